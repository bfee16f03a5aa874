"""Command lines for short CPU training runs of the default config (shared by the training tests)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT = str(REPO / "configs" / "default.yaml")
TRAIN_PY = str(REPO / "train.py")


def fit_args(run_dir: Path, *extra: str, steps: int = 2, epochs: int = 1, command: str = "fit") -> list[str]:
    """``command`` on the default config with ``steps`` batches of 8 per epoch, writing under ``run_dir``."""
    return [
        command, "--config", DEFAULT, f"--run_dir={run_dir}", "--data.batch_size=8", "--data.eval_batch_size=50",
        "--data.num_workers=0", f"--trainer.limit_train_batches={steps}", "--trainer.limit_val_batches=1",
        "--trainer.limit_test_batches=1", "--trainer.limit_predict_batches=2", f"--trainer.max_epochs={epochs}",
        "--trainer.max_time=null", "--trainer.enable_progress_bar=false", "--model.warmup_epochs=0",
        "--overlays.num_images=2", *extra,
    ]  # fmt: skip


def train_command(run_dir: Path, *extra: str, **kwargs) -> list[str]:
    """:func:`fit_args` as a ``python train.py`` command line (for a separate process)."""
    return [sys.executable, TRAIN_PY, *fit_args(run_dir, *extra, **kwargs)]


def run_env() -> dict[str, str]:
    return {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def saved_step(path: Path) -> int:
    """``global_step`` of the checkpoint at ``path``; -1 while it does not exist (or cannot be read)."""
    try:
        return int(torch.load(path, weights_only=True)["global_step"])
    except (FileNotFoundError, RuntimeError, EOFError, KeyError):
        return -1


def version_folders(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.iterdir() if p.name.startswith("version_"))
