"""Honest evaluation (issue 10): validation is a seeded hold-out of the train split, model selection never reads
the test split, and ``fit`` evaluates the selected checkpoint on the test split once, at its end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from vision_attn.data import ClutteredFashionMNIST, ImageDataModule
from vision_attn.training.callbacks import TrainSummary
from vision_attn.training.cli import main

REPO = Path(__file__).resolve().parents[1]


def test_validation_is_a_seeded_holdout_of_the_train_split() -> None:
    dm = ImageDataModule(val_fraction=0.1, num_workers=0, seed=3)
    dm.setup("fit")
    assert dm.val_set.base.split == "train"
    assert dm.train_set.base.split == "train"
    assert dm.test_set.base.split == "test"
    val, train = set(dm.val_set.indices.tolist()), set(dm.train_set.indices.tolist())
    assert (len(val), len(train)) == (400, 3600)
    assert not val & train
    again = ImageDataModule(val_fraction=0.1, num_workers=0, seed=3)
    again.setup("fit")
    assert np.array_equal(again.val_set.indices, dm.val_set.indices)


def test_no_validation_means_none_not_the_test_split() -> None:
    dm = ImageDataModule(val_fraction=0.0, num_workers=0)
    dm.setup("fit")
    assert dm.val_set is None
    assert dm.val_dataloader() == []
    assert len(dm.train_set) == 4000


def test_fit_selects_on_val_and_tests_once_at_the_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[str] = []
    read_item = ClutteredFashionMNIST.__getitem__
    end_fit = TrainSummary.on_fit_end

    def spy_item(self: ClutteredFashionMNIST, index: int) -> tuple:
        events.append(self.split)
        return read_item(self, index)

    def spy_fit_end(self: TrainSummary, trainer, module) -> None:
        events.append("fit_end")
        end_fit(self, trainer, module)

    monkeypatch.setattr(ClutteredFashionMNIST, "__getitem__", spy_item)
    monkeypatch.setattr(TrainSummary, "on_fit_end", spy_fit_end)
    args = [
        "fit", "--config", str(REPO / "configs" / "default.yaml"), "--trainer.max_epochs=2",
        "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1", "--trainer.limit_test_batches=1",
        "--data.batch_size=8", "--data.eval_batch_size=8", "--model.warmup_epochs=0", "--trainer.logger=false",
        "--trainer.enable_progress_bar=false", "--overlays.every_n_epochs=0",
        f"--run_dir={tmp_path}",
    ]  # fmt: skip
    assert main(args) == 0
    end = events.index("fit_end")
    assert "train" in events[:end]
    assert "test" not in events[:end], "the test split was read during fit"
    assert events[end + 1 :] == ["test"] * 8, "fit did not end with one test pass (limit_test_batches=1 batch of 8)"
    summary = json.loads((tmp_path / "version_0" / "summary.json").read_text())
    assert summary["test"]["checkpoint"] == summary["best_model_path"]
    assert Path(summary["best_model_path"]).is_file()
    assert 0.0 <= summary["test"]["metrics"]["test/acc1"] <= 1.0


def test_test_after_fit_can_be_turned_off(tmp_path: Path) -> None:
    args = [
        "fit", "--config", str(REPO / "configs" / "default.yaml"), "--trainer.fast_dev_run=1",
        "--data.batch_size=4", "--data.eval_batch_size=4", "--trainer.enable_progress_bar=false",
        "--overlays.every_n_epochs=0", "--test_after_fit=false", f"--run_dir={tmp_path}",
    ]  # fmt: skip
    assert main(args) == 0
    assert "test" not in json.loads((tmp_path / "version_0" / "summary.json").read_text())
