"""Image files and the embedded dataset as model-ready batches, with their object boxes and masks.

What ``vision-attn explain``, the map evaluation and the app read: files (or folders of them) and
``cluttered_fashion_mnist[:split]``, each sent through the model's eval pipeline (:mod:`vision_attn.data.preprocess`,
the same steps validation uses); boxes ``(x_min, y_min, x_max, y_max)`` in pixels (max exclusive) and masks follow
their image through the same resize and crop.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from vision_attn.data.preprocess import Prepared, prepare_images

__all__ = [
    "IMAGE_SUFFIXES",
    "find_image_files",
    "load_dataset_images",
    "load_image_files",
    "parse_dataset_spec",
    "read_boxes",
    "unique_names",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
DATASET_SPLITS = ("test", "train")


def find_image_files(paths: Sequence[str | os.PathLike], name: str = "--images") -> list[Path]:
    """Return the image files among ``paths``: files as given, folders by their image files (sorted, not recursive).

    Raises ``FileNotFoundError`` for a path that does not exist and ``ValueError`` when no image is found.
    """
    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found += sorted(f for f in path.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            found.append(path)
        else:
            raise FileNotFoundError(f"{name} entry {str(path)!r} is neither a file nor a folder")
    if not found:
        raise ValueError(f"{name} {[str(p) for p in paths]} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
    return found


def unique_names(paths: Sequence[str | os.PathLike]) -> list[str]:
    """Return one file-name-safe name per path: its stem, or ``stem_1``, ``stem_2``, ... (in order) where several
    paths share a stem (``a/cat.png``, ``b/cat.png``, ``cat.jpg``). Characters other than letters, digits, ``.``,
    ``-`` and ``_`` become ``_``."""
    stems = [re.sub(r"[^\w.-]", "_", Path(p).stem) for p in paths]
    counts = Counter(stems)
    taken = {s for s in stems if counts[s] == 1}
    numbered: Counter[str] = Counter()
    names = []
    for stem in stems:
        if counts[stem] == 1:
            names.append(stem)
            continue
        numbered[stem] += 1
        while f"{stem}_{numbered[stem]}" in taken:  # never reuse a name another file has
            numbered[stem] += 1
        names.append(f"{stem}_{numbered[stem]}")
        taken.add(names[-1])
    return names


def read_boxes(path: str | os.PathLike, images: Sequence[Path], name: str = "--boxes") -> torch.Tensor:
    """Read a JSON ``{image: [x_min, y_min, x_max, y_max]}`` (keys: a path as given, or the file name) and return
    one box per image in ``images``, ``[B, 4]`` float, in the image's own pixels."""
    path = Path(path)
    try:
        table = json.loads(path.read_text())
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{name} file {str(path)!r} does not exist") from err
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{name} file {str(path)!r} is not readable JSON: {err}") from err
    if not isinstance(table, dict):
        raise ValueError(f"{name} file {str(path)!r} must hold a JSON object {{image: [x0, y0, x1, y1]}}")
    boxes, missing = [], []
    for image in images:
        key = next((k for k in (str(image), image.as_posix(), image.name) if k in table), None)
        if key is None:
            missing.append(image.name)
            continue
        box = table[key]
        if (
            not isinstance(box, list)
            or len(box) != 4
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box)
            or not (box[2] > box[0] and box[3] > box[1])
        ):
            raise ValueError(
                f"{name} entry {key!r} is {box!r}; expected [x_min, y_min, x_max, y_max] numbers with "
                "x_max > x_min and y_max > y_min"
            )
        boxes.append([float(v) for v in box])
    if missing:
        raise ValueError(f"{name} file {str(path)!r} has no box for {missing}")
    return torch.tensor(boxes, dtype=torch.float32)


def parse_dataset_spec(spec: str, name: str = "--dataset") -> tuple[str, str]:
    """Return ``(dataset, split)`` of ``'cluttered_fashion_mnist[:test|train]'`` (split default ``'test'``)."""
    dataset, _, split = spec.partition(":")
    split = split or "test"
    if dataset != "cluttered_fashion_mnist" or split not in DATASET_SPLITS:
        raise ValueError(f"{name} {spec!r} is unknown; expected 'cluttered_fashion_mnist[:test|train]' (with boxes)")
    return dataset, split


def load_image_files(
    paths: Sequence[str | os.PathLike], data_config: Mapping[str, Any], boxes: torch.Tensor | None = None
) -> Prepared:
    """Read image files through the eval pipeline of ``data_config``; returns a
    :class:`~vision_attn.data.preprocess.Prepared` (``images [B, C, H, W]``, ``boxes`` moved with them when given
    ``[B, 4]`` in each file's own pixels, the files' original ``sizes``)."""
    return prepare_images(list(paths), data_config, boxes=boxes, names=[str(p) for p in paths])


def load_dataset_images(
    spec: str, limit: int | None, data_config: Mapping[str, Any]
) -> tuple[Prepared, list[str], torch.Tensor]:
    """Load ``spec`` = ``'cluttered_fashion_mnist[:test|train]'`` as ``(prepared, names, labels [B])``: the first
    ``limit`` samples (all if ``None``) through the eval pipeline of ``data_config``, with their object boxes and
    masks (``prepared.boxes``, ``prepared.masks``)."""
    from vision_attn.data.cluttered import ClutteredFashionMNIST

    _, split = parse_dataset_spec(spec)
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"--limit must be an int >= 1, got {limit!r}")
    data = ClutteredFashionMNIST(split)
    count = len(data) if limit is None else min(limit, len(data))
    names = [f"{split}_{i:04d}" for i in range(count)]
    prepared = prepare_images(
        list(data.images[:count]), data_config, boxes=data.boxes[:count], masks=list(data.masks[:count]), names=names
    )
    return prepared, names, torch.as_tensor(data.targets[:count])
