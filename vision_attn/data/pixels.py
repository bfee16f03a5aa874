"""Decoded images to ``uint8 [H, W, C]`` arrays, with 16-bit images scaled (not clipped) to 8 bits."""

from __future__ import annotations

import numpy as np
from PIL import Image

__all__ = ["to_uint8_array"]

# PIL modes of one-channel integer images wider than 8 bits (16-bit PNG and TIFF open as "I;16"; some as "I")
_WIDE_GREY_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})


def _scale16(array: np.ndarray) -> np.ndarray:
    """``uint8`` of a 16-bit array: 0 -> 0, 65535 -> 255 (values outside ``[0, 65535]`` are clipped)."""
    return np.round(np.clip(array.astype(np.float64), 0, 65535) / 257.0).astype(np.uint8)


def to_uint8_array(image: Image.Image | np.ndarray, in_chans: int) -> np.ndarray:
    """``uint8 [H, W, in_chans]`` of a PIL image or an array (``[H, W]`` / ``[H, W, C]``, ``uint8`` or ``uint16``).

    16-bit grey images (PIL mode ``I;16``/``I``, ``uint16`` arrays) are scaled by 1/257, so their full range maps
    onto 0..255 (a plain ``convert('L')`` clips everything above 255 to white). Grey is repeated to RGB for
    ``in_chans=3``; colour is converted to luminance for ``in_chans=1``; an alpha channel is dropped.
    """
    if in_chans not in (1, 3):
        raise ValueError(f"in_chans must be 1 or 3, got {in_chans}")
    if isinstance(image, Image.Image):
        if image.mode in _WIDE_GREY_MODES:
            image = Image.fromarray(_scale16(np.asarray(image)))  # 2-D uint8 -> mode "L"
        image = image.convert("L" if in_chans == 1 else "RGB")
        array = np.asarray(image, dtype=np.uint8)
    else:
        array = np.asarray(image)
        if array.dtype == np.uint16:
            array = _scale16(array)
        elif array.dtype != np.uint8:
            raise TypeError(f"image arrays must be uint8 or uint16, got dtype {array.dtype}")
    if array.ndim == 2:
        array = array[:, :, None]
    if array.shape[2] != in_chans:
        if in_chans == 3:
            array = np.repeat(array[:, :, :1], 3, axis=2)
        else:
            array = np.asarray(Image.fromarray(np.ascontiguousarray(array[:, :, :3])).convert("L"))[:, :, None]
    return array
