"""``export_trained`` / ``write_export``: write a trained model as a timm/HF folder, ONNX, TorchScript and
``torch.export`` files, all in one output folder that is replaced in one atomic step."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from vision_attn._data_config import resolve_data_config
from vision_attn._io import atomic_dir
from vision_attn.export.hub import write_hub_files
from vision_attn.export.programs import (
    example_input,
    write_exported_program,
    write_onnx,
    write_torchscript,
)
from vision_attn.models._loading import load_trained, recorded_model_args

__all__ = ["FORMATS", "ExportResult", "check_out_folder", "export_trained", "write_export"]

FORMATS = ("hub", "onnx", "torchscript", "pt2")
FILE_NAMES = {"onnx": "model.onnx", "torchscript": "model.torchscript.pt", "pt2": "model.pt2"}
META_KEYS = ("model_name", "model_args", "class_names", "mean", "std", "input_size", "crop_pct", "interpolation",
             "crop_mode", "num_classes", "in_chans", "img_size", "data_name", "epoch", "global_step",
             "source_checkpoint", "weights")  # fmt: skip


@dataclass
class ExportResult:
    """What :func:`write_export` wrote: the ``folder``, the main file per format, and per verified format the
    largest ``|exported - eager|`` output difference on a check batch (None: onnxruntime not installed)."""

    folder: Path
    files: dict[str, Path] = field(default_factory=dict)
    max_abs_diff: dict[str, float | None] = field(default_factory=dict)


def _check_formats(formats: Any) -> tuple[str, ...]:
    if isinstance(formats, str):
        formats = (formats,)
    formats = tuple(formats)
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ValueError(f"formats {list(formats)} must be one or more of {', '.join(FORMATS)}")
    return formats


def _format_files(fmt: str, stem: str) -> tuple[str, ...]:
    return ("config.json", f"{stem}.safetensors", f"{stem}.json") if fmt == "hub" else (FILE_NAMES[fmt],)


def _known_names(stem: str) -> set[str]:
    return {"README.md", *(name for fmt in FORMATS for name in _format_files(fmt, stem))}


def check_out_folder(out: str | os.PathLike, stem: str = "model") -> None:
    """Raise a ``ValueError`` unless ``out`` is new, empty or a previous export: an export replaces the whole folder,
    so a folder holding anything else (whose files would be deleted) is refused."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out {str(out)!r} is a file; expected a folder for the export")
    if out.is_dir():
        foreign = sorted(p.name for p in out.iterdir() if p.name not in _known_names(stem))
        if foreign:
            raise ValueError(
                f"out {str(out)!r} holds files that are not an export ({', '.join(foreign[:5])}); the export "
                "replaces the whole folder, so give a new or empty folder"
            )


def _normalize_meta(model: nn.Module, meta: dict[str, Any]) -> dict[str, Any]:
    """Metadata to store with the weights: model name/args, class names and the eval preprocessing (``input_size``
    (C, H, W), mean/std, ``crop_pct``, ``interpolation``, ``crop_mode``)."""
    meta = dict(meta)
    if "classes" in meta and "class_names" not in meta:
        meta["class_names"] = meta.pop("classes")
    meta.setdefault("model_name", (getattr(model, "pretrained_cfg", None) or {}).get("architecture"))
    meta["model_args"] = recorded_model_args(model, dict(meta.get("model_args") or {}))
    meta["num_classes"] = getattr(model, "num_classes", meta.get("num_classes"))
    config = resolve_data_config(model, meta)  # the eval preprocessing: as given, else the model's own
    meta.update(config, input_size=list(config["input_size"]), mean=list(config["mean"]), std=list(config["std"]))
    if meta.get("source_checkpoint"):  # a file name, never a path of the machine that trained it
        meta["source_checkpoint"] = Path(meta["source_checkpoint"]).name
    return {k: meta[k] for k in META_KEYS if meta.get(k) is not None}


