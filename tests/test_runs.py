"""Run isolation (issue 11): every command writes into its own ``<run_dir>/version_K/``; ``--ckpt_path last|best``
find the right file; a resumed run continues in its folder; nothing of a real run is ever overwritten."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from train_helpers import fit_args, run_env, train_command, version_folders

from vision_attn.cli import main as cli_main
from vision_attn.training.cli import main
from vision_attn.training.loggers import CSVLogger
from vision_attn.training.runs import claim_run_folder, find_checkpoint, open_run_folder


def digests(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (the lock file aside), by relative path."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def test_every_run_has_its_own_folder_and_a_fast_dev_run_overwrites_nothing(tmp_path: Path, capsys) -> None:
    assert main(fit_args(tmp_path)) == 0
    assert version_folders(tmp_path) == ["version_0"]
    run = tmp_path / "version_0"
    names = {p.name for p in run.iterdir()}
    assert {"config.yaml", "hparams.yaml", "metrics.csv", "summary.json", "checkpoints", "export", "attention"} <= names
    assert any(n.startswith("events.out.tfevents") for n in names), "TensorBoard logs are not in the run folder"
    # TensorBoard holds the same attention overlay as attention/
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run), size_guidance={"images": 0})
    events.Reload()
    (image,) = events.Images("attention/rollout")
    assert image.encoded_image_string == (run / "attention" / "epoch=000.png").read_bytes()
    assert (image.width, image.height) == Image.open(run / "attention" / "epoch=000.png").size
    assert not list(run.rglob("version_*")), "a logger made a version folder of its own"
    summary = json.loads((run / "summary.json").read_text())
    assert Path(summary["best_model_path"]).parent == (run / "checkpoints").resolve()
    assert Path(summary["last_model_path"]) == (run / "checkpoints" / "last.ckpt").resolve()
    assert (run / "export" / "model.safetensors").is_file()
    assert (run / "config.yaml").read_text().startswith("# vision-attn fit")
    before = digests(run)

    # a smoke test afterwards: its own folder, no checkpoint that --ckpt_path last could pick up
    assert main(fit_args(tmp_path, "--trainer.fast_dev_run=1")) == 0
    assert version_folders(tmp_path) == ["version_0", "version_1"]
    assert digests(run) == before, "the fast_dev_run changed files of the real run"
    assert not list((tmp_path / "version_1").rglob("*.ckpt"))
    assert (tmp_path / "version_1" / "export" / "model.safetensors").is_file()
    assert find_checkpoint(tmp_path, "last", resumable=True) == run / "checkpoints" / "last.ckpt"

    # a second real run: a third folder, the first one still untouched
    assert main(fit_args(tmp_path)) == 0
    assert version_folders(tmp_path) == ["version_0", "version_1", "version_2"]
    assert digests(run) == before
    assert "writing into run folder" in capsys.readouterr().out


def test_test_with_ckpt_path_best_and_predict_writes_a_csv(tmp_path: Path, capsys) -> None:
    assert main(fit_args(tmp_path, "--trainer.logger=false", "--overlays.every_n_epochs=0")) == 0
    best = Path(json.loads((tmp_path / "version_0" / "summary.json").read_text())["best_model_path"])
    capsys.readouterr()
    assert main(fit_args(tmp_path, "--ckpt_path=best", command="test")) == 0  # found on disk, like a new process
    assert f"--ckpt_path best is {best}" in capsys.readouterr().out
    assert "test/acc1" in (tmp_path / "version_1" / "metrics.csv").read_text()
    assert main(fit_args(tmp_path, "--ckpt_path=best", command="predict")) == 0
    assert f"--ckpt_path best is {best}" in capsys.readouterr().out
    assert version_folders(tmp_path) == ["version_0", "version_1", "version_2"]
    rows = (tmp_path / "version_2" / "predictions.csv").read_text().splitlines()
    assert rows[0] == "index,label,probability,true_label"  # the embedded dataset has no file paths
    assert len(rows) == 1 + 2 * 50  # limit_predict_batches=2 batches of 50
    assert [int(row.split(",")[0]) for row in rows[1:]] == list(range(100))


def test_resume_continues_in_its_folder_and_keeps_the_metrics(tmp_path: Path) -> None:
    assert main(fit_args(tmp_path, "--trainer.log_every_n_steps=1")) == 0
    run = tmp_path / "version_0"
    rows_before = (run / "metrics.csv").read_text().splitlines()
    first_config = (run / "config.yaml").read_text()
    assert main(fit_args(tmp_path, "--trainer.log_every_n_steps=1", "--ckpt_path=last", epochs=2)) == 0
    assert version_folders(tmp_path) == ["version_0"]
    rows_after = (run / "metrics.csv").read_text().splitlines()
    assert len(rows_after) > len(rows_before)
    assert set(rows_before[1:]) <= set(rows_after), "the resumed run dropped the rows logged before it"
    assert (run / "config.yaml").read_text() == first_config
    assert "last.ckpt" in (run / "config.resumed-1.yaml").read_text()  # the resumed part's own config
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4


def test_resuming_an_older_checkpoint_starts_a_new_folder(tmp_path: Path) -> None:
    args = ("--trainer.logger=false", "--overlays.every_n_epochs=0", "--checkpoint.save_top_k=-1")
    assert main(fit_args(tmp_path, *args, epochs=2)) == 0
    run = tmp_path / "version_0"
    epoch0 = next((run / "checkpoints").glob("best-epoch=000-*.ckpt"))
    before = digests(run)
    assert main(fit_args(tmp_path, *args, f"--ckpt_path={epoch0}", epochs=3)) == 0
    assert version_folders(tmp_path) == ["version_0", "version_1"]
    assert digests(run) == before, "resuming epoch 0 overwrote the run's later checkpoints"
    assert torch.load(tmp_path / "version_1" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6


def test_a_folder_in_use_is_not_resumed_into(tmp_path: Path, capsys) -> None:
    assert main(fit_args(tmp_path, "--trainer.logger=false", "--overlays.every_n_epochs=0")) == 0
    holder = open_run_folder(tmp_path / "version_0")  # another process running in it, as far as the lock says
    try:
        assert cli_main(fit_args(tmp_path, "--ckpt_path=last", epochs=2)) == 2
    finally:
        holder.release()
    assert f"is in use by another process (pid {os.getpid()})" in capsys.readouterr().err
    assert version_folders(tmp_path) == ["version_0"]


@pytest.mark.slow  # two training processes on two cores: ~20 s; claim_run_folder's locking is tested below
def test_two_fits_started_at_once_never_share_a_folder(tmp_path: Path) -> None:
    quiet = ("--trainer.logger=false", "--overlays.every_n_epochs=0")
    command = train_command(tmp_path, *quiet)
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    procs = [subprocess.Popen(command, env=run_env(), cwd=tmp_path, **pipes) for _ in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]  # reads both pipes: a full pipe never blocks a run
    for process, (_, err) in zip(procs, outputs, strict=True):
        assert process.returncode == 0, err[-3000:]
    assert version_folders(tmp_path) == ["version_0", "version_1"]
    for name in ("version_0", "version_1"):
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        assert Path(summary["last_model_path"]).parent.parent == (tmp_path / name).resolve()
        assert torch.load(summary["last_model_path"], weights_only=True)["global_step"] == 2


def _claim(args: tuple[str, Any]) -> str:
    run_dir, barrier = args
    barrier.wait(timeout=120)  # all processes claim at the same moment
    return claim_run_folder(run_dir).path.name


def test_claiming_is_atomic_across_processes(tmp_path: Path) -> None:
    workers = 6
    context = multiprocessing.get_context("fork")
    barrier = context.Manager().Barrier(workers)
    with context.Pool(workers) as pool:
        names = pool.map(_claim, [(str(tmp_path), barrier)] * workers, chunksize=1)
    assert sorted(names) == [f"version_{k}" for k in range(workers)]


def _fake_checkpoint(path: Path, step: int, mtime: int, resumable: bool = True, best: str | None = None) -> Path:
    ckpt: dict = {"state_dict": {"w": torch.zeros(2)}, "global_step": step}
    if resumable:
        ckpt |= {"optimizer_states": [], "loops": {}}
    if best:
        ckpt["callbacks"] = {"ModelCheckpoint{'monitor': 'val/acc1'}": {"best_model_path": best}}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, path)
    os.utime(path, (mtime, mtime))
    return path


def test_ckpt_path_last_is_the_newest_resumable_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"--ckpt_path last: no resumable checkpoint under .*version_\*"):
        find_checkpoint(tmp_path, "last", resumable=True)
    _fake_checkpoint(tmp_path / "version_0" / "checkpoints" / "last.ckpt", step=10, mtime=1_000)
    newest = _fake_checkpoint(tmp_path / "version_1" / "checkpoints" / "last.ckpt", step=5, mtime=2_000)
    truncated = tmp_path / "version_2" / "checkpoints" / "last.ckpt"
    truncated.parent.mkdir(parents=True)
    truncated.write_bytes(newest.read_bytes()[:200])
    os.utime(truncated, (3_000, 3_000))
    weights = _fake_checkpoint(tmp_path / "version_3" / "checkpoints" / "w.ckpt", 7, 4_000, resumable=False)
    (tmp_path / "not_a_run" / "checkpoints").mkdir(parents=True)
    _fake_checkpoint(tmp_path / "not_a_run" / "checkpoints" / "last.ckpt", step=99, mtime=5_000)
    assert find_checkpoint(tmp_path, "last", resumable=True) == newest
    assert find_checkpoint(tmp_path, "last") == weights


def test_ckpt_path_best_follows_the_newest_run_that_has_one(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"--ckpt_path best: no best checkpoint .*val_fraction > 0"):
        find_checkpoint(tmp_path, "best")
    ckpts = tmp_path / "version_0" / "checkpoints"
    _fake_checkpoint(ckpts / "best-epoch=001.ckpt", 4, 1_000)
    # recorded with another working directory: found by name in the run's own folder
    _fake_checkpoint(ckpts / "last.ckpt", 6, 1_100, best="/elsewhere/version_0/checkpoints/best-epoch=001.ckpt")
    _fake_checkpoint(tmp_path / "version_1" / "checkpoints" / "last.ckpt", 2, 2_000)  # no validation: no best
    assert find_checkpoint(tmp_path, "best") == ckpts / "best-epoch=001.ckpt"
    (ckpts / "cut.ckpt").write_bytes(b"PK\x03\x04 truncated")  # newest file of the run, unreadable: looked past
    assert find_checkpoint(tmp_path, "best") == ckpts / "best-epoch=001.ckpt"


def test_csv_logger_appends_when_a_run_continues(tmp_path: Path) -> None:
    first = CSVLogger(str(tmp_path), name="", version="version_0")
    first.log_metrics({"a": 1.0}, step=0)
    first.save()
    second = CSVLogger(str(tmp_path), name="", version="version_0")
    second.log_metrics({"a": 2.0, "b": 3.0}, step=1)
    second.save()
    lines = (tmp_path / "version_0" / "metrics.csv").read_text().splitlines()
    assert lines[0].split(",") == ["a", "b", "step"]
    assert lines[1:] == ["1.0,,0", "2.0,3.0,1"]


def test_a_failed_start_leaves_no_folder_behind(tmp_path: Path) -> None:
    run = claim_run_folder(tmp_path / "runs" / "exp")
    (run.path / "checkpoints").mkdir()  # made, but nothing written in it
    run.release()
    assert not (tmp_path / "runs").exists()
    kept = claim_run_folder(tmp_path / "runs" / "exp")
    (kept.path / "config.yaml").write_text("x")
    kept.release()
    assert (tmp_path / "runs" / "exp" / "version_0" / "config.yaml").is_file()


def test_ranks_of_a_launch_ignore_a_killed_launchs_leftover_folder_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import time

    from vision_attn.training import cli

    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")  # torchrun's id when none is given: the same every launch
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    note = cli._launch_file(str(tmp_path))
    note.write_text(str(tmp_path / "version_0"))  # left behind by a launch killed an hour ago
    old = time.time() - 3600
    os.utime(note, (old, old))
    with pytest.raises(ValueError, match="rank 1: rank zero did not name its run folder"):
        cli._wait_for_run_folder(str(tmp_path), timeout=0.3)
    note.write_text(str(tmp_path / "version_1"))  # this launch's rank zero names its folder
    assert cli._wait_for_run_folder(str(tmp_path), timeout=5) == tmp_path / "version_1"
