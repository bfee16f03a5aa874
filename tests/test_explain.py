"""Attention capture, rollout, gradient rollout, Grad-CAM and explain() (issue 6)."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

import vision_attn
from vision_attn.explain import (
    HEAD_FUSIONS,
    AttentionRecorder,
    attention_gradients,
    attention_rollout,
    explain,
    gradient_rollout,
    list_methods,
)
from vision_attn.layers.attention_tap import AttentionTap


def _random_attentions(batch: int, heads: int, tokens: int, layers: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, tokens, tokens, generator=gen).softmax(dim=-1) for _ in range(layers)]


def _no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def _fused_flags(model: nn.Module) -> list[bool]:
    return [m.fused_attn for m in model.modules() if hasattr(m, "fused_attn")]


@pytest.fixture(scope="module")
def tiny_vit() -> nn.Module:
    torch.manual_seed(0)
    return vision_attn.create_model("va_vit_tiny_patch4_32", depth=2, num_classes=5).eval()


@pytest.fixture(scope="module")
def tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("resnet10t", num_classes=5).eval()


# --- rollout: pure functions -------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_prefix_tokens", [0, 1])
def test_identity_attention_gives_uniform_map(num_prefix_tokens: int) -> None:
    tokens = num_prefix_tokens + 16
    eye = torch.eye(tokens).expand(2, 3, tokens, tokens)
    out = attention_rollout([eye, eye, eye], num_prefix_tokens=num_prefix_tokens)
    assert out.shape == (2, 4, 4)
    assert torch.allclose(out, out.flatten(1)[:, :1, None].expand_as(out))


def test_rollout_hand_computed_two_layers() -> None:
    a1 = torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    a2 = torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    layers = [a1[None, None], a2[None, None]]
    # Â1 = [[.5,.5,0],[0,1,0],[0,0,1]], Â2 = [[.5,0,.5],[.5,.5,0],[0,.5,.5]]; R = Â2 Â1
    cls_map = attention_rollout(layers, num_prefix_tokens=1, grid_size=(1, 2))
    torch.testing.assert_close(cls_map, torch.tensor([[[0.25, 0.5]]]))
    mean_map = attention_rollout(layers, num_prefix_tokens=0, grid_size=(1, 3))  # mean of R's rows
    torch.testing.assert_close(mean_map, torch.tensor([[[1 / 6, 1 / 2, 1 / 3]]]))
    from_second = attention_rollout(layers, num_prefix_tokens=1, grid_size=(1, 2), start_layer=1)
    torch.testing.assert_close(from_second, torch.tensor([[[0.0, 0.5]]]))


def test_rollout_discard_ratio_zeroes_lowest_patch_entries() -> None:
    attn = torch.full((1, 1, 5, 5), 0.2)
    attn[0, 0, 0] = torch.tensor([0.2, 0.1, 0.3, 0.15, 0.25])
    out = attention_rollout([attn], num_prefix_tokens=1, discard_ratio=0.5)
    # the 2 lowest patch entries (0.1, 0.15) are zeroed; row 0 = [.6, 0, .15, 0, .125] / .875
    torch.testing.assert_close(out, torch.tensor([[[0.0, 0.15 / 0.875], [0.0, 0.125 / 0.875]]]))


@pytest.mark.parametrize("head_fusion", HEAD_FUSIONS)
def test_rollout_batched_equals_per_sample_loop(head_fusion: str) -> None:
    attentions = _random_attentions(batch=4, heads=3, tokens=17, layers=3)
    batched = attention_rollout(attentions, head_fusion=head_fusion, discard_ratio=0.25)
    looped = torch.cat(
        [attention_rollout([a[i : i + 1] for a in attentions], head_fusion=head_fusion, discard_ratio=0.25)
         for i in range(4)]
    )  # fmt: skip
    torch.testing.assert_close(batched, looped)
    grads = _random_attentions(batch=4, heads=3, tokens=17, layers=3, seed=1)
    batched = gradient_rollout(attentions, grads)
    looped = torch.cat([gradient_rollout([a[i : i + 1] for a in attentions], [g[i : i + 1] for g in grads])
                        for i in range(4)])  # fmt: skip
    torch.testing.assert_close(batched, looped)


def test_gradient_rollout_hand_computed() -> None:
    attn = torch.tensor([[0.2, 0.5, 0.3], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])[None, None]
    grad = torch.tensor([[1.0, 2.0, -1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])[None, None]
    # Ā = clamp(∇A ⊙ A, 0) = [[.2, 1, 0], [0, 1, 0], [0, 0, 1]]; R = I + Ā; row 0 over patches = [1, 0]
    out = gradient_rollout([attn], [grad], num_prefix_tokens=1, grid_size=(1, 2))
    torch.testing.assert_close(out, torch.tensor([[[1.0, 0.0]]]))
    # a second layer: R = R + Ā @ R with R = I + Ā from above
    two = gradient_rollout([attn, attn], [grad, grad], num_prefix_tokens=1, grid_size=(1, 2))
    bar = torch.tensor([[0.2, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    r1 = torch.eye(3) + bar
    torch.testing.assert_close(two, (r1 + bar @ r1)[0, 1:].reshape(1, 1, 2))


@pytest.mark.parametrize(("num_prefix_tokens", "grid_size"), [(5, (2, 3)), (2, (4, 4)), (1, (3, 5)), (0, (2, 4))])
def test_prefix_tokens_and_non_square_grids(num_prefix_tokens: int, grid_size: tuple[int, int]) -> None:
    tokens = num_prefix_tokens + grid_size[0] * grid_size[1]
    target_patch = 4
    attn = torch.full((1, 2, tokens, tokens), 1.0 / tokens)
    attn[:, :, :, :] = 0.0
    attn[:, :, :, num_prefix_tokens + target_patch] = 1.0  # every token attends to one patch
    out = attention_rollout([attn], num_prefix_tokens=num_prefix_tokens, grid_size=grid_size)
    assert out.shape == (1, *grid_size)
    assert int(out.flatten(1).argmax()) == target_patch
    grads = gradient_rollout([attn], [torch.ones_like(attn)], num_prefix_tokens, grid_size)
    assert int(grads.flatten(1).argmax()) == target_patch


def test_rollout_bad_input_errors() -> None:
    good = _random_attentions(2, 2, 17, 2)
    with pytest.raises(ValueError, match="does not match"):
        attention_rollout([good[0], torch.rand(2, 2, 10, 10)])
    with pytest.raises(ValueError, match="4-D"):
        attention_rollout([torch.rand(2, 17, 17)])
    with pytest.raises(TypeError, match="list of"):
        attention_rollout(torch.rand(2, 2, 17, 17))
    with pytest.raises(ValueError, match="fit no square grid"):
        attention_rollout(_random_attentions(1, 1, 7, 1))
    with pytest.raises(ValueError, match=r"grid_size \(2, 3\) holds 6"):
        attention_rollout(good, grid_size=(2, 3))
    for ratio in (1.0, -0.1):
        with pytest.raises(ValueError, match=r"discard_ratio must be a float in \[0, 1\)"):
            attention_rollout(good, discard_ratio=ratio)
    with pytest.raises(ValueError, match=r"head_fusion 'median' is unknown; expected one of \('mean', 'max', 'min'\)"):
        attention_rollout(good, head_fusion="median")
    with pytest.raises(ValueError, match="start_layer"):
        attention_rollout(good, start_layer=2)
    with pytest.raises(ValueError, match="gradients has 1 layers"):
        gradient_rollout(good, good[:1])


# --- capture -------------------------------------------------------------------------------------------------------


def test_recorder_fused_on_outputs_unchanged_and_restored(tiny_vit: nn.Module) -> None:
    for m in tiny_vit.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = True
    tiny_vit.blocks[1].attn.fused_attn = False  # a mixed setting must come back as it was
    flags = _fused_flags(tiny_vit)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        before = tiny_vit(x)
        with AttentionRecorder(tiny_vit) as rec:
            assert not any(_fused_flags(tiny_vit))
            inside = tiny_vit(x)
        after = tiny_vit(x)
    assert _fused_flags(tiny_vit) == flags
    assert _no_hooks(tiny_vit)
    torch.testing.assert_close(inside, before, atol=1e-5, rtol=0)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)
    assert len(rec.attentions) == 2
    for attn in rec.attentions:
        assert attn.shape == (3, 3, 65, 65)
        assert not attn.requires_grad
        torch.testing.assert_close(attn.sum(-1), torch.ones(3, 3, 65))
    assert list(rec.maps) == ["blocks.0.attn", "blocks.1.attn"]
    assert set(rec.kinds.values()) == {"attention"}


def test_recorder_restores_after_exception(tiny_vit: nn.Module) -> None:
    tiny_vit.blocks[0].attn.fused_attn = True
    tiny_vit.blocks[1].attn.fused_attn = True

    def fail_inside() -> None:
        with AttentionRecorder(tiny_vit):
            tiny_vit(torch.randn(1, 3, 32, 32))
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        fail_inside()
    assert _fused_flags(tiny_vit) == [True, True]
    assert _no_hooks(tiny_vit)
    with pytest.raises(ValueError, match="channels"), AttentionRecorder(tiny_vit):
        tiny_vit(torch.randn(1, 1, 32, 32))
    assert _fused_flags(tiny_vit) == [True, True]
    assert _no_hooks(tiny_vit)


def test_recorder_keeps_graph_without_detach(tiny_vit: nn.Module) -> None:
    with AttentionRecorder(tiny_vit, detach=False) as rec:
        logits = tiny_vit(torch.randn(2, 3, 32, 32))
    (grad,) = torch.autograd.grad(logits[:, 0].sum(), rec.attentions[-1])
    assert grad.shape == rec.attentions[-1].shape
    assert grad.abs().sum() > 0
    assert all(p.grad is None for p in tiny_vit.parameters())


def test_recorder_records_latest_forward_only(tiny_vit: nn.Module) -> None:
    with torch.no_grad(), AttentionRecorder(tiny_vit) as rec:
        tiny_vit(torch.randn(4, 3, 32, 32))
        tiny_vit(torch.randn(1, 3, 32, 32))
    assert [a.shape[0] for a in rec.attentions] == [1, 1]


@pytest.mark.parametrize(
    ("name", "kwargs", "size", "num_prefix_tokens"),
    [
        ("vit_tiny_patch16_224", {"depth": 2}, (224, 224), 1),
        ("deit_tiny_distilled_patch16_224", {"depth": 2}, (224, 224), 2),
        ("vit_tiny_patch16_224", {"depth": 2, "reg_tokens": 4, "img_size": 64}, (64, 64), 5),
        ("vit_tiny_patch16_224", {"depth": 1, "reg_tokens": 4, "img_size": 64, "dynamic_img_size": True}, (48, 80), 5),
        ("eva02_tiny_patch14_224", {"depth": 1, "img_size": 56}, (56, 56), 1),  # rotary embeddings, SwiGLU
    ],
)
def test_timm_vits(name: str, kwargs: dict, size: tuple[int, int], num_prefix_tokens: int) -> None:
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=4, **kwargs).eval()
    assert model.num_prefix_tokens == num_prefix_tokens
    for block in model.blocks:
        block.attn.fused_attn = True  # capture must work from the fused (SDPA) path
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        before = model(x)
        with AttentionRecorder(model) as rec:
            inside = model(x)
    grid = model.patch_embed.dynamic_feat_size(size)
    tokens = num_prefix_tokens + grid[0] * grid[1]
    assert [a.shape for a in rec.attentions] == [(2, 3, tokens, tokens)] * kwargs["depth"]
    torch.testing.assert_close(inside, before, atol=1e-5, rtol=0)
    assert all(_fused_flags(model))
    assert _no_hooks(model)
    for method in ("rollout", "gradient_rollout", "attention"):
        maps = explain(model, x, method=method)
        assert maps.shape == (2, *size)
        assert maps.min() >= 0
        assert maps.max() <= 1
    assert _no_hooks(model)
    assert all(p.grad is None for p in model.parameters())
    if not kwargs.get("dynamic_img_size"):
        with pytest.raises(ValueError, match="spatial size"):
            explain(model, torch.randn(1, 3, size[0] + 16, size[1]))


@pytest.mark.parametrize("name", [n for n in vision_attn.list_models() if "_vit" in n or "_cct" in n])
def test_every_registered_vit(name: str) -> None:
    torch.manual_seed(0)
    model = vision_attn.create_model(name, depth=1, num_classes=3).eval()
    size = tuple(model.patch_embed.img_size)
    x = torch.randn(2, model.in_chans, *size)
    flags = _fused_flags(model)
    for method in ("rollout", "gradient_rollout"):
        maps = explain(model, x, method=method)
        assert maps.shape == (2, *size)
        assert torch.isfinite(maps).all()
    assert _no_hooks(model)
    assert _fused_flags(model) == flags


# --- explain() -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["rollout", "gradient_rollout", "attention", "gradcam", "layercam"])
def test_explain_batched_equals_loop(tiny_vit: nn.Module, method: str) -> None:
    x = torch.randn(3, 3, 32, 32)
    batched = explain(tiny_vit, x, method=method, target=[0, 1, 2])
    looped = torch.cat([explain(tiny_vit, x[i : i + 1], method=method, target=i) for i in range(3)])
    assert batched.shape == (3, 32, 32)
    torch.testing.assert_close(batched, looped, atol=1e-5, rtol=1e-4)


def test_target_class_changes_gradient_maps(tiny_vit: nn.Module, tiny_cnn: nn.Module) -> None:
    x = torch.randn(2, 3, 32, 32)
    atts, grads0, targets = attention_gradients(tiny_vit, x, target=0)
    _, grads1, _ = attention_gradients(tiny_vit, x, target=1)
    assert targets.tolist() == [0, 0]
    assert not torch.allclose(gradient_rollout(atts, grads0), gradient_rollout(atts, grads1))
    for model, method in ((tiny_vit, "gradient_rollout"), (tiny_cnn, "gradcam")):
        assert not torch.allclose(explain(model, x, method, target=0), explain(model, x, method, target=3))
    rollout0 = explain(tiny_vit, x, "rollout", target=0)  # class-agnostic
    torch.testing.assert_close(rollout0, explain(tiny_vit, x, "rollout", target=1))


def test_gradcam_matches_pytorch_grad_cam(tiny_cnn: nn.Module) -> None:
    from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, LayerCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    x = torch.randn(2, 3, 32, 32)
    layer = tiny_cnn.layer2
    for method, cam_cls in (("gradcam", GradCAM), ("gradcam++", GradCAMPlusPlus), ("layercam", LayerCAM)):
        ours = explain(tiny_cnn, x, method=method, target=[1, 2], target_layers=[layer])
        with cam_cls(model=tiny_cnn, target_layers=[layer]) as cam:
            theirs = torch.from_numpy(cam(x, targets=[ClassifierOutputTarget(1), ClassifierOutputTarget(2)]))
        tiny_cnn.zero_grad(set_to_none=True)
        torch.testing.assert_close(ours, theirs.float(), atol=1e-4, rtol=0)
    assert _no_hooks(tiny_cnn)


def test_gradcam_default_layer_and_no_side_effects(tiny_cnn: nn.Module) -> None:
    tiny_cnn.train()
    try:
        with pytest.warns(UserWarning, match="train mode"):  # explained in eval mode, then put back
            maps = explain(tiny_cnn, torch.randn(2, 3, 64, 64), method="gradcam")
        assert tiny_cnn.training, "explain must leave the model in the mode it found it in"
    finally:
        tiny_cnn.eval()
    assert maps.shape == (2, 64, 64)
    assert maps.amax(dim=(1, 2)).eq(1).all()
    assert _no_hooks(tiny_cnn)
    assert all(p.grad is None for p in tiny_cnn.parameters())


class _SpatialGateNet(nn.Module):
    """A CNN whose spatial gate is marked by an AttentionTap, like the attention CNNs of issue 4."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.gate = nn.Conv2d(4, 1, 1)
        self.tap = AttentionTap("spatial")
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.conv(x)
        feat = feat * self.tap(self.gate(feat).sigmoid())
        return self.head(feat.mean(dim=(2, 3)))


