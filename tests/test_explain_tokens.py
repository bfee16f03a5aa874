"""Explain reads the right tokens for every pooling, and takes models as users hold them (issue 11, Explain)."""

from __future__ import annotations

import warnings

import pytest
import timm
import torch
from torch import nn

import vision_attn
from vision_attn.explain import (
    AttentionRecorder,
    NotApplicableError,
    attention_rollout,
    explain,
    gradient_rollout,
    last_layer_attention,
    token_pool,
    token_pool_weights,
    unwrap_model,
)
from vision_attn.explain._common import normalize_maps, upsample_maps
from vision_attn.explain.cam import default_target_layer, grad_cam
from vision_attn.layers import ConvTokenizer

TOKEN_METHODS = ("rollout", "gradient_rollout", "attention")


def _avg_vit() -> nn.Module:
    """Average pooling with a class token and two register tokens: the head reads none of the prefix rows."""
    torch.manual_seed(0)
    return vision_attn.create_model(
        "va_vit_tiny_patch4_32", depth=2, num_classes=4, global_pool="avg", reg_tokens=2
    ).eval()


def _cct() -> nn.Module:
    """CCT sequence pooling; a scaled pooling layer makes the pooling weights far from uniform."""
    torch.manual_seed(0)
    model = vision_attn.create_model("va_cct_2_3x2_32", num_classes=4).eval()
    with torch.no_grad():
        model.attn_pool.attention_pool.weight.mul_(40.0)
    return model


def _distilled() -> nn.Module:
    """timm's distilled DeiT with a distillation token unlike the class token (so their rows differ) and a silent
    class head (so the logits come from the distillation token alone, as a reading of row 0 would miss)."""
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_distilled_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=4)
    with torch.no_grad():
        model.dist_token.normal_(0.0, 3.0)
        model.head.weight.zero_()
    return model.eval()


def _conv_stem_cls() -> nn.Module:
    """A ViT with a convolutional stem and a class token (the shape of the lead's planned default model)."""
    torch.manual_seed(0)
    return vision_attn.create_model(
        "va_vit_tiny_patch4_32", depth=2, num_classes=4, embed_layer=ConvTokenizer,
        embed_args=dict(kernel_size=3, num_conv_layers=2),
    ).eval()  # fmt: skip


# (model factory, pool it must be read as, the reading an unaware rollout would take instead)
CASES = {
    "avg+cls+registers": (_avg_vit, "avg", "token"),
    "cct seq": (_cct, "seq", "avg"),
    "deit distilled": (_distilled, "distilled", "token"),
    "conv stem + cls": (_conv_stem_cls, "token", "avg"),
}


def _reference(model: nn.Module, x: torch.Tensor, method: str, pool: str) -> torch.Tensor:
    """The map of ``method`` read with ``pool``, from the pure functions (min-max scaled, upsampled like explain)."""
    prefix = model.num_prefix_tokens
    with torch.enable_grad(), AttentionRecorder(model, detach=False) as recorder:
        logits = model(x)
    attentions, sequence = recorder.attentions, recorder.pool_weights
    sequence = None if sequence is None else sequence.detach()
    if method == "gradient_rollout":  # of the predicted classes' logits
        score = logits.gather(1, logits.argmax(dim=1, keepdim=True)).sum()
        gradients = torch.autograd.grad(score, attentions)
        # the layer maps as explain keeps them: relu(∇A ⊙ A) averaged over heads in the model's dtype (float32),
        # passed as one head with unit gradients; the rollout itself runs in float64 (an average-pooled map is a
        # small part on a uniform one, which min-max scaling magnifies)
        fused = [
            (g * a.detach()).clamp(min=0).mean(dim=1, keepdim=True).double()
            for a, g in zip(attentions, gradients, strict=True)
        ]
        raw = gradient_rollout(
            fused,
            [torch.ones_like(f) for f in fused],
            prefix,
            pool_weights=token_pool_weights(pool, fused[0].shape[-1], prefix, sequence),
        )
        return _scaled(raw, x)
    attentions = [a.detach().mean(dim=1, keepdim=True).double() for a in attentions]  # heads fused as explain does
    weights = token_pool_weights(pool, attentions[0].shape[-1], prefix, sequence)
    if method == "rollout":
        raw = attention_rollout(attentions, prefix, pool_weights=weights)
    else:
        raw = last_layer_attention(attentions, prefix, pool_weights=weights)
    return _scaled(raw, x)


