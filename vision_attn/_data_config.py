"""A model's eval preprocessing as one dict, with timm's ``resolve_data_config`` keys.

``{'input_size': (C, H, W), 'interpolation', 'mean', 'std', 'crop_pct', 'crop_mode'}`` is recorded with every
checkpoint and export, and :func:`vision_attn.data.create_transform` builds the one eval transform from it:
validation, test and predict, ``vision-attn explain`` (files and the embedded dataset), the map evaluation and the
app all feed a model through it. This module is light (no albumentations, no Lightning) so that models, data and
explain can all read it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

__all__ = [
    "CROP_MODES",
    "DATA_CONFIG_KEYS",
    "EVAL_DEFAULTS",
    "INTERPOLATIONS",
    "channel_stats",
    "check_data_config",
    "model_input_size",
    "resolve_data_config",
]

INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "area", "lanczos")
CROP_MODES = ("center", "squash")  # timm's 'center' (resize short side, centre crop) and 'squash' (resize, no ratio)
DATA_CONFIG_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
# what validation used before the pipeline was recorded with the weights (ImageDataModule's defaults then): the
# values an old checkpoint without these fields is read with
EVAL_DEFAULTS: dict[str, Any] = {"crop_pct": 1.0, "interpolation": "bilinear", "crop_mode": "center"}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def channel_stats(
    values: Sequence[float] | float | None, in_chans: int, name: str, convert: bool = False
) -> tuple[float, ...] | None:
    """Return ``values`` as one mean or std per channel (``in_chans`` of them), or ``None`` for ``None``.

    One value is repeated to every channel. Any other count than 1 or ``in_chans`` raises a ``ValueError``
    naming ``name``, unless ``convert`` (for statistics that came with a model or a dataset, not from the user)
    allows 3 values for 1 channel (their mean, as for luminance). A std must be positive.
    """
    if values is None:
        return None
    given = tuple(values) if isinstance(values, Sequence) and not isinstance(values, str) else (values,)
    if not all(_is_number(v) for v in given) or not given:
        raise ValueError(f"{name} {list(given)} must be finite numbers")
    given = tuple(float(v) for v in given)
    if "std" in name and min(given) <= 0:
        raise ValueError(f"{name} {list(given)} must be > 0 (it divides the image)")
    if len(given) == 1:
        return given * in_chans
    if len(given) == 3 and in_chans == 1 and convert:
        return (sum(given) / 3,)
    if len(given) != in_chans:
        expected = "1 value" if in_chans == 1 else f"1 or {in_chans} values (one per channel)"
        raise ValueError(f"{name} has {len(given)} values {list(given)}; expected {expected}: the model takes "
                         f"in_chans={in_chans}")  # fmt: skip
    return given


def _pair(value: Any) -> Any:
    if isinstance(value, int) and not isinstance(value, bool):
        return [value, value]
    return list(value) if isinstance(value, (list, tuple)) else value


def _model_img_size(model: nn.Module) -> Any:
    patch_embed = getattr(model, "patch_embed", None)
    size = getattr(patch_embed, "img_size", getattr(model, "img_size", None))
    return None if size is None or isinstance(size, nn.Module) else size


def model_input_size(model: nn.Module, meta: Mapping[str, Any] | None = None) -> tuple[int, int, int]:
    """Return ``(C, H, W)`` to feed ``model``: the size recorded with its weights (``meta``'s ``input_size``, else
    its ``img_size``: a CNN takes any size, so what it was trained at matters), else the model's own ``img_size``,
    else its pretrained config's. ``C`` is the model's own ``in_chans`` where it has one."""
    meta = meta or {}
    cfg_size = tuple((getattr(model, "pretrained_cfg", None) or {}).get("input_size") or (3, 224, 224))
    meta_size, own_size = meta.get("input_size"), _model_img_size(model)
    if isinstance(meta_size, (list, tuple)) and len(meta_size) == 3:
        height, width = meta_size[1:]
    elif meta.get("img_size") is not None:
        height, width = _pair(meta["img_size"])[:2]
    elif own_size is not None:
        height, width = _pair(own_size)[:2]
    else:
        height, width = cfg_size[1:]
    channels = getattr(model, "in_chans", None) or meta.get("in_chans") or (meta_size or cfg_size)[0]
    return int(channels), int(height), int(width)


def check_data_config(config: Mapping[str, Any], where: str = "data config") -> dict[str, Any]:
    """Return a complete data config (every key of :data:`DATA_CONFIG_KEYS`, tuples, per-channel mean/std) from
    ``config``; a ``ValueError`` names ``where``, the key, the value and what is expected."""
    missing = [k for k in DATA_CONFIG_KEYS if config.get(k) is None]
    if missing:
        raise ValueError(f"{where} lacks {missing}; a data config needs {list(DATA_CONFIG_KEYS)}")
    size = config["input_size"]
    if (
        not isinstance(size, (list, tuple))
        or len(size) != 3
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)
    ):
        raise ValueError(f"{where}: input_size must be (C, H, W) positive ints, got {size!r}")
    if size[0] not in (1, 3):
        raise ValueError(f"{where}: input_size {tuple(size)} has {size[0]} channels; images have 1 (grey) or 3 (RGB)")
    crop_pct = config["crop_pct"]
    if not _is_number(crop_pct) or not 0.0 < crop_pct <= 1.0:
        raise ValueError(f"{where}: crop_pct must be a number in (0, 1], got {crop_pct!r}")
    if config["interpolation"] not in INTERPOLATIONS:
        raise ValueError(f"{where}: interpolation must be one of {INTERPOLATIONS}, got {config['interpolation']!r}")
    if config["crop_mode"] not in CROP_MODES:
        raise ValueError(f"{where}: crop_mode must be one of {CROP_MODES}, got {config['crop_mode']!r}")
    in_chans = size[0]
    return {
        "input_size": tuple(int(v) for v in size),
        "interpolation": config["interpolation"],
        "mean": channel_stats(config["mean"], in_chans, f"{where}: mean", convert=True),
        "std": channel_stats(config["std"], in_chans, f"{where}: std", convert=True),
        "crop_pct": float(crop_pct),
        "crop_mode": config["crop_mode"],
    }


def resolve_data_config(
    model: nn.Module | None = None, meta: Mapping[str, Any] | None = None, **overrides: Any
) -> dict[str, Any]:
    """The eval data config ``{input_size, interpolation, mean, std, crop_pct, crop_mode}`` of a model.

    Each value comes from ``overrides`` (not ``None``), else ``meta`` (what :func:`vision_attn.load_trained`
    returns as ``info``: the values recorded with the weights), else the model's ``pretrained_cfg`` (as timm's
    ``resolve_data_config``), else timm's ImageNet defaults. ``input_size`` follows the model itself where it
    fixes one (a ViT's ``img_size``, its ``in_chans``); ``overrides`` may give ``img_size`` (N or (H, W)) instead
    of ``input_size``. Mean and std are given per input channel (3 recorded values become their mean for a grey
    model). Returns a checked, complete dict (:func:`check_data_config`).
    """
    meta = dict(meta or {})
    cfg = dict((getattr(model, "pretrained_cfg", None) or {}) if model is not None else {})
    img_size = overrides.pop("img_size", None)
    unknown = sorted(set(overrides) - set(DATA_CONFIG_KEYS))
    if unknown:
        raise TypeError(f"resolve_data_config got unknown overrides {unknown}; expected {list(DATA_CONFIG_KEYS)}")
    if model is not None:
        size = list(model_input_size(model, meta))
    else:
        size = list(meta.get("input_size") or cfg.get("input_size") or (3, 224, 224))
    if img_size is not None:
        pair = _pair(img_size)
        if not isinstance(pair, list) or len(pair) != 2:
            raise ValueError(f"img_size must be N or (H, W), got {img_size!r}")
        size[1:] = pair
    defaults = {
        "interpolation": "bicubic",
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
        "crop_pct": 0.875,
        "crop_mode": "center",
    }  # timm's DEFAULT_CROP_PCT and the ImageNet statistics
    resolved: dict[str, Any] = {"input_size": tuple(size)}
    for key in DATA_CONFIG_KEYS[1:]:
        for source in (overrides, meta, cfg, defaults):
            if source.get(key) is not None:
                resolved[key] = source[key]
                break
    if overrides.get("input_size") is not None:
        resolved["input_size"] = tuple(overrides["input_size"])
    return check_data_config(resolved, "resolve_data_config")
