"""Small Hugging Face datasets and LitData shards built locally from the embedded dataset (never the network)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vision_attn.data import ClutteredFashionMNIST

datasets = pytest.importorskip("datasets")  # the `datasets` extra: the tests that use these helpers skip without it

# the eval-like train pipeline: no crop, flip or shift, so an item's tensor identifies its image
IDENTITY = ("--data.crop_scale=null", "--data.hflip=0", "--data.translate=0", "--data.img_size=64")
IDENTITY_KWARGS = dict(crop_scale=None, hflip=0.0, translate=0.0, img_size=64)


def embedded_split(split: str, count: int, label_dtype: str = "class") -> datasets.Dataset:
    """The first ``count`` images of the embedded ``split`` as a ``datasets.Dataset`` (``image``: an ``Image``
    column, ``label``: a ``ClassLabel`` with the Fashion-MNIST names, or a plain int column for ``'int'``)."""
    data = ClutteredFashionMNIST(split)
    label = datasets.ClassLabel(names=list(data.classes)) if label_dtype == "class" else datasets.Value("int64")
    features = datasets.Features({"image": datasets.Image(), "label": label})
    return datasets.Dataset.from_dict(
        {"image": [Image.fromarray(data.images[i]) for i in range(count)],
         "label": [int(data.targets[i]) for i in range(count)]},
        features=features,
    )  # fmt: skip


def save_embedded(root: Path, train: int = 80, test: int = 40, **extra_splits: int) -> Path:
    """A ``save_to_disk`` folder with ``train`` and ``test`` splits (and ``extra_splits`` name -> count, taken from the
    embedded test images after the ``test`` ones)."""
    splits = {"train": embedded_split("train", train), "test": embedded_split("test", test)}
    for name, count in extra_splits.items():
        splits[name] = embedded_split("test", test + count).select(range(test, test + count))
    datasets.DatasetDict(splits).save_to_disk(str(root))
    return root


def digest(image: torch.Tensor) -> str:
    """A short hash of an image tensor's bytes."""
    return hashlib.sha1(np.ascontiguousarray(image.numpy()).tobytes()).hexdigest()[:16]


def items_of(dataset) -> list[tuple[str, int]]:
    """``(digest, label)`` of every item of a dataset of ``(image, label)`` (map-style or a stream)."""
    if isinstance(dataset, torch.utils.data.IterableDataset):
        return [(digest(x), int(y)) for x, y in dataset]
    return [(digest(x), int(y)) for x, y in (dataset[i] for i in range(len(dataset)))]
