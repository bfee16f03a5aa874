"""``image_folder`` data (issue 11): 16-bit images, symbolic-link loops, held-out test and validation splits when
the folder has no test/ (or val/), the train split's class numbering everywhere, ``bad_images: skip`` with
``download: true``."""

from __future__ import annotations

import io
import signal
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vision_attn.data import ImageDataModule
from vision_attn.data.image_folder import ImageFolder
from vision_attn.data.pixels import to_uint8_array
from vision_attn.data.verify import find_bad_images

CLASSES = ("cat", "dog", "fox")


def png(path: Path, seed: int, size: int = 8) -> Path:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def make_folder(root: Path, per_class: int = 10, classes: tuple[str, ...] = CLASSES) -> Path:
    for c, name in enumerate(classes):
        for i in range(per_class):
            png(root / name / f"{i}.png", seed=100 * c + i)
    return root


def datamodule(root: Path, **kwargs) -> ImageDataModule:
    kwargs = {"name": "image_folder", "data_dir": str(root), "img_size": 8, "num_workers": 0, "batch_size": 2,
              **kwargs}  # fmt: skip
    dm = ImageDataModule(**kwargs)
    dm.setup("fit")
    return dm


def files_of(dataset) -> set[str]:
    """The files a ``TransformedDataset`` reads (its ``indices`` into the base image folder, or all of them)."""
    indices = dataset.indices if dataset.indices is not None else range(len(dataset.base))
    return {dataset.base.samples[int(i)][0] for i in indices}


# --- 16-bit images ------------------------------------------------------------------------------------------
def test_16_bit_png_is_scaled_not_clipped_to_white(tmp_path: Path) -> None:
    values = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000).astype(np.uint16)  # 0 .. 63000
    for name in CLASSES[:2]:
        (tmp_path / name).mkdir()
        Image.fromarray(values).save(tmp_path / name / "deep.png")
    assert Image.open(tmp_path / "cat" / "deep.png").mode == "I;16"
    dm = datamodule(tmp_path, in_chans=1, mean=(0.0,), std=(1.0,), val_fraction=0.0, test_fraction=0.5, batch_size=1,
                    crop_scale=None, hflip=0.0)  # fmt: skip
    image, _ = dm.test_set[0]
    expected = np.round(values / 257.0) / 255.0
    np.testing.assert_allclose(image[0].numpy(), expected, atol=1 / 255)
    assert image.max() < 1.0  # not all white
    assert to_uint8_array(values, 3).shape == (8, 8, 3)


def test_rgb_and_uint8_images_are_unchanged(tmp_path: Path) -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (5, 6, 3), dtype=np.uint8)
    assert np.array_equal(to_uint8_array(Image.fromarray(rgb), 3), rgb)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    assert np.array_equal(to_uint8_array(Image.open(buffer), 3), rgb)
    assert to_uint8_array(rgb, 1).shape == (5, 6, 1)
    with pytest.raises(TypeError, match="uint8 or uint16, got dtype float32"):
        to_uint8_array(rgb.astype(np.float32), 3)


# --- symbolic links -----------------------------------------------------------------------------------------
@pytest.fixture
def alarm():
    """Fail instead of hanging: a walk that loops forever is stopped after 60 s."""

    def timeout(signum, frame):
        raise TimeoutError("the folder walk did not end")

    previous = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def test_symlink_loops_neither_hang_nor_multiply_items(tmp_path: Path, alarm) -> None:
    root = make_folder(tmp_path / "data", per_class=3)
    (root / "cat" / "again").symlink_to(root / "cat", target_is_directory=True)  # cat/again -> cat
    (root / "dog" / "up").symlink_to(root, target_is_directory=True)  # dog/up -> the whole tree
    external = make_folder(tmp_path / "elsewhere", per_class=2, classes=("extra",))
    (root / "fox" / "more").symlink_to(external / "extra", target_is_directory=True)  # a real link: followed
    assert find_bad_images(root) == []
    dataset = ImageFolder(root)
    counts = np.bincount(dataset.targets, minlength=3).tolist()
    assert counts == [3, 3, 5]
    assert len({path for path, _ in dataset.samples}) == len(dataset.samples)


