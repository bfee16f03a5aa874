"""Attention maps for every timm transformer family (issue 28): the family rules against dense references built by
explicit loops, attention-pool and class-attention readouts, the model left as found, refusals with the reason, and
the family x method sweep of ``benchmarks/timm_coverage.py`` (a representative subset by default, every family with
``-m slow``)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

import vision_attn
from vision_attn.explain import (
    AttentionRecorder,
    NotApplicableError,
    applicable_methods,
    explain,
    list_methods,
)
from vision_attn.explain.families import find_adapter
from vision_attn.explain.flow import flow_attention, flow_gradient_rollout, flow_pool_map, flow_rollout
from vision_attn.explain.tokens import capture_token_flow

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from timm_coverage import FAMILIES, liven, run_family, unlisted_modules  # noqa: E402  (a script folder)

GENERATOR_SEED = 3


def _images(size: int, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(GENERATOR_SEED))


def _model(name: str) -> nn.Module:
    torch.manual_seed(FAMILIES[name].seed)
    return liven(FAMILIES[name].build().eval())


# --- dense references: the full token-to-token matrices, built by explicit loops ------------------------------------


def _capture(model: nn.Module, x: torch.Tensor, owners: dict[str, nn.Module], gradients: bool = False):
    """Raw attention of ``owners`` (in forward order) and, with ``gradients``, their gradients of the predicted
    classes' logits: lists of tensors in each module's own layout."""
    with torch.enable_grad(), AttentionRecorder(model, detach=not gradients, owners=owners) as recorder:
        logits = model(x)
    attentions = recorder.attentions
    if not gradients:
        return attentions, None
    score = logits.gather(1, logits.argmax(dim=1, keepdim=True)).sum()
    grads = torch.autograd.grad(score, attentions)
    return [a.detach() for a in attentions], [g.detach() for g in grads]


def _rollout_step(attention: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    """Abnar & Zuidema's layer ``norm(0.5·A + 0.5·S)`` of dense ``[B, N_out, N_in]`` maps."""
    step = 0.5 * attention + 0.5 * skip
    return step / step.sum(dim=-1, keepdim=True)


def _read(steps: list[torch.Tensor], readout: torch.Tensor) -> torch.Tensor:
    """``readout · T_L ⋯ T_1`` with the full product ``R = T_L ⋯ T_1`` formed first (``[B, N_0]``)."""
    product = steps[-1]
    for step in reversed(steps[:-1]):
        product = product @ step  # B, N_L, N_0
    readout = readout.expand(product.shape[0], -1) if readout.ndim == 1 else readout
    return (readout[:, None].double() @ product)[:, 0]


def _merge(grid: tuple[int, int], rows_of: callable, cols_of: callable, out: tuple[int, int]) -> torch.Tensor:
    """``M [N_out, N_in]``: coarse token ``(a, b)`` the mean of the fine tokens in ``rows_of(a) x cols_of(b)``."""
    merge = torch.zeros(out[0] * out[1], grid[0] * grid[1], dtype=torch.float64)
    for a in range(out[0]):
        for b in range(out[1]):
            cells = [(r, c) for r in rows_of(a) if 0 <= r < grid[0] for c in cols_of(b) if 0 <= c < grid[1]]
            for r, c in cells:
                merge[a * out[1] + b, r * grid[1] + c] = 1.0 / len(cells)
    return merge


