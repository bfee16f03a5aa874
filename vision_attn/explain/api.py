"""One entry point, :func:`explain`: ``(model, images [B, C, H, W]) -> maps [B, H, W]`` in [0, 1] for any method."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from vision_attn.explain._common import (
    TOKEN_METHODS,
    NotApplicableError,
    check_logits,
    check_model_images,
    check_target,
    eval_mode,
    normalize_maps,
    require_classes,
    resolve_targets,
    to_model_inputs,
    token_layout,
    token_pool,
    unwrap_model,
    upsample_maps,
)
from vision_attn.explain.cam import CAM_METHODS, default_target_layer, grad_cam
from vision_attn.explain.capture import AttentionRecorder
from vision_attn.explain.metrics import random_maps
from vision_attn.explain.rollout import (
    attention_rollout,
    check_grid_size,
    gradient_rollout,
    last_layer_attention,
    token_pool_weights,
)

__all__ = ["CLASS_METHODS", "METHODS", "TOKEN_METHODS", "attention_gradients", "explain", "record_attentions"]

METHODS = (*TOKEN_METHODS, *CAM_METHODS, "spatial", "random")
CLASS_METHODS = ("gradient_rollout", *CAM_METHODS)  # explain one class logit; need a classifier head

_OPTIONS: dict[str, tuple[str, ...]] = {
    "rollout": ("head_fusion", "discard_ratio", "start_layer", "num_prefix_tokens", "grid_size"),
    "gradient_rollout": ("num_prefix_tokens", "grid_size"),
    "attention": ("head_fusion", "layer", "num_prefix_tokens", "grid_size"),
    **dict.fromkeys(CAM_METHODS, ("target_layers", "num_prefix_tokens", "grid_size")),
    "spatial": ("layer",),
    "random": ("seed", "grid_size"),
}


def _token_attentions(
    recorder: AttentionRecorder, model: nn.Module, batch_size: int | None = None
) -> list[torch.Tensor]:
    if not recorder.attentions:
        kinds = sorted(set(recorder.kinds.values()))
        found = f" (it has only {', '.join(kinds)} maps)" if kinds else ""
        raise NotApplicableError(
            f"model {type(model).__name__} has no token-attention modules{found}; the attention methods "
            f"{TOKEN_METHODS} need a ViT-style model; use one of {(*CAM_METHODS, 'spatial')} for a CNN"
        )
    if batch_size is not None and any(a.shape[0] != batch_size for a in recorder.attentions):
        shapes = sorted({tuple(a.shape) for a in recorder.attentions})
        raise NotApplicableError(
            f"model {type(model).__name__} has attention maps of shapes {shapes} for {batch_size} images: "
            f"windowed or pooled attention (e.g. Swin) has no global [B, heads, N, N] map for {TOKEN_METHODS}; "
            f"use one of {CAM_METHODS}"
        )
    return recorder.attentions


def _record(model: nn.Module, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor | None]:
    """``(attentions, logits, pool weights [B, N] or None)`` of one forward pass without gradients."""
    with torch.no_grad(), AttentionRecorder(model) as recorder:
        logits = model(images)
    check_logits(logits, model)
    return _token_attentions(recorder, model, images.shape[0]), logits, recorder.pool_weights


def _gradients(
    model: nn.Module, images: torch.Tensor, target: int | Sequence[int] | torch.Tensor | None
) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor, torch.Tensor | None]:
    """``(attentions, gradients, targets, pool weights or None)`` of one forward and one backward pass."""
    with torch.enable_grad(), AttentionRecorder(model, detach=False) as recorder:
        logits = model(images.detach().requires_grad_(True))
        check_logits(logits, model, need_classes=True)
        attentions = _token_attentions(recorder, model, images.shape[0])
        targets = resolve_targets(target, logits)
        score = logits.gather(1, targets[:, None]).sum()  # images are independent: d(sum)/dA_b = d(logit_b)/dA_b
        gradients = torch.autograd.grad(score, attentions)
    pool = recorder.pool_weights
    return (
        [a.detach() for a in attentions],
        [g.detach() for g in gradients],
        targets,
        None if pool is None else pool.detach(),
    )


def record_attentions(model: nn.Module, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Run ``model`` on ``images`` without gradients; return ``(attentions [B, heads, N, N] per layer, logits)``.

    ``DataParallel``/``DistributedDataParallel``/``torch.compile`` wrappers are unwrapped; the model runs in its
    current mode; NaN/Inf logits raise a ``ValueError``.
    """
    attentions, logits, _ = _record(unwrap_model(model), images)
    return attentions, logits


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
    require_classes(model, "gradient_rollout")
    attentions, gradients, targets, _ = _gradients(model, images, target)
    return attentions, gradients, targets