# --- splits -------------------------------------------------------------------------------------------------
def test_a_folder_without_test_split_holds_one_out_of_the_train_images(tmp_path: Path) -> None:
    root = make_folder(tmp_path, per_class=20)  # 60 images, class folders directly in data_dir
    dm = datamodule(root, val_fraction=0.2, test_fraction=0.1, seed=5)
    train, val, test = files_of(dm.train_set), files_of(dm.val_set), files_of(dm.test_set)
    assert (len(train), len(val), len(test)) == (43, 11, 6)  # test: 10% of 60; val: 20% of the other 54
    assert len(train | val | test) == 60  # disjoint
    again = datamodule(root, val_fraction=0.2, test_fraction=0.1, seed=5)
    assert files_of(again.test_set) == test
    assert files_of(datamodule(root, val_fraction=0.2, test_fraction=0.1, seed=6).test_set) != test
    assert len(files_of(datamodule(tmp_path, val_fraction=0.0).train_set)) == 54  # no validation: the rest trains


@pytest.mark.parametrize(
    ("folders", "val_from", "test_from"),
    [
        (("train",), "train", "train"),
        (("train", "val"), "train", "val"),  # one evaluation folder: the test split
        (("train", "test"), "train", "test"),
        (("train", "val", "test"), "val", "test"),
    ],
)
def test_split_folders_are_used_when_present(tmp_path: Path, folders, val_from: str, test_from: str) -> None:
    for k, name in enumerate(folders):
        make_folder(tmp_path / name, per_class=10 if name == "train" else 2 + k)
    dm = datamodule(tmp_path, val_fraction=0.2)
    val, test = files_of(dm.val_set), files_of(dm.test_set)
    assert {Path(p).parts[-3] for p in val} == {val_from}
    assert {Path(p).parts[-3] for p in test} == {test_from}
    assert not files_of(dm.train_set) & (val | test)


def test_val_and_test_folders_keep_the_train_class_numbering(tmp_path: Path) -> None:
    make_folder(tmp_path / "train", per_class=4)
    make_folder(tmp_path / "test", per_class=2, classes=("fox",))  # only the last class
    dm = datamodule(tmp_path, val_fraction=0.0)
    assert dm.classes == list(CLASSES)
    assert {label for _, label in dm.test_set.base.samples} == {2}
    png(tmp_path / "test" / "wolf" / "0.png", seed=1)
    with pytest.raises(ValueError, match=r"class folder\(s\) \['wolf'\] that the train split does not have"):
        datamodule(tmp_path, val_fraction=0.0)


def test_hidden_folders_are_not_classes(tmp_path: Path) -> None:
    root = make_folder(tmp_path, per_class=4)
    png(root / ".ipynb_checkpoints" / "0.png", seed=1)
    png(root / "cat" / ".cache" / "0.png", seed=2)
    dm = datamodule(root, val_fraction=0.0)
    assert dm.num_classes == 3
    assert len(dm.train_set) + len(dm.test_set) == 12


def test_bad_images_skip_works_with_download_true(tmp_path: Path) -> None:
    root = make_folder(tmp_path, per_class=4)
    (root / "cat" / "broken.png").write_bytes(b"not a png")
    dm = ImageDataModule(name="image_folder", data_dir=str(root), img_size=8, num_workers=0, batch_size=2,
                         download=True, bad_images="skip", val_fraction=0.0)  # fmt: skip
    dm.prepare_data()  # nothing to download for an image folder: it must not scan with the default 'error'
    with pytest.warns(UserWarning, match=r"skipping 1 unreadable file"):
        dm.setup("fit")
    assert str(root / "cat" / "broken.png") not in {p for p, _ in dm.train_set.base.samples}
