"""Helpers shared by the explain methods: the model behind wrappers, targets, image and logit checks, eval mode,
map post-processing."""

from __future__ import annotations

import contextlib
import itertools
import warnings
from collections.abc import Iterator, Sequence
from numbers import Integral

import torch
import torch.nn.functional as F
from torch import nn

from vision_attn.layers.checks import check_images

__all__ = [
    "SIGNS",
    "NotApplicableError",
    "apply_sign",
    "check_logits",
    "check_model_images",
    "check_target",
    "eval_mode",
    "normalize_maps",
    "require_classes",
    "resolve_targets",
    "to_model_inputs",
    "unwrap_model",
    "upsample_maps",
]


class NotApplicableError(ValueError):
    """A method that does not apply to a model (rollout on a CNN, a class-target method on a ``num_classes=0``
    model, ...). A ``ValueError``; the ``explain`` CLI skips such model/method pairs and says so."""


def unwrap_model(model: nn.Module) -> nn.Module:
    """Return the model inside ``DataParallel`` / ``DistributedDataParallel`` / ``torch.compile`` wrappers.

    Only these wrappers are opened (timm's ``unwrap_model`` would also open any module that merely has a
    ``module`` attribute).
    """
    from torch._dynamo.eval_frame import OptimizedModule

    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif isinstance(model, OptimizedModule):
            model = model._orig_mod
        else:
            return model


def _is_index(value: object, scalar: bool = False) -> bool:
    """Whether ``value`` is an int or an integer tensor (0-d only with ``scalar``); bools are not indices."""
    if isinstance(value, torch.Tensor):
        integer = not (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool)
        return integer and (value.ndim == 0 or not scalar)
    return isinstance(value, Integral) and not isinstance(value, bool)


def check_target(target: object) -> None:
    """Raise ``TypeError`` unless ``target`` is ``None``, an int, a sequence of ints or an integer tensor."""
    if target is None or _is_index(target):
        return
    if isinstance(target, Sequence) and not isinstance(target, (str, bytes)):
        bad = [t for t in target if not _is_index(t, scalar=True)]
        if not bad:
            return
        raise TypeError(f"target must hold integer class indices, got {type(bad[0]).__name__} {bad[0]!r} in {target!r}")
    what = f"dtype {target.dtype}" if isinstance(target, torch.Tensor) else f"{type(target).__name__} {target!r}"
    raise TypeError(f"target must be None, an int class index or one int per image, got {what}")


def resolve_targets(target: int | Sequence[int] | torch.Tensor | None, logits: torch.Tensor) -> torch.Tensor:
    """Return the class index per image ``[B]`` (long): ``None`` = predicted class, an int for all, or one each."""
    if logits.ndim != 2:
        raise ValueError(f"the model must return logits [B, num_classes], got shape {tuple(logits.shape)}")
    batch, num_classes = logits.shape
    check_target(target)
    if target is None:
        return logits.detach().argmax(dim=1)
    targets = torch.as_tensor(target, device=logits.device)
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


def require_classes(model: nn.Module, method: str) -> None:
    """Raise :class:`NotApplicableError` if ``model`` has no classifier (``num_classes == 0``) for a class-target
    ``method``."""
    if getattr(model, "num_classes", None) == 0:
        raise NotApplicableError(
            f"method {method!r} explains a class logit, but model {type(model).__name__} has num_classes=0 (no "
            f"classifier head: it returns features); build it with num_classes > 0 or use one of "
            "('rollout', 'attention', 'spatial')"
        )


def check_logits(output: object, model: nn.Module, need_classes: bool = False) -> None:
    """Raise ``ValueError`` if the model ``output`` holds NaN/Inf (naming the images), or, with ``need_classes``,
    is not a logits tensor ``[B, num_classes]``."""
    if not isinstance(output, torch.Tensor):
        if need_classes:
            raise ValueError(
                f"model {type(model).__name__} returned {type(output).__name__}; explain needs logits [B, num_classes]"
            )
        return
    if need_classes and output.ndim != 2:
        raise ValueError(
            f"model {type(model).__name__} returned shape {tuple(output.shape)}; explain needs logits [B, num_classes]"
        )
    finite = torch.isfinite(output.detach()).flatten(1).all(dim=1) if output.ndim > 1 else torch.isfinite(output)
    if not finite.all():
        bad = (~finite).nonzero().flatten().tolist()
        raise ValueError(
            f"model {type(model).__name__} returned NaN or Inf logits for images {bad[:10]}"
            f"{' ...' if len(bad) > 10 else ''}; its weights or its inputs are broken (check the checkpoint and "
            "the input normalization)"
        )


def to_model_inputs(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Return ``images`` on the device and in the floating dtype of ``model``'s first floating parameter/buffer."""
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        if tensor.is_floating_point():
            return images.to(device=tensor.device, dtype=tensor.dtype)
    return images


@contextlib.contextmanager
def eval_mode(model: nn.Module, caller: str = "explain", stacklevel: int = 4) -> Iterator[None]:
    """Run the block with ``model`` in eval mode and restore every module's train/eval flag afterwards.

    A model found in train mode gets a ``UserWarning``: dropout would make the maps random and BatchNorm would
    normalize by the batch and update its running statistics, so it is explained in eval mode instead.
    """
    flags = [(module, module.training) for module in model.modules()]
    if any(training for _, training in flags):
        warnings.warn(
            f"{caller}: model {type(model).__name__} is in train mode; it is explained in eval mode (no dropout, "
            "BatchNorm running statistics neither used from the batch nor updated) and put back in train mode "
            "afterwards; call model.eval() first to silence this warning",
            UserWarning,
            stacklevel=stacklevel,
        )
        model.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


SIGNS = ("positive", "absolute", "signed")  # how a signed attribution becomes a map


def apply_sign(attributions: torch.Tensor, sign: str) -> torch.Tensor:
    """A signed attribution map as a map of evidence: its ``'positive'`` part (for the class; the reading of LRP
    heatmaps and of captum's ``sign='positive'``), its ``'absolute'`` value, or ``'signed'`` (min-max scaling then
    puts the strongest evidence against the class at 0 and no evidence in between)."""
    if sign == "positive":
        return attributions.clamp(min=0)
    if sign == "absolute":
        return attributions.abs()
    if sign == "signed":
        return attributions
    raise ValueError(f"sign {sign!r} is unknown; expected one of {SIGNS}")


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
