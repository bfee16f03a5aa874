"""Datasets selectable by name: torchvision's (with their ``download=True`` path), ``ImageFolder`` and the embedded
cluttered Fashion-MNIST. Each has its class count, channels, native size and mean/std.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import datasets as tvd

from vision_attn.data.cluttered import DEFAULT_ASSET, ClutteredFashionMNIST
from vision_attn.data.image_folder import LAYOUT, ImageFolder, image_folder_splits
from vision_attn.data.pixels import to_uint8_array

__all__ = ["DATASETS", "DatasetInfo", "TransformedDataset", "build_dataset", "dataset_info", "list_datasets"]

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class DatasetInfo:
    """What the DataModule needs to know about a dataset before reading it."""

    num_classes: int | None  # None: read from the data (ImageFolder)
    in_chans: int
    img_size: int  # the size models are trained at by default
    mean: tuple[float, ...]
    std: tuple[float, ...]
    build: Callable[..., Dataset]  # (data_dir, split 'train'|'test', download) -> dataset
    files: str  # where the files live under data_dir, for the "not found" message


def _tv(cls: type, split_kw: Callable[[str], dict[str, Any]], **extra: Any) -> Callable[[Path, str, bool], Dataset]:
    def build(root: Path, split: str, download: bool) -> Dataset:
        return cls(root=str(root), download=download, **split_kw(split), **extra)

    return build


def _train_flag(split: str) -> dict[str, Any]:
    return {"train": split == "train"}


def _split_as(train: str, test: str) -> Callable[[str], dict[str, Any]]:
    return lambda split: {"split": train if split == "train" else test}


def _cluttered(root: Path, split: str, download: bool) -> Dataset:
    path = root if root.suffix == ".npz" else root / DEFAULT_ASSET.name
    return ClutteredFashionMNIST(split, path)


def _image_folder(
    root: Path, split: str, download: bool, bad_images: str = "error", classes: Sequence[str] | None = None
) -> Dataset:
    """The ``split`` folder of ``root`` (see :func:`~vision_attn.data.image_folder.image_folder_splits`).

    Every file is decoded once first: unreadable ones raise (``bad_images='error'``) or are left out with a
    warning (``'skip'``), so a corrupt file never stops training mid-epoch.
    """
    folder = image_folder_splits(root)[split]
    if folder is None:
        raise ValueError(
            f"data_dir {str(root)!r} has no {split} split (no {split}/ folder beside train/); ImageDataModule holds "
            f"one out of the train images instead"
        )
    return ImageFolder(folder, bad_images, classes)


def _own_reader(name: str) -> Callable[..., Dataset]:
    def build(root: Path, split: str, download: bool) -> Dataset:
        raise ValueError(f"dataset {name!r} is read by ImageDataModule(name={name!r}, ...), not by build_dataset")

    return build


_CLUTTERED_STATS = ((0.1198,), (0.2703,))  # from the shipped file's meta (see vision_attn.data.cluttered)

DATASETS: dict[str, DatasetInfo] = {
    "cluttered_fashion_mnist": DatasetInfo(10, 1, 64, *_CLUTTERED_STATS, _cluttered, DEFAULT_ASSET.name),
    "cifar10": DatasetInfo(10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
                           _tv(tvd.CIFAR10, _train_flag), "cifar-10-batches-py/"),
    "cifar100": DatasetInfo(100, 3, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762),
                            _tv(tvd.CIFAR100, _train_flag), "cifar-100-python/"),
    "mnist": DatasetInfo(10, 1, 28, (0.1307,), (0.3081,), _tv(tvd.MNIST, _train_flag), "MNIST/raw/"),
    "fashion_mnist": DatasetInfo(10, 1, 28, (0.2860,), (0.3530,), _tv(tvd.FashionMNIST, _train_flag),
                                 "FashionMNIST/raw/ (the four idx files, un-gzipped)"),
    "svhn": DatasetInfo(10, 3, 32, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970),
                        _tv(tvd.SVHN, _split_as("train", "test")), "train_32x32.mat, test_32x32.mat"),
    "stl10": DatasetInfo(10, 3, 96, (0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713),
                         _tv(tvd.STL10, _split_as("train", "test")), "stl10_binary/"),
    "flowers102": DatasetInfo(102, 3, 224, IMAGENET_MEAN, IMAGENET_STD,
                              _tv(tvd.Flowers102, _split_as("train", "test")), "flowers-102/"),
    "oxford_iiit_pet": DatasetInfo(37, 3, 224, IMAGENET_MEAN, IMAGENET_STD,
                                   _tv(tvd.OxfordIIITPet, _split_as("trainval", "test")), "oxford-iiit-pet/"),
    "imagenette": DatasetInfo(10, 3, 224, IMAGENET_MEAN, IMAGENET_STD,
                              _tv(tvd.Imagenette, _split_as("train", "val"), size="320px"), "imagenette2-320/"),
    "image_folder": DatasetInfo(None, 3, 224, IMAGENET_MEAN, IMAGENET_STD, _image_folder, LAYOUT),
    # read by their own sources (vision_attn.data.hf, vision_attn.data.shards), which fill in classes and statistics
    "hf": DatasetInfo(None, 3, 224, IMAGENET_MEAN, IMAGENET_STD, _own_reader("hf"), "a Hugging Face dataset (hf_name)"),
    "litdata": DatasetInfo(None, 3, 224, IMAGENET_MEAN, IMAGENET_STD, _own_reader("litdata"),
                           "the shards written by vision-attn shard"),
}  # fmt: skip


def list_datasets() -> list[str]:
    """Return the sorted dataset names accepted by :func:`build_dataset` and the DataModule."""
    return sorted(DATASETS)


def dataset_info(name: str) -> DatasetInfo:
    """Return the :class:`DatasetInfo` of ``name``; unknown names raise a ``ValueError`` listing the known ones."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset name {name!r}; known datasets: {', '.join(list_datasets())}")
    return DATASETS[name]


