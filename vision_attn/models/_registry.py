"""Registry of vision_attn models: timm's registry plus the list of names that are ours.

Every model is registered with timm's ``register_model`` (so ``timm.create_model(name)`` works after
``import vision_attn``); :func:`create_model` and :func:`list_models` only see our names.
"""

from __future__ import annotations

import difflib
import fnmatch
import json
import os
from collections.abc import Callable
from typing import Any

import timm
import torch
from timm.models import register_model as _timm_register_model
from torch import nn

__all__ = ["create_model", "list_models", "load_checkpoint", "register_filter_fn", "register_model"]

_MODEL_NAMES: set[str] = set()
_FILTER_FNS: dict[type, Callable[[dict[str, torch.Tensor], nn.Module], dict[str, torch.Tensor]]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a model entrypoint with timm and record its name as one of ours. Returns ``fn``."""
    if fn.__name__ in timm.list_models() and fn.__name__ not in _MODEL_NAMES:
        raise RuntimeError(f"model name {fn.__name__!r} would shadow a timm model")
    _MODEL_NAMES.add(fn.__name__)
    return _timm_register_model(fn)


def register_filter_fn(model_cls: type, filter_fn: Callable) -> None:
    """Set the ``checkpoint_filter_fn(state_dict, model) -> state_dict`` used to adapt weights for ``model_cls``."""
    _FILTER_FNS[model_cls] = filter_fn


def list_models(pattern: str = "*") -> list[str]:
    """Return the sorted names of vision_attn models matching the wildcard ``pattern``."""
    return sorted(n for n in _MODEL_NAMES if fnmatch.fnmatch(n, pattern))


def _check_name(model_name: str) -> None:
    if not isinstance(model_name, str):
        raise TypeError(f"model_name must be a str, got {type(model_name).__name__}")
    if model_name not in _MODEL_NAMES:
        close = difflib.get_close_matches(model_name, sorted(_MODEL_NAMES), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see vision_attn.list_models()"
        raise ValueError(f"unknown model_name {model_name!r}: not a vision_attn model{hint}")


def _read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint_path {path!r} does not exist or is not a file")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle errors, truncated zip files, ...
        raise ValueError(f"checkpoint_path {path!r} is not a readable PyTorch or safetensors file: {err}") from err
    if isinstance(state, dict):
        for key in ("state_dict", "model", "state_dict_ema"):
            if key in state and isinstance(state[key], dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"checkpoint_path {path!r} holds no state dict of tensors")
    return state


def load_checkpoint(model: nn.Module, checkpoint_path: str | os.PathLike, strict: bool = True) -> nn.Module:
    """Load a local weights file (safetensors or ``torch.save``'d state dict) into ``model``; returns ``model``.

    The model's ``checkpoint_filter_fn`` (if registered) adapts foreign weights first, e.g. resampling
    position embeddings. Mismatching keys or shapes raise a ``ValueError`` that lists them.
    """
    state = _read_state_dict(checkpoint_path)
    for cls in type(model).__mro__:
        if cls in _FILTER_FNS:
            state = _FILTER_FNS[cls](state, model)
            break
    own = model.state_dict()
    wrong_shape = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and own[k].shape != v.shape
    ]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if wrong_shape or (strict and (missing or unexpected)):
        parts = []
        if wrong_shape:
            parts.append(f"shape mismatch ({len(wrong_shape)}): " + "; ".join(wrong_shape[:10]))
        if strict and missing:
            parts.append(f"missing keys ({len(missing)}): {', '.join(missing[:10])}")
        if strict and unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected[:10])}")
        raise ValueError(
            f"checkpoint_path {os.fspath(checkpoint_path)!r} does not fit {type(model).__name__}: " + " | ".join(parts)
        )
    model.load_state_dict(state, strict=strict)
    return model


def _read_config(checkpoint_path: str | os.PathLike) -> dict[str, Any]:
    """Model kwargs saved beside an exported weights file as ``<stem>.json`` (key ``model_args``), if any."""
    cfg_path = os.path.splitext(os.fspath(checkpoint_path))[0] + ".json"
    if not os.path.isfile(cfg_path):
        return {}
    with open(cfg_path) as f:
        return dict(json.load(f).get("model_args", {}))


def create_model(
    model_name: str,
    pretrained: bool = False,
    checkpoint_path: str | os.PathLike | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build the vision_attn model ``model_name`` (see :func:`list_models`); returns an ``nn.Module``.

    ``pretrained=True`` goes through timm's normal download path (network needed). ``checkpoint_path`` loads a
    local weights file strictly; model arguments stored beside it in ``<stem>.json`` (as written by the training
    export) are used unless overridden by ``kwargs``.
    """
    _check_name(model_name)
    if checkpoint_path is not None:
        kwargs = {**_read_config(checkpoint_path), **kwargs}
    model = timm.create_model(model_name, pretrained=pretrained, **kwargs)
    if checkpoint_path is not None:
        load_checkpoint(model, checkpoint_path)
    return model
