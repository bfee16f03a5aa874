"""Helpers shared by the explain methods: targets, token layout of a model, image checks, map post-processing."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vision_attn.layers.checks import check_images

__all__ = ["check_model_images", "normalize_maps", "resolve_targets", "token_layout", "upsample_maps"]


def resolve_targets(target: int | Sequence[int] | torch.Tensor | None, logits: torch.Tensor) -> torch.Tensor:
    """Return the class index per image ``[B]`` (long): ``None`` = predicted class, an int for all, or one each."""
    if logits.ndim != 2:
        raise ValueError(f"the model must return logits [B, num_classes], got shape {tuple(logits.shape)}")
    batch, num_classes = logits.shape
    if target is None:
        return logits.detach().argmax(dim=1)
    if isinstance(target, bool) or not isinstance(target, (int, Sequence, torch.Tensor)):
        raise TypeError(f"target must be None, an int or one int per image, got {type(target).__name__}")
    targets = torch.as_tensor(target, device=logits.device)
    if targets.is_floating_point() or targets.is_complex():
        raise TypeError(f"target must hold integer class indices, got dtype {targets.dtype}")
    targets = targets.long().reshape(-1)
    if targets.numel() == 1:
        targets = targets.expand(batch)
    if targets.numel() != batch:
        raise ValueError(f"target has {targets.numel()} entries for a batch of {batch} images; give one or {batch}")
    if bool(((targets < 0) | (targets >= num_classes)).any()):
        raise ValueError(f"target {targets.tolist()} is out of range; the model has {num_classes} classes")
    return targets.contiguous()


def _in_chans(model: nn.Module) -> int | None:
    for attr in ("in_chans", "num_channels"):
        value = getattr(model, attr, None)
        if isinstance(value, int):
            return value
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return module.in_channels
    return None


def check_model_images(model: nn.Module, images: torch.Tensor, name: str = "images") -> None:
    """Raise ``TypeError``/``ValueError`` unless ``images`` ``[B, C, H, W]`` fits ``model`` (channels, size) and
    holds only finite values (a NaN would spread through attention and make every map meaningless)."""
    check = getattr(model, "check_input", None)
    if callable(check):
        check_images(images, name=name)
        check(images)
    else:
        img_size = divisor = None
        patch_embed = getattr(model, "patch_embed", None)
        if patch_embed is not None and getattr(patch_embed, "img_size", None) is not None:
            dynamic = getattr(model, "dynamic_img_size", False) or not getattr(patch_embed, "strict_img_size", True)
            if not dynamic:
                img_size = tuple(patch_embed.img_size)
            elif not getattr(patch_embed, "dynamic_img_pad", False):
                divisor = tuple(patch_embed.patch_size)
        check_images(images, in_chans=_in_chans(model), img_size=img_size, divisor=divisor, name=name)
    finite = torch.isfinite(images).flatten(1).all(dim=1)
    if not finite.all():
        bad = (~finite).nonzero().flatten().tolist()
        raise ValueError(
            f"{name} hold NaN or Inf values (batch indices {bad[:10]}{' ...' if len(bad) > 10 else ''}); "
            "explain needs finite, normalized images"
        )


def token_layout(
    model: nn.Module,
    image_size: tuple[int, int],
    num_prefix_tokens: int | None = None,
    grid_size: Sequence[int] | None = None,
) -> tuple[int, tuple[int, int] | None]:
    """Return ``(num_prefix_tokens, (gh, gw))`` of a ViT-style ``model`` for inputs of ``image_size``.

    Read from ``model.num_prefix_tokens`` and ``model.patch_embed`` (``dynamic_feat_size`` or ``grid_size``) —
    works for our ViTs and timm's (class, distillation and register tokens). Given values win; the grid is
    ``None`` when the model has no ``patch_embed`` (rollout then needs a square token count).
    """
    if num_prefix_tokens is None:
        num_prefix_tokens = getattr(model, "num_prefix_tokens", None)
        if num_prefix_tokens is None:
            num_prefix_tokens = int(getattr(model, "cls_token", None) is not None)
    if grid_size is not None:
        return int(num_prefix_tokens), (int(grid_size[0]), int(grid_size[1]))
    patch_embed = getattr(model, "patch_embed", None)
    if patch_embed is not None and hasattr(patch_embed, "dynamic_feat_size"):
        gh, gw = patch_embed.dynamic_feat_size(tuple(image_size))
        return int(num_prefix_tokens), (int(gh), int(gw))
    if patch_embed is not None and getattr(patch_embed, "grid_size", None) is not None:
        gh, gw = patch_embed.grid_size
        return int(num_prefix_tokens), (int(gh), int(gw))
    return int(num_prefix_tokens), None


def upsample_maps(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinearly resize maps ``[B, h, w]`` to ``[B, *size]`` (float32)."""
    maps = maps.float()
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps[:, None], size=tuple(size), mode="bilinear", align_corners=False)[:, 0]


def normalize_maps(maps: torch.Tensor) -> torch.Tensor:
    """Min-max scale each map of ``[B, H, W]`` to [0, 1]; a constant map becomes all zeros."""
    flat = maps.flatten(1)
    low = flat.amin(dim=1)[:, None, None]
    span = (flat.amax(dim=1) - flat.amin(dim=1))[:, None, None]
    return torch.where(span > 0, (maps - low) / span.clamp(min=torch.finfo(maps.dtype).tiny), torch.zeros_like(maps))
