"""Trained weights on disk: read every format vision_attn writes, validated, with errors that name the file.

:func:`read_weights` understands

* ``.safetensors``: a state dict. vision_attn writes its metadata (model name and arguments, class names,
  normalization, input size) into the file's own header under ``"vision_attn"``, so weights and metadata are one
  atomic file and cannot drift apart; exports from before keep it in ``<stem>.json`` beside the file;
* a folder: the timm / Hugging Face Hub layout (``config.json`` + ``model.safetensors``) or the earlier export
  layout (``model.safetensors`` + ``model.json``);
* a ``train.py`` checkpoint (``.ckpt``: ``state_dict`` with ``net.`` / ``ema.module.`` keys and a ``vision_attn``
  entry), the EMA weights when it has them unless ``use_ema=False``;
* a ``torch.save``-d state dict (``.pth`` / ``.bin``; timm's ``state_dict`` / ``model`` / ``state_dict_ema``
  wrappers too).

The format is recognised from the first bytes, not the file name, so a renamed file still loads. ``torch.load``
runs with ``weights_only=True`` (a file holding code is refused). Non-finite weights and malformed metadata are
errors naming the file.
"""

from __future__ import annotations

import json
import math
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vision_attn._data_config import CROP_MODES, EVAL_DEFAULTS, INTERPOLATIONS
from vision_attn._io import atomic_write_bytes

__all__ = ["TrainedWeights", "UnsafeFileError", "read_metadata_file", "read_weights", "write_safetensors"]

META_KEY = "vision_attn"  # safetensors header key holding the JSON metadata
HUB_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
STATE_DICT_KEYS = ("state_dict", "model", "state_dict_ema")  # timm train-script checkpoints wrap the weights
EVAL_KEYS = tuple(EVAL_DEFAULTS)  # the eval preprocessing beyond input size and mean/std


class UnsafeFileError(ValueError, pickle.UnpicklingError):
    """A weights file holds Python objects other than tensors and plain types; it is not unpickled."""


@dataclass
class TrainedWeights:
    """A state dict read from ``path`` with its validated metadata (empty when the file has none).

    ``source`` says which format it came from (``'checkpoint'``, ``'safetensors'``, ``'state_dict'``,
    ``'hub_folder'``, ``'export_folder'``); ``weights`` which copy (``'ema'``, ``'net'`` or ``'file'``).
    """

    state_dict: dict[str, torch.Tensor]
    path: Path
    source: str
    weights: str = "file"
    meta: dict[str, Any] = field(default_factory=dict)


def _sniff(path: Path) -> str:
    """Return ``'zip'`` (torch.save), ``'pickle'`` (legacy torch.save), ``'safetensors'`` or ``'unknown'``."""
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:4] == b"PK\x03\x04":
        return "zip"
    # safetensors: a little-endian u64 header length, then the JSON header (its first byte may look like pickle's)
    if len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") <= path.stat().st_size - 8:
        return "safetensors"
    if head[:1] == b"\x80":
        return "pickle"
    return "unknown"


def _file(path: str | os.PathLike, name: str) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{name} must be a path, got {type(path).__name__}")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{name} {str(path)!r} does not exist")
    if path.is_file() and path.stat().st_size == 0:
        raise ValueError(f"{name} {str(path)!r} is empty (0 bytes); expected a checkpoint or safetensors file")
    return path


def read_weights(path: str | os.PathLike, use_ema: bool = True, name: str = "checkpoint_path") -> TrainedWeights:
    """Read the weights and metadata at ``path`` (any format above); returns a :class:`TrainedWeights`.

    Raises ``FileNotFoundError`` for a missing path, ``ValueError`` naming the file for an empty, truncated,
    unrecognised or unsafe file, malformed metadata or non-finite weights (``name`` is the argument named).
    """
    path = _file(path, name)
    if path.is_dir():
        weights = _read_folder(path, name)
    else:
        kind = _sniff(path)
        if kind == "safetensors":
            state, meta = _read_safetensors(path, name)
            weights = TrainedWeights(state, path, "safetensors", meta=meta)
        elif kind in ("zip", "pickle"):
            weights = _read_torch(path, use_ema, name)
        else:
            with open(path, "rb") as f:
                head = f.read(8)
            raise ValueError(
                f"{name} {str(path)!r} is not a readable PyTorch or safetensors file (it starts with {head!r}); "
                "expected a .ckpt/.pth from torch.save, a .safetensors file or an export folder"
            )
    _check_finite(weights.state_dict, weights.path)
    return weights