def _check_options(method: str, options: dict[str, Any]) -> None:
    unknown = sorted(set(options) - set(_OPTIONS[method]))
    if unknown:
        raise TypeError(f"explain(method={method!r}) got unknown options {unknown}; it accepts {_OPTIONS[method]}")


def _resolve_layers(model: nn.Module, target_layers: Any, wrapper: nn.Module | None = None) -> list[nn.Module]:
    """Modules of ``target_layers`` (modules or names in ``model``, or in its ``wrapper`` such as ``module.x``)."""
    layers = target_layers if isinstance(target_layers, (list, tuple)) else [target_layers]
    resolved = []
    for layer in layers:
        if isinstance(layer, str):
            name = layer
            for owner in (model, wrapper):
                try:
                    layer = owner.get_submodule(name) if owner is not None else None
                except AttributeError as err:
                    error = err
                    continue
                break
            if not isinstance(layer, nn.Module):
                raise ValueError(f"target_layers entry {name!r} is not a submodule of the model: {error}")
        if not isinstance(layer, nn.Module):
            raise TypeError(f"target_layers entries must be modules or submodule names, got {type(layer).__name__}")
        resolved.append(layer)
    return resolved


def _received_attention(attention: torch.Tensor, image_size: tuple[int, int], name: str) -> torch.Tensor:
    """Attention each key position receives, mean over heads and queries: ``[B, h, Nq, Nk] -> [B, gh, gw]``.

    The key grid follows the image's aspect ratio (``gh * gw == Nk``, ``gh / gw ~ H / W``).
    """
    num_keys = attention.shape[-1]
    height, width = image_size
    gh = max(1, round(math.sqrt(num_keys * height / width)))
    gw = num_keys // gh
    if gh * gw != num_keys:
        raise ValueError(
            f"attention map {name} has {num_keys} key positions, which fit no grid of the image's aspect "
            f"{height}x{width}"
        )
    return attention.float().mean(dim=(1, 2)).reshape(-1, gh, gw)


def _spatial_maps(model: nn.Module, images: torch.Tensor, layer: int | None) -> torch.Tensor:
    size = (images.shape[-2], images.shape[-1])
    with torch.no_grad(), AttentionRecorder(model) as recorder:
        check_logits(model(images), model)
    maps = []
    for name, tensor in recorder.maps.items():
        if recorder.kinds[name] == "spatial":
            maps.append(tensor.float().mean(dim=1))  # B, 1|C, h, w -> B, h, w
        elif recorder.kinds[name] == "attention" and name not in recorder.token_names and tensor.ndim == 4:
            maps.append(_received_attention(tensor, size, name))
    if not maps:
        kinds = sorted(set(recorder.kinds.values()))
        raise NotApplicableError(
            f"model {type(model).__name__} has no spatial attention maps (AttentionTap kind 'spatial' or conv "
            f"attention 'attention'); found kinds {kinds}"
        )
    if layer is not None:
        if not isinstance(layer, int) or not -len(maps) <= layer < len(maps):
            raise ValueError(f"layer {layer!r} is out of range for {len(maps)} spatial maps")
        maps = [maps[layer]]
    return torch.stack([normalize_maps(upsample_maps(m, size)) for m in maps]).mean(dim=0)


