"""Images to model inputs through the one eval pipeline: what validation, ``vision-attn explain``, the map
evaluation and the app all call, so a file reaches the model exactly as a validation image does.

:func:`read_image` decodes a file (or takes a PIL image or an array) to ``uint8 [H, W, C]`` with the model's
channel count, as the datasets do (grey repeated to RGB, RGB to luminance, alpha dropped, 16-bit scaled);
:func:`prepare_images` runs images, with their object boxes and masks, through
:func:`~vision_attn.data.transforms.create_transform` of a data config (:func:`vision_attn.data.resolve_data_config`).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from vision_attn._data_config import check_data_config
from vision_attn.data.image_folder import load_image
from vision_attn.data.pixels import to_uint8_array
from vision_attn.data.transforms import create_transform

__all__ = ["MAX_IMAGE_PIXELS", "Prepared", "prepare_images", "read_image"]

# larger images are refused before they are decoded (PIL's own decompression-bomb limit, ~9459 x 9459 pixels);
# the eval pipeline resizes anything up to it
MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485

ImageLike = str | os.PathLike | Image.Image | np.ndarray


def _open(path: Path, name: str) -> Image.Image:
    if not path.is_file():
        raise FileNotFoundError(f"{name} {str(path)!r} does not exist or is not a file")
    try:
        with warnings.catch_warnings():  # a size over the limit is refused below, with the limit named
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as probe:  # reads the header only
                width, height = probe.size
    except Image.DecompressionBombError as err:  # PIL refuses over twice its limit before the size can be read
        raise ValueError(
            f"{name} {str(path)!r} has more pixels than the limit of {MAX_IMAGE_PIXELS:,} "
            f"(vision_attn.data.preprocess.MAX_IMAGE_PIXELS): {err}; downscale it first"
        ) from err
    except (OSError, SyntaxError, ValueError) as err:  # PIL.UnidentifiedImageError is an OSError
        raise ValueError(f"{name} {str(path)!r} cannot be read as an image: {err}") from err
    if width * height > MAX_IMAGE_PIXELS:
        raise ValueError(
            f"{name} {str(path)!r} is {width} x {height} pixels, more than the limit of {MAX_IMAGE_PIXELS:,} "
            "(vision_attn.data.preprocess.MAX_IMAGE_PIXELS); downscale it first"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return load_image(str(path))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning) as err:
        raise ValueError(f"{name} {str(path)!r} cannot be decoded (truncated or damaged?): {err}") from err


def read_image(image: ImageLike, in_chans: int, name: str = "image") -> np.ndarray:
    """Return ``image`` (a file path, a PIL image or an ``[H, W]`` / ``[H, W, C]`` uint8/uint16 array) as
    ``uint8 [H, W, in_chans]``, converted as the datasets convert their images.

    A missing file is a ``FileNotFoundError``; a file that is not an image, is truncated or has more than
    :data:`MAX_IMAGE_PIXELS` pixels is a ``ValueError`` naming ``name`` and the file.
    """
    if isinstance(image, (str, os.PathLike)):
        image = _open(Path(image), name)
    elif isinstance(image, np.ndarray):
        if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 2, 3, 4)):
            raise ValueError(f"{name} array has shape {image.shape}; expected [H, W] or [H, W, C] with C in 1..4")
        if image.shape[0] * image.shape[1] > MAX_IMAGE_PIXELS:
            raise ValueError(f"{name} array is {image.shape[1]} x {image.shape[0]} pixels, more than the limit of "
                             f"{MAX_IMAGE_PIXELS:,}")  # fmt: skip
    elif isinstance(image, Image.Image):
        if image.width * image.height > MAX_IMAGE_PIXELS:
            raise ValueError(f"{name} is {image.width} x {image.height} pixels, more than the limit of "
                             f"{MAX_IMAGE_PIXELS:,}")  # fmt: skip
    else:
        raise TypeError(f"{name} must be a file path, a PIL image or a numpy array, got {type(image).__name__}")
    return to_uint8_array(image, in_chans)


@dataclass
class Prepared:
    """Model inputs made by :func:`prepare_images`: ``images`` float ``[B, C, H, W]`` (normalized), ``boxes``
    float ``[B, 4]`` in the input's pixels (NaN where the crop removed a box) or ``None``, ``masks`` bool
    ``[B, H, W]`` or ``None``, and each image's original ``sizes`` ``(H, W)``."""

    images: torch.Tensor
    boxes: torch.Tensor | None
    masks: torch.Tensor | None
    sizes: list[tuple[int, int]]


def _check_rows(values: Any, count: int, name: str) -> None:
    if values is not None and len(values) != count:
        raise ValueError(f"{name} has {len(values)} entries for {count} images; give one per image")


def prepare_images(
    images: Sequence[ImageLike],
    data_config: Mapping[str, Any],
    boxes: Sequence[Sequence[float]] | np.ndarray | torch.Tensor | None = None,
    masks: Sequence[np.ndarray] | None = None,
    names: Sequence[str] | None = None,
) -> Prepared:
    """Run ``images`` (paths, PIL images or arrays, any sizes) through the eval pipeline of ``data_config``.

    ``boxes``: one ``(x_min, y_min, x_max, y_max)`` per image in its own pixels (max exclusive); ``masks``: one
    ``[H, W]`` array per image (non-zero = object). Both follow the image through the same resize and crop
    (albumentations' box and mask targets). ``names`` name the images in errors. Returns a :class:`Prepared`.
    """
    config = check_data_config(data_config)
    if isinstance(images, (str, os.PathLike, Image.Image, np.ndarray)):
        raise TypeError(f"images must be a sequence of images, got one {type(images).__name__}; wrap it in a list")
    if not len(images):
        raise ValueError("images is empty; give at least one image")
    _check_rows(boxes, len(images), "boxes")
    _check_rows(masks, len(images), "masks")
    _check_rows(names, len(images), "names")
    transform = create_transform(config, boxes=boxes is not None)
    in_chans = config["input_size"][0]
    tensors, moved_boxes, moved_masks, sizes = [], [], [], []
    for i, image in enumerate(images):
        if isinstance(image, (str, os.PathLike)):
            label = "image file"  # the path is named with it
        else:
            label = f"image {names[i]!r}" if names is not None else f"images[{i}]"
        array = read_image(image, in_chans, name=label)
        sizes.append((int(array.shape[0]), int(array.shape[1])))
        inputs: dict[str, Any] = {"image": array}
        if boxes is not None:
            inputs.update(bboxes=np.asarray(boxes[i], dtype=np.float32).reshape(1, 4), box_index=[0])
        if masks is not None:
            mask = np.asarray(masks[i])
            if mask.shape != array.shape[:2]:
                raise ValueError(f"masks[{i}] has shape {mask.shape}, but images[{i}] is {array.shape[:2]}")
            inputs["mask"] = (mask != 0).astype(np.uint8)
        out = transform(**inputs)
        tensors.append(out["image"])
        if boxes is not None:
            kept = np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4)
            moved_boxes.append(torch.from_numpy(kept[0]) if len(kept) else torch.full((4,), float("nan")))
        if masks is not None:
            moved_masks.append(torch.as_tensor(out["mask"]).bool())
    return Prepared(
        images=torch.stack(tensors),
        boxes=torch.stack(moved_boxes) if boxes is not None else None,
        masks=torch.stack(moved_masks) if masks is not None else None,
        sizes=sizes,
    )
