"""Failures are failures and lose nothing (issue 11): a kill or a full disk during a checkpoint refresh leaves the
previous checkpoint loadable; a fit without training steps is an error, not an untrained export; SIGTERM saves a
resumable checkpoint and exits non-zero."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset
from train_helpers import TinyNet, fit_args, run_env, saved_step, signal_when, train_command

from vision_attn.cli import main as cli_main
from vision_attn.training import ExportBackbone, ImageClassifier
from vision_attn.training.callbacks import RunGuard
from vision_attn.training.checkpoint_io import AtomicCheckpointIO
from vision_attn.training.cli import SIGTERM_EXIT_CODE, main
from vision_attn.training.runs import find_checkpoint, is_resumable

QUIET = ("--trainer.logger=false", "--overlays.every_n_epochs=0")


# saves checkpoint 1, then checkpoint 2 with a writer that stops (as if killed) after half of the bytes
KILLED_WRITER = textwrap.dedent(
    """
    import io, os, sys, time, torch
    from vision_attn.training.checkpoint_io import AtomicCheckpointIO
    path, ready = sys.argv[1], sys.argv[2]
    plugin = AtomicCheckpointIO()
    plugin.save_checkpoint({"global_step": 1, "state_dict": {"w": torch.ones(50_000)}}, path)
    real_save = torch.save
    def half_then_hang(obj, f, *args, **kwargs):
        buffer = io.BytesIO()
        real_save(obj, buffer)
        f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        f.flush()
        os.fsync(f.fileno())
        open(ready, "w").close()
        time.sleep(300)
    torch.save = half_then_hang
    plugin.save_checkpoint({"global_step": 2, "state_dict": {"w": torch.zeros(50_000)}}, path)
    """
)


def test_kill_during_a_checkpoint_write_leaves_the_previous_one_loadable(tmp_path: Path) -> None:
    path = tmp_path / "version_0" / "checkpoints" / "last.ckpt"
    ready = tmp_path / "half-written"
    process = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(path), str(ready)], env=run_env())
    signal_when(process, ready.exists, signal.SIGKILL, timeout=120)  # killed in the middle of its write
    assert process.returncode == -signal.SIGKILL
    leftovers = [p.name for p in path.parent.iterdir() if p != path]
    assert len(leftovers) == 1, leftovers  # the half-written temporary file, beside the checkpoint
    assert leftovers[0].startswith(".last.ckpt.")
    assert not leftovers[0].endswith(".ckpt")
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["global_step"] == 1
    assert torch.equal(ckpt["state_dict"]["w"], torch.ones(50_000))
    assert find_checkpoint(tmp_path, "last") == path  # the temporary file is never taken for a checkpoint


def test_disk_full_during_a_checkpoint_refresh_keeps_the_previous_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_save = torch.save
    saves = []

    def disk_fills_at_third_save(obj, f, *args, **kwargs):
        saves.append(obj.get("global_step") if isinstance(obj, dict) else None)
        if len(saves) >= 3:
            f.write(b"\0" * 4096)  # part of the bytes made it, then the disk was full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_fills_at_third_save)
    with pytest.raises(OSError, match="No space left on device"):
        main(fit_args(tmp_path, *QUIET, "--step_checkpoint.every_n_train_steps=1", steps=4))
    assert saves == [1, 2, 3]
    folder = tmp_path / "version_0" / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["last.ckpt"], "a temporary file was left behind"
    monkeypatch.setattr(torch, "save", real_save)
    last = torch.load(folder / "last.ckpt", weights_only=True)
    assert last["global_step"] == 2
    assert is_resumable(last)


def test_the_cli_saves_checkpoints_through_the_atomic_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = []
    real = AtomicCheckpointIO.save_checkpoint

    def spy(self, checkpoint, path, storage_options=None):
        paths.append(Path(path).name)
        return real(self, checkpoint, path, storage_options)

    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", spy)
    assert main(fit_args(tmp_path, *QUIET)) == 0
    assert "last.ckpt" in paths
    assert any(name.startswith("best-") for name in paths)


def test_a_fit_without_training_steps_is_an_error_and_exports_nothing(tmp_path: Path) -> None:
    images, labels = torch.randn(3, 3, 8, 8), torch.randint(0, 10, (3,))
    loader = DataLoader(TensorDataset(images, labels), batch_size=4, drop_last=True)  # 3 images: no full batch
    export = ExportBackbone(dirpath=str(tmp_path / "export"))
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", callbacks=[RunGuard(), export])  # fmt: skip
    with pytest.raises(ValueError, match=r"fit made no training step \(0 training batches per epoch"):
        trainer.fit(ImageClassifier(TinyNet(), num_classes=10), loader)
    assert not list((tmp_path / "export").iterdir()), "an untrained network was exported"


def test_lightning_option_errors_exit_2_without_traceback(tmp_path: Path, capsys) -> None:
    # 0.001 of the 450 batches is less than one batch: Lightning raises its MisconfigurationException
    assert cli_main(fit_args(tmp_path, *QUIET, "--trainer.limit_train_batches=0.001")) == 2
    err = capsys.readouterr().err
    assert "You requested to check 0.001 of the `train_dataloader`" in err
    assert "Traceback" not in err


def test_sigterm_in_process_saves_a_resumable_checkpoint_and_the_resume_trains_the_rest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """SIGTERM sent to this process during step 4 (Lightning's handler is installed for the fit); the separate-process
    version below, a real ``kill -TERM`` from outside, runs with ``-m slow``."""
    steps, signalled_at = 8, 4
    step = ImageClassifier.training_step

    def terminate(self, batch, batch_idx):
        if self.global_step == signalled_at:
            assert callable(signal.getsignal(signal.SIGTERM)), "no SIGTERM handler during the fit"
            os.kill(os.getpid(), signal.SIGTERM)
        return step(self, batch, batch_idx)

    last = tmp_path / "version_0" / "checkpoints" / "last.ckpt"
    before = signal.getsignal(signal.SIGTERM)
    with monkeypatch.context() as patch:
        patch.setattr(ImageClassifier, "training_step", terminate)
        assert main(fit_args(tmp_path, *QUIET, steps=steps)) == SIGTERM_EXIT_CODE
    assert signal.getsignal(signal.SIGTERM) == before, "the fit left its SIGTERM handler installed"
    out, err = capsys.readouterr()
    assert "stopped by SIGTERM; resume with --ckpt_path last" in err
    stopped = torch.load(last, weights_only=True)
    assert stopped["global_step"] == signalled_at + 1  # Lightning stops after the step it was signalled in
    assert f"SIGTERM: saved a resumable checkpoint at step {signalled_at + 1}" in out
    assert is_resumable(stopped)
    assert not list((tmp_path / "version_0" / "export").iterdir()), "an interrupted fit exported its weights"
    assert main(fit_args(tmp_path, *QUIET, "--ckpt_path=last", steps=steps)) == 0
    summary = json.loads((tmp_path / "version_0" / "summary.json").read_text())
    assert summary["global_step"] == steps
    # only the steps not done before, each a batch of 8 and the default config's 2 context outliers
    assert summary["train_images"] == (steps - signalled_at - 1) * (8 + 2)


@pytest.mark.slow  # two fresh processes (~40 s); the in-process SIGTERM above checks the same by default
def test_sigterm_saves_a_resumable_checkpoint_and_exits_non_zero(tmp_path: Path) -> None:
    steps = 60
    args = (*QUIET, "--step_checkpoint.every_n_train_steps=3")
    last = tmp_path / "version_0" / "checkpoints" / "last.ckpt"
    process = subprocess.Popen(
        train_command(tmp_path, *args, steps=steps), env=run_env(), cwd=tmp_path, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    out, err = signal_when(process, lambda: saved_step(last) >= 3, signal.SIGTERM)
    assert process.returncode == SIGTERM_EXIT_CODE, err[-3000:]
    assert "stopped by SIGTERM; resume with --ckpt_path last" in err
    stopped = torch.load(last, weights_only=True)
    assert 3 <= stopped["global_step"] < steps
    assert f"SIGTERM: saved a resumable checkpoint at step {stopped['global_step']}" in out
    assert is_resumable(stopped)
    assert not list((tmp_path / "version_0" / "export").iterdir()), "an interrupted fit exported its weights"

    resumed = subprocess.run(
        train_command(tmp_path, *args, "--ckpt_path=last", steps=steps), env=run_env(), cwd=tmp_path,
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads((tmp_path / "version_0" / "summary.json").read_text())
    assert summary["global_step"] == steps
    # only the steps not done before, each a batch of 8 and the default config's 2 context outliers
    assert summary["train_images"] == (steps - stopped["global_step"]) * (8 + 2)