def _read_safetensors(path: Path, name: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """State dict and metadata (the header's, else ``<stem>.json``'s) of a safetensors file."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            header = f.metadata() or {}
            state = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except SafetensorError as err:
        raise ValueError(
            f"{name} {str(path)!r} is not a complete safetensors file ({err}); it may be truncated by an "
            "interrupted copy or download"
        ) from err
    sidecar = path.with_suffix(".json")  # <stem>.json: the metadata of exports written before the header held it
    if META_KEY not in header:
        return state, read_metadata_file(sidecar) if sidecar.is_file() else {}
    try:
        meta = json.loads(header[META_KEY])
    except json.JSONDecodeError as err:
        raise ValueError(f"{name} {str(path)!r}: its '{META_KEY}' header entry is not JSON ({err})") from err
    meta = validate_metadata(meta, f"{str(path)!r} (header)")
    if sidecar.is_file():
        read_metadata_file(sidecar)  # the header wins, but a broken file beside it is still an error naming it
    return state, meta


def _read_torch(path: Path, use_ema: bool, name: str) -> TrainedWeights:
    try:
        with open(path, "rb") as f:  # a file object: torch.load would pick a reader by the file's suffix
            obj = torch.load(f, map_location="cpu", weights_only=True)  # never unpickles code
    except pickle.UnpicklingError as err:
        raise UnsafeFileError(
            f"{name} {str(path)!r} is not a readable PyTorch or safetensors file: it holds Python objects other "
            f"than tensors, which are not loaded (weights_only=True): {str(err).splitlines()[0]}"
        ) from err
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise ValueError(
            f"{name} {str(path)!r} is not a readable PyTorch or safetensors file (truncated or damaged?): "
            f"{str(err).splitlines()[0] if str(err) else type(err).__name__}"
        ) from err
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict) and _is_lightning(obj):
        return _from_lightning(obj, path, use_ema, name)
    if isinstance(obj, dict):
        for key in STATE_DICT_KEYS:
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{name} {str(path)!r} holds no state dict of tensors")
    return TrainedWeights(_strip_common_prefix(obj, ("module.",)), path, "state_dict")


def _is_lightning(obj: dict[str, Any]) -> bool:
    return any(k in obj for k in (META_KEY, "pytorch-lightning_version", "hyper_parameters", "global_step"))


def _from_lightning(ckpt: dict[str, Any], path: Path, use_ema: bool, name: str) -> TrainedWeights:
    """The network of a Lightning checkpoint: ``ema.module.*`` (if wanted and present), else ``net.*``."""
    state = ckpt["state_dict"]
    meta_raw = ckpt.get(META_KEY)
    if meta_raw is None:  # not written by train.py: look for a model name among the hyper-parameters
        meta_raw = _meta_from_hparams(dict(ckpt.get("hyper_parameters") or {}))
    meta = validate_metadata(meta_raw, repr(str(path))) if meta_raw else {}
    for key in ("epoch", "global_step"):
        if isinstance(ckpt.get(key), int):
            meta[key] = ckpt[key]
    ema = _with_prefix(state, "ema.module.") if use_ema else {}
    if ema:
        return TrainedWeights(ema, path, "checkpoint", "ema", meta)
    net = _with_prefix(state, "net.")
    if net:
        return TrainedWeights(net, path, "checkpoint", "net", meta)
    stripped = _strip_common_prefix(state, ("model.", "backbone.", "module."))
    if not stripped or not all(isinstance(v, torch.Tensor) for v in stripped.values()):
        raise ValueError(f"{name} {str(path)!r} is a Lightning checkpoint without network weights ('net.' keys)")
    return TrainedWeights(stripped, path, "checkpoint", "net", meta)


def _meta_from_hparams(hparams: dict[str, Any]) -> dict[str, Any]:
    """``{model_name, model_args}`` from Lightning hyper-parameters (flat or nested under a model key)."""
    for key in ("model_name", "model", "backbone", "arch"):
        value = hparams.get(key)
        if isinstance(value, str):
            args = hparams.get("model_args") or hparams.get("model_kwargs") or {}
            return {"model_name": value, "model_args": dict(args)}
        if isinstance(value, dict):
            found = _meta_from_hparams(value)
            if found:
                return found
    init = hparams.get("init_args")
    return _meta_from_hparams(init) if isinstance(init, dict) else {}


def _with_prefix(state: dict[str, Any], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _strip_common_prefix(state: dict[str, Any], prefixes: tuple[str, ...]) -> dict[str, Any]:
    for prefix in prefixes:
        if state and all(k.startswith(prefix) for k in state):
            return _with_prefix(state, prefix)
    return dict(state)


def _read_folder(folder: Path, name: str) -> TrainedWeights:
    """An export folder: timm/HF ``config.json`` + ``model.safetensors``, or ``model.safetensors`` + ``model.json``."""
    files = [folder / f for f in HUB_WEIGHTS if (folder / f).is_file()] or sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"{name} {str(folder)!r} is a folder without weights; expected an export folder with model.safetensors "
            "(and config.json or model.json)"
        )
    weights_file = files[0]
    if _sniff(weights_file) == "safetensors":
        state, meta = _read_safetensors(weights_file, name)
    else:
        state, meta = _read_torch(weights_file, True, name).state_dict, {}
    config = folder / "config.json"
    if config.is_file():
        hub_meta = _meta_from_hub_config(read_json(config), config)
        _check_same_model(meta, hub_meta, weights_file, config)
        if meta:  # our own metadata says how the weights were evaluated; config.json of old exports had timm's guess
            hub_meta = {k: v for k, v in hub_meta.items() if k not in EVAL_KEYS}
        return TrainedWeights(state, weights_file, "hub_folder", meta={**hub_meta, **meta})
    if not meta:
        raise ValueError(
            f"{name} {str(folder)!r} has weights but no metadata (no config.json, model.json or safetensors "
            "header); give the model name (model_name= / --model) and the weights file instead"
        )
    return TrainedWeights(state, weights_file, "export_folder", meta=meta)


def _check_same_model(meta: dict[str, Any], hub_meta: dict[str, Any], weights: Path, config: Path) -> None:
    for key in ("model_name", "num_classes"):
        if key in meta and key in hub_meta and meta[key] != hub_meta[key]:
            raise ValueError(
                f"{str(config)!r} says {key}={hub_meta[key]!r} but {str(weights)!r} was written for "
                f"{key}={meta[key]!r}: the folder mixes two exports; export it again"
            )


def read_json(path: Path) -> dict[str, Any]:
    """Parse the JSON object in ``path``; a ``ValueError`` names the file when it is not one."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{str(path)!r} is not valid JSON ({err}); expected the export's metadata object") from err
    if not isinstance(data, dict):
        raise ValueError(f"{str(path)!r} holds a JSON {type(data).__name__}; expected an object {{...}}")
    return data


