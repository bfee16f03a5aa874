"""One loader of trained weights, :func:`load_trained` ``-> (model, info)``, and :func:`load_model`, which opens a
model by its weights or by its name, for the entry points that run a model on a user's images (``vision-attn
explain``, the map evaluation, the app, ``vision-attn export``).

``info`` carries the model's eval preprocessing (``input_size``, ``crop_pct``, ``interpolation``, ``crop_mode``,
``mean``, ``std``): :func:`vision_attn.data.resolve_data_config` turns it into the data config the eval transform
is built from.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

from torch import nn

from vision_attn._data_config import EVAL_DEFAULTS, resolve_data_config
from vision_attn.models._factory import build_from_weights, create_model
from vision_attn.models._weights import read_weights

__all__ = ["load_model", "load_trained", "recorded_model_args"]

_WARNED: set[str] = set()  # files whose missing eval preprocessing was reported (once per process and file)


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


def _eval_preprocessing(model: nn.Module, meta: dict[str, Any], path: str) -> dict[str, Any]:
    """The data config of weights with metadata ``meta``: as recorded; for weights that vision_attn wrote before the
    eval preprocessing was recorded, the defaults validation used then (said once per file); for bare weights, the
    model's own pretrained config."""
    recorded = bool(meta.get("model_name")) and meta.get("mean") is not None
    missing = [k for k in EVAL_DEFAULTS if meta.get(k) is None]
    if recorded and missing:
        meta = {**EVAL_DEFAULTS, **meta}
        if path not in _WARNED:
            _WARNED.add(path)
            warnings.warn(
                f"{path!r} records no {', '.join(missing)} (written before the eval preprocessing was stored with the "
                f"weights); using {', '.join(f'{k}={EVAL_DEFAULTS[k]!r}' for k in missing)}, the validation defaults",
                UserWarning,
                stacklevel=3,
            )
    config = resolve_data_config(model, meta)
    return {**config, "mean": list(config["mean"]), "std": list(config["std"])}  # as stored: JSON lists


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

    ``info``: ``model_name``, ``model_args``, the eval preprocessing (``input_size`` ``(C, H, W)``, ``mean``,
    ``std``, ``crop_pct``, ``interpolation``, ``crop_mode``: pass ``info`` to
    :func:`vision_attn.data.resolve_data_config`), ``class_names`` (or None), ``num_classes``, ``path`` (the weights
    file), ``source`` (the format), ``weights`` (``'ema'``, ``'net'`` or ``'file'``) and, where the metadata has
    them, ``epoch``/``global_step``, ``data_name`` and ``img_size`` (the size the weights were trained at).
    """
    weights = read_weights(path, use_ema=use_ema, name="path")
    model = build_from_weights(weights, model_name, model_args, resample_weights=resample_weights)
    meta = weights.meta
    names, num_classes = meta.get("class_names"), getattr(model, "num_classes", None)
    if names is not None and isinstance(num_classes, int) and num_classes > 0 and len(names) != num_classes:
        raise ValueError(f"{str(weights.path)!r}: metadata has {len(names)} class_names for num_classes={num_classes}")
    info: dict[str, Any] = {
        "model_name": meta.get("model_name") or model_name,
        "model_args": {**dict(meta.get("model_args") or {}), **dict(model_args or {})},
        **_eval_preprocessing(model, meta, str(weights.path)),
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


def load_model(
    checkpoint: str | os.PathLike | None = None,
    model_name: str | None = None,
    weights: str | os.PathLike | None = None,
    model_args: dict[str, Any] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Open a model to run on images; returns ``(model in eval mode, info)`` as :func:`load_trained` does.

    ``checkpoint`` (a ``train.py`` checkpoint, an export folder, a ``.safetensors`` with metadata) or ``weights``
    (bare weights for ``model_name``) go through :func:`load_trained`; a ``model_name`` alone is built by
    :func:`~vision_attn.create_model` (random weights unless ``model_args`` asks timm for ``pretrained``), with the
    eval preprocessing of its pretrained config.
    """
    if checkpoint is not None and weights is not None:
        raise ValueError("give checkpoint or weights (with a model_name), not both")
    if checkpoint is not None or weights is not None:
        source = checkpoint if checkpoint is not None else weights
        return load_trained(source, model_name=None if checkpoint is not None else model_name, model_args=model_args)
    if model_name is None:
        raise ValueError("give a checkpoint path or a model name")
    args = dict(model_args or {})
    model = create_model(model_name, **args).eval()
    info = {
        "model_name": model_name,
        "model_args": args,
        **_eval_preprocessing(model, {}, model_name),
        "class_names": (getattr(model, "pretrained_cfg", None) or {}).get("label_names"),
        "num_classes": getattr(model, "num_classes", None),
        "path": None,
        "source": "model_name",
        "weights": "pretrained" if args.get("pretrained") else "random",
    }
    return model, info
