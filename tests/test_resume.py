"""Interrupted and repeated training runs of the default config: a crash mid-epoch + ``--ckpt_path last`` ends
with exactly the weights of an unbroken run (in-process by default; the SIGKILLed separate process, which pays
~15 s of imports per process, with ``-m slow``), and two runs with one seed give the same metrics."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_helpers import crash_at, fit_args, run_env, saved_step, signal_when

from vision_attn.training import ImageClassifier
from vision_attn.training.cli import main

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


@pytest.mark.slow  # three fresh processes (~70 s); the in-process crash below checks the same property by default
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


def test_a_crash_mid_epoch_then_resume_matches_unbroken_run(tmp_path, monkeypatch):
    steps, crash_step = 6, 9  # 2 epochs of 6 steps; checkpoints every 2 steps, so the last one is at step 8
    args = ("--trainer.logger=false", "--overlays.every_n_epochs=0", "--step_checkpoint.every_n_train_steps=2")
    assert main(fit_args(tmp_path / "unbroken", *args, steps=steps, epochs=2)) == 0
    unbroken = torch.load(tmp_path / "unbroken" / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)
    assert unbroken["global_step"] == 2 * steps

    out = tmp_path / "crashed"
    with monkeypatch.context() as patch:
        patch.setattr(ImageClassifier, "training_step", crash_at(crash_step))
        with pytest.raises(RuntimeError, match="simulated crash"):
            main(fit_args(out, *args, steps=steps, epochs=2))
    last = out / "version_0" / "checkpoints" / "last.ckpt"
    assert saved_step(last) == 8, "the crash must land mid-epoch, after the second epoch's first checkpoint"
    torch.manual_seed(1234)  # the process's random state now differs from a fresh start: the resume restores it
    assert main(fit_args(out, *args, "--ckpt_path=last", steps=steps, epochs=2)) == 0
    assert_same_run(unbroken, torch.load(last, weights_only=True))
