"""Grad-CAM family, batched in torch, for CNN feature maps and ViT tokens.

Matches ``pytorch_grad_cam`` (``GradCAM``, ``GradCAMPlusPlus``, ``LayerCAM``) on the maps it produces, but
leaves the model as it was: no ``model.eval()``, no ``zero_grad()`` / ``.grad`` writes (gradients come from
``torch.autograd.grad``), every hook removed, errors raised instead of printed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vision_attn.explain._common import NotApplicableError, check_logits, resolve_targets

__all__ = ["CAM_METHODS", "cam_weights", "default_target_layer", "grad_cam"]

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


def default_target_layer(model: nn.Module, images: torch.Tensor) -> nn.Module:
    """Return the layer Grad-CAM uses by default.

    ViT-style models (``blocks`` and ``patch_embed``): the last block's ``norm1`` (the usual choice for ViTs).
    Otherwise the module that last produces a 4-D feature map with more than one location during a forward
    pass of one image (``layer4`` for a ResNet), never one inside a token-attention module (whose ``q``/``k``
    tensors ``[B, heads, N, head_dim]`` are 4-D too). Pass the unwrapped model (see
    :func:`~vision_attn.explain._common.unwrap_model`).
    """
    blocks = getattr(model, "blocks", None)
    if hasattr(model, "patch_embed") and isinstance(blocks, (nn.Sequential, nn.ModuleList)) and len(blocks) > 0:
        last = blocks[-1]
        return last.norm1 if hasattr(last, "norm1") else last
    inside_attention = {
        id(sub) for m in model.modules() if hasattr(m, "fused_attn") for sub in m.modules() if sub is not m
    }
    found: list[nn.Module] = []

    def hook(module: nn.Module, args: object, output: object) -> None:
        if isinstance(output, torch.Tensor) and output.ndim == 4 and output.shape[-1] * output.shape[-2] > 1:
            found.append(module)

    candidates = [m for m in model.modules() if m is not model and id(m) not in inside_attention]
    handles = [m.register_forward_hook(hook) for m in candidates]
    try:
        with torch.no_grad():
            model(images[:1])
    finally:
        for handle in handles:
            handle.remove()
    if not found:
        raise NotApplicableError(
            f"model {type(model).__name__} produces no 4-D feature map for Grad-CAM; pass target_layers=[module]"
        )
    return found[-1]


def _to_spatial(
    tensor: torch.Tensor, num_prefix_tokens: int, grid_size: tuple[int, int] | None, layer_name: str
) -> torch.Tensor:
    if tensor.ndim == 4:
        return tensor
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``model`` once and return ``(maps [B, H_img, W_img], targets [B])`` of a Grad-CAM ``method``.

    ``targets``: class index per image (``None``: the predicted class). Each layer's map is rectified,
    min-max scaled per image and upsampled (bilinear) to the image; the maps of several layers are averaged,
    as in ``pytorch_grad_cam``. ``[B, N, C]`` token outputs are reshaped to ``grid_size`` after dropping
    ``num_prefix_tokens``.
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
        act = _to_spatial(act.detach(), num_prefix_tokens, grid_size, name)
        grad = _to_spatial(grad, num_prefix_tokens, grid_size, name)
        cam = cam_weights(method, act.float(), grad.float()).clamp(min=0)  # B, h, w
        cam = cam - cam.flatten(1).amin(dim=1)[:, None, None]
        cam = cam / (1e-7 + cam.flatten(1).amax(dim=1)[:, None, None])
        maps.append(F.interpolate(cam[:, None], size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0])
    return torch.stack(maps).clamp(min=0).mean(dim=0), targets
