"""The work behind ``vision-attn explain``, the map evaluation and the app: read a user's images through the model's
eval pipeline, predict, explain in batches with any registered method, score the maps, load method plugins.

The command-line tools only parse arguments and write files; everything they compute is here, so the CLI, the
evaluation and the app cannot drift apart.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vision_attn.data.images import find_image_files, load_dataset_images, load_image_files, unique_names
from vision_attn.explain.api import explain
from vision_attn.explain.metrics import deletion_auc, energy_pointing, insertion_auc, pointing_game
from vision_attn.explain.registry import get_method

__all__ = ["SCORES", "ExplainInputs", "explain_batches", "load_inputs", "load_plugins", "predict", "score_maps"]

SCORES = ("pointing_game", "energy_pointing", "deletion_auc", "insertion_auc")


@dataclass
class ExplainInputs:
    """Images ready for a model: ``images`` ``[B, C, H, W]`` (through its eval pipeline), one file-safe name each,
    object ``boxes`` ``[B, 4]`` and ``masks`` ``[B, H, W]`` in the input's pixels where known, the true ``labels``
    ``[B]`` (datasets), and the source ``paths`` (files)."""

    images: torch.Tensor
    names: list[str]
    boxes: torch.Tensor | None = None
    masks: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    paths: list[Path] | None = None


def load_inputs(
    data_config: Mapping[str, Any],
    paths: Sequence[str | os.PathLike] | None = None,
    dataset: str | None = None,
    limit: int | None = None,
    boxes: torch.Tensor | None = None,
) -> ExplainInputs:
    """Read image files or folders (``paths``; ``boxes`` ``[B, 4]`` in each file's own pixels, optional) or the
    embedded dataset (``dataset`` = ``'cluttered_fashion_mnist[:test|train]'``, its first ``limit`` images, with
    boxes, masks and labels) through the eval pipeline of ``data_config``; returns :class:`ExplainInputs`."""
    if (paths is None) == (dataset is None):
        raise ValueError("give exactly one of paths (image files or folders) or dataset")
    if dataset is not None:
        prepared, names, labels = load_dataset_images(dataset, limit, data_config)
        return ExplainInputs(prepared.images, names, prepared.boxes, prepared.masks, labels)
    files = find_image_files(paths)
    prepared = load_image_files(files, data_config, boxes=boxes)
    return ExplainInputs(prepared.images, unique_names(files), prepared.boxes, paths=files)


def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """Class probabilities ``[B, num_classes]`` (float32) of ``model`` on ``images``, ``batch_size`` at a time."""
    with torch.no_grad():
        logits = torch.cat([model(chunk) for chunk in images.split(batch_size)])
    return logits.float().softmax(dim=-1)


def explain_batches(
    model: nn.Module,
    images: torch.Tensor,
    method: str,
    target: int | Sequence[int] | torch.Tensor | None = None,
    batch_size: int = 32,
    **options: Any,
) -> torch.Tensor:
    """:func:`~vision_attn.explain.explain` of ``images`` ``batch_size`` at a time; returns maps ``[B, H, W]``.

    A per-image ``target`` is split with the images; a method with a ``seed`` option gets ``seed + k`` for the
    ``k``-th batch, so batches do not repeat each other's random maps.
    """
    seeded = "seed" in get_method(method).options
    targets = target if not isinstance(target, (Sequence, torch.Tensor)) else torch.as_tensor(target).reshape(-1)
    per_image = isinstance(targets, torch.Tensor) and targets.numel() > 1
    maps = []
    for k, start in enumerate(range(0, images.shape[0], batch_size)):
        chunk = images[start : start + batch_size]
        chunk_target = targets[start : start + batch_size] if per_image else targets
        chunk_options = {**options, "seed": int(options.get("seed", 0)) + k} if seeded else options
        maps.append(explain(model, chunk, method, chunk_target, **chunk_options))
    return torch.cat(maps)


def score_maps(
    model: nn.Module,
    images: torch.Tensor,
    maps: torch.Tensor,
    boxes: torch.Tensor | None = None,
    target: int | Sequence[int] | torch.Tensor | None = None,
    scores: Sequence[str] = SCORES,
    steps: int = 16,
    batch_size: int = 32,
) -> dict[str, torch.Tensor]:
    """Per-image scores ``{name: [B]}`` of ``maps`` ``[B, H, W]``: the box scores (pointing game, energy in box)
    where ``boxes`` are given, deletion / insertion AUC with ``steps`` > 0 (see :mod:`vision_attn.explain.metrics`)."""
    unknown = sorted(set(scores) - set(SCORES))
    if unknown:
        raise ValueError(f"scores {unknown} are unknown; expected some of {SCORES}")
    out: dict[str, torch.Tensor] = {}
    if boxes is not None and "pointing_game" in scores:
        out["pointing_game"] = pointing_game(maps.cpu(), boxes)
    if boxes is not None and "energy_pointing" in scores:
        out["energy_pointing"] = energy_pointing(maps.cpu(), boxes)
    kw = {"steps": steps, "batch_size": batch_size}
    if steps > 0 and "deletion_auc" in scores:
        out["deletion_auc"] = deletion_auc(model, images, maps, target, **kw)
    if steps > 0 and "insertion_auc" in scores:
        out["insertion_auc"] = insertion_auc(model, images, maps, target, **kw)
    return out


def load_plugins(modules: Sequence[str]) -> list[str]:
    """Import each of ``modules`` (a module name on ``sys.path``, or a ``.py`` file) so the methods it registers
    with :func:`~vision_attn.explain.register_method` become available; returns the imported module names."""
    loaded = []
    for spec in modules:
        path = Path(spec)
        if spec.endswith(".py"):
            if not path.is_file():
                raise FileNotFoundError(f"--plugin {spec!r} does not exist")
            name = f"vision_attn_plugin_{path.stem}"
            module_spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(module_spec)  # type: ignore[arg-type]
            sys.modules[name] = module
            module_spec.loader.exec_module(module)  # type: ignore[union-attr]
        else:
            try:
                importlib.import_module(spec)
            except ModuleNotFoundError as err:
                raise ValueError(f"--plugin {spec!r} cannot be imported ({err}); give a module name on the Python "
                                 "path or a .py file") from err  # fmt: skip
            name = spec
        loaded.append(name)
    return loaded