def build_dataset(
    name: str,
    data_dir: str | os.PathLike | None,
    split: str,
    download: bool = False,
    bad_images: str = "error",
    classes: Sequence[str] | None = None,
) -> Dataset:
    """Return the raw ``split`` (``'train'``/``'test'``; ``'val'`` for an ``image_folder`` with ``val/`` and
    ``test/``) of dataset ``name``: items ``(PIL image | uint8 array, int)``.

    Missing files with ``download=False`` raise a ``FileNotFoundError`` naming the path and how to get the data.
    ``bad_images`` (``'error'`` or ``'skip'``) is what an ``image_folder`` does with unreadable files; ``classes``
    (the train split's) numbers the labels of its val/test folder.
    """
    info = dataset_info(name)
    if split not in ("train", "test") and not (split == "val" and name == "image_folder"):
        raise ValueError(f"split must be 'train' or 'test' ('val' too for image_folder), got {split!r}")
    if data_dir is None:
        if name != "cluttered_fashion_mnist":
            raise ValueError(f"data_dir is required for dataset {name!r} (only the embedded dataset has a default)")
        data_dir = DEFAULT_ASSET.parent
    root = Path(data_dir).expanduser()
    how = (
        "set download: true (--data.download=true) to fetch it with torchvision"
        if name not in ("image_folder", "cluttered_fashion_mnist")
        else "point data_dir at the folder that holds it"
    )
    missing = FileNotFoundError(
        f"dataset {name!r} not found under data_dir {str(root)!r} (download={download}); expected {info.files} there; "
        + how
    )
    if name == "image_folder":
        if not root.is_dir():
            raise missing
        return _image_folder(root, split, download, bad_images, classes)  # its errors name the folder and the fix
    try:
        return info.build(root, split, download)
    except (RuntimeError, FileNotFoundError) as err:
        if download:
            raise
        raise missing from err


class TransformedDataset(Dataset):
    """Wrap a dataset of ``(image, label)`` so items become ``(transform(image) float [C, H, W], label)``.

    Images (PIL or uint8 arrays) are converted to ``in_chans`` channels (grey repeated to RGB, RGB to luminance)
    before the albumentations ``transform``. ``indices`` selects a subset.
    """

    def __init__(
        self,
        base: Dataset,
        transform: Callable[..., dict[str, Any]],
        in_chans: int,
        indices: np.ndarray | list[int] | None = None,
    ) -> None:
        if in_chans not in (1, 3):
            raise ValueError(f"in_chans must be 1 or 3, got {in_chans}")
        self.base = base
        self.transform = transform
        self.in_chans = in_chans
        self.indices = None if indices is None else np.asarray(indices, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.indices) if self.indices is not None else len(self.base)  # type: ignore[arg-type]

    def _to_array(self, image: Any) -> np.ndarray:
        return to_uint8_array(image, self.in_chans)

    def __getitem__(self, index: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        """``index`` or ``(index, augmentation_seed)`` (from :class:`~vision_attn.data.resumable.EpochSampler`):
        the seed makes the random augmentation of this item reproducible."""
        if isinstance(index, tuple):
            index, aug_seed = index
            self.transform.set_random_seed(aug_seed)
        return self._load(index)

    def __getitems__(self, indices: list[int | tuple[int, int]]) -> list[tuple[torch.Tensor, int]]:
        """A whole batch (the ``DataLoader`` calls this instead of ``__getitem__`` per item).

        With ``(index, augmentation_seed)`` items the augmentations are seeded once, by the batch's first seed, and
        drawn in order: as reproducible as per-item seeding for a given batch (a resumed run restarts at a batch
        boundary), without re-seeding albumentations for every image, which cost more than the augmentation itself.
        """
        if indices and isinstance(indices[0], tuple):
            self.transform.set_random_seed(indices[0][1])
            indices = [index for index, _ in indices]
        return [self._load(index) for index in indices]

    def _raw(self, index: int) -> tuple[int, np.ndarray, int]:
        """Item ``index`` before the transform: its index in ``base``, its uint8 image array and its label."""
        if self.indices is not None:
            index = int(self.indices[index])
        image, label = self.base[index]
        return index, self._to_array(image), int(label)

    def _load(self, index: int) -> tuple[torch.Tensor, int]:
        _, array, label = self._raw(index)
        return self.transform(image=array)["image"], label