def write_export(
    model: nn.Module,
    out: str | os.PathLike,
    formats: tuple[str, ...] | list[str] | str = ("hub",),
    meta: dict[str, Any] | None = None,
    stem: str = "model",
    keep_other_formats: bool = False,
) -> ExportResult:
    """Write ``model`` in ``formats`` into the folder ``out``, replacing it in one atomic step; returns what was
    written (:class:`ExportResult`).

    ``meta`` describes the weights (``model_name``, ``model_args``, ``class_names``/``classes``, ``mean``,
    ``std``, ``input_size`` or ``img_size``/``in_chans``, ...; missing values come from the model). Files:
    ``hub``: ``config.json`` + ``<stem>.safetensors`` + ``<stem>.json``; ``onnx``: ``model.onnx``;
    ``torchscript``: ``model.torchscript.pt``; ``pt2``: ``model.pt2``. ONNX, TorchScript and ``.pt2`` are
    checked against eager outputs (ONNX in onnxruntime when installed) before the folder is replaced.
    ``keep_other_formats=True`` carries over the files of other formats already in ``out`` (only right when they
    hold the same weights, e.g. when ``out`` is where the model was loaded from).
    """
    formats = _check_formats(formats)
    out = Path(out)
    check_out_folder(out, stem)
    was_training = model.training
    model.eval()
    meta = _normalize_meta(model, meta or {})
    result = ExportResult(out)
    example = example_input(tuple(meta["input_size"]), batch=2)
    check = example_input(tuple(meta["input_size"]), batch=3, seed=1)  # another batch size: the axis is dynamic
    try:
        with atomic_dir(out) as staging:
            if keep_other_formats and out.is_dir():
                for fmt in set(FORMATS) - set(formats):
                    for name in _format_files(fmt, stem):
                        if (out / name).is_file():
                            shutil.copy2(out / name, staging / name)
                            result.files.setdefault(fmt, out / name)
            if "hub" in formats:
                write_hub_files(model, staging, meta, stem)
                result.files["hub"] = out / f"{stem}.safetensors"
            program = None
            if "pt2" in formats:
                program, diff = write_exported_program(model, staging / FILE_NAMES["pt2"], example, check)
                result.max_abs_diff["pt2"] = diff
            if "onnx" in formats:
                source = program if program is not None else model
                result.max_abs_diff["onnx"] = write_onnx(source, staging / FILE_NAMES["onnx"], example, check, model)
            if "torchscript" in formats:
                path = staging / FILE_NAMES["torchscript"]
                result.max_abs_diff["torchscript"] = write_torchscript(model, path, check)
            for fmt in formats:
                if fmt != "hub":
                    result.files[fmt] = out / FILE_NAMES[fmt]
    finally:
        model.train(was_training)
    return result


def export_trained(
    source: str | os.PathLike,
    out: str | os.PathLike,
    formats: tuple[str, ...] | list[str] | str = ("hub",),
    model_name: str | None = None,
    model_args: dict[str, Any] | None = None,
    use_ema: bool = True,
    resample_weights: bool = False,
) -> ExportResult:
    """Load ``source`` with :func:`vision_attn.load_trained` (a ``train.py`` checkpoint, an export folder, a
    ``.safetensors`` with metadata, or bare weights with ``model_name``) and write it with :func:`write_export`.

    Returns the :class:`ExportResult`. The metadata (class names, mean/std, input size) travels with it. Exporting
    a folder into itself adds formats: the files of the formats not asked for are kept.
    """
    formats = _check_formats(formats)
    check_out_folder(out)
    model, info = load_trained(
        source, model_name=model_name, model_args=model_args, use_ema=use_ema, resample_weights=resample_weights
    )
    meta = {k: v for k, v in info.items() if k in META_KEYS}
    meta["source_checkpoint"] = info["path"]
    same_folder = Path(out).resolve() in (Path(source).resolve(), Path(info["path"]).resolve().parent)
    return write_export(model, out, formats, meta, keep_other_formats=same_folder)
