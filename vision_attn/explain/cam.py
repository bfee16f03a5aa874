"""Grad-CAM family, batched in torch, for CNN feature maps and ViT tokens.

Matches ``pytorch_grad_cam`` (``GradCAM``, ``GradCAMPlusPlus``, ``LayerCAM``) on the maps it produces, but
leaves the model as it was: no ``model.eval()``, no ``zero_grad()`` / ``.grad`` writes (gradients come from
``torch.autograd.grad``), every hook removed, errors raised instead of printed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vision_attn.explain._common import NotApplicableError, check_logits, resolve_targets
from vision_attn.explain.families.base import FeatureLayout

__all__ = ["CAM_METHODS", "cam_weights", "default_cam_layer", "default_target_layer", "grad_cam"]

CAM_METHODS = ("gradcam", "gradcam++", "layercam")


def cam_weights(method: str, activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
    """Return the (unrectified) class activation map ``[B, h, w]`` of ``activations``/``gradients`` ``[B, C, h, w]``.

    * ``gradcam`` (Selvaraju et al. 2017): channel weights = spatial mean of the gradients;
    * ``gradcam++`` (Chattopadhay et al. 2018): weights = ``Σ relu(∇) · α`` with the closed-form ``α``;
    * ``layercam`` (Jiang et al. 2021): per-location weights ``relu(∇)``.
    """
    if method == "gradcam":
        weights = gradients.mean(dim=(2, 3), keepdim=True)
        return (weights * activations).sum(dim=1)
    if method == "gradcam++":
        grads2 = gradients.pow(2)
        sum_act = activations.sum(dim=(2, 3), keepdim=True)
        alpha = grads2 / (2 * grads2 + sum_act * grads2 * gradients + 1e-6)
        alpha = torch.where(gradients != 0, alpha, torch.zeros_like(alpha))
        weights = (gradients.clamp(min=0) * alpha).sum(dim=(2, 3), keepdim=True)
        return (weights * activations).sum(dim=1)
    if method == "layercam":
        return (gradients.clamp(min=0) * activations).sum(dim=1)
    raise ValueError(f"method {method!r} is not a CAM method; expected one of {CAM_METHODS}")


def _feature_info_layer(model: nn.Module, images: torch.Tensor) -> tuple[nn.Module, FeatureLayout] | None:
    """The last stage of a timm model's ``feature_info`` whose map has more than one location for ``images``, with
    its layout told from its output's shape against the stage's reduction: ``[B, C, h, w]``, ``[B, h, w, C]`` or
    tokens ``[B, N, C]`` (``N - gh*gw`` prefix tokens; a block with ``norm1`` then gives its input)."""
    info = getattr(model, "feature_info", None)
    stages = []
    try:
        for entry in reversed(list(info or [])):
            grid = tuple(-(-int(size) // int(entry["reduction"])) for size in images.shape[-2:])
            if grid[0] * grid[1] > 1:
                stages.append((model.get_submodule(entry["module"]), grid))
    except (AttributeError, KeyError, TypeError, ValueError):
        return None
    if not stages:
        return None
    module, grid = stages[0]
    outputs: list[object] = []
    handle = module.register_forward_hook(lambda m, args, out: outputs.append(out))
    try:
        with torch.no_grad():
            model(images[:1])
    finally:
        handle.remove()
    if len(outputs) != 1 or not isinstance(outputs[0], torch.Tensor):
        return None
    shape = tuple(outputs[0].shape)
    if len(shape) == 4 and shape[-2:] == grid:
        return module, FeatureLayout("nchw")
    if len(shape) == 4 and shape[1:3] == grid:
        return module, FeatureLayout("nhwc")
    if len(shape) == 3 and 0 <= shape[1] - grid[0] * grid[1] <= 16:
        prefix = shape[1] - grid[0] * grid[1]
        norm = getattr(module, "norm1", None)
        if prefix > 0 and isinstance(norm, nn.Module):  # a class-token head reads nothing of the last block's patch
            return norm, FeatureLayout("tokens", prefix, grid)  # outputs: take its input, as for ViTs
        return module, FeatureLayout("tokens", prefix, grid)
    return None


def default_cam_layer(model: nn.Module, images: torch.Tensor) -> tuple[nn.Module, FeatureLayout]:
    """Grad-CAM's default target layer of ``model`` and how its output is a feature map.

    The model's family adapter names it (:mod:`vision_attn.explain.families`: the last block's ``norm1`` for ViTs,
    the last stage for hierarchical models, the last self-attention block for CaiT / XCiT); else the last stage of
    timm's ``feature_info``; else the module that last produces a 4-D feature map with more than one location during
    a forward pass of one image (``layer4`` for a ResNet), never one inside a token-attention module (whose ``q``/``k``
    tensors ``[B, heads, N, head_dim]`` are 4-D too). Raises :class:`NotApplicableError` suggesting ``target_layers``
    when none is found.
    """
    from vision_attn.explain.families import find_adapter

    adapter = find_adapter(model)
    found = adapter.cam_layer(model) if adapter is not None else None
    if found is not None:
        return found
    found = _feature_info_layer(model, images)
    if found is not None:
        return found
    inside_attention = {
        id(sub) for m in model.modules() if hasattr(m, "fused_attn") for sub in m.modules() if sub is not m
    }
    layers: list[nn.Module] = []
    calls: dict[int, int] = {}

    def hook(module: nn.Module, args: object, output: object) -> None:
        calls[id(module)] = calls.get(id(module), 0) + 1
        if isinstance(output, torch.Tensor) and output.ndim == 4 and output.shape[-1] * output.shape[-2] > 1:
            layers.append(module)

    candidates = [m for m in model.modules() if m is not model and id(m) not in inside_attention]
    handles = [m.register_forward_hook(hook) for m in candidates]
    try:
        with torch.no_grad():
            model(images[:1])
    finally:
        for handle in handles:
            handle.remove()
    layers = [m for m in layers if calls[id(m)] == 1]  # a layer that runs twice has no single map
    if not layers:
        raise NotApplicableError(
            f"model {type(model).__name__} produces no 4-D feature map for Grad-CAM; pass target_layers=[module]"
        )
    return layers[-1], FeatureLayout("nchw")


def default_target_layer(model: nn.Module, images: torch.Tensor) -> nn.Module:
    """Return the layer Grad-CAM uses by default (see :func:`default_cam_layer`, which also says its layout). Pass
    the unwrapped model (see :func:`~vision_attn.explain._common.unwrap_model`)."""
    return default_cam_layer(model, images)[0]


def _to_spatial(
    tensor: torch.Tensor,
    num_prefix_tokens: int,
    grid_size: tuple[int, int] | None,
    layer_name: str,
    layout: FeatureLayout | None = None,
) -> torch.Tensor:
    if layout is not None and layout.convert is not None:
        return layout.convert(tensor)
    if layout is not None and layout.kind == "nhwc" and tensor.ndim == 4:
        return tensor.permute(0, 3, 1, 2)
    if tensor.ndim == 4:
        return tensor
    if layout is not None and layout.kind == "tokens":
        num_prefix_tokens = layout.num_prefix_tokens
        grid_size = layout.grid or grid_size
        if grid_size is None or grid_size[0] * grid_size[1] != tensor.shape[1] - num_prefix_tokens:
            count = tensor.shape[1] - num_prefix_tokens
            side = math.isqrt(count)
            grid_size = (side, side) if side * side == count else grid_size
    if tensor.ndim == 3 and grid_size is not None:  # tokens B, N, C -> B, C, gh, gw
        tokens = tensor[:, num_prefix_tokens:]
        if tokens.shape[1] != grid_size[0] * grid_size[1]:
            raise ValueError(
                f"target layer {layer_name} gives {tokens.shape[1]} patch tokens, which does not fit the grid "
                f"{grid_size}; pass grid_size and num_prefix_tokens"
            )
        return tokens.transpose(1, 2).reshape(tensor.shape[0], -1, *grid_size)
    raise ValueError(
        f"target layer {layer_name} outputs shape {tuple(tensor.shape)}; Grad-CAM needs [B, C, h, w] feature maps "
        "or [B, N, C] tokens of a model with a patch grid"
    )


def grad_cam(
    model: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor | None,
    target_layers: Sequence[nn.Module],
    method: str = "gradcam",
    num_prefix_tokens: int = 0,
    grid_size: tuple[int, int] | None = None,
    layouts: Sequence[FeatureLayout | None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``model`` once and return ``(maps [B, H_img, W_img], targets [B])`` of a Grad-CAM ``method``.

    ``targets``: class index per image (``None``: the predicted class). Each layer's map is rectified,
    min-max scaled per image and upsampled (bilinear) to the image; the maps of several layers are averaged,
    as in ``pytorch_grad_cam``. ``[B, N, C]`` token outputs are reshaped to ``grid_size`` after dropping
    ``num_prefix_tokens``; ``layouts`` (one per layer, see :func:`default_cam_layer`) say where a layer's output is
    channels-last (``[B, h, w, C]``) or tokens with their own prefix and grid.
    """
    if method not in CAM_METHODS:
        raise ValueError(f"method {method!r} is not a CAM method; expected one of {CAM_METHODS}")
    activations: list[torch.Tensor] = []

    def hook(module: nn.Module, args: object, output: torch.Tensor) -> None:
        activations.append(output)

    handles = [layer.register_forward_hook(hook) for layer in target_layers]
    try:
        with torch.enable_grad():
            x = images.detach().requires_grad_(True)
            logits = model(x)
            check_logits(logits, model, need_classes=True)
            if len(activations) != len(target_layers):
                raise ValueError(
                    f"target_layers has {len(target_layers)} layers, but {len(activations)} outputs were recorded "
                    "in the forward pass; every target layer must run exactly once"
                )
            targets = resolve_targets(targets, logits)
            score = logits.gather(1, targets[:, None]).sum()
            grads = torch.autograd.grad(score, activations)
    finally:
        for handle in handles:
            handle.remove()

    maps = []
    for i, (act, grad) in enumerate(zip(activations, grads, strict=True)):
        name = f"target_layers[{i}]"
        layout = layouts[i] if layouts is not None else None
        act = _to_spatial(act.detach(), num_prefix_tokens, grid_size, name, layout)
        grad = _to_spatial(grad, num_prefix_tokens, grid_size, name, layout)
        cam = cam_weights(method, act.float(), grad.float()).clamp(min=0)  # B, h, w
        cam = cam - cam.flatten(1).amin(dim=1)[:, None, None]
        cam = cam / (1e-7 + cam.flatten(1).amax(dim=1)[:, None, None])
        maps.append(F.interpolate(cam[:, None], size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0])
    return torch.stack(maps).clamp(min=0).mean(dim=0), targets
