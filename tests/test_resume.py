"""Interrupted and repeated training runs of the default config: SIGKILL mid-epoch + ``--ckpt_path last`` ends
with exactly the weights of an unbroken run, and two runs with one seed give the same metrics."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_helpers import run_env, saved_step, signal_when

ROOT = Path(__file__).resolve().parents[1]
STEPS_PER_EPOCH = 24


def train_command(out: Path, *extra: str) -> list[str]:
    return [
        sys.executable, str(ROOT / "train.py"), "fit", "--config", str(ROOT / "configs" / "default.yaml"),
        "--data.batch_size=16", "--data.eval_batch_size=100", "--data.num_workers=0",
        f"--trainer.limit_train_batches={STEPS_PER_EPOCH}", "--trainer.limit_val_batches=2",
        "--trainer.max_epochs=2", "--trainer.max_time=null", "--trainer.logger=false",
        f"--run_dir={out}",
        "--step_checkpoint.every_n_train_steps=2", "--overlays.every_n_epochs=0", *extra,
    ]  # fmt: skip


def train(out: Path, *extra: str) -> dict:
    subprocess.run(train_command(out, *extra), check=True, env=run_env(), cwd=out.parent, capture_output=True)
    return torch.load(out / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)


def assert_same_run(a: dict, b: dict) -> None:
    assert a["global_step"] == b["global_step"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), f"{key} differs"
    score = "best_model_score"
    best_a = next(v[score] for k, v in a["callbacks"].items() if "val/acc1" in k)
    best_b = next(v[score] for k, v in b["callbacks"].items() if "val/acc1" in k)
    assert torch.equal(best_a, best_b)


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("unbroken") / "run"
    return train(out)


@pytest.mark.slow  # determinism is also implied by the resume test below, which must match the same unbroken run
def test_same_seed_same_metrics(unbroken, tmp_path):
    again = train(tmp_path / "run")
    assert unbroken["global_step"] == 2 * STEPS_PER_EPOCH
    assert_same_run(unbroken, again)


def test_sigkill_mid_epoch_then_resume_matches_unbroken_run(unbroken, tmp_path):
    out = tmp_path / "run"
    last = out / "version_0" / "checkpoints" / "last.ckpt"
    target = STEPS_PER_EPOCH + 6  # inside the second epoch, after its first step checkpoints
    process = subprocess.Popen(
        train_command(out), env=run_env(), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    signal_when(process, lambda: saved_step(last) >= target, signal.SIGKILL)
    assert process.returncode == -signal.SIGKILL
    killed_at = saved_step(last)
    assert STEPS_PER_EPOCH < killed_at < 2 * STEPS_PER_EPOCH, "the kill must land mid-epoch"

    resumed = train(out, "--ckpt_path=last")
    assert_same_run(unbroken, resumed)
