"""Attention CNNs (issue 4): every ``va_resnet*`` variant, AugmentedConv2d, BotAttention and the tapped timm modules."""

from __future__ import annotations

import math

import pytest
import timm
import torch
from timm.layers import EcaModule, NonLocalAttn, SEModule
from timm.layers.bottleneck_attn import BottleneckAttn
from timm.layers.cbam import CbamModule
from timm.layers.coord_attn import CoordAttn
from torch import nn

import vision_attn
from vision_attn.explain.capture import AttentionRecorder
from vision_attn.layers.aa_conv import AugmentedConv2d, relative_logits_2d
from vision_attn.layers.attention_tap import attention_hook_points
from vision_attn.layers.bot import BotAttention
from vision_attn.layers.cnn_attn import CNN_GATES
from vision_attn.models import resnet_attn
from vision_attn.models.resnet_attn import ATTN_LAYERS, DEFAULT_STAGES

CNN_NAMES = vision_attn.list_models("va_resnet*")
EXPECTED_NAMES = {
    f"va_resnet{depth}{'' if kind == 'none' else '_' + kind}_{size}"
    for depth in (18, 50)
    for kind in ATTN_LAYERS
    for size in (32, 224)
}


def attn_kind(name: str) -> str:
    parts = name.split("_")
    return parts[2] if len(parts) == 4 else "none"


def tiny(name: str) -> tuple[dict, int]:
    """Kwargs and input size that keep a variant cheap on 2 CPU cores: 16px (small stem) / 64px (ImageNet stem),
    one block per stage, stage widths / 4. ``img_size`` follows the input so BoT's fixed position tables fit."""
    size = 16 if name.endswith("_32") else 64
    return {"img_size": size, "layers": (1, 1, 1, 1), "channels": (16, 32, 64, 128)}, size


def build(name: str, **extra) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    kwargs, size = tiny(name)
    model = vision_attn.create_model(name, **{**kwargs, **extra})
    return model, torch.randn(2, 3, size, size)


def test_registered_names_are_ours_and_complete():
    assert set(CNN_NAMES) == EXPECTED_NAMES
    assert set(timm.list_models(module="resnet_attn")) == EXPECTED_NAMES
    assert not EXPECTED_NAMES & set(timm.list_models(module="resnet"))


@pytest.mark.parametrize("name", CNN_NAMES)
def test_pretrained_cfg_and_timm_create_model(name):
    model = timm.create_model(name)  # the registered configuration, full size
    size = 32 if name.endswith("_32") else 224
    cfg = model.pretrained_cfg
    assert cfg["input_size"] == (3, size, size)
    assert cfg["num_classes"] == model.num_classes == (10 if size == 32 else 1000)
    assert len(cfg["mean"]) == len(cfg["std"]) == 3
    assert cfg["fixed_input_size"] == (attn_kind(name) == "bot")
    assert model.attn_layer == attn_kind(name)


@pytest.mark.parametrize("name", CNN_NAMES)
def test_forward_is_finite_and_gradients_reach_every_parameter(name):
    model, x = build(name, num_classes=5)
    for module in model.modules():  # zero-initialised BN (last of each block, non-local) would block gradients
        if isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
    model.train()
    y = model(x)
    assert y.shape == (2, 5)
    assert torch.isfinite(y).all()
    y.logsumexp(dim=1).sum().backward()
    # the non-local key bias shifts every logit of a query equally, so softmax cancels its gradient exactly
    exempt = {n for n, _ in model.named_parameters() if attn_kind(name) == "nonlocal" and n.endswith("se.p.bias")}
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    zero_grad = [n for n, p in model.named_parameters() if n not in exempt and p.grad.abs().sum() == 0]
    assert not no_grad, f"missing or non-finite gradients: {no_grad}"
    assert not zero_grad, f"zero gradients: {zero_grad}"


@pytest.mark.parametrize("name", CNN_NAMES)
def test_features_only_and_forward_intermediates_match_feature_info(name):
    kwargs, size = tiny(name)
    torch.manual_seed(0)
    model = timm.create_model(name, **kwargs).eval()
    torch.manual_seed(0)
    features = timm.create_model(name, features_only=True, **kwargs).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        maps = features(x)
        final, intermediates = model.forward_intermediates(x)
        last = model.forward_features(x)
    assert [m.shape[1] for m in maps] == features.feature_info.channels()
    assert [math.ceil(size / r) for r in features.feature_info.reduction()] == [m.shape[-1] for m in maps]
    assert features.feature_info.reduction() == ([1, 1, 2, 4, 8] if size == 16 else [2, 4, 8, 16, 32])
    assert [t.shape for t in intermediates] == [m.shape for m in maps]
    torch.testing.assert_close(intermediates[-1], maps[-1])
    torch.testing.assert_close(final, last)


