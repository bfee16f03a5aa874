"""Albumentations pipelines: a configurable train pipeline, and the one eval pipeline built from a data config.

Both take a ``uint8`` ``[H, W, C]`` numpy image and return a float ``[C, H, W]`` tensor.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations checks PyPI for updates on import

import albumentations as A
from albumentations.pytorch import ToTensorV2

from vision_attn._data_config import check_data_config

__all__ = ["build_train_transform", "create_transform"]


def _check_prob(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {value}")


def build_train_transform(
    img_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    crop_scale: tuple[float, float] | None = (0.35, 1.0),
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
    translate: float = 0.0,
    hflip: float = 0.5,
    color_jitter: float = 0.0,
    coarse_dropout: float = 0.0,
) -> A.Compose:
    """Return the train pipeline: random resized crop (or resize), shift, flip, colour jitter, coarse dropout.

    ``crop_scale=None`` resizes instead of cropping; ``translate`` shifts by a whole number of pixels, up to that
    fraction of the size (zero padding, then a random crop: a quarter of the cost of an affine warp, which mattered
    on small images, and no interpolation blur); ``hflip``/``coarse_dropout`` are probabilities; ``color_jitter``
    is the strength of brightness/contrast/saturation jitter (0 = off).
    """
    if img_size <= 0:
        raise ValueError(f"img_size must be positive, got {img_size}")
    if crop_scale is not None and not 0.0 < crop_scale[0] <= crop_scale[1] <= 1.0:
        raise ValueError(f"crop_scale must be (min, max) with 0 < min <= max <= 1, got {crop_scale}")
    if not 0.0 <= translate < 0.5:
        raise ValueError(f"translate must be in [0, 0.5), got {translate}")
    if color_jitter < 0:
        raise ValueError(f"color_jitter must be >= 0, got {color_jitter}")
    _check_prob("hflip", hflip)
    _check_prob("coarse_dropout", coarse_dropout)
    ops: list[A.BasicTransform] = []
    if crop_scale is None:
        ops.append(A.Resize(img_size, img_size))
    else:
        ops.append(A.RandomResizedCrop(size=(img_size, img_size), scale=crop_scale, ratio=crop_ratio))
    shift = round(translate * img_size)
    if shift > 0:
        ops += [A.Pad(shift, fill=0, border_mode=0), A.RandomCrop(img_size, img_size)]
    if hflip > 0:
        ops.append(A.HorizontalFlip(p=hflip))
    if color_jitter > 0:
        ops.append(A.ColorJitter(brightness=color_jitter, contrast=color_jitter, saturation=color_jitter, hue=0.0))
    if coarse_dropout > 0:
        hole = (max(1, img_size // 8), max(1, img_size // 4))
        ops.append(A.CoarseDropout(num_holes_range=(1, 2), hole_height_range=hole, hole_width_range=hole,
                                   fill=0, p=coarse_dropout))  # fmt: skip
    ops += [A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=255.0), ToTensorV2()]
    return A.Compose(ops)


_CV2_INTERPOLATION = {"nearest": 0, "bilinear": 1, "bicubic": 2, "area": 3, "lanczos": 4}  # cv2.INTER_* flags


def create_transform(data_config: Mapping[str, Any], boxes: bool = False) -> A.Compose:
    """Return the eval pipeline of ``data_config`` (see :func:`vision_attn.data.resolve_data_config`): timm's eval
    geometry in albumentations, then normalize.

    ``crop_mode='center'``: resize so the image covers ``floor(size / crop_pct)`` keeping its aspect ratio (the
    short side for a square input, as timm's ``Resize(int)``; timm's ``ResizeKeepRatio`` otherwise), then centre
    crop ``(H, W)``; ``'squash'``: resize to exactly ``floor(size / crop_pct)``, then centre crop. OpenCV resizing
    with the config's ``interpolation``. Call it with ``image=`` a ``uint8 [H, W, C]`` array (``C`` =
    ``input_size[0]``; see :func:`vision_attn.data.read_image`) and optionally ``mask=`` ``[H, W]`` (nearest
    neighbour); with ``boxes=True`` also ``bboxes=`` ``[N, 4]`` ``(x_min, y_min, x_max, y_max)`` pixels and
    ``box_index=`` (clipped to the crop; a box the crop removes is dropped). Returns albumentations' dict with
    ``image`` float ``[C, H, W]``.
    """
    config = check_data_config(data_config)
    _, height, width = config["input_size"]
    crop_pct, flag = config["crop_pct"], _CV2_INTERPOLATION[config["interpolation"]]
    scale = (math.floor(height / crop_pct), math.floor(width / crop_pct))
    if config["crop_mode"] == "squash":
        resize: A.BasicTransform = A.Resize(*scale, interpolation=flag)
    elif scale[0] == scale[1]:
        resize = A.SmallestMaxSize(max_size=scale[0], interpolation=flag)
    else:
        resize = A.SmallestMaxSize(max_size_hw=scale, interpolation=flag)
    ops = [
        resize,
        A.CenterCrop(height, width),
        A.Normalize(mean=config["mean"], std=config["std"], max_pixel_value=255.0),
        ToTensorV2(),
    ]
    if not boxes:
        return A.Compose(ops)
    params = A.BboxParams(format="pascal_voc", label_fields=["box_index"], clip=True, min_area=0, min_visibility=0)
    return A.Compose(ops, bbox_params=params)
