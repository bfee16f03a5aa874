"""Model-ready image batches from image files and from the embedded dataset, with their object boxes.

What ``vision-attn explain`` reads: files (or folders of them) and ``cluttered_fashion_mnist[:split]``, resized
to the model's input size, converted to its channel count and normalized per channel; boxes
``(x_min, y_min, x_max, y_max)`` in pixels (max exclusive) are rescaled with their image.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from vision_attn.data.pixels import to_uint8_array

__all__ = [
    "IMAGE_SUFFIXES",
    "channel_stats",
    "find_image_files",
    "load_dataset_images",
    "load_image_files",
    "parse_dataset_spec",
    "read_boxes",
    "resize_boxes",
    "transform_boxes",
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


def channel_stats(
    values: Sequence[float] | None, in_chans: int, name: str, convert: bool = False
) -> tuple[float, ...] | None:
    """Return ``values`` as one mean or std per channel (``in_chans`` of them), or ``None`` for ``None``.

    One value is repeated to every channel. Any other count than 1 or ``in_chans`` raises a ``ValueError``
    naming ``name``, unless ``convert`` (for statistics that came with a model, not from the user) allows 3
    values for 1 channel (their mean, as for luminance). A std must be positive.
    """
    if values is None:
        return None
    given = tuple(float(v) for v in (values if isinstance(values, Sequence) else [values]))
    if not all(np.isfinite(given)):
        raise ValueError(f"{name} {list(given)} must be finite numbers")
    if "std" in name and min(given, default=1.0) <= 0:
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


def _normalize(batch: torch.Tensor, mean: Sequence[float] | None, std: Sequence[float] | None) -> torch.Tensor:
    """``(batch - mean) / std`` per channel of ``[B, C, H, W]`` (each ``C`` values or ``None`` = no change)."""
    if mean is not None:
        batch = batch - torch.as_tensor(mean, dtype=batch.dtype)[:, None, None]
    if std is not None:
        batch = batch / torch.as_tensor(std, dtype=batch.dtype)[:, None, None]
    return batch


def _to_tensor(image: Image.Image, in_chans: int, size: tuple[int, int] | None) -> torch.Tensor:
    """A PIL image as float ``[in_chans, H, W]`` in [0, 1], resized (bilinear) to ``size`` ``(H, W)``."""
    array = to_uint8_array(image, in_chans)  # 16-bit greyscale is scaled to 8 bits, not clipped
    image = Image.fromarray(array[:, :, 0] if in_chans == 1 else array)
    if size is not None and image.size != (size[1], size[0]):
        image = image.resize((size[1], size[0]), Image.BILINEAR)
    array = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(array).reshape(*array.shape[:2], -1).permute(2, 0, 1)


def load_image_files(
    paths: Sequence[str | os.PathLike],
    in_chans: int,
    size: tuple[int, int] | None,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Read image files as ``(batch [B, in_chans, H, W], original sizes [(H, W)] per file)``.

    Each image is resized (bilinear) to ``size`` ``(H, W)`` (``None``: kept; then all must have one size) and
    normalized per channel by ``mean``/``std`` (one value per channel, see :func:`channel_stats`).
    """
    if in_chans not in (1, 3):
        raise ValueError(f"in_chans must be 1 or 3 to read image files, got {in_chans}")
    tensors, sizes = [], []
    for path in paths:
        try:
            with Image.open(path) as image:
                sizes.append((image.height, image.width))
                tensors.append(_to_tensor(image, in_chans, size))
        except OSError as err:  # PIL.UnidentifiedImageError is an OSError
            raise ValueError(f"image file {str(path)!r} cannot be read as an image: {err}") from err
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) > 1:
        raise ValueError(
            f"images have different sizes {sorted(s[1:] for s in shapes)} and the model has no fixed input size; "
            "give --img-size"
        )
    return _normalize(torch.stack(tensors), mean, std), sizes


def resize_boxes(
    boxes: torch.Tensor, from_sizes: Sequence[tuple[int, int]], to_size: tuple[int, int] | None
) -> torch.Tensor:
    """Rescale boxes ``[B, 4]`` ``(x_min, y_min, x_max, y_max)`` from their images' ``(H, W)`` to ``to_size``.

    Returns a new float tensor ``[B, 4]``; ``to_size=None`` returns the boxes unchanged.
    """
    boxes = torch.as_tensor(boxes, dtype=torch.float32).clone()
    if to_size is None:
        return boxes
    sizes = torch.as_tensor([list(s) for s in from_sizes], dtype=torch.float32).reshape(-1, 2)
    scale_y, scale_x = to_size[0] / sizes[:, 0], to_size[1] / sizes[:, 1]
    return boxes * torch.stack([scale_x, scale_y, scale_x, scale_y], dim=1)


def transform_boxes(transform: Any, image_shape: Sequence[int], boxes: Any) -> torch.Tensor:
    """Move boxes ``[N, 4]`` of one image of ``image_shape`` ``(H, W[, C])`` through the geometric steps of an
    albumentations ``transform`` (e.g. the eval resize + centre crop), as the image itself moves.

    Returns float ``[N, 4]`` in the output image's pixels, clipped to it; a box the crop removes entirely is
    all NaN.
    """
    import albumentations as A

    if not isinstance(transform, A.BaseCompose):
        raise TypeError(f"transform must be an albumentations Compose, got {type(transform).__name__}")
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    channels = image_shape[2] if len(image_shape) > 2 else 1
    params = A.BboxParams(format="pascal_voc", label_fields=["box_index"], clip=True, min_area=0, min_visibility=0)
    with_boxes = A.Compose(list(transform.transforms), bbox_params=params)
    image = np.zeros((int(image_shape[0]), int(image_shape[1]), int(channels)), dtype=np.uint8)
    moved = with_boxes(image=image, bboxes=boxes, box_index=list(range(len(boxes))))
    out = torch.full((len(boxes), 4), float("nan"))
    for box, index in zip(moved["bboxes"], moved["box_index"], strict=True):
        out[int(index)] = torch.as_tensor(np.asarray(box, dtype=np.float32)[:4])
    return out


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


def load_dataset_images(
    spec: str,
    limit: int | None,
    in_chans: int,
    size: tuple[int, int] | None,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
) -> tuple[torch.Tensor, list[str], torch.Tensor, torch.Tensor]:
    """Load ``spec`` = ``'cluttered_fashion_mnist[:test|train]'`` as ``(images, names, boxes [B, 4], labels [B])``.

    The first ``limit`` samples (all if ``None``), converted to ``in_chans``, resized to ``size`` (boxes with
    them) and normalized per channel by ``mean``/``std`` (default: the dataset's).
    """
    from vision_attn.data.cluttered import ClutteredFashionMNIST

    _, split = parse_dataset_spec(spec)
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"--limit must be an int >= 1, got {limit!r}")
    data = ClutteredFashionMNIST(split)
    count = len(data) if limit is None else min(limit, len(data))
    native = tuple(data.images.shape[1:3])
    images = torch.stack([_to_tensor(Image.fromarray(data.images[i]), in_chans, size) for i in range(count)])
    mean = mean if mean is not None else channel_stats([data.meta["mean"]], in_chans, "dataset mean")
    std = std if std is not None else channel_stats([data.meta["std"]], in_chans, "dataset std")
    names = [f"{split}_{i:04d}" for i in range(count)]
    boxes = resize_boxes(torch.as_tensor(data.boxes[:count], dtype=torch.float32), [native] * count, size)
    return _normalize(images, mean, std), names, boxes, torch.as_tensor(data.targets[:count])