def read_metadata_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate a ``model.json`` / ``<stem>.json`` metadata file; returns the metadata dict."""
    return validate_metadata(read_json(Path(path)), repr(str(path)))


def _meta_from_hub_config(config: dict[str, Any], path: Path) -> dict[str, Any]:
    """Metadata from a timm/HF ``config.json`` (``architecture``, ``model_args``, ``pretrained_cfg``, ...)."""
    where = repr(str(path))
    if not isinstance(config.get("architecture"), str):
        raise ValueError(f"{where} has no 'architecture' string naming the model (got {config.get('architecture')!r})")
    pretrained_cfg = config.get("pretrained_cfg", {})
    if not isinstance(pretrained_cfg, dict):
        raise ValueError(f"{where}: 'pretrained_cfg' must be an object, got {type(pretrained_cfg).__name__}")
    meta: dict[str, Any] = {"model_name": config["architecture"], "model_args": config.get("model_args", {})}
    for key in ("mean", "std", "input_size", *EVAL_KEYS):
        if key in pretrained_cfg:
            meta[key] = pretrained_cfg[key]
    if "num_classes" in config:
        meta["num_classes"] = config["num_classes"]
    labels = config.get("label_names")
    if isinstance(labels, dict):  # timm allows {index: name}
        labels = [labels[k] for k in sorted(labels, key=int)]
    if labels is not None:
        meta["class_names"] = labels
    return validate_metadata(meta, where)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def validate_metadata(meta: Any, where: str) -> dict[str, Any]:
    """Return ``meta`` with checked types (``model_name`` str, ``model_args`` object, ``class_names`` list of str,
    ``mean``/``std`` lists of numbers, ``input_size`` ints, ``crop_pct`` in (0, 1], a known ``interpolation`` and
    ``crop_mode``); a ``ValueError`` names ``where`` and the key."""
    if not isinstance(meta, dict):
        raise ValueError(f"metadata in {where} must be a JSON object, got {type(meta).__name__}")
    meta = dict(meta)
    if "classes" in meta and "class_names" not in meta:
        meta["class_names"] = meta.pop("classes")
    meta.pop("classes", None)

    def wrong(key: str, expected: str) -> ValueError:
        return ValueError(f"metadata in {where}: {key!r} must be {expected}, got {meta[key]!r}")

    if meta.get("model_name") is not None and not isinstance(meta["model_name"], str):
        raise wrong("model_name", "a model name string")
    if meta.get("model_args") is None:
        meta["model_args"] = {}
    if not isinstance(meta["model_args"], dict):
        raise wrong("model_args", "an object of model keyword arguments")
    names = meta.get("class_names")
    if names is not None and (not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names)):
        raise wrong("class_names", "a list of strings")
    for key in ("mean", "std"):
        value = meta.get(key)
        if value is None:
            continue
        value = [value] if _is_number(value) else value
        if not isinstance(value, (list, tuple)) or not value or not all(_is_number(v) for v in value):
            raise wrong(key, "a list of finite numbers")
        if key == "std" and any(v <= 0 for v in value):
            raise wrong(key, "positive")
        meta[key] = [float(v) for v in value]
    for key in ("num_classes", "in_chans"):
        if meta.get(key) is not None and (not isinstance(meta[key], int) or isinstance(meta[key], bool)):
            raise wrong(key, "an int")
    for key in ("input_size", "img_size"):
        value = meta.get(key)
        if value is None:
            continue
        ints = [value] if isinstance(value, int) else value
        if not isinstance(ints, (list, tuple)) or not all(isinstance(v, int) and v > 0 for v in ints):
            raise wrong(key, "a positive int or a list of them")
    crop_pct = meta.get("crop_pct")
    if crop_pct is not None and (not _is_number(crop_pct) or not 0.0 < crop_pct <= 1.0):
        raise wrong("crop_pct", "a number in (0, 1]")
    for key, allowed in (("interpolation", INTERPOLATIONS), ("crop_mode", CROP_MODES)):
        if meta.get(key) is not None and meta[key] not in allowed:
            raise wrong(key, f"one of {allowed}")
    num_classes = meta.get("num_classes", meta["model_args"].get("num_classes"))
    if names is not None and isinstance(num_classes, int) and num_classes > 0 and len(names) != num_classes:
        raise ValueError(f"metadata in {where}: {len(names)} class_names for num_classes={num_classes}")
    return meta


def _check_finite(state: dict[str, torch.Tensor], path: Path) -> None:
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ValueError(
            f"{str(path)!r} holds non-finite (NaN/Inf) weights in {len(bad)} tensor(s): {', '.join(bad[:5])}; "
            "the run that wrote it diverged; use an earlier checkpoint"
        )


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def write_safetensors(path: str | os.PathLike, state: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Atomically write ``state`` to ``path`` with ``meta`` (JSON) in the safetensors header; returns ``path``."""
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}  # no shared storage
    header = {"format": "pt", META_KEY: json.dumps(_jsonable(meta), sort_keys=True)}
    return atomic_write_bytes(path, save(tensors, metadata=header))


def to_json(meta: dict[str, Any]) -> str:
    """``meta`` as indented JSON text (non-JSON values as strings), for the metadata files beside the weights."""
    return json.dumps(_jsonable(meta), indent=2, sort_keys=True) + "\n"