def _scaled(raw: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Min-max scaled and upsampled like explain (the offset dropped first, so float32 keeps the small part)."""
    raw = raw - raw.flatten(1).amin(dim=1)[:, None, None]
    return normalize_maps(upsample_maps(raw, tuple(x.shape[-2:])))


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_token_methods_read_the_tokens_the_head_pools(case: str) -> None:
    factory, right, wrong = CASES[case]
    model = factory()
    assert token_pool(model) == right
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    for method in TOKEN_METHODS:
        maps = explain(model, x, method)
        torch.testing.assert_close(maps, _reference(model, x, method, right), atol=1e-5, rtol=0)
        gap = (maps - _reference(model, x, method, wrong)).abs().amax(dim=(1, 2))
        assert (gap > 0.05).all(), f"{method}: the {wrong!r} reading is indistinguishable ({gap.tolist()})"


def test_pool_weights_pure_hand_computed() -> None:
    # 1 class token + 4 patches; the class row attends to patch 0, every patch row to patch 3
    attn = torch.zeros(1, 1, 5, 5)
    attn[0, 0, 0, 1] = 1.0
    attn[0, 0, 1:, 4] = 1.0
    token = attention_rollout([attn], 1, grid_size=(2, 2), pool_weights=token_pool_weights("token", 5, 1))
    avg = attention_rollout([attn], 1, grid_size=2, pool_weights=token_pool_weights("avg", 5, 1))
    # Â = 0.5·A + 0.5·I: class row -> [0.5, 0.5, 0, 0, 0]; patch rows r -> 0.5 at r and 0.5 at patch 3
    torch.testing.assert_close(token, torch.tensor([[[0.5, 0.0], [0.0, 0.0]]]))
    torch.testing.assert_close(avg, torch.tensor([[[0.125, 0.125], [0.125, 0.625]]]))
    assert attention_rollout([attn], 1, grid_size=2).equal(token)  # the default stays the class row
    seq = token_pool_weights("seq", 5, 1, torch.tensor([[0.0, 0.0, 1.0, 0.0]]))
    torch.testing.assert_close(seq, torch.tensor([[0.0, 0.0, 0.0, 1.0, 0.0]]))
    torch.testing.assert_close(token_pool_weights("distilled", 6, 2), torch.tensor([0.5, 0.5, 0, 0, 0, 0]))
    torch.testing.assert_close(token_pool_weights("avg_all", 4, 0), torch.full((4,), 0.25))
    with pytest.raises(ValueError, match=r"pool 'distilled' reads 2 prefix token\(s\).*num_prefix_tokens is 1"):
        token_pool_weights("distilled", 5, 1)
    with pytest.raises(ValueError, match=r"sequence_weights weigh 3 tokens, but there are 4 patch tokens"):
        token_pool_weights("seq", 5, 1, torch.rand(1, 3))


def test_sequence_pool_weights_are_recorded_from_outside() -> None:
    model = _cct()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), AttentionRecorder(model) as rec:
        logits = model(x)
        tokens = model.forward_features(x)
        expected = model.attn_pool.attention_pool(tokens[:, model.num_prefix_tokens :]).softmax(dim=1)[..., 0]
    torch.testing.assert_close(rec.pool_weights, expected)
    assert rec.kinds["attn_pool.weights_tap"] == "pool"
    assert rec.pool_weights.shape == (2, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), logits)  # the tap changes nothing
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert not any(isinstance(v, torch.Tensor) for m in model.modules() for v in vars(m).values())
    assert "weights_tap" not in "".join(model.state_dict())  # same weights file as before


def test_timm_pools_without_a_row_reading_are_refused() -> None:
    for pool in ("max", "avgmax"):  # attention pooling ('map') is read: tests/test_families.py
        model = timm.create_model(
            "vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, num_classes=3, global_pool=pool
        ).eval()
        with pytest.raises(NotApplicableError, match=f"global_pool={pool!r}"):
            explain(model, torch.randn(1, 3, 32, 32), "rollout")
        assert explain(model, torch.randn(1, 3, 32, 32), "gradcam").shape == (1, 32, 32)
    include = timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, num_classes=3, global_pool="avg", reg_tokens=2,
        pool_include_prefix=True,
    )  # fmt: skip
    assert token_pool(include) == "avg_all"


# --- models as users hold them -------------------------------------------------------------------------------------


def _reg_vit() -> nn.Module:
    torch.manual_seed(0)
    return vision_attn.create_model("va_vit_tiny_patch4_32", depth=2, num_classes=4, reg_tokens=4).eval()


@pytest.mark.parametrize("wrap", ["DataParallel", "compile"])
def test_wrapped_models_are_explained_as_the_model_inside(wrap: str) -> None:
    model = _reg_vit()
    wrapped = nn.DataParallel(model) if wrap == "DataParallel" else torch.compile(model)
    assert unwrap_model(wrapped) is model
    x = torch.randn(2, 3, 32, 32)
    for method in (*TOKEN_METHODS, "gradcam"):
        torch.testing.assert_close(explain(wrapped, x, method), explain(model, x, method), atol=1e-6, rtol=0)
    assert default_target_layer(unwrap_model(wrapped), x) is model.blocks[-1].norm1  # not a k_norm
    by_name = explain(wrapped, x, "gradcam", target_layers=["blocks.0.norm1"])
    torch.testing.assert_close(by_name, explain(model, x, "gradcam", target_layers=[model.blocks[0].norm1]))


def test_distributed_data_parallel_is_unwrapped(tmp_path) -> None:
    import torch.distributed as dist

    model = _reg_vit()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(model)
        x = torch.randn(2, 3, 32, 32)
        assert unwrap_model(ddp) is model
        for method in ("rollout", "gradcam"):
            torch.testing.assert_close(explain(ddp, x, method), explain(model, x, method))
    finally:
        dist.destroy_process_group()


def test_token_gradcam_drops_every_prefix_token() -> None:
    for model in (_reg_vit(), _distilled(), _cct()):  # 5, 2 and 0 prefix tokens
        x = torch.randn(2, 3, 32, 32)
        layer = model.blocks[-1].norm1
        grid = model.patch_embed.grid_size
        expected, _ = grad_cam(model, x, None, [layer], num_prefix_tokens=model.num_prefix_tokens, grid_size=grid)
        torch.testing.assert_close(explain(model, x, "gradcam"), normalize_maps(expected), atol=1e-6, rtol=0)
        with pytest.raises(ValueError, match="does not fit the grid"):  # a miscounted prefix cannot slip through
            grad_cam(model, x, None, [layer], num_prefix_tokens=model.num_prefix_tokens + 1, grid_size=grid)


def test_grid_size_int_and_checked_against_the_model() -> None:
    model = _reg_vit()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(explain(model, x, "rollout", grid_size=8), explain(model, x, "rollout"))
    torch.testing.assert_close(explain(model, x, "gradcam", grid_size=(8, 8)), explain(model, x, "gradcam"))
    with pytest.raises(ValueError, match=r"grid_size \(4, 16\) does not match the token grid \(8, 8\)"):
        explain(model, x, "rollout", grid_size=(4, 16))
    with pytest.raises(ValueError, match=r"num_prefix_tokens 1 does not match .* 5 prefix tokens"):
        explain(model, x, "gradient_rollout", num_prefix_tokens=1)
    with pytest.raises(ValueError, match="grid_size must be a positive int"):
        explain(model, x, "attention", grid_size=(8, 0))


def test_inputs_are_cast_to_the_model_dtype() -> None:
    model = _reg_vit()
    x = torch.randn(2, 3, 32, 32)
    reference = {m: explain(model, x, m) for m in ("rollout", "gradient_rollout", "gradcam")}
    model.double()
    for method, expected in reference.items():
        maps = explain(model, x, method)
        assert maps.dtype == torch.float32
        torch.testing.assert_close(maps, expected, atol=1e-4, rtol=0)
    model.to(torch.bfloat16)
    maps = explain(model, x, "rollout")
    assert torch.isfinite(maps).all()
    assert (maps - reference["rollout"]).abs().mean() < 0.1


def test_non_finite_logits_are_an_error() -> None:
    model = _reg_vit()
    with torch.no_grad():
        model.head.bias[1] = float("inf")
    x = torch.randn(3, 3, 32, 32)
    for method in ("rollout", "gradient_rollout", "attention", "gradcam"):
        with pytest.raises(ValueError, match=r"NaN or Inf logits for images \[0, 1, 2\]"):
            explain(model, x, method)


def test_models_without_classifier_are_refused_for_class_target_methods() -> None:
    model = vision_attn.create_model("va_vit_tiny_patch4_32", depth=1, num_classes=0).eval()
    x = torch.randn(2, 3, 32, 32)
    for method in ("gradient_rollout", "gradcam", "gradcam++", "layercam"):
        with pytest.raises(NotApplicableError, match="num_classes=0"):
            explain(model, x, method)
    assert explain(model, x, "rollout").shape == (2, 32, 32)  # class-agnostic: fine
    from vision_attn.explain import deletion_auc

    with pytest.raises(NotApplicableError, match="num_classes=0"):
        deletion_auc(model, x, torch.rand(2, 32, 32))


def test_train_mode_warns_explains_in_eval_and_restores() -> None:
    model = vision_attn.create_model("va_vit_tiny_patch4_32", depth=2, num_classes=4, drop_rate=0.5,
                                     attn_drop_rate=0.5, proj_drop_rate=0.5).eval()  # fmt: skip
    x = torch.randn(2, 3, 32, 32)
    expected = {m: explain(model, x, m) for m in ("rollout", "gradient_rollout", "gradcam")}
    model.train()
    model.blocks[0].eval()  # a submodule kept in eval mode must come back in eval mode
    for method, maps in expected.items():
        with pytest.warns(UserWarning, match="is in train mode; it is explained in eval mode"):
            torch.testing.assert_close(explain(model, x, method), maps)
        assert model.training
        assert not model.blocks[0].training
        assert model.blocks[1].training
    cnn = timm.create_model("resnet10t", num_classes=3).train()
    stats = [b.clone() for b in cnn.buffers()]
    with pytest.warns(UserWarning, match="train mode"):
        explain(cnn, torch.randn(2, 3, 32, 32), "gradcam")
    assert all(torch.equal(a, b) for a, b in zip(stats, cnn.buffers(), strict=True))  # BatchNorm untouched
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        explain(model.eval(), x)  # eval mode: no warning


def test_str_target_is_a_type_error() -> None:
    model = _reg_vit()
    x = torch.randn(2, 3, 32, 32)
    for target in ("3", ["1", "2"], 1.0, [1, 2.5]):
        for method in ("gradient_rollout", "rollout", "gradcam"):
            with pytest.raises(TypeError, match=r"target must"):
                explain(model, x, method, target=target)


@pytest.mark.parametrize("mask", [None, "bool", "additive", "bias"])
@pytest.mark.parametrize("rows", ["all", "some", "none"])
def test_attention_backward_equals_autograd_with_the_layer_map(mask: str | None, rows: str) -> None:
    """Gradient rollout's attention backward (one pass: ∇q, ∇k, ∇v and mean_h(relu(∇A ⊙ A))) equals autograd through
    the explicit ops, for fewer keys than queries (spatially reduced keys), masks (a learned additive one gets its
    gradient), a last partial block, and output gradients on some query rows only (a class token's readout) or on
    none."""
    from vision_attn.explain.capture import attention_backward

    torch.manual_seed(0)
    q = torch.randn(2, 3, 37, 8, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, 3, 29, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))
    attn_mask = None
    if mask == "bool":
        attn_mask = torch.rand(37, 29) > 0.3
        attn_mask[:, 0] = True  # every query attends somewhere
    elif mask == "additive":  # a learned bias per head and query (its gradient is checked too)
        attn_mask = torch.randn(1, 3, 37, 29, dtype=torch.float64, requires_grad=True)
    elif mask == "bias":  # a learned bias per head, broadcast over images and queries
        attn_mask = torch.randn(3, 1, 29, dtype=torch.float64, requires_grad=True)
    scores = (q * 8**-0.5) @ k.transpose(-2, -1)
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, -torch.inf) if mask == "bool" else scores + attn_mask
    probs = scores.softmax(dim=-1)
    probs.retain_grad()
    out = probs @ v
    grad_out = torch.randn_like(out)
    if rows == "some":
        grad_out[:, :, 3:30] = 0
        grad_out[0, 1, 10] = 1.0  # one row with a gradient in one image and head only
    elif rows == "none":  # an output the target does not depend on: every gradient and the map are zero
        grad_out.zero_()
    out.backward(grad_out)
    learned = attn_mask is not None and attn_mask.requires_grad
    mask_grad = torch.zeros_like(attn_mask) if learned else None
    grads = attention_backward(
        q.detach(), k.detach(), v.detach(), out.detach(), grad_out, attn_mask, block=16, mask_grad=mask_grad
    )
    expected = (q.grad, k.grad, v.grad, (probs.grad * probs.detach()).clamp(min=0).mean(dim=1))
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    if learned:
        torch.testing.assert_close(mask_grad, attn_mask.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "vit_relpos_small_patch16_224"])
def test_gradient_rollout_runs_each_attention_backward_once(name: str) -> None:
    """Above the first attention call, gradient rollout's maps come from the backward pass itself: no fused
    attention backward runs, and the maps equal those recomputed from each call's output gradient; also where the
    attention mask is a learned relative-position bias (it gets its gradient from the same pass)."""
    from vision_attn.explain import capture

    torch.manual_seed(0)
    model = timm.create_model(name, img_size=64, depth=3, embed_dim=48, num_heads=3, num_classes=5).eval()
    x = torch.randn(2, 3, 64, 64)
    calls = []
    original = capture.attention_backward
    try:
        capture.attention_backward = lambda *a, **k: calls.append(a[3] is not None) or original(*a, **k)
        with torch.autograd.profiler.profile() as prof:
            maps = explain(model, x, "gradient_rollout")
    finally:
        capture.attention_backward = original
    assert calls == [True, True, False]  # backward passes of the blocks above the first one; then its map
    assert not [e for e in prof.function_events if "flash_attention" in e.name and "backward" in e.name]
    reference = _reference(model, x, "gradient_rollout", "token" if model.num_prefix_tokens else "avg")
    torch.testing.assert_close(maps, reference, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("head_fusion", ["mean", "max", "min"])
@pytest.mark.parametrize("mask", [None, "bool", "additive"])
def test_fused_attention_equals_the_explicit_ops(head_fusion: str, mask: str | None) -> None:
    """Rollout's blockwise attention: the output of the explicit ops and their probabilities fused over heads, over
    fewer keys than queries, masks and a last partial block."""
    from vision_attn.explain.capture import explicit_attention, fused_attention

    torch.manual_seed(0)
    q = torch.randn(2, 3, 37, 8, dtype=torch.float64)
    k, v = (torch.randn(2, 3, 29, 8, dtype=torch.float64) for _ in range(2))
    attn_mask = {None: None, "bool": torch.rand(37, 29) > 0.3, "additive": torch.randn(1, 3, 37, 29).double()}[mask]
    if mask == "bool":
        attn_mask[:, 0] = True
    out, fused = fused_attention(q, k, v, attn_mask, head_fusion=head_fusion, block=16)
    expected_out, probs = explicit_attention(q, k, v, attn_mask)
    reduce = {"mean": torch.mean, "max": torch.amax, "min": torch.amin}[head_fusion]
    torch.testing.assert_close(out, expected_out, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fused, reduce(probs, dim=1), rtol=1e-10, atol=1e-12)