def test_spatial_maps_of_cnn_attention_modules() -> None:
    model = _SpatialGateNet().eval()
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad(), AttentionRecorder(model) as rec:
        model(x)
    assert rec.kinds == {"tap": "spatial"}
    assert rec.attentions == []
    expected = model.gate(model.conv(x)).sigmoid()[:, 0]
    expected = (expected - expected.amin(dim=(1, 2), keepdim=True)) / (
        expected.amax(dim=(1, 2), keepdim=True) - expected.amin(dim=(1, 2), keepdim=True)
    )
    torch.testing.assert_close(explain(model, x, method="spatial"), expected.detach())
    with pytest.raises(ValueError, match="no token-attention modules"):
        explain(model, x, method="rollout")


class _NonLocalNet(nn.Module):
    """A CNN with one non-local (self-attention over positions) layer whose probabilities an AttentionTap marks."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.tap = AttentionTap("attention")
        self.head = nn.Linear(4, 3)

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.conv(x).flatten(2).transpose(1, 2)  # B, C, h, w -> B, hw, C
        return (tokens @ tokens.transpose(1, 2)).softmax(dim=-1)[:, None]  # B, 1, hw, hw

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.conv(x).flatten(2).transpose(1, 2)
        out = self.tap(self.probabilities(x))[:, 0] @ tokens
        return self.head(out.mean(dim=1))


def test_spatial_maps_of_conv_attention_follow_image_aspect() -> None:
    model = _NonLocalNet().eval()
    x = torch.randn(2, 1, 8, 12)
    received = model.probabilities(x).mean(dim=(1, 2)).reshape(2, 8, 12).detach()
    low, high = received.amin(dim=(1, 2), keepdim=True), received.amax(dim=(1, 2), keepdim=True)
    torch.testing.assert_close(explain(model, x, method="spatial"), (received - low) / (high - low))


def test_explain_bad_input(tiny_vit: nn.Module, tiny_cnn: nn.Module) -> None:
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match=r"method 'occlusion' is unknown; expected one of \('rollout'"):
        explain(tiny_vit, x, method="occlusion")
    with pytest.raises(ValueError, match="no token-attention modules"):
        explain(tiny_cnn, torch.randn(1, 3, 64, 64), method="rollout")
    with pytest.raises(ValueError, match="no spatial attention maps"):
        explain(tiny_vit, x, method="spatial")
    with pytest.raises(ValueError, match="channels"):
        explain(tiny_vit, torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="spatial size 48x48"):
        explain(tiny_vit, torch.randn(1, 3, 48, 48))
    with pytest.raises(TypeError, match="floating dtype"):
        explain(tiny_vit, torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(TypeError, match=r"unknown options \['discard'\]"):
        explain(tiny_vit, x, method="rollout", discard=0.5)
    with pytest.raises(ValueError, match=r"target .* out of range"):
        explain(tiny_vit, x, method="gradient_rollout", target=7)
    with pytest.raises(ValueError, match="head_fusion 'sum' is unknown"):
        explain(tiny_vit, x, method="rollout", head_fusion="sum")
    swin = timm.create_model(
        "swin_tiny_patch4_window7_224", img_size=32, window_size=4, embed_dim=12, depths=(1, 1), num_heads=(1, 1),
        global_pool="max",
    ).eval()  # fmt: skip
    with pytest.raises(ValueError, match="pools its last tokens by 'max'"):
        explain(swin, torch.randn(1, 3, 32, 32), method="rollout")
    assert set(list_methods()) >= {"rollout", "gradient_rollout", "attention", "gradcam", "spatial", "random"}