def explain(
    model: nn.Module,
    images: torch.Tensor,
    method: str = "rollout",
    target: int | Sequence[int] | torch.Tensor | None = None,
    **options: Any,
) -> torch.Tensor:
    """Explain ``model``'s predictions on ``images`` ``[B, C, H, W]``; returns maps ``[B, H, W]`` in [0, 1].

    Each map is min-max scaled per image and bilinearly upsampled to the image size. Methods (:data:`METHODS`)
    and their ``options``:

    * ``rollout`` — attention rollout (Abnar & Zuidema 2020): ``head_fusion``, ``discard_ratio``,
      ``start_layer``; class-agnostic (``target`` is not used);
    * ``gradient_rollout`` — gradient-weighted rollout (Chefer et al. 2021) of the ``target`` logit;
    * ``attention`` — raw attention of one layer (``layer=-1``, ``head_fusion``), class-agnostic;
    * ``gradcam``, ``gradcam++``, ``layercam`` — Grad-CAM family (Selvaraju et al. 2017; Chattopadhay et al.
      2018; Jiang et al. 2021) on ``target_layers`` (modules or names; default: see
      :func:`~vision_attn.explain.cam.default_target_layer`);
    * ``spatial`` — the CNN attention modules' own maps: spatial gates (CBAM, coordinate attention) and, for
      conv attention (non-local, AA-conv, BoT), the attention each position receives (mean over heads and
      queries); each min-max scaled, then the mean over all modules, or only module ``layer``;
    * ``random`` — a random-map baseline (``seed``, ``grid_size`` for blocky maps).

    Token methods also take ``num_prefix_tokens`` and ``grid_size`` (an int or ``(gh, gw)``); both are read from
    the model and a given value must agree with it. Token methods read the tokens the model's head pools (class
    token, the mean of the patch tokens for average pooling, the pooling weights of CCT sequence pooling, class
    and distillation tokens of distilled DeiTs; see :func:`~vision_attn.explain._common.token_pool`).
    ``target``: ``None`` = the predicted class, an int for all images, or one per image.

    ``DataParallel``/``DistributedDataParallel``/``torch.compile`` wrappers are unwrapped; images are moved to the
    model's device and dtype (the maps come back float32 on the images' device). The model is explained in eval
    mode: a model in train mode gets a ``UserWarning`` and is put back in train mode afterwards; nothing else
    changes (no ``.grad`` writes, every hook removed). Raises :class:`~vision_attn.explain.NotApplicableError` (a
    ``ValueError``) where ``method`` does not suit the model, and ``ValueError`` for NaN/Inf logits.
    """
    if method not in METHODS:
        raise ValueError(f"method {method!r} is unknown; expected one of {METHODS}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    _check_options(method, options)
    check_target(target)
    wrapper, model = model, unwrap_model(model)
    check_model_images(model, images)
    size = (images.shape[-2], images.shape[-1])
    inputs = to_model_inputs(model, images)
    if method in CLASS_METHODS:
        require_classes(model, method)
    if method in TOKEN_METHODS or method in CAM_METHODS:
        num_prefix, grid = token_layout(
            model, size, options.pop("num_prefix_tokens", None), options.pop("grid_size", None)
        )
    with eval_mode(model):
        if method in TOKEN_METHODS:
            if method == "gradient_rollout":
                attentions, gradients, _, sequence_weights = _gradients(model, inputs, target)
            else:
                attentions, _, sequence_weights = _record(model, inputs)
            weights = token_pool_weights(token_pool(model), attentions[0].shape[-1], num_prefix, sequence_weights)
            layout = dict(num_prefix_tokens=num_prefix, grid_size=grid, pool_weights=weights)
            if method == "rollout":
                raw = attention_rollout(attentions, **layout, **options)
            elif method == "attention":
                raw = last_layer_attention(attentions, **layout, **options)
            else:
                raw = gradient_rollout(attentions, gradients, **layout)
        elif method in CAM_METHODS:
            target_layers = options.get("target_layers")
            layers = (
                [default_target_layer(model, inputs)]
                if target_layers is None
                else _resolve_layers(model, target_layers, wrapper)
            )
            raw, _ = grad_cam(model, inputs, target, layers, method, num_prefix_tokens=num_prefix, grid_size=grid)
        elif method == "spatial":
            raw = _spatial_maps(model, inputs, options.get("layer"))
        else:  # random
            grid = options.get("grid_size")
            grid = None if grid is None else check_grid_size(grid)
            raw = random_maps(images.shape[0], size, grid_size=grid, seed=int(options.get("seed", 0)))
    return normalize_maps(upsample_maps(raw.detach(), size)).to(images.device)
