"""Hugging Face datasets (``data.name: hf``, issue 24): columns and class names from the features, split names,
hold-outs, streaming, training and exact mid-epoch resume, bad input. Built locally, never from the Hub."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hf_helpers import IDENTITY, IDENTITY_KWARGS, datasets, embedded_split, items_of, save_embedded
from train_helpers import crash_at, fit_args

import vision_attn
from vision_attn.data import ClutteredFashionMNIST, ImageDataModule
from vision_attn.training import ImageClassifier
from vision_attn.training.cli import main

CLASSES = list(ClutteredFashionMNIST("test").classes)


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)


@pytest.fixture(scope="module")
def hf_disk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``save_to_disk`` folder: train (80) and test (40) splits of the embedded images."""
    return save_embedded(tmp_path_factory.mktemp("hf") / "embedded")


def hf_module(hf_name: Path | str, **kwargs) -> ImageDataModule:
    kwargs = {"name": "hf", "hf_name": str(hf_name), "in_chans": 1, "batch_size": 8, "num_workers": 0,
              **IDENTITY_KWARGS, **kwargs}  # fmt: skip
    return ImageDataModule(**kwargs)


def set_up(hf_name: Path | str, **kwargs) -> ImageDataModule:
    dm = hf_module(hf_name, **kwargs)
    dm.setup("fit")
    return dm


def test_classes_columns_and_labels_come_from_the_features(hf_disk: Path, tmp_path: Path) -> None:
    dm = hf_module(hf_disk, data_dir=str(tmp_path / "cache"))
    assert dm.num_classes == 10
    assert (dm.source.image_column, dm.source.label_column) == ("image", "label")
    dm.setup("fit")
    assert dm.classes == CLASSES
    assert dm.hparams["class_names"] == CLASSES
    # train has no validation split: 10 % of it is held out (seeded, disjoint); the test split is its own
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (72, 8, 40)
    assert not set(dm.train_set.indices) & set(dm.val_set.indices)
    source = ClutteredFashionMNIST("test")
    labels = [int(y) for _, y in (dm.test_set[i] for i in range(40))]
    assert labels == source.targets[:40].tolist()
    image, _ = dm.test_set.base[3]
    np.testing.assert_array_equal(np.asarray(image), source.images[3])
    again = hf_module(hf_disk, data_dir=str(tmp_path / "cache"))
    again.setup("fit")
    np.testing.assert_array_equal(again.val_set.indices, dm.val_set.indices)


def test_parquet_files_read_as_the_train_split(hf_disk: Path, tmp_path: Path) -> None:
    train = datasets.load_from_disk(str(hf_disk))["train"]
    train.to_parquet(str(tmp_path / "train.parquet"))
    dm = hf_module(tmp_path / "train.parquet", data_dir=str(tmp_path / "cache"), val_fraction=0.25, test_fraction=0.25)
    dm.setup("fit")
    assert dm.classes == CLASSES
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (45, 15, 20)  # test held out first
    held = set(dm.test_set.indices) | set(dm.val_set.indices)
    assert len(held) == 35
    assert not held & set(dm.train_set.indices)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 1, 64, 64)
    assert y.dtype == torch.int64


def test_split_names_validation_as_test_or_as_validation(tmp_path: Path) -> None:
    root = save_embedded(tmp_path / "ds", train=40, test=20, validation=10)
    both = hf_module(root)
    assert both.source.splits == {"train": "train", "val": "validation", "test": "test"}
    both.setup("fit")
    assert (len(both.train_set), len(both.val_set), len(both.test_set)) == (40, 10, 20)
    only_val = tmp_path / "only_val"
    datasets.DatasetDict({"train": embedded_split("train", 40), "validation": embedded_split("test", 10)}).save_to_disk(
        str(only_val)
    )
    lone = hf_module(only_val)  # one held-out split: it is the test split, validation is held out of train
    assert lone.source.splits == {"train": "train", "val": None, "test": "validation"}
    named = hf_module(only_val, val_split="validation", test_fraction=0.25)  # named: validation; test held out
    named.setup("fit")
    assert named.source.splits == {"train": "train", "val": "validation", "test": None}
    assert (len(named.train_set), len(named.val_set), len(named.test_set)) == (30, 10, 10)


