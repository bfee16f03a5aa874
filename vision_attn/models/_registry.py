"""Registry of vision_attn models: timm's registry plus the list of names that are ours.

Every model is registered with timm's ``register_model`` (so ``timm.create_model(name)`` works after
``import vision_attn``); :func:`create_model` and :func:`list_models` only see our names.
"""

from __future__ import annotations

import difflib
import fnmatch
import os
from collections.abc import Callable
from typing import Any

import timm
import torch
from timm.models import register_model as _timm_register_model
from torch import nn

from vision_attn.models._weights import read_weights

__all__ = ["create_model", "fit_state_dict", "list_models", "load_checkpoint", "register_filter_fn", "register_model"]

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


def fit_state_dict(
    model: nn.Module, state: dict[str, torch.Tensor], source: str, strict: bool = True, resample_weights: bool = False
) -> nn.Module:
    """Load ``state`` into ``model`` strictly; returns ``model``. ``source`` names the file in errors.

    Weights of another architecture (other shapes; with ``strict`` also missing or unexpected keys) raise a
    ``ValueError`` listing them. Only with ``resample_weights=True`` does the model's ``checkpoint_filter_fn``
    adapt them first (e.g. resampling a ViT's position and patch embeddings to its ``img_size``/``patch_size``).
    """
    if resample_weights:
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
        hint = ""
        resizable = {"pos_embed", "patch_embed.proj.weight"} & {k.split(":")[0] for k in wrong_shape}
        if resizable and not resample_weights and any(cls in _FILTER_FNS for cls in type(model).__mro__):
            hint = (
                f" ({', '.join(sorted(resizable))} differ: the weights were trained for another img_size or "
                "patch_size; pass resample_weights=True (--resample-weights) to resample them on purpose)"
            )
        raise ValueError(f"{source} does not fit {type(model).__name__}: " + " | ".join(parts) + hint)
    model.load_state_dict(state, strict=strict)
    return model


def load_checkpoint(
    model: nn.Module, checkpoint_path: str | os.PathLike, strict: bool = True, resample_weights: bool = False
) -> nn.Module:
    """Load the weights at ``checkpoint_path`` (any format :func:`~vision_attn.load_trained` reads: safetensors,
    ``torch.save``-d state dict, ``train.py`` checkpoint, export folder) into ``model``; returns ``model``.

    Strict: mismatching keys or shapes raise a ``ValueError`` that lists them, unless ``resample_weights=True``
    asks the model's ``checkpoint_filter_fn`` to adapt foreign weights (position-embedding resampling).
    """
    weights = read_weights(checkpoint_path)
    source = f"checkpoint_path {os.fspath(checkpoint_path)!r}"
    return fit_state_dict(model, weights.state_dict, source, strict=strict, resample_weights=resample_weights)


def create_model(
    model_name: str,
    pretrained: bool = False,
    checkpoint_path: str | os.PathLike | None = None,
    resample_weights: bool = False,
    **kwargs: Any,
) -> nn.Module:
    """Build the vision_attn model ``model_name`` (see :func:`list_models`); returns an ``nn.Module``.

    ``pretrained=True`` goes through timm's normal download path (network needed). ``checkpoint_path`` loads
    trained weights strictly (any format :func:`~vision_attn.load_trained` reads); the model arguments stored with
    them are used, and ``kwargs`` that contradict them are an error (drop rates may change).
    ``resample_weights=True`` adapts weights trained for another ``img_size``/``patch_size`` on purpose.
    """
    _check_name(model_name)
    if checkpoint_path is None:
        return timm.create_model(model_name, pretrained=pretrained, **kwargs)
    from vision_attn.models._loading import build_from_weights  # it builds models through this module

    weights = read_weights(checkpoint_path)
    return build_from_weights(weights, model_name, kwargs, resample_weights=resample_weights, pretrained=pretrained)
