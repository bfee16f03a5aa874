"""Every registered model: output shape, finite values, gradients on all parameters, fused/explicit parity."""

from __future__ import annotations

import pytest
import timm
import torch

import vision_attn

MODEL_NAMES = vision_attn.list_models()


def small_kwargs(name: str) -> dict:
    """Shrink the big registered configs so the whole registry runs in seconds on 2 CPU cores."""
    if "_vit" in name or name.startswith("va_cct"):
        return {"depth": 1 if "224" in name else 2}
    if name.startswith("va_resnet"):
        return {"img_size": 64 if name.endswith("_224") else 16, "layers": (1, 1, 1, 1), "channels": (16, 32, 64, 128)}
    return {}


def build(name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    kwargs = small_kwargs(name)
    model = vision_attn.create_model(name, **kwargs)
    channels, height, width = model.pretrained_cfg["input_size"]
    if "img_size" in kwargs:
        height = width = kwargs["img_size"]
    return model, torch.randn(2, channels, height, width)


def set_fused(model: torch.nn.Module, fused: bool) -> int:
    count = 0
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = fused
            count += 1
    return count


def test_registry_is_populated():
    assert len(MODEL_NAMES) >= 9
    for name in MODEL_NAMES:
        assert name.startswith("va_")


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_forward_shape_and_finite(name):
    model, x = build(name)
    model.eval()
    with torch.no_grad():
        y = model(x)
    assert y.shape == (2, model.pretrained_cfg["num_classes"])
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_backward_reaches_every_parameter(name):
    model, x = build(name)
    model.train()
    with torch.no_grad():  # zero-initialised weights (last BN of a residual branch) block gradients by design
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.02)
    model(x).logsumexp(dim=1).sum().backward()
    missing = [
        n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)
    ]
    assert not missing, f"no gradient for {missing}"


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_fused_and_explicit_attention_agree(name):
    model, x = build(name)
    model.eval()
    if set_fused(model, True) == 0:
        pytest.skip(f"{name} has no switchable attention")
    with torch.no_grad():
        fused = model(x)
        set_fused(model, False)
        explicit = model(x)
    torch.testing.assert_close(fused, explicit, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_timm_create_model_and_pretrained_cfg(name):
    model = timm.create_model(name, **small_kwargs(name))
    cfg = model.pretrained_cfg
    assert cfg["input_size"][0] == 3
    assert cfg["num_classes"] > 0
    assert len(cfg["mean"]) == 3
    assert len(cfg["std"]) == 3


def test_unknown_name_says_so_and_suggests():
    with pytest.raises(
        ValueError, match=r"unknown model_name 'va_vit_tiny_patch4_23'.*did you mean va_vit_tiny_patch4_32"
    ):
        vision_attn.create_model("va_vit_tiny_patch4_23")


def test_create_model_builds_timm_names_too_but_lists_only_ours():
    model = vision_attn.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, num_classes=3)
    assert type(model) is timm.models.vision_transformer.VisionTransformer  # one builder for every name
    assert "vit_tiny_patch16_224" not in vision_attn.list_models()
    assert not set(MODEL_NAMES) & set(timm.list_models(module="vision_transformer"))
    with pytest.raises(ValueError, match="neither a vision_attn model nor a timm model"):
        vision_attn.create_model("vit_tiny_patch16_2244")


def test_list_models_pattern():
    assert vision_attn.list_models("va_cct*") == ["va_cct_2_3x2_32", "va_cct_7_3x1_32"]