@pytest.fixture(scope="module")
def bad_datasets(tmp_path_factory: pytest.TempPathFactory, hf_disk: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad")
    labels, coarse = datasets.ClassLabel(names=CLASSES), datasets.ClassLabel(names=["a"])
    paths = {"good": hf_disk, "missing": root / "missing"}
    for name, data in {
        "int_labels": embedded_split("train", 8, label_dtype="int"),
        "two_labels": embedded_split("train", 8).add_column("coarse", [0] * 8, feature=coarse),
        "no_image": datasets.Dataset.from_dict({"pixels": [b"x"] * 2, "label": [0, 1]},
                                               features=datasets.Features({"pixels": datasets.Value("binary"),
                                                                           "label": labels})),
    }.items():  # fmt: skip
        paths[name] = root / name
        datasets.DatasetDict(train=data).save_to_disk(str(paths[name]))
    paths["empty"] = root / "empty.parquet"
    embedded_split("train", 8).select([]).to_parquet(str(paths["empty"]))
    return paths


@pytest.mark.parametrize(
    ("case", "kwargs", "error", "message"),
    [
        ("good", {"image_column": "picture"}, ValueError, r"data.image_column 'picture' is not a column of .*image"),
        ("good", {"label_column": "fine"}, ValueError, r"data.label_column 'fine' is not a column"),
        ("good", {"image_column": "label"}, ValueError, r"data.image_column 'label' .* ClassLabel column; expected an"),
        ("good", {"train_split": "training"}, ValueError, r"train_split 'training' is not a split of .*: train, te"),
        ("good", {"val_split": "dev"}, ValueError, r"data.val_split 'dev' is not a split"),
        ("int_labels", {}, ValueError, r"no ClassLabel column .*set data.label_column"),
        ("int_labels", {"label_column": "label"}, ValueError, r"'label' .* Value column without class names"),
        ("two_labels", {}, ValueError, r"several ClassLabel columns \['label', 'coarse'\]"),
        ("no_image", {}, ValueError, r"has no Image column"),
        ("empty", {}, ValueError, r"data.hf_name '.*empty.parquet' could not be loaded: .*no data"),
        ("missing", {}, FileNotFoundError, r"data.hf_name .*missing.* could not be loaded"),
    ],
)
def test_bad_input_names_the_option_and_value(bad_datasets, tmp_path, case, kwargs, error, message) -> None:
    with pytest.raises(error, match=message) as err:
        set_up(bad_datasets[case], data_dir=str(tmp_path), **kwargs)
    assert "\n" not in str(err.value)


def test_hf_name_is_required() -> None:
    with pytest.raises(ValueError, match=r"data.hf_name is required for data.name 'hf'"):
        ImageDataModule("hf")


def test_streamed_hold_outs_are_seeded_and_disjoint(hf_disk: Path) -> None:
    dm = hf_module(hf_disk, streaming=True, val_fraction=0.3)
    dm.setup("fit")
    train, val, test = (items_of(s) for s in (dm.train_set, dm.val_set, dm.test_set))
    assert len(test) == 40  # the test split itself
    assert len(train) + len(val) == 80  # without shuffling or augmenting (identity), every image once
    assert 8 <= len(val) <= 40  # ~30 % by a seeded hash of the bytes
    assert not {d for d, _ in train} & {d for d, _ in val}
    again = hf_module(hf_disk, streaming=True, val_fraction=0.3)
    again.setup("fit")
    assert sorted(items_of(again.val_set)) == sorted(val)
    other_seed = hf_module(hf_disk, streaming=True, val_fraction=0.3, seed=7)
    other_seed.setup("fit")
    assert sorted(items_of(other_seed.val_set)) != sorted(val)


ARGS = ("--trainer.logger=false", "--overlays.every_n_epochs=0", "--step_checkpoint.every_n_train_steps=2",
        "--data.name=hf", "--data.context_outliers=0", "--data.in_chans=1", *IDENTITY[-1:])  # fmt: skip


def test_fit_crash_and_resume_matches_unbroken_run(hf_disk: Path, tmp_path: Path, monkeypatch) -> None:
    args = (*ARGS, f"--data.hf_name={hf_disk}", f"--data.data_dir={tmp_path / 'cache'}")
    steps = 4  # 2 epochs of 4 steps (batch 8 of the 72 training images)
    assert main(fit_args(tmp_path / "unbroken", *args, steps=steps, epochs=2)) == 0
    unbroken = torch.load(tmp_path / "unbroken" / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)
    assert unbroken["global_step"] == 2 * steps
    assert unbroken["datamodule_hyper_parameters"]["class_names"] == CLASSES
    _, info = vision_attn.load_trained(tmp_path / "unbroken" / "version_0" / "export")
    assert info["class_names"] == CLASSES
    with monkeypatch.context() as patch:
        patch.setattr(ImageClassifier, "training_step", crash_at(7))
        with pytest.raises(RuntimeError, match="simulated crash"):
            main(fit_args(tmp_path / "crashed", *args, steps=steps, epochs=2))
    last = tmp_path / "crashed" / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 6  # mid-epoch
    assert main(fit_args(tmp_path / "crashed", *args, "--ckpt_path=last", steps=steps, epochs=2)) == 0
    resumed = torch.load(last, weights_only=True)
    for key, value in unbroken["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), key


def test_streaming_fit_resumes_from_the_saved_position(hf_disk: Path, tmp_path: Path, monkeypatch) -> None:
    args = (*ARGS, f"--data.hf_name={hf_disk}", "--data.streaming=true", "--data.val_fraction=0.2")
    with monkeypatch.context() as patch:
        patch.setattr(ImageClassifier, "training_step", crash_at(3))
        with pytest.raises(RuntimeError, match="simulated crash"):
            main(fit_args(tmp_path / "run", *args, steps=6, epochs=1))
    last = tmp_path / "run" / "version_0" / "checkpoints" / "last.ckpt"
    saved = torch.load(last, weights_only=True)
    assert saved["global_step"] == 2
    state = saved["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    assert state  # the stream's position is in the checkpoint
    assert main(fit_args(tmp_path / "run", *args, "--ckpt_path=last", steps=6, epochs=1)) == 0
    assert torch.load(last, weights_only=True)["global_step"] == 6
