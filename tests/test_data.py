"""DataModule, datasets, albumentations pipelines and the embedded cluttered Fashion-MNIST (issue 5)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from vision_attn.data import ImageDataModule, build_dataset, build_train_transform, create_transform, list_datasets
from vision_attn.data.cluttered import (
    DEFAULT_ASSET,
    ClutteredFashionMNIST,
    load_cluttered,
    make_cluttered_fashion_mnist,
    save_npz_deterministic,
)
from vision_attn.data.datasets import DATASETS

REPO = Path(__file__).resolve().parents[1]


def _batch(loader: torch.utils.data.DataLoader) -> tuple[torch.Tensor, torch.Tensor]:
    return next(iter(loader))


# --- embedded dataset ---------------------------------------------------------------------------------------
def test_asset_is_small_and_licensed() -> None:
    assert DEFAULT_ASSET.is_file()
    assert DEFAULT_ASSET.stat().st_size <= 5_000_000
    notice = (REPO / "assets" / "LICENSE-fashion-mnist.txt").read_text()
    assert "Zalando SE" in notice
    assert "Permission is hereby granted" in notice


def test_embedded_dataset_contents() -> None:
    train, test = ClutteredFashionMNIST("train"), ClutteredFashionMNIST("test")
    assert (len(train), len(test)) == (4000, 1000)
    image, label = train[0]
    assert image.shape == (64, 64)
    assert image.dtype == np.uint8
    assert 0 <= label < 10
    assert len(train.classes) == 10
    assert np.bincount(test.targets, minlength=10).tolist() == [100] * 10
    x0, y0, x1, y1 = train.boxes.T
    assert (x0 >= 0).all()
    assert (y0 >= 0).all()
    assert (x1 <= 64).all()
    assert (y1 <= 64).all()
    assert ((x1 - x0) <= 28).all()
    assert ((y1 - y0) <= 28).all()
    assert ((x1 > x0) & (y1 > y0)).all()


def test_a_split_reads_only_its_own_arrays(tmp_path: Path) -> None:
    whole = load_cluttered()
    assert {"train_images", "test_images", "classes", "meta"} <= set(whole)
    test = ClutteredFashionMNIST("test")
    np.testing.assert_array_equal(test.images, whole["test_images"])
    np.testing.assert_array_equal(test.boxes, whole["test_boxes"])
    # a file without the other split's arrays still gives this split
    save_npz_deterministic(tmp_path / "test_only.npz", {k: v for k, v in whole.items() if not k.startswith("train")})
    np.testing.assert_array_equal(ClutteredFashionMNIST("test", tmp_path / "test_only.npz").targets, test.targets)
    with pytest.raises(ValueError, match=r"test_only.npz' is not a cluttered Fashion-MNIST file: .*'train_boxes'"):
        ClutteredFashionMNIST("train", tmp_path / "test_only.npz")


def test_generator_is_deterministic_and_boxes_hold_the_object(tmp_path: Path) -> None:
    raw = REPO.parent / "shared" / "data" / "fashion-mnist"
    if not raw.is_dir():
        pytest.skip(f"{raw} not present")
    kwargs = dict(num_train=20, num_test=10, canvas_size=48, num_clutter=4, clutter_size=8, seed=3)
    a = make_cluttered_fashion_mnist(raw, **kwargs)
    b = make_cluttered_fashion_mnist(raw, **kwargs)
    save_npz_deterministic(tmp_path / "a.npz", a)
    save_npz_deterministic(tmp_path / "b.npz", b)
    digest = [hashlib.sha256((tmp_path / n).read_bytes()).hexdigest() for n in ("a.npz", "b.npz")]
    assert digest[0] == digest[1]
    c = make_cluttered_fashion_mnist(raw, **{**kwargs, "seed": 4})
    assert not np.array_equal(a["train_images"], c["train_images"])
    # the object's pixels are exactly the source image, inside its box; clutter stays outside the box
    from vision_attn.data.cluttered import read_idx

    source = read_idx(raw / "train-images-idx3-ubyte.gz")
    for image, box, src in zip(a["train_images"], a["train_boxes"], a["train_source_index"], strict=True):
        x0, y0, x1, y1 = (int(v) for v in box)
        obj = source[src]
        ys, xs = np.nonzero(obj)
        crop = obj[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
        np.testing.assert_array_equal(image[y0:y1, x0:x1], crop)
        assert image.sum() > crop.sum()  # there is clutter elsewhere


def test_generator_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="num_train must be a positive multiple of 10"):
        make_cluttered_fashion_mnist(tmp_path, num_train=15)
    with pytest.raises(FileNotFoundError, match="raw_dir"):
        make_cluttered_fashion_mnist(tmp_path, num_train=10, num_test=10)


def test_embedded_datamodule_shapes_and_normalization() -> None:
    dm = ImageDataModule(batch_size=50, eval_batch_size=1000, num_workers=0, val_fraction=0.1, seed=1)
    assert (dm.num_classes, dm.in_chans, dm.img_size) == (10, 1, 64)
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (3600, 400, 1000)
    x, y = _batch(dm.train_dataloader())
    assert x.shape == (50, 1, 64, 64)
    assert x.dtype == torch.float32
    assert y.shape == (50,)
    assert y.dtype == torch.int64
    x, _ = _batch(dm.test_dataloader())
    assert abs(x.mean().item()) < 0.05
    assert abs(x.std().item() - 1) < 0.05
    # seeded split: same seed, same split; train and val disjoint
    again = ImageDataModule(num_workers=0, val_fraction=0.1, seed=1)
    again.setup("fit")
    np.testing.assert_array_equal(dm.val_set.indices, again.val_set.indices)
    assert not set(dm.val_set.indices) & set(dm.train_set.indices)


def test_grey_data_as_rgb() -> None:
    dm = ImageDataModule(in_chans=3, batch_size=4, num_workers=0, val_fraction=0.1)
    dm.setup("fit")
    assert (len(dm.val_set), len(dm.test_set)) == (400, 1000)
    assert len(dm.mean) == 3
    x, _ = _batch(dm.test_dataloader())
    assert x.shape == (4, 3, 64, 64)
    torch.testing.assert_close(x[:, 0], x[:, 1])


# --- torchvision datasets and ImageFolder on local copies -----------------------------------------------
def test_image_folder_cifar_jpeg(cifar_folder: Path) -> None:
    dm = ImageDataModule("image_folder", str(cifar_folder), img_size=32, mean=(0.5,), std=(0.25,), batch_size=6,
                         num_workers=0, val_fraction=0.0, crop_scale=(0.5, 1.0), coarse_dropout=0.5)  # fmt: skip
    assert dm.num_classes == 3
    assert dm.in_chans == 3
    assert dm.mean == (0.5, 0.5, 0.5)
    dm.setup("fit")
    assert dm.classes == ["airplane", "cat", "ship"]
    assert (len(dm.train_set), len(dm.test_set)) == (36, 12)
    x, y = _batch(dm.train_dataloader())
    assert x.shape == (6, 3, 32, 32)
    assert x.dtype == torch.float32
    assert set(y.tolist()) <= {0, 1, 2}
    x, _ = _batch(dm.test_dataloader())
    assert x.min() >= (0 - 0.5) / 0.25 - 1e-5
    assert x.max() <= (1 - 0.5) / 0.25 + 1e-5
    grey = ImageDataModule("image_folder", str(cifar_folder), img_size=48, in_chans=1, num_workers=0, batch_size=2)
    grey.setup("fit")
    assert _batch(grey.val_dataloader())[0].shape == (2, 1, 48, 48)


def test_fashion_mnist_from_raw_files(fashion_mnist_root: Path) -> None:
    dm = ImageDataModule("fashion_mnist", str(fashion_mnist_root), batch_size=500, num_workers=0, val_fraction=0.1)
    assert (dm.num_classes, dm.in_chans, dm.img_size) == (10, 1, 28)
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (54000, 6000, 10000)
    x, y = _batch(dm.test_dataloader())
    assert x.shape == (500, 1, 28, 28)
    assert x.dtype == torch.float32
    assert y.dtype == torch.int64
    assert abs(x.mean().item()) < 0.1
    assert abs(x.std().item() - 1) < 0.1


# --- bad input ----------------------------------------------------------------------------------------------
def test_unknown_dataset_lists_known_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown dataset name 'cifar11'.*cifar10, cifar100") as err:
        ImageDataModule("cifar11")
    assert all(name in str(err.value) for name in list_datasets())
    assert {"cifar10", "cifar100", "mnist", "fashion_mnist", "svhn", "stl10", "flowers102", "oxford_iiit_pet",
            "imagenette", "image_folder", "cluttered_fashion_mnist", "hf", "litdata"} == set(DATASETS)  # fmt: skip


@pytest.mark.parametrize("name", ["cifar10", "fashion_mnist", "svhn", "imagenette"])
def test_missing_data_dir_says_where_and_how(tmp_path: Path, name: str) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=f"{name}.*{missing}.*download") as err:
        build_dataset(name, missing, "train", download=False)
    assert "download: true" in str(err.value)


def test_missing_image_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'none'}"):
        ImageDataModule("image_folder", str(tmp_path / "none"))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"val_fraction": 1.0}, "val_fraction must be in"),
        ({"batch_size": 0}, "batch_size must be positive"),
        ({"in_chans": 2}, "in_chans must be 1, 3 or None"),
        ({"mean": (0.1, 0.2)}, "mean has 2 values"),
        ({"hflip": 1.5}, "hflip must be a probability"),
        ({"crop_scale": (0.9, 0.1)}, "crop_scale must be"),
        ({"eval_crop_pct": 0.0}, "crop_pct must be in"),
    ],
)
def test_bad_datamodule_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ImageDataModule(**kwargs)


def test_transforms_output() -> None:
    image = np.random.default_rng(0).integers(0, 256, (40, 30, 3), dtype=np.uint8)
    train = build_train_transform(32, (0.5,) * 3, (0.5,) * 3, translate=0.1, color_jitter=0.3, coarse_dropout=1.0)
    out = train(image=image)["image"]
    assert out.shape == (3, 32, 32)
    assert out.dtype == torch.float32
    config = {"input_size": (3, 32, 32), "mean": (0.0,) * 3, "std": (1.0,) * 3, "crop_pct": 0.875,
              "interpolation": "bilinear", "crop_mode": "center"}  # fmt: skip
    out = create_transform(config)(image=image)["image"]
    assert out.shape == (3, 32, 32)
    assert out.min() >= 0.0
    assert out.max() <= 1.0
