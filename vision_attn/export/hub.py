"""The timm / Hugging Face Hub folder: ``config.json`` + ``model.safetensors``, as ``timm.models.push_to_hf_hub``
publishes it, so ``timm.create_model("local-dir:PATH", pretrained=True)`` (after ``import vision_attn``) and the
Hub load it.

``config.json`` is written by timm's own ``save_config_for_hf`` (``architecture``, ``num_classes``, ``label_names``,
``model_args``, ``pretrained_cfg`` with input size and mean/std). For a plain ViT it also holds
``timm_architecture`` and ``timm_model_args`` (incl. ``patch_size``): building timm's ``VisionTransformer`` from them
takes the same state dict and gives the same logits, without vision_attn installed. ``model.safetensors`` carries
vision_attn's metadata in its header, and ``model.json`` repeats it for readers of the earlier export layout.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from vision_attn._io import atomic_write_text
from vision_attn.models._weights import to_json, write_safetensors
from vision_attn.models.vit import timm_vit_args

__all__ = ["hub_config_fields", "write_hub_files"]


def hub_config_fields(model: nn.Module, meta: dict[str, Any]) -> dict[str, Any]:
    """Top-level ``config.json`` fields beyond timm's: class names, and the plain-timm equivalent of a plain ViT."""
    fields: dict[str, Any] = {}
    if meta.get("class_names"):
        fields["label_names"] = list(meta["class_names"])
    equivalent = timm_vit_args(model)
    if equivalent is not None:
        fields["timm_architecture"], fields["timm_model_args"] = equivalent
    return fields


def _save_config(model: nn.Module, path: Path, meta: dict[str, Any]) -> None:
    """timm's ``save_config_for_hf`` with the eval preprocessing (input size, mean/std, crop, interpolation) in
    ``pretrained_cfg``, so timm's own ``resolve_data_config`` builds the pipeline validation used."""
    from timm.models._hub import save_config_for_hf

    original = model.pretrained_cfg
    cfg = dict(original)
    for key in ("mean", "std", "input_size", "crop_pct", "interpolation", "crop_mode"):
        if meta.get(key) is not None:
            cfg[key] = tuple(meta[key]) if isinstance(meta[key], (list, tuple)) else meta[key]
    cfg["num_classes"] = getattr(model, "num_classes", cfg.get("num_classes"))
    model.pretrained_cfg = cfg  # timm reads the preprocessing from here; restored below
    try:
        save_config_for_hf(model, str(path), model_config=hub_config_fields(model, meta))
    finally:
        model.pretrained_cfg = original


def write_hub_files(model: nn.Module, folder: Path, meta: dict[str, Any], stem: str = "model") -> list[Path]:
    """Write ``config.json`` (when ``model`` is a timm-registered model), ``<stem>.safetensors`` and ``<stem>.json``
    into ``folder`` (a staging folder swapped in by the caller); returns the paths written."""
    written = [write_safetensors(folder / f"{stem}.safetensors", model.state_dict(), meta)]
    if (getattr(model, "pretrained_cfg", None) or {}).get("architecture"):
        _save_config(model, folder / "config.json", meta)
        written.append(folder / "config.json")
    written.append(atomic_write_text(folder / f"{stem}.json", to_json(meta)))
    return written
