"""One entry point, :func:`explain`: ``(model, images [B, C, H, W]) -> maps [B, H, W]`` in [0, 1] for any registered
method (:mod:`vision_attn.explain.registry`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from vision_attn.explain._common import (
    NotApplicableError,
    check_model_images,
    check_target,
    eval_mode,
    normalize_maps,
    to_model_inputs,
    unwrap_model,
    upsample_maps,
)
from vision_attn.explain.registry import get_method
from vision_attn.explain.tokens import capture_token_attention

__all__ = ["attention_gradients", "explain", "record_attentions"]


def record_attentions(model: nn.Module, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Run ``model`` on ``images`` without gradients; return ``(attentions [B, heads, N, N] per layer, logits)``.

    ``DataParallel``/``DistributedDataParallel``/``torch.compile`` wrappers are unwrapped; the model runs in its
    current mode; NaN/Inf logits raise a ``ValueError``.
    """
    tokens = capture_token_attention(unwrap_model(model), images)
    return tokens.attentions, tokens.logits


def attention_gradients(
    model: nn.Module, images: torch.Tensor, target: int | Sequence[int] | torch.Tensor | None = None
) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """Run ``model`` once; return ``(attentions, gradients, targets)`` for gradient rollout.

    ``attentions`` and ``gradients`` are lists of ``[B, heads, N, N]`` (detached): the attention probabilities
    and the gradient of each image's target logit (``target``: ``None`` = predicted class, an int, or one per
    image) with respect to them; ``targets`` is ``[B]``. Parameter ``.grad`` fields are left untouched; wrappers
    are unwrapped and the model runs in its current mode, as in :func:`record_attentions`.
    """
    model = unwrap_model(model)
    check_target(target)
    reason = get_method("gradient_rollout").reason_not_applicable(model)
    if reason:
        raise NotApplicableError(reason)
    tokens = capture_token_attention(model, images, target, gradients=True)
    return tokens.attentions, tokens.gradients, tokens.targets


def explain(
    model: nn.Module,
    images: torch.Tensor,
    method: str = "rollout",
    target: int | Sequence[int] | torch.Tensor | None = None,
    **options: Any,
) -> torch.Tensor:
    """Explain ``model``'s predictions on ``images`` ``[B, C, H, W]``; returns maps ``[B, H, W]`` in [0, 1].

    ``method`` is any registered method (:func:`~vision_attn.explain.list_methods`; ``vision-attn methods`` prints
    them with their options; ``docs/explain.md`` lists them): built in are ``rollout``, ``gradient_rollout``,
    ``attention``, ``gradcam``, ``gradcam++``, ``layercam``, ``spatial`` and ``random``. ``options`` are the
    method's own (e.g. ``head_fusion``, ``discard_ratio``, ``start_layer`` for rollout; ``target_layers`` for
    Grad-CAM; ``num_prefix_tokens`` and ``grid_size`` for every token method, read from the model and checked
    against it when given). ``target``: ``None`` = the predicted class, an int for all images, or one per image
    (class-agnostic methods ignore it).

    Token methods read any transformer family an adapter of :mod:`vision_attn.explain.families` describes (plain
    ViTs, attention-pool heads, class attention, windowed and hierarchical models; the maps lie on the finest token
    grid); ``applicable_methods(model)`` says which apply and why the others do not. Each map is min-max scaled per
    image and bilinearly upsampled to the image size. ``DataParallel`` /
    ``DistributedDataParallel`` / ``torch.compile`` wrappers are unwrapped; images are moved to the model's device
    and dtype (the maps come back float32 on the images' device). The model is explained in eval mode: a model in
    train mode gets a ``UserWarning`` and is put back in train mode afterwards; nothing else changes (no ``.grad``
    writes, every hook removed). Raises :class:`~vision_attn.explain.NotApplicableError` (a ``ValueError``) where
    ``method`` does not suit the model, and ``ValueError`` for NaN/Inf logits.
    """
    spec = get_method(method) if isinstance(method, str) else None
    if spec is None:
        raise TypeError(f"method must be a registered method name (str), got {type(method).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    spec.check_options(options)
    check_target(target)
    model = unwrap_model(model)
    check_model_images(model, images)
    reason = spec.reason_not_applicable(model)
    if reason:
        raise NotApplicableError(reason)
    size = (images.shape[-2], images.shape[-1])
    with eval_mode(model):
        raw = spec.fn(model, to_model_inputs(model, images), target=target, **options)
    if not isinstance(raw, torch.Tensor) or raw.ndim != 3 or raw.shape[0] != images.shape[0]:
        shape = tuple(raw.shape) if isinstance(raw, torch.Tensor) else type(raw).__name__
        raise ValueError(f"method {method!r} returned {shape}; an explain method must return maps [B, h, w] with "
                         f"B={images.shape[0]}")  # fmt: skip
    raw = raw.detach()
    raw = raw - raw.flatten(1).amin(dim=1)[:, None, None]  # min-max scaling ignores the offset; float32 keeps the rest
    return normalize_maps(upsample_maps(raw, size)).to(images.device)
