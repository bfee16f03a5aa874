"""Datasets, albumentations pipelines, the eval preprocessing and the Lightning DataModule (the embedded default:
cluttered Fashion-MNIST)."""

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations checks PyPI for updates on import

from vision_attn._data_config import resolve_data_config
from vision_attn.data.cluttered import ClutteredFashionMNIST, make_cluttered_fashion_mnist
from vision_attn.data.datamodule import ImageDataModule
from vision_attn.data.datasets import DATASETS, build_dataset, dataset_info, list_datasets
from vision_attn.data.preprocess import Prepared, prepare_images, read_image
from vision_attn.data.transforms import build_train_transform, create_transform

__all__ = [
    "DATASETS",
    "ClutteredFashionMNIST",
    "ImageDataModule",
    "Prepared",
    "build_dataset",
    "build_train_transform",
    "create_transform",
    "dataset_info",
    "list_datasets",
    "make_cluttered_fashion_mnist",
    "prepare_images",
    "read_image",
    "resolve_data_config",
]
