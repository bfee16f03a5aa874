"""One loader for every trained-weights format vision_attn writes: :func:`load_trained` ``-> (model, info)``.

It is what ``create_model(checkpoint_path=...)``, ``vision-attn export`` and ``vision-attn explain`` use. Loading is
strict: the model arguments come from the weights' metadata, arguments that contradict them are an error (only
drop rates and ``dynamic_img_size`` may change), weights of another shape are an error unless
``resample_weights=True`` asks for position/patch-embedding resampling.
"""

from __future__ import annotations

import difflib
import os
from typing import Any

import timm
from torch import nn

from vision_attn.models._registry import create_model, fit_state_dict, list_models
from vision_attn.models._weights import TrainedWeights, read_weights

__all__ = [
    "RUNTIME_ARGS",
    "build_from_weights",
    "build_model",
    "load_trained",
    "model_input_size",
    "recorded_model_args",
]

# arguments that change how a network runs, not which weights it has
RUNTIME_ARGS = frozenset(
    {"drop_rate", "pos_drop_rate", "proj_drop_rate", "attn_drop_rate", "drop_path_rate", "drop_block_rate",
     "dynamic_img_size"}
)  # fmt: skip


def _is_known(model_name: str) -> bool:
    return model_name in list_models() or timm.is_model(model_name)


def _unknown(model_name: str, where: str) -> ValueError:
    close = difflib.get_close_matches(model_name, list_models(), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else " (see vision_attn.list_models(), timm.list_models())"
    return ValueError(f"{where}model {model_name!r} is neither a vision_attn model nor a timm model{hint}")


def build_model(model_name: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Build ``model_name``, a vision_attn name (:func:`create_model`) or any timm name; returns the module."""
    if not isinstance(model_name, str):
        raise TypeError(f"model_name must be a str, got {type(model_name).__name__}")
    if model_name in list_models():
        return create_model(model_name, pretrained=pretrained, **kwargs)
    if not timm.is_model(model_name):
        raise _unknown(model_name, "")
    return timm.create_model(model_name, pretrained=pretrained, **kwargs)


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
    reference = build_model(name, **stored) if unrecorded else None
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
    if not _is_known(name):
        raise _unknown(name, f"{where} names a ")
    args = _merge_args(weights, name, given, resample_weights)
    model = build_model(name, pretrained=pretrained, **args)
    return fit_state_dict(model, weights.state_dict, where, resample_weights=resample_weights)


def _is_json(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_is_json(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_json(v) for k, v in value.items())
    return isinstance(value, (str, int, float, bool)) or value is None


def recorded_model_args(model: nn.Module, given: dict[str, Any] | None = None) -> dict[str, Any]:
    """The arguments that rebuild ``model``: ``given``, then what timm's factory recorded, then its current sizes."""
    args = {**(given or {}), **(getattr(model, "_model_args", None) or {})}
    for key in ("in_chans", "num_classes"):
        if isinstance(getattr(model, key, None), int):
            args[key] = getattr(model, key)
    wrong = sorted(k for k, v in args.items() if not _is_json(v))
    if wrong:
        raise ValueError(
            f"model arguments {wrong} are Python objects, which an export cannot store; build the model from "
            "registered names and plain values (strings, numbers, lists) to export it"
        )
    return args


def model_input_size(model: nn.Module, meta: dict[str, Any] | None = None) -> tuple[int, int, int]:
    """Return ``(C, H, W)`` the model takes: its own img_size, else the metadata's, else its pretrained config's."""
    meta = meta or {}
    cfg_size = tuple((getattr(model, "pretrained_cfg", None) or {}).get("input_size") or (3, 224, 224))
    meta_size = meta.get("input_size")
    if isinstance(meta_size, (list, tuple)) and len(meta_size) == 3:
        cfg_size = tuple(meta_size)
    elif meta.get("img_size") is not None:
        cfg_size = (cfg_size[0], *_pair(meta["img_size"]))
    size = _current_value(model, "img_size")
    height, width = (_pair(size) if size is not ... and size is not None else cfg_size[1:])[:2]
    channels = getattr(model, "in_chans", None) or meta.get("in_chans") or cfg_size[0]
    return int(channels), int(height), int(width)


def load_trained(
    path: str | os.PathLike,
    model_name: str | None = None,
    model_args: dict[str, Any] | None = None,
    use_ema: bool = True,
    resample_weights: bool = False,
) -> tuple[nn.Module, dict[str, Any]]:
    """Load trained weights with the model they belong to; returns ``(model in eval mode, info)``.

    ``path``: a ``train.py`` checkpoint (``.ckpt``; its EMA weights unless ``use_ema=False``), an export folder
    (timm/Hugging Face ``config.json`` + ``model.safetensors``, or ``model.safetensors`` + ``model.json``), a
    ``.safetensors`` file with its metadata, or bare weights (``.safetensors``/``.pth``) with ``model_name``.

    ``info``: ``model_name``, ``model_args``, ``input_size`` ``(C, H, W)``, ``mean``, ``std``, ``class_names``
    (or None), ``num_classes``, ``path`` (the weights file), ``source`` (the format), ``weights`` (``'ema'``,
    ``'net'`` or ``'file'``) and, where the metadata has them, ``epoch``/``global_step`` and ``img_size`` (the
    size the weights were trained at, which a CNN taking any size may differ from ``input_size``).
    """
    weights = read_weights(path, use_ema=use_ema, name="path")
    model = build_from_weights(weights, model_name, model_args, resample_weights=resample_weights)
    meta = weights.meta
    names, num_classes = meta.get("class_names"), getattr(model, "num_classes", None)
    if names is not None and isinstance(num_classes, int) and num_classes > 0 and len(names) != num_classes:
        raise ValueError(f"{str(weights.path)!r}: metadata has {len(names)} class_names for num_classes={num_classes}")
    cfg = getattr(model, "pretrained_cfg", None) or {}
    info: dict[str, Any] = {
        "model_name": meta.get("model_name") or model_name,
        "model_args": {**dict(meta.get("model_args") or {}), **dict(model_args or {})},
        "input_size": model_input_size(model, meta),
        "mean": meta.get("mean") or cfg.get("mean"),
        "std": meta.get("std") or cfg.get("std"),
        "class_names": meta.get("class_names"),
        "num_classes": getattr(model, "num_classes", meta.get("num_classes")),
        "path": str(weights.path),
        "source": weights.source,
        "weights": weights.weights,
    }
    for key in ("epoch", "global_step", "data_name", "img_size"):  # img_size: what the weights were trained at
        if key in meta:
            info[key] = meta[key]
    return model.eval(), info