def expected_taps(model: nn.Module, kind: str) -> int:
    blocks = [b for s in DEFAULT_STAGES[kind] for b in getattr(model, f"layer{s}")]
    per_block = {"cbam": 2, "aa": 2 if isinstance(model.layer1[0], resnet_attn.BasicBlock) else 1}
    return len(blocks) * per_block.get(kind, 1)


@pytest.mark.parametrize("name", CNN_NAMES)
def test_attention_maps_are_recorded_with_the_shared_recorder(name):
    model, x = build(name)
    model.eval()
    kind = attn_kind(name)
    with torch.no_grad(), AttentionRecorder(model) as rec:
        model(x)
    assert len(rec.hook_points) == len(rec.maps) == expected_taps(model, kind)
    want_kinds = {"none": set(), "cbam": {"channel", "spatial"}, "coord": {"spatial"}}.get(
        kind, {"channel"} if kind in ("se", "eca") else {"attention"}
    )
    assert set(rec.kinds.values()) == want_kinds
    for point_name, value in rec.maps.items():
        map_kind = rec.kinds[point_name]
        assert value.shape[0] == 2
        assert value.ndim == 4
        if map_kind == "attention":
            assert value.shape[-1] == value.shape[-2]
            torch.testing.assert_close(value.sum(-1), torch.ones(value.shape[:-1]))
        else:
            assert ((value > 0) & (value < 1)).all()
            if map_kind == "channel":
                assert value.shape[-2:] == (1, 1)
            else:
                assert value.shape[-1] > 1
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("name", CNN_NAMES)
def test_changing_input_size_works_or_errors_clearly(name):
    model, _ = build(name)
    model.eval()
    _, size = tiny(name)
    stride = model.net_stride
    kind = attn_kind(name)
    with torch.no_grad():
        for new_size in (size - stride, size + stride):
            x = torch.randn(1, 3, new_size, new_size)
            if kind == "bot":
                with pytest.raises(ValueError, match=rf"{new_size}x{new_size}.*fixed to img_size {size}x{size}"):
                    model(x)
            elif kind == "aa" and new_size > size:
                with pytest.raises(ValueError, match=rf"{new_size}x{new_size}, larger than img_size {size}x{size}"):
                    model(x)
            else:
                assert model(x).shape == (1, model.num_classes)
                assert model.forward_features(x).shape[-1] == math.ceil(new_size / stride)


def test_bot_features_only_at_the_wrong_size_names_the_feature_size():
    kwargs, _ = tiny("va_resnet50_bot_224")
    features = timm.create_model("va_resnet50_bot_224", features_only=True, **kwargs).eval()
    with torch.no_grad(), pytest.raises(ValueError, match=r"feature size 6x6 .* built for feat_size 4x4"):
        features(torch.randn(1, 3, 96, 96))


