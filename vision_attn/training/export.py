"""Export a trained backbone as one ``<stem>.safetensors`` file, loadable without Lightning::

    model, info = vision_attn.load_trained("model.safetensors")

The metadata (model name and arguments, class names, mean/std, input size) is written into the safetensors header,
so weights and metadata are one atomic file; ``<stem>.json`` beside it repeats it for readers of the earlier
layout. For a timm / Hugging Face folder, ONNX, TorchScript or ``.pt2`` use :func:`vision_attn.export_trained`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vision_attn._io import atomic_write_text
from vision_attn.models._loading import recorded_model_args
from vision_attn.models._weights import read_weights, to_json, write_safetensors

__all__ = ["export_checkpoint", "export_model"]


def export_model(
    net: nn.Module | dict[str, torch.Tensor],
    path: str | os.PathLike,
    model_name: str | None,
    model_args: dict[str, Any] | None = None,
    **extra: Any,
) -> Path:
    """Write ``net``'s state dict (or the state dict ``net``) to ``path`` (``.safetensors``) with
    ``{model_name, model_args, **extra}`` in its header and in the ``.json`` beside it; returns the
    ``.safetensors`` path. Each file is written atomically, the weights (with their metadata) first."""
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path.with_suffix(".safetensors")
    if isinstance(net, nn.Module):
        model_args, state = recorded_model_args(net, model_args), net.state_dict()
    else:
        state = net
    meta = {"model_name": model_name, "model_args": dict(model_args or {}), **extra}
    write_safetensors(path, state, meta)
    atomic_write_text(path.with_suffix(".json"), to_json(meta))
    return path


def export_checkpoint(ckpt_path: str | os.PathLike, path: str | os.PathLike, use_ema: bool = True) -> Path:
    """Export the network of a ``train.py`` checkpoint (the EMA weights if it has them and ``use_ema``) to
    ``path``; returns the ``.safetensors`` path. Loads with ``weights_only=True``: a file holding code is refused."""
    weights = read_weights(ckpt_path, use_ema=use_ema, name="ckpt_path")
    if weights.source != "checkpoint" or not weights.meta.get("model_name"):
        raise ValueError(f"ckpt_path {str(ckpt_path)!r} is not a train.py checkpoint (no 'vision_attn' key)")
    meta = dict(weights.meta, source_checkpoint=Path(ckpt_path).name, weights=weights.weights)
    return export_model(weights.state_dict, path, meta.pop("model_name"), meta.pop("model_args"), **meta)
