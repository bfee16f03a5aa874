"""Command lines for short CPU training runs of the default config (shared by the training tests)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
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


def signal_when(process: subprocess.Popen, ready: Callable[[], bool], signum: int, timeout: float = 300) -> tuple:
    """Send ``signum`` to ``process`` as soon as ``ready()`` holds; returns its ``(stdout, stderr)`` once it ended.
    The test fails if the process ends first or ``ready`` does not hold within ``timeout`` seconds."""
    try:
        deadline = time.monotonic() + timeout
        while not ready():
            if process.poll() is not None:
                pytest.fail(f"the process ended (code {process.returncode}) before it could be signalled")
            if time.monotonic() > deadline:
                pytest.fail(f"the process was not ready to be signalled within {timeout} s")
            time.sleep(0.05)
        process.send_signal(signum)
        return process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()


class TinyNet(torch.nn.Module):
    """A linear classifier of ``[B, 3, 8, 8]`` images into 10 classes."""

    num_classes = 10

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(3 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


def crash_at(step_to_crash: int) -> Callable:
    """A replacement for ``ImageClassifier.training_step`` that raises ``RuntimeError('simulated crash')`` at
    optimizer step ``step_to_crash`` and trains normally before it (patch it in with ``monkeypatch.setattr``)."""
    from vision_attn.training import ImageClassifier

    step = ImageClassifier.training_step

    def crash(self, batch, batch_idx):
        if self.global_step == step_to_crash:
            raise RuntimeError("simulated crash")
        return step(self, batch, batch_idx)

    return crash