@pytest.mark.parametrize(
    ("name", "x", "error", "pattern"),
    [
        ("va_resnet18_32", torch.randn(1, 1, 32, 32), ValueError, r"1 channels .*in_chans=3"),
        ("va_resnet18_se_224", torch.randn(1, 3, 16, 16), ValueError, r"spatial size 16x16; the minimum is 32x32"),
        ("va_resnet18_32", torch.randn(1, 3, 4, 4), ValueError, r"spatial size 4x4; the minimum is 8x8"),
        ("va_resnet18_32", torch.zeros(1, 3, 32, 32, dtype=torch.uint8), TypeError, r"floating dtype"),
    ],
)
def test_bad_input_is_named(name, x, error, pattern):
    model = vision_attn.create_model(name, layers=(1, 1, 1, 1)).eval()
    with pytest.raises(error, match=pattern):
        model(x)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"attn_layer": "sk"}, r"unknown attn_layer 'sk'; known: none, se, eca, cbam, coord, nonlocal, aa, bot"),
        ({"stem": "cifar"}, r"unknown stem 'cifar'; known: imagenet, small"),
        ({"attn_layer": "se", "attn_stages": (0, 5)}, r"attn_stages must be ints in 1..4"),
        ({"attn_layer": "bot", "img_size": 36}, r"img_size 36x36 must be divisible by the network stride 8"),
        ({"attn_layer": "aa", "dv_ratio": 0}, r"dv_ratio must be in \(0, 1\], got 0"),
    ],
)
def test_bad_config_is_named(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        vision_attn.create_model("va_resnet18_32", layers=(1, 1, 1, 1), **kwargs)


@pytest.mark.slow
@pytest.mark.parametrize("name", CNN_NAMES)
def test_registered_config_runs_at_its_input_size(name):
    model = timm.create_model(name).eval()
    size = model.pretrained_cfg["input_size"][-1]
    with torch.no_grad():
        y = model(torch.randn(1, 3, size, size))
    assert y.shape == (1, model.num_classes)
    assert torch.isfinite(y).all()


def test_full_size_models_match_timm_and_paper_parameter_counts():
    def count(model: nn.Module) -> int:
        return sum(p.numel() for p in model.parameters())

    assert count(vision_attn.create_model("va_resnet50_224")) == count(timm.create_model("resnet50"))
    ours_se = vision_attn.create_model("va_resnet50_se_224")
    ours_se.load_state_dict(timm.create_model("seresnet50").state_dict())  # timm SE-ResNet weights load strictly
    assert 20.7e6 < count(vision_attn.create_model("va_resnet50_bot_224")) < 20.9e6  # BoT50: 20.8M (paper, Table 13)


# ----- the layers -----


@pytest.mark.parametrize("stride", [1, 2])
def test_aa_conv_with_zero_attention_channels_is_its_plain_conv(stride):
    torch.manual_seed(0)
    aa = AugmentedConv2d(8, 16, kernel_size=3, stride=stride, dk=0, dv=0)
    conv = nn.Conv2d(8, 16, 3, stride=stride, padding=1, bias=False)
    conv.weight.data.copy_(aa.conv.weight)
    x = torch.randn(2, 8, 9, 7)
    assert [n for n, _ in aa.named_parameters()] == ["conv.weight"]
    assert torch.equal(aa(x), conv(x))


def test_aa_conv_concatenates_conv_and_attention_channels():
    torch.manual_seed(0)
    aa = AugmentedConv2d(8, 24, kernel_size=3, stride=2, dk=8, dv=8, num_heads=2, feat_size=9)
    x = torch.randn(2, 8, 9, 7)  # odd sizes: conv and pooled attention grids must still agree (5x4)
    y = aa(x)
    assert y.shape == (2, 24, 5, 4)
    torch.testing.assert_close(y[:, :16], aa.conv(x))


def naive_aa_attention(aa: AugmentedConv2d, x: torch.Tensor) -> torch.Tensor:
    """Bello et al. 2019, Eqs. 1-3 position by position: the attention channels of ``aa`` (stride 1)."""
    batch, _, height, width = x.shape
    heads, dkh, dvh = aa.num_heads, aa.dk // aa.num_heads, aa.dv // aa.num_heads
    q, k, v = aa.qkv(x).split([aa.dk, aa.dk, aa.dv], dim=1)
    max_h, max_w = (aa.rel_height.shape[0] + 1) // 2, (aa.rel_width.shape[0] + 1) // 2
    out = torch.zeros(batch, aa.dv, height, width)
    positions = [(i, j) for i in range(height) for j in range(width)]
    for h in range(heads):
        qh, kh, vh = q[:, h * dkh : (h + 1) * dkh], k[:, h * dkh : (h + 1) * dkh], v[:, h * dvh : (h + 1) * dvh]
        for y, x_ in positions:
            query = qh[:, :, y, x_] * dkh**-0.5  # B, dkh
            logits = torch.stack(
                [
                    (query * kh[:, :, y2, x2]).sum(1)
                    + query @ aa.rel_width[x2 - x_ + max_w - 1]
                    + query @ aa.rel_height[y2 - y + max_h - 1]
                    for y2, x2 in positions
                ],
                dim=1,
            ).softmax(dim=1)  # B, N
            values = torch.stack([vh[:, :, y2, x2] for y2, x2 in positions], dim=1)  # B, N, dvh
            out[:, h * dvh : (h + 1) * dvh, y, x_] = (logits[:, :, None] * values).sum(1)
    return aa.proj(out)


def test_aa_conv_attention_matches_the_papers_formula():
    torch.manual_seed(0)
    aa = AugmentedConv2d(6, 10, kernel_size=3, dk=4, dv=4, num_heads=2, feat_size=(5, 6))
    x = torch.randn(2, 6, 3, 4)  # smaller than feat_size: uses the central rows of the position tables
    torch.testing.assert_close(aa(x)[:, 6:], naive_aa_attention(aa, x), atol=1e-5, rtol=1e-4)


def test_aa_relative_logits_are_shift_consistent():
    torch.manual_seed(0)
    batch, heads, dim, height, width, max_h, max_w = 2, 3, 4, 4, 5, 6, 7
    rel_h, rel_w = torch.randn(2 * max_h - 1, dim), torch.randn(2 * max_w - 1, dim)
    q = torch.randn(batch, heads, 1, dim).expand(-1, -1, height * width, -1)  # the same query everywhere
    logits = relative_logits_2d(q, rel_h, rel_w, (height, width)).reshape(batch, heads, height, width, height, width)
    seen = {}
    for y in range(height):
        for x in range(width):
            for y2 in range(height):
                for x2 in range(width):
                    offset = (y2 - y, x2 - x)
                    value = logits[:, :, y, x, y2, x2]
                    if offset in seen:  # the same relative offset gives the same logit wherever the pair sits
                        torch.testing.assert_close(value, seen[offset], atol=0, rtol=0)
                    seen[offset] = value
    assert len(seen) == (2 * height - 1) * (2 * width - 1)
    expected = q[:, :, 0] @ (rel_h[max_h - 1 + 2] + rel_w[max_w - 1 - 3])
    torch.testing.assert_close(seen[(2, -3)], expected)


def test_aa_conv_input_sizes():
    aa = AugmentedConv2d(4, 8, dk=4, dv=4, num_heads=2, feat_size=8)
    assert aa(torch.randn(1, 4, 5, 8)).shape == (1, 8, 5, 8)
    with pytest.raises(ValueError, match=r"x has spatial size 9x8, larger than this AugmentedConv2d's feat_size 8x8"):
        aa(torch.randn(1, 4, 9, 8))


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"dk": 0, "dv": 8}, r"dk and dv must be both 0 .* got dk=0, dv=8"),
        ({"dk": 6, "dv": 8, "num_heads": 4}, r"num_heads=4 must be a positive int dividing dk=6 and dv=8"),
        ({"dk": 8, "dv": 32, "num_heads": 4}, r"dv=32 exceeds out_channels=16"),
        ({"dk": 8, "dv": 8, "num_heads": 4}, r"feat_size .* is required when dv > 0"),
        ({"kernel_size": 2}, r"kernel_size must be a positive odd int, got 2"),
    ],
)
def test_aa_conv_bad_arguments_are_named(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        AugmentedConv2d(8, 16, **kwargs)


@pytest.mark.parametrize("stride", [1, 2])
def test_bot_attention_is_timms_bottleneck_attn_plus_a_tap(stride):
    torch.manual_seed(0)
    ours = BotAttention(16, 32, feat_size=(4, 6), stride=stride, num_heads=4)
    theirs = BottleneckAttn(16, 32, feat_size=(4, 6), stride=stride, num_heads=4)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 16, 4, 6)
    with AttentionRecorder(ours) as rec:
        y = ours(x)
    torch.testing.assert_close(y, theirs(x))
    (probs,) = rec.maps.values()
    assert probs.shape == (2, 4, 24, 24)
    with pytest.raises(ValueError, match=r"feature size 4x4 but this BotAttention was built for feat_size 4x6"):
        ours(torch.randn(2, 16, 4, 4))


TIMM_GATES = {"se": SEModule, "eca": EcaModule, "cbam": CbamModule, "coord": CoordAttn, "nonlocal": NonLocalAttn}


@pytest.mark.parametrize("kind", list(TIMM_GATES))
def test_tapped_timm_modules_compute_what_timm_computes(kind):
    torch.manual_seed(0)
    ours, theirs = CNN_GATES[kind](32).eval(), TIMM_GATES[kind](32).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_()
    theirs.load_state_dict(ours.state_dict())  # same keys: weights move both ways
    x = torch.randn(2, 32, 6, 5)
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-6, rtol=1e-5)
    assert len(list(attention_hook_points(ours))) == (2 if kind == "cbam" else 1)
    assert not list(attention_hook_points(theirs))
