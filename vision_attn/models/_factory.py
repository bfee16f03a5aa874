"""One model builder: :func:`create_model` turns a name (vision_attn or timm) and arguments into a model, with
trained weights loaded strictly when given.

Training, loading, export, explain and the app all build models here. Loading is strict: the model arguments come
from the weights' metadata, arguments that contradict them are an error (only drop rates and ``dynamic_img_size``
may change), weights of another shape are an error unless ``resample_weights=True`` asks for position /
patch-embedding resampling.
"""

from __future__ import annotations

import os
from typing import Any

import timm
import torch
from torch import nn

from vision_attn.models._registry import check_model_name, filter_fn_for
from vision_attn.models._weights import TrainedWeights, read_weights

__all__ = ["RUNTIME_ARGS", "build_from_weights", "create_model", "fit_state_dict", "load_checkpoint"]

# arguments that change how a network runs, not which weights it has
RUNTIME_ARGS = frozenset(
    {"drop_rate", "pos_drop_rate", "proj_drop_rate", "attn_drop_rate", "drop_path_rate", "drop_block_rate",
     "dynamic_img_size"}
)  # fmt: skip


def create_model(
    model_name: str,
    pretrained: bool = False,
    checkpoint_path: str | os.PathLike | None = None,
    resample_weights: bool = False,
    **kwargs: Any,
) -> nn.Module:
    """Build ``model_name`` (a vision_attn name, see :func:`list_models`, or any timm name); returns an
    ``nn.Module``.

    ``pretrained=True`` goes through timm's normal download path (network needed). ``checkpoint_path`` loads
    trained weights strictly (any format :func:`~vision_attn.load_trained` reads); the model arguments stored with
    them are used, and ``kwargs`` that contradict them are an error (drop rates may change).
    ``resample_weights=True`` adapts weights trained for another ``img_size``/``patch_size`` on purpose.
    """
    check_model_name(model_name)
    if checkpoint_path is None:
        return timm.create_model(model_name, pretrained=pretrained, **kwargs)
    weights = read_weights(checkpoint_path)
    return build_from_weights(weights, model_name, kwargs, resample_weights=resample_weights, pretrained=pretrained)


def fit_state_dict(
    model: nn.Module, state: dict[str, torch.Tensor], source: str, strict: bool = True, resample_weights: bool = False
) -> nn.Module:
    """Load ``state`` into ``model`` strictly; returns ``model``. ``source`` names the file in errors.

    Weights of another architecture (other shapes; with ``strict`` also missing or unexpected keys) raise a
    ``ValueError`` listing them. Only with ``resample_weights=True`` does the model's ``checkpoint_filter_fn``
    adapt them first (e.g. resampling a ViT's position and patch embeddings to its ``img_size``/``patch_size``).
    """
    filter_fn = filter_fn_for(model)
    if resample_weights and filter_fn is not None:
        state = filter_fn(state, model)
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
        if resizable and not resample_weights and filter_fn is not None:
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


def _pair(value: Any) -> Any:
    if isinstance(value, int) and not isinstance(value, bool):
        return [value, value]
    return list(value) if isinstance(value, (list, tuple)) else value


def _same(key: str, a: Any, b: Any) -> bool:
    if key == "img_size":
        return _pair(a) == _pair(b)
    norm = lambda v: list(v) if isinstance(v, (list, tuple)) else v  # noqa: E731 (JSON turns tuples into lists)
    return norm(a) == norm(b)


def _current_value(model: nn.Module, key: str) -> Any:
    """What ``model`` was built with for argument ``key``, or ``Ellipsis`` when it cannot be read back."""
    if key == "img_size":
        patch_embed = getattr(model, "patch_embed", None)
        return getattr(patch_embed, "img_size", getattr(model, "img_size", ...))
    value = getattr(model, key, ...)
    return value if isinstance(value, (int, float, str, bool, list, tuple, type(None))) else ...


def _merge_args(weights: TrainedWeights, name: str, given: dict[str, Any], resample_weights: bool) -> dict[str, Any]:
    """The stored model arguments updated by ``given``, refusing values that contradict the weights."""
    stored = dict(weights.meta.get("model_args") or {})
    if not weights.meta.get("model_name"):  # bare weights: the caller's arguments are the only description
        return {**stored, **given}
    where = f"{str(weights.path)!r}"
    unrecorded = [k for k in given if k not in RUNTIME_ARGS and k not in stored]
    reference = timm.create_model(name, **stored) if unrecorded else None
    for key, value in given.items():
        if key in RUNTIME_ARGS:
            continue
        have = stored[key] if key in stored else _current_value(reference, key)
        if have is ...:
            raise ValueError(
                f"model_args {key}={value!r} is not recorded with {where} and cannot be checked against its weights; "
                f"leave it out (the stored model_args are {stored})"
            )
        if not _same(key, have, value) and not (key == "img_size" and resample_weights):
            hint = "; pass resample_weights=True (--resample-weights) to resample" if key == "img_size" else ""
            raise ValueError(
                f"model_args {key}={value!r} contradicts {where}, whose weights were trained with {key}={have!r}; "
                f"leave it out{hint}"
            )
    return {**stored, **given}


def build_from_weights(
    weights: TrainedWeights,
    model_name: str | None = None,
    model_args: dict[str, Any] | None = None,
    resample_weights: bool = False,
    pretrained: bool = False,
) -> nn.Module:
    """Build the model ``weights`` describes (or ``model_name`` for bare weights) and load them strictly.

    Returns the module. ``model_args`` may change drop rates; other values must agree with the stored ones.
    """
    given = dict(model_args or {})
    where = f"{str(weights.path)!r}"
    stored_name = weights.meta.get("model_name")
    if model_name is not None and stored_name is not None and model_name != stored_name:
        raise ValueError(
            f"{where} holds weights of {stored_name!r}, not {model_name!r}; leave the model name out, or load them "
            "into another architecture on purpose with vision_attn.load_checkpoint(model, path)"
        )
    name = stored_name or model_name
    if name is None:
        raise ValueError(
            f"{where} does not say which model its weights belong to (no vision_attn metadata, model.json or "
            "config.json); give the model name (model_name= / --model NAME)"
        )
    check_model_name(name, f"{where} names a model")
    args = _merge_args(weights, name, given, resample_weights)
    model = create_model(name, pretrained=pretrained, **args)
    return fit_state_dict(model, weights.state_dict, where, resample_weights=resample_weights)
