"""Export a trained backbone as ``<stem>.safetensors`` + ``<stem>.json``, loadable without Lightning::

model = vision_attn.create_model(meta["model_name"], checkpoint_path="model.safetensors")
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

__all__ = ["export_checkpoint", "export_model"]


def _to_jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_to_jsonable(v) for v in value]
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)


def export_model(
    net: nn.Module | dict[str, torch.Tensor],
    path: str | os.PathLike,
    model_name: str | None,
    model_args: dict[str, Any] | None = None,
    **extra: Any,
) -> Path:
    """Write ``net``'s state dict (or the state dict ``net``) to ``path`` (``.safetensors``) and
    ``{model_name, model_args, **extra}`` to the ``.json`` beside it; returns the ``.safetensors`` path."""
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path.with_suffix(".safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    state = net.state_dict() if isinstance(net, nn.Module) else net
    state = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    save_file(state, str(path), metadata={"format": "pt"})
    meta = {"model_name": model_name, "model_args": dict(model_args or {}), **extra}
    path.with_suffix(".json").write_text(json.dumps(_to_jsonable(meta), indent=2, sort_keys=True) + "\n")
    return path


def _state_with_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def export_checkpoint(ckpt_path: str | os.PathLike, path: str | os.PathLike, use_ema: bool = True) -> Path:
    """Export the network of a ``train.py`` checkpoint (the EMA weights if it has them and ``use_ema``) to
    ``path``; returns the ``.safetensors`` path. Loads with ``weights_only=True``: a file holding code is refused."""
    ckpt_path = Path(ckpt_path)
    if not ckpt_path.is_file():
        raise FileNotFoundError(f"ckpt_path {str(ckpt_path)!r} does not exist")
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)  # never unpickles code
    info = ckpt.get("vision_attn") if isinstance(ckpt, dict) else None
    if not isinstance(info, dict) or "state_dict" not in ckpt:
        raise ValueError(f"ckpt_path {str(ckpt_path)!r} is not a train.py checkpoint (no 'vision_attn' key)")
    state = ckpt["state_dict"]
    weights = _state_with_prefix(state, "ema.module.") if use_ema else {}
    weights = weights or _state_with_prefix(state, "net.")
    if not weights:
        raise ValueError(f"ckpt_path {str(ckpt_path)!r} holds no 'net.' weights")
    extra = {k: v for k, v in info.items() if k not in ("model_name", "model_args")}
    extra.update(source_checkpoint=str(ckpt_path), epoch=ckpt.get("epoch"), global_step=ckpt.get("global_step"))
    if "classes" in extra:
        extra["class_names"] = extra.pop("classes")
    return export_model(weights, path, info.get("model_name"), info.get("model_args"), **extra)
