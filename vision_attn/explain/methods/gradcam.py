"""``gradcam``, ``gradcam++``, ``layercam``: the Grad-CAM family on a CNN feature map or on ViT tokens (Selvaraju et
al. 2017; Chattopadhay et al. 2018; Jiang et al. 2021)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from vision_attn.explain.cam import default_cam_layer, grad_cam
from vision_attn.explain.registry import register_method
from vision_attn.explain.tokens import token_layout

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # names seen through DataParallel / DDP / torch.compile


def _submodule(model: nn.Module, name: str) -> nn.Module:
    """``model.get_submodule(name)``, also for a name given through a wrapper (``module.layer4``)."""
    try:
        return model.get_submodule(name)
    except AttributeError as err:
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                return _submodule(model, name[len(prefix) :])
        raise ValueError(f"target_layers entry {name!r} is not a submodule of the model: {err}") from err


def resolve_target_layers(model: nn.Module, target_layers: Any) -> list[nn.Module]:
    """Modules of ``target_layers`` (a module, a submodule name, or a list of them)."""
    layers = target_layers if isinstance(target_layers, (list, tuple)) else [target_layers]
    resolved = []
    for layer in layers:
        if isinstance(layer, str):
            layer = _submodule(model, layer)
        if not isinstance(layer, nn.Module):
            raise TypeError(f"target_layers entries must be modules or submodule names, got {type(layer).__name__}")
        resolved.append(layer)
    return resolved


def _register(name: str, description: str, reference: str) -> None:
    def cam(
        model: nn.Module,
        images: torch.Tensor,
        target: int | Sequence[int] | torch.Tensor | None = None,
        target_layers: Any = None,
        num_prefix_tokens: int | None = None,
        grid_size: int | Sequence[int] | None = None,
    ) -> torch.Tensor:
        num_prefix, grid = token_layout(model, tuple(images.shape[-2:]), num_prefix_tokens, grid_size)
        if target_layers is None:
            layer, layout = default_cam_layer(model, images)
            layers, layouts = [layer], [layout]
            if layout.kind == "tokens" and num_prefix_tokens is None and grid_size is None:
                num_prefix = layout.num_prefix_tokens
        else:
            layers, layouts = resolve_target_layers(model, target_layers), None
        maps, _ = grad_cam(
            model, images, target, layers, name, num_prefix_tokens=num_prefix, grid_size=grid, layouts=layouts
        )
        return maps

    cam.__name__ = cam.__qualname__ = name.replace("+", "p")
    cam.__doc__ = f"{name} of the ``target`` logits on ``target_layers`` (default: the model's last feature map)."
    register_method(name, cam, needs=("class_target", "feature_layer"), description=description, reference=reference)


_register(
    "gradcam",
    "the target layer's activations weighted by their spatially averaged gradients for the target class",
    "Selvaraju et al. 2017",
)
_register(
    "gradcam++",
    "Grad-CAM with per-location weights from higher-order gradient terms (several object instances)",
    "Chattopadhay et al. 2018",
)
_register(
    "layercam",
    "activations weighted by their positive gradients at each location (finer maps from earlier layers)",
    "Jiang et al. 2021",
)