def _conv_merge(grid: tuple[int, int], kernel: int, stride: int, padding: int) -> torch.Tensor:
    out = ((grid[0] + 2 * padding - kernel) // stride + 1, (grid[1] + 2 * padding - kernel) // stride + 1)
    window = lambda a: range(a * stride - padding, a * stride - padding + kernel)  # noqa: E731
    return _merge(grid, window, window, out)


def _swin_windows(maps: torch.Tensor, grid: tuple[int, int], window: int, shift: int) -> torch.Tensor:
    """Swin's windows ``[B, windows, w², w²]`` placed at their tokens' grid positions: window ``(a, b)`` of the
    rolled and padded grid holds rolled position ``(a·w + i, b·w + j)``, i.e. token ``((a·w+i+s) mod H, ...)``;
    padding holds none; with a shift, pairs from different regions of Swin's mask are zero."""
    height, width = grid
    hp, wp = math.ceil(height / window) * window, math.ceil(width / window) * window

    def region(pos: int, size: int) -> int:
        return 0 if pos < size - window else (1 if pos < size - shift else 2)

    dense = torch.zeros(maps.shape[0], height * width, height * width, dtype=torch.float64)
    per_row = wp // window
    for a in range(hp // window):
        for b in range(per_row):
            cells = [(a * window + i, b * window + j) for i in range(window) for j in range(window)]
            for qi, (qr, qc) in enumerate(cells):
                if qr >= height or qc >= width:
                    continue
                q = ((qr + shift) % height) * width + (qc + shift) % width
                for ki, (kr, kc) in enumerate(cells):
                    if kr >= height or kc >= width:
                        continue
                    if shift and (region(qr, hp), region(qc, wp)) != (region(kr, hp), region(kc, wp)):
                        continue
                    k = ((kr + shift) % height) * width + (kc + shift) % width
                    dense[:, q, k] += maps[:, a * per_row + b, qi, ki].double()
    return dense


def _swin() -> nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(
        "swin_tiny_patch4_window7_224", img_size=48, window_size=4, embed_dim=24, depths=(2, 2), num_heads=(1, 2),
        num_classes=3,
    )  # fmt: skip
    return model.eval()


def _swin_dense(model: nn.Module, x: torch.Tensor, method: str) -> torch.Tensor:
    blocks = [b for s in model.layers for b in s.blocks]
    owners = {f"block{i}": b.attn for i, b in enumerate(blocks)}
    attentions, grads = _capture(model, x, owners, gradients=method == "gradient_rollout")
    batch, steps, grid = x.shape[0], [], (12, 12)
    for i, block in enumerate(blocks):
        if i == 2:  # patch merging 12x12 -> 6x6 (2x2 cells)
            steps.append(_merge(grid, lambda a: (2 * a, 2 * a + 1), lambda b: (2 * b, 2 * b + 1), (6, 6))[None])
            grid = (6, 6)
        maps = attentions[i]
        if grads is not None:
            maps = (grads[i] * maps).clamp(min=0)
        maps = maps.reshape(batch, -1, *maps.shape[1:]).mean(dim=2)  # B, windows, w², w² (heads averaged)
        dense = _swin_windows(maps, grid, block.window_size[0], block.shift_size[0])
        eye = torch.eye(grid[0] * grid[1], dtype=torch.float64).expand_as(dense)
        if method == "rollout":
            steps.append(_rollout_step(dense, eye))
        elif method == "gradient_rollout":
            steps.append(eye + dense)
        else:
            steps.append(dense if i == len(blocks) - 1 else eye)
    readout = torch.full((36,), 1 / 36, dtype=torch.float64)
    return _read(steps, readout).reshape(batch, 12, 12)


def test_swin_rules_match_a_dense_reference() -> None:
    """Shifted windows (roll undone, masked pairs zero), padding (6x6 tokens in 4x4 windows) and 2x2 patch merging,
    composed to the 12x12 patch grid and read with the average pool: rollout, gradient rollout, last-layer attention."""
    model = _swin()
    assert [b.shift_size[0] for s in model.layers for b in s.blocks] == [0, 2, 0, 2]
    x = _images(48)
    flow = capture_token_flow(model, x)
    assert flow.family == "Swin"
    assert [m.is_attention for m in flow.mixes] == [True, True, False, True, True]
    torch.testing.assert_close(flow_rollout(flow), _swin_dense(model, x, "rollout"), rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(flow_attention(flow), _swin_dense(model, x, "attention"), rtol=1e-5, atol=1e-9)
    gradient = capture_token_flow(model, x, gradients=True)
    expected = _swin_dense(model, x, "gradient_rollout")
    torch.testing.assert_close(flow_gradient_rollout(gradient), expected, rtol=1e-5, atol=1e-12)


def _reduced_keys(grid: tuple[int, int], key_grid: tuple[int, int], rows: callable, cols: callable) -> torch.Tensor:
    return _merge(grid, rows, cols, key_grid)


def test_pvt_v2_reduced_keys_and_overlapping_merges_match_a_dense_reference() -> None:
    """Spatially reduced keys (a strided convolution; the linear variant's adaptive 7x7 pooling) spread over the
    tokens they were built from; each stage's overlapping patch embedding (3x3, stride 2) merges its window."""
    for name in ("PVT v2", "PVT v2 linear"):
        model = _model(name)
        x = _images(64)
        attn_modules = [blk.attn for stage in model.stages for blk in stage.blocks]
        attentions, _ = _capture(model, x, {f"a{i}": m for i, m in enumerate(attn_modules)})
        steps, grid = [], (16, 16)
        for i, attn in enumerate(attn_modules):
            if i > 0:
                steps.append(_conv_merge(grid, 3, 2, 1)[None])
                grid = (grid[0] // 2, grid[1] // 2)
            if attn.pool is not None:  # adaptive average pooling to 7x7: PyTorch's bins
                size = (7, 7)
                bins = lambda a, n=grid[0]: range(a * n // 7, -(-(a + 1) * n // 7))  # noqa: E731
                keys = _reduced_keys(grid, size, bins, bins)
            elif attn.sr is not None:
                sr = attn.sr.stride[0]
                size = (grid[0] // sr, grid[1] // sr)
                cell = lambda a, sr=sr: range(a * sr, a * sr + sr)  # noqa: E731
                keys = _reduced_keys(grid, size, cell, cell)
            else:
                keys = torch.eye(grid[0] * grid[1], dtype=torch.float64)
            dense = attentions[i].double().mean(dim=1) @ keys  # B, N, N_keys @ N_keys, N
            steps.append(_rollout_step(dense, torch.eye(grid[0] * grid[1], dtype=torch.float64)))
        expected = _read(steps, torch.full((grid[0] * grid[1],), 1 / (grid[0] * grid[1]), dtype=torch.float64))
        flow = capture_token_flow(model, x)
        torch.testing.assert_close(flow_rollout(flow), expected.reshape(2, 16, 16), rtol=1e-5, atol=1e-9, msg=name)


def test_mvitv2_pooled_queries_keys_and_shortcut_match_a_dense_reference() -> None:
    """Pooled queries put the attention rows on the coarse tokens, pooled keys spread over their windows, and the
    pooled shortcut is the residual path (a merge), for rollout and gradient rollout."""
    model = _model("MViTv2")
    x = _images(64)
    blocks = [b for stage in model.stages for b in stage.blocks]
    for method in ("rollout", "gradient_rollout"):
        attentions, grads = _capture(model, x, {f"b{i}": b.attn for i, b in enumerate(blocks)}, method != "rollout")
        steps, grid = [], (16, 16)
        for i, block in enumerate(blocks):
            attn = block.attn
            q_conv, k_conv = attn.pool_q, attn.pool_k
            k_keys = _conv_merge(grid, k_conv.kernel_size[0], k_conv.stride[0], k_conv.padding[0])
            out = (grid[0] // q_conv.stride[0], grid[1] // q_conv.stride[1])
            pool = block.shortcut_pool_attn
            skip = (
                torch.eye(grid[0] * grid[1], dtype=torch.float64)
                if pool is None
                else _conv_merge(grid, pool.kernel_size[0], pool.stride[0], pool.padding[0])
            )
            maps = attentions[i] if grads is None else (grads[i] * attentions[i]).clamp(min=0)
            dense = maps.double().mean(dim=1) @ k_keys
            steps.append(_rollout_step(dense, skip) if method == "rollout" else skip + dense)
            grid = out
        readout = torch.full((grid[0] * grid[1],), 1 / (grid[0] * grid[1]), dtype=torch.float64)
        expected = _read(steps, readout).reshape(2, 16, 16)
        flow = capture_token_flow(model, x, gradients=method != "rollout")
        got = flow_rollout(flow) if method == "rollout" else flow_gradient_rollout(flow)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-12, msg=method)


def test_cait_class_attention_is_the_readout_over_the_self_attention_stack() -> None:
    """CaiT (Touvron et al. 2021): every attention layer is captured (talking-heads self-attention and class
    attention); the class token joins with no source; class-attention rows are the readout composed with the
    self-attention stack."""
    from timm.models import cait

    model = _model("CaiT")
    x = _images(32)
    modules = [m for m in model.modules() if isinstance(m, (cait.TalkingHeadAttn, cait.ClassAttn))]
    assert len(modules) == len(model.blocks) + len(model.blocks_token_only)
    attentions, _ = _capture(model, x, {f"a{i}": m for i, m in enumerate(modules)})
    count = 16
    steps = []
    for attn in attentions[: len(model.blocks)]:
        steps.append(_rollout_step(attn.double().mean(dim=1), torch.eye(count, dtype=torch.float64)))
    join = torch.zeros(count + 1, count, dtype=torch.float64)
    join[1:] = torch.eye(count, dtype=torch.float64)  # the class token (row 0) takes nothing from below
    steps.append(join[None])
    for attn in attentions[len(model.blocks) :]:
        dense = torch.zeros(2, count + 1, count + 1, dtype=torch.float64)
        dense[:, 0] = attn.double().mean(dim=1)[:, 0]  # only the class row attends
        step = 0.5 * dense + 0.5 * torch.eye(count + 1, dtype=torch.float64)
        steps.append(step / step.sum(dim=-1, keepdim=True))
    readout = torch.zeros(count + 1, dtype=torch.float64)
    readout[0] = 1.0
    expected = _read(steps, readout).reshape(2, 4, 4)
    flow = capture_token_flow(model, x)
    assert len(flow.attention_mixes) == len(modules)
    torch.testing.assert_close(flow_rollout(flow), expected, rtol=1e-5, atol=1e-9)


def test_xcit_skips_channel_attention_with_the_reason_and_reads_class_attention() -> None:
    model = _model("XCiT")
    flow = capture_token_flow(model, _images(32))
    assert len(flow.skipped) == len(model.blocks)
    assert all("mixes channels, not tokens" in reason for reason in flow.skipped.values())
    assert len(flow.attention_mixes) == len(model.cls_attn_blocks)
    assert (flow_rollout(flow).flatten(1).std(dim=1) > 0).all()


def test_attention_pool_readout_is_the_pool_querys_attention() -> None:
    """SigLIP's AttentionPoolLatent: the readout is its query's attention (mean over heads and latents), composed
    with the blocks beneath; ``attention`` with ``layer='pool'`` shows the pool's own map."""
    model = _model("SigLIP (attention pool 'map')")
    x = _images(32)
    owners = {f"b{i}": b.attn for i, b in enumerate(model.blocks)} | {"pool": model.attn_pool}
    attentions, _ = _capture(model, x, owners)
    pool = attentions[-1].double().mean(dim=(1, 2))  # B, H, latents, N -> B, N
    eye = torch.eye(16, dtype=torch.float64)
    steps = [_rollout_step(a.double().mean(dim=1), eye) for a in attentions[:-1]]
    torch.testing.assert_close(flow_rollout(capture_token_flow(model, x)), _read(steps, pool).reshape(2, 4, 4))
    flow = capture_token_flow(model, x)
    assert flow.pool
    torch.testing.assert_close(flow_pool_map(flow), pool.reshape(2, 4, 4))
    pool_maps = explain(model, x, "attention", layer="pool")
    assert pool_maps.shape == (2, 32, 32)
    assert not torch.allclose(pool_maps, explain(model, x, "attention"))
    with pytest.raises(NotApplicableError, match="has no attention-pool head"):
        explain(_model("ViT (class token)"), x, "attention", layer="pool")
    with pytest.raises(ValueError, match="layer 'last' is unknown"):
        explain(model, x, "attention", layer="last")


def test_maxvit_block_and_grid_partitions_place_their_windows() -> None:
    """MaxViT: block windows and the dilated grid partition, each placed at its tokens' own grid positions."""
    from timm.models import maxxvit

    torch.manual_seed(0)
    model = timm.create_model("maxvit_rmlp_pico_rw_256", img_size=64, num_classes=3).eval()
    x = _images(64)
    blocks = [m for m in model.modules() if isinstance(m, maxxvit.PartitionAttentionCl)]
    attentions, _ = _capture(model, x, {f"a{i}": b.attn for i, b in enumerate(blocks)})
    flow = capture_token_flow(model, x)
    windows = flow.attention_mixes
    assert len(windows) == len(blocks)
    assert {b.partition_block for b in blocks} == {True, False}
    for block, attn, mix in zip(blocks, attentions, windows, strict=True):
        grid, size = mix.source.grid, block.partition_size[0]
        maps = attn.reshape(2, -1, *attn.shape[1:]).mean(dim=2)  # B, windows, p², p²
        dense = torch.zeros(2, grid[0] * grid[1], grid[0] * grid[1])
        cells = grid[0] // size
        for a in range(cells):
            for b in range(cells):
                if block.partition_block:  # window (a, b) holds rows a·p + i
                    tokens = [(a * size + i) * grid[1] + b * size + j for i in range(size) for j in range(size)]
                else:  # grid: window (a, b) holds rows i·(H/p) + a
                    tokens = [(i * cells + a) * grid[1] + j * cells + b for i in range(size) for j in range(size)]
                for qi, q in enumerate(tokens):
                    for ki, k in enumerate(tokens):
                        dense[:, q, k] = maps[:, a * cells + b, qi, ki]
        rows = torch.rand(2, grid[0] * grid[1], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        expected = torch.einsum("bq,bqk->bk", rows, dense.double())  # any row vector through the dense layer
        torch.testing.assert_close(mix.attend(rows, mix.weights.double()), expected)


def test_every_layer_is_captured_or_the_model_is_refused() -> None:
    """A model computing attention in a module its family adapter does not describe is refused, naming it."""

    class Rogue(nn.Module):
        def __init__(self, dim: int) -> None:
            super().__init__()
            self.qk = nn.Linear(dim, 2 * dim)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            q, k = self.qk(x).chunk(2, dim=-1)
            return x + (q @ k.transpose(-2, -1)).softmax(dim=-1) @ x

    model = vision_attn.create_model("va_vit_tiny_patch4_32", depth=2, num_classes=3).eval()
    model.blocks[1] = nn.Sequential(model.blocks[1], Rogue(model.embed_dim)).eval()
    for method in ("rollout", "gradient_rollout", "transformer_attribution"):
        with pytest.raises(NotApplicableError, match=r"does not describe \(softmax in blocks\.1\.1 \[2, 65, 65\]"):
            explain(model, _images(32), method)


def _snapshot(model: nn.Module) -> dict:
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "training": [m.training for m in model.modules()],
        "fused": [getattr(m, "fused_attn", None) for m in model.modules()],
    }


@pytest.mark.parametrize("name", ["Swin", "Hiera", "Twins-SVT"])
def test_models_are_left_as_found_and_batches_equal_loops(name: str) -> None:
    model = _model(name)
    model.train()
    before = _snapshot(model)
    x = _images(FAMILIES[name].size, batch=3)
    for method in ("rollout", "gradient_rollout", "transformer_attribution", "gradcam"):
        with pytest.warns(UserWarning, match="train mode"):
            maps = explain(model, x, method, target=[0, 1, 2])
        after = _snapshot(model)
        assert after["training"] == before["training"]
        assert after["fused"] == before["fused"]
        assert all(torch.equal(after["state"][k], v) for k, v in before["state"].items())
        assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
        assert all(p.grad is None for p in model.parameters())
        assert not torch.overrides._get_current_function_mode_stack()
        model.eval()
        single = torch.cat([explain(model, x[i : i + 1], method, target=i) for i in range(3)])
        model.train()
        # at random init Chefer's relevance is a part of ~1e-6 on the average-pooled readout's uniform map: min-max
        # scaling magnifies float32 rounding of the LRP rules (which differ between a batch and single images)
        tolerance = 2e-3 if method == "transformer_attribution" else 1e-4
        torch.testing.assert_close(maps, single, atol=tolerance, rtol=1e-4, msg=f"{name} {method}")


def test_gradcam_default_layer_reads_channels_last_maps() -> None:
    """Swin's last stage is NHWC: the default Grad-CAM reads it as such (a reference permutes by hand)."""
    model = _model("Swin")
    x = _images(32)
    layer = model.layers[-1]
    outputs = []
    handle = layer.register_forward_hook(lambda m, args, out: outputs.append(out))
    logits = model(x)
    handle.remove()
    (grad,) = torch.autograd.grad(logits.gather(1, logits.argmax(1, keepdim=True)).sum(), outputs)
    act, grad = outputs[0].detach().permute(0, 3, 1, 2), grad.permute(0, 3, 1, 2)
    cam = (grad.mean(dim=(2, 3), keepdim=True) * act).sum(dim=1).clamp(min=0)
    cam = cam - cam.flatten(1).amin(1)[:, None, None]
    cam = cam / (1e-7 + cam.flatten(1).amax(1)[:, None, None])
    cam = torch.nn.functional.interpolate(cam[:, None], size=(32, 32), mode="bilinear", align_corners=False)[:, 0]
    low, high = cam.flatten(1).amin(1)[:, None, None], cam.flatten(1).amax(1)[:, None, None]
    torch.testing.assert_close(explain(model, x, "gradcam"), (cam - low) / (high - low))  # explain's min-max scaling


# --- applicable_methods and the sweep -------------------------------------------------------------------------------

SUBSET = ["ViT (class token)", "SigLIP (attention pool 'map')", "CaiT", "Swin", "PVT v2", "Hiera", "CoaT", "BoTNet"]


@pytest.mark.parametrize("name", SUBSET)
def test_applicable_methods_agree_with_what_explain_does(name: str) -> None:
    """``{method: ''}`` exactly for the methods that return a map; the reason of a refusal is the one explain raises;
    and no method fails in another way or returns a constant map."""
    model = _model(name)
    reasons = applicable_methods(model)
    assert set(reasons) == set(list_methods())
    outcomes = run_family(FAMILIES[name])
    for method, (outcome, detail) in outcomes.items():
        assert outcome in ("supported", "refused"), (name, method, outcome, detail)
        if reasons[method]:
            assert outcome == "refused", (name, method)
            assert detail == reasons[method], (name, method)
        elif outcome == "refused":  # a refusal found only by running: it must still say why
            assert detail, (name, method)
    token = {"rollout", "gradient_rollout", "attention"}
    supported = {m for m, (o, _) in outcomes.items() if o == "supported"}
    assert (token <= supported) == (name != "CoaT"), (name, supported)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in FAMILIES if n not in SUBSET])
def test_every_timm_attention_family_is_explained_or_refused(name: str) -> None:
    for method, (outcome, detail) in run_family(FAMILIES[name]).items():
        assert outcome in ("supported", "refused"), (name, method, outcome, detail)
        if outcome == "refused":
            assert detail, (name, method)


def test_the_table_lists_every_timm_model_module() -> None:
    """Every model module of the installed timm is an attention family of the sweep or listed as having none."""
    assert unlisted_modules() == []


def test_families_are_found_from_the_model_not_named() -> None:
    assert find_adapter(_model("Swin")).family == "Swin"
    assert find_adapter(_model("ViT (class token)")).family == "ViT"
    assert find_adapter(timm.create_model("resnet10t")) is None


def test_docs_carry_the_generated_blocks() -> None:
    text = (REPO / "docs" / "explain.md").read_text()
    for name in ("timm_coverage", "explain_targets"):
        assert f"<!-- {name}:start -->" in text, name
        assert f"<!-- {name}:end -->" in text, name
    block = text.split("<!-- timm_coverage:start -->")[1].split("<!-- timm_coverage:end -->")[0]
    assert all(f"| {name} |" in block for name in FAMILIES)
    assert "(docs/explain.md#model-families)" in (REPO / "README.md").read_text()
