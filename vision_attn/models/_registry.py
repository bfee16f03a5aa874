"""Registry of vision_attn model names: timm's registry plus the list of names that are ours.

Every model is registered with timm's ``register_model`` (so ``timm.create_model(name)`` works after
``import vision_attn``); :func:`list_models` only lists our names, :func:`check_model_name` accepts ours and timm's.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable

import timm
import torch
from timm.models import register_model as _timm_register_model
from torch import nn

__all__ = ["check_model_name", "filter_fn_for", "list_models", "register_filter_fn", "register_model"]

FilterFn = Callable[[dict[str, torch.Tensor], nn.Module], dict[str, torch.Tensor]]

_MODEL_NAMES: set[str] = set()
_FILTER_FNS: dict[type, FilterFn] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a model entrypoint with timm and record its name as one of ours. Returns ``fn``."""
    if fn.__name__ in timm.list_models() and fn.__name__ not in _MODEL_NAMES:
        raise RuntimeError(f"model name {fn.__name__!r} would shadow a timm model")
    _MODEL_NAMES.add(fn.__name__)
    return _timm_register_model(fn)


def register_filter_fn(model_cls: type, filter_fn: FilterFn) -> None:
    """Set the ``checkpoint_filter_fn(state_dict, model) -> state_dict`` used to adapt weights for ``model_cls``."""
    _FILTER_FNS[model_cls] = filter_fn


def filter_fn_for(model: nn.Module) -> FilterFn | None:
    """The ``checkpoint_filter_fn`` registered for ``model``'s class (or a base class), else ``None``."""
    return next((_FILTER_FNS[cls] for cls in type(model).__mro__ if cls in _FILTER_FNS), None)


def list_models(pattern: str = "*") -> list[str]:
    """Return the sorted names of vision_attn models matching the wildcard ``pattern``."""
    return sorted(n for n in _MODEL_NAMES if fnmatch.fnmatch(n, pattern))


def check_model_name(model_name: object, what: str = "unknown model_name") -> str:
    """Return ``model_name`` if it names a vision_attn or a timm model; else a ``TypeError``/``ValueError`` that
    suggests close names (``what`` starts the message, e.g. ``"'ckpt' names a model"``)."""
    if not isinstance(model_name, str):
        raise TypeError(f"model_name must be a str, got {type(model_name).__name__}")
    if model_name in _MODEL_NAMES or timm.is_model(model_name):
        return model_name
    close = difflib.get_close_matches(model_name, sorted(_MODEL_NAMES), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else " (see vision_attn.list_models(), timm.list_models())"
    raise ValueError(f"{what} {model_name!r}: neither a vision_attn model nor a timm model{hint}")
