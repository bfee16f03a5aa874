"""Context-only training images (outlier exposure, Hendrycks et al. 2019) for datasets with object boxes.

A model trained on objects in clutter can learn "no dense object in view = class X": on the embedded cluttered
Fashion-MNIST, the default model calls almost every image with its object blanked out a sandal (the sparsest class),
so clutter becomes evidence for "sandal" and rollout points at it (``benchmarks/context_probe.py``). With
``ImageDataModule(context_outliers=k)`` each training batch also holds the context-only versions of its first ``k``
images (the object's box set to 0, the canvas background), labelled :data:`OUTLIER_LABEL`; the training loss asks
for a uniform prediction on them (:func:`vision_attn.training.loss.classification_loss`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from vision_attn.data.datasets import TransformedDataset

__all__ = ["OUTLIER_LABEL", "ContextOutliers", "blank"]

OUTLIER_LABEL = -1  # the target of a context-only image: no class


def blank(images: np.ndarray, boxes: np.ndarray, keep: str) -> np.ndarray:
    """``images`` (``[N, H, W]`` or ``[N, H, W, C]``) with everything outside each box (``keep='object'``) or inside it
    (``keep='context'``) set to 0; ``boxes`` ``[N, 4]`` are ``x_min, y_min, x_max, y_max`` in pixels, max exclusive."""
    if keep not in ("object", "context"):
        raise ValueError(f"keep must be 'object' or 'context', got {keep!r}")
    if images.ndim not in (3, 4) or boxes.shape != (images.shape[0], 4):
        raise ValueError(f"expected images [N, H, W(, C)] and boxes [N, 4], got {images.shape} and {boxes.shape}")
    height, width = images.shape[1:3]
    rows, cols = np.arange(height)[None, :, None], np.arange(width)[None, None, :]
    x0, y0, x1, y1 = (boxes[:, k, None, None] for k in range(4))
    inside = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)
    keep_mask = inside if keep == "object" else ~inside
    if images.ndim == 4:
        keep_mask = keep_mask[..., None]
    return np.where(keep_mask, images, 0).astype(images.dtype)


class ContextOutliers(TransformedDataset):
    """A :class:`TransformedDataset` whose batches (``__getitems__``, what the ``DataLoader`` calls) end with ``count``
    context-only images: the batch's first ``count`` images with their object box blanked (:func:`blank`), then
    augmented like the rest, with the target :data:`OUTLIER_LABEL`. ``base`` must have ``boxes`` ``[N, 4]``."""

    def __init__(
        self,
        base: Dataset,
        transform: Any,
        in_chans: int,
        indices: np.ndarray | list[int] | None,
        count: int,
        name: str = "the dataset",
    ) -> None:
        super().__init__(base, transform, in_chans, indices)
        if count < 1:
            raise ValueError(f"context_outliers must be >= 1 here, got {count}")
        if getattr(base, "boxes", None) is None:
            raise ValueError(
                f"data.context_outliers={count} needs object boxes for the training images, and {name} has none "
                "(the embedded cluttered_fashion_mnist has them); set data.context_outliers=0"
            )
        self.count = count

    def __getitems__(self, indices: list[int | tuple[int, int]]) -> list[tuple[torch.Tensor, int]]:
        """The batch's items, then the context-only versions of its first ``count`` images (their augmentations
        drawn after the batch's, from the same seeded stream)."""
        items = super().__getitems__(indices)
        first = [index[0] if isinstance(index, tuple) else index for index in indices[: self.count]]
        return items + [self._load_context(index) for index in first]

    def _load_context(self, index: int) -> tuple[torch.Tensor, int]:
        base_index, array, _ = self._raw(index)
        box = np.asarray(self.base.boxes[base_index])[None]  # type: ignore[attr-defined]
        return self.transform(image=blank(array[None], box, "context")[0])["image"], OUTLIER_LABEL
