"""LitData shards (``data.name: litdata``, ``vision-attn shard``, issue 24): the round trip keeps images, labels
and class names; each rank and worker reads its own samples and an epoch covers the split once; exact mid-epoch
resume; corrupt or missing shards and bad options are one-line errors; a two-process DDP run (slow)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from hf_helpers import IDENTITY_KWARGS, digest, items_of, save_embedded
from train_helpers import crash_at, fit_args, run_env

pytest.importorskip("litdata")

from litdata.utilities.env import _DistributedEnv

from vision_attn.cli import main as cli_main
from vision_attn.data import ClutteredFashionMNIST, ImageDataModule
from vision_attn.data.shards import SHARD_META, write_shards
from vision_attn.training import ImageClassifier
from vision_attn.training.cli import main

REPO = Path(__file__).resolve().parents[1]
CLASSES = list(ClutteredFashionMNIST("test").classes)
SOURCE = dict(name="hf", in_chans=1, val_fraction=0.2, batch_size=8, num_workers=0, **IDENTITY_KWARGS)


@pytest.fixture(scope="module")
def hf_disk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_embedded(tmp_path_factory.mktemp("hf") / "embedded")  # train 80, test 40


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory, hf_disk: Path) -> Path:
    """Shards of the Hugging Face dataset: train 64, val 16 (held out, seed 42), test 40."""
    out = tmp_path_factory.mktemp("shards") / "embedded"
    write_shards(ImageDataModule(hf_name=str(hf_disk), **SOURCE), out, num_workers=2, chunk_bytes="40KB")
    return out


def shard_module(data_dir: Path, **kwargs) -> ImageDataModule:
    dm = ImageDataModule("litdata", str(data_dir), **{"batch_size": 8, "num_workers": 0, **IDENTITY_KWARGS, **kwargs})
    dm.setup("fit")
    return dm


def test_round_trip_keeps_images_labels_and_class_names(hf_disk: Path, shards: Path) -> None:
    meta = json.loads((shards / SHARD_META).read_text())
    assert meta["splits"] == {"train": 64, "val": 16, "test": 40}
    assert len(list((shards / "train").glob("chunk-*.bin"))) > 1  # several chunks, written by two workers
    source = ImageDataModule(hf_name=str(hf_disk), **SOURCE)
    source.setup("fit")
    streamed = shard_module(shards)
    assert (streamed.num_classes, streamed.in_chans, streamed.img_size) == (10, 1, 64)
    assert (streamed.mean, streamed.std) == (source.mean, source.std)
    assert streamed.classes == CLASSES == streamed.hparams["class_names"]
    for split in ("train", "val", "test"):
        expected = items_of(getattr(source, f"{split}_set"))
        assert sorted(items_of(getattr(streamed, f"{split}_set"))) == sorted(expected), split
    labels = Counter(y for _, y in items_of(streamed.test_set))
    assert labels == Counter(ClutteredFashionMNIST("test").targets[:40].tolist())


def test_jpeg_files_are_stored_as_they_are(cifar_folder: Path, tmp_path: Path) -> None:
    import litdata

    dm = ImageDataModule("image_folder", str(cifar_folder), img_size=32, val_fraction=0.25, num_workers=0)
    write_shards(dm, tmp_path / "cifar")
    stored = litdata.StreamingDataset(str(tmp_path / "cifar" / "test"))
    files = {path.read_bytes(): label for path, label in ((Path(p), y) for p, y in dm.test_set.base.samples)}
    assert len(stored) == len(files) == 12
    for i in range(len(stored)):
        item = stored[i]
        assert files[item["image"]] == item["label"]  # the JPEG's own bytes, with its label
    assert json.loads((tmp_path / "cifar" / SHARD_META).read_text())["classes"] == ["airplane", "cat", "ship"]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_each_rank_reads_its_own_samples_and_an_epoch_covers_the_split(shards: Path, num_workers: int) -> None:
    everything = {d for d, _ in items_of(shard_module(shards).train_set)}
    assert len(everything) == 64
    per_rank = []
    for rank in range(2):
        dm = shard_module(shards, num_workers=num_workers)
        dm.train_set.distributed_env = _DistributedEnv(world_size=2, global_rank=rank, num_nodes=1)
        loader = dm.train_dataloader()
        assert len(loader) == 4  # 64 images, 2 ranks, batches of 8
        epochs = [[digest(x) for images, _ in loader for x in images] for _ in range(2)]
        assert all(len(seen) == len(set(seen)) == 32 for seen in epochs)
        assert epochs[0] != epochs[1]  # reshuffled each epoch
        per_rank.append(epochs)
    for epoch in range(2):
        first, second = (set(per_rank[rank][epoch]) for rank in range(2))
        assert not first & second
        assert first | second == everything


@pytest.mark.parametrize("num_workers", [0, 2])
def test_fit_crash_mid_epoch_and_resume_matches_unbroken_run(shards, tmp_path, monkeypatch, num_workers) -> None:
    args = ("--trainer.logger=false", "--overlays.every_n_epochs=0", "--step_checkpoint.every_n_train_steps=2",
            "--data.name=litdata", f"--data.data_dir={shards}", "--data.context_outliers=0", "--test_after_fit=false",
            "--data.batch_size=16", f"--data.num_workers={num_workers}")  # fmt: skip
    steps, epochs = 4, 2  # 64 images in batches of 16; the epoch after the resumed one must start afresh too
    assert main(fit_args(tmp_path / "unbroken", *args, steps=steps, epochs=epochs)) == 0
    unbroken = torch.load(tmp_path / "unbroken" / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)
    assert unbroken["global_step"] == steps * epochs
    assert unbroken["datamodule_hyper_parameters"]["class_names"] == CLASSES
    with monkeypatch.context() as patch:
        patch.setattr(ImageClassifier, "training_step", crash_at(3))
        with pytest.raises(RuntimeError, match="simulated crash"):
            main(fit_args(tmp_path / "crashed", *args, steps=steps, epochs=epochs))
    last = tmp_path / "crashed" / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 2  # mid-epoch (the first epoch is steps 0..3)
    torch.manual_seed(1234)
    assert main(fit_args(tmp_path / "crashed", *args, "--ckpt_path=last", steps=steps, epochs=epochs)) == 0
    resumed = torch.load(last, weights_only=True)
    assert resumed["global_step"] == unbroken["global_step"]
    for key, value in unbroken["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), key


def test_shard_command_and_its_bad_input(hf_disk: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    config = str(REPO / "configs" / "default.yaml")
    command = ["shard", "--config", config, "--data.name", "hf", f"--data.hf_name={hf_disk}", "--data.in_chans", "1",
               "--out", str(out), "--num-workers", "1"]  # fmt: skip
    assert cli_main(command) == 0
    assert "train 72, val 8, test 40 images, 10 classes" in capsys.readouterr().out
    assert json.loads((out / SHARD_META).read_text())["source"]["hf_name"] == str(hf_disk)
    assert cli_main(command) == 2  # never written over
    assert f"--out {str(out)!r} already exists" in capsys.readouterr().err
    assert cli_main([*command[:-4], "--data.colour", "red", "--out", str(tmp_path / "x")]) == 2
    error = capsys.readouterr().err
    assert "unknown data option(s) ['colour']" in error
    assert error.count("\n") == 1
    assert not (tmp_path / "x").exists()


def _broken_copy(shards: Path, tmp_path: Path, how: str) -> Path:
    copy = tmp_path / how
    shutil.copytree(shards, copy)
    chunk = sorted((copy / "train").glob("chunk-*.bin"))[0]
    if how == "truncated":
        chunk.write_bytes(chunk.read_bytes()[:-100])
    elif how == "no_index":
        (copy / "train" / "index.json").unlink()
    elif how == "garbled":  # same size, image bytes destroyed
        data = bytearray(chunk.read_bytes())
        data[200:] = bytes(len(data) - 200)
        chunk.write_bytes(bytes(data))
    elif how == "no_meta":
        (copy / SHARD_META).unlink()
    elif how == "bad_meta":
        (copy / SHARD_META).write_text('{"format": "something else"}')
    elif how == "no_classes":
        meta = json.loads((copy / SHARD_META).read_text())
        (copy / SHARD_META).write_text(json.dumps({**meta, "classes": []}))
    return copy


@pytest.mark.parametrize(
    ("how", "error", "message"),
    [
        ("truncated", ValueError, r"data.data_dir '.*truncated': shard train/chunk-.*\.bin is \d+ bytes, index.json"),
        ("no_index", FileNotFoundError, r"data.data_dir '.*no_index': train/index.json is missing"),
        ("garbled", ValueError, r"item \d+ of data.data_dir '.*garbled' \(train\) is (unreadable|not a readable)"),
        ("no_meta", FileNotFoundError, r"data.data_dir '.*no_meta' holds no readable vision_attn_shards.json"),
        ("bad_meta", ValueError, r"data.data_dir '.*bad_meta': vision_attn_shards.json is not a vision-attn shard"),
        ("no_classes", ValueError, r"data.data_dir '.*no_classes' has no train split or no class names"),
    ],
)
def test_corrupt_or_missing_shards_are_one_line_errors(shards, tmp_path, how, error, message) -> None:
    broken = _broken_copy(shards, tmp_path, how)
    with pytest.raises(error, match=message) as err:
        list(shard_module(broken).train_dataloader())
    assert "\n" not in str(err.value)


def test_litdata_needs_a_data_dir_and_fitting_batches(shards: Path) -> None:
    with pytest.raises(ValueError, match=r"data.data_dir is required for data.name 'litdata'"):
        ImageDataModule("litdata")
    with pytest.raises(ValueError, match=r"batch_size 128 is larger than the 64 training images"):
        shard_module(shards, batch_size=128)
    with pytest.raises(ValueError, match=r"context_outliers=2 needs object boxes .* dataset 'litdata' has none"):
        shard_module(shards, context_outliers=2)


@pytest.mark.slow  # two torchrun runs of two training processes each (~40 s on 2 cores)
def test_torchrun_ddp_on_shards_reads_distinct_samples_and_resumes(shards: Path, tmp_path: Path) -> None:
    record = tmp_path / "record"
    callback = json.dumps({"class_path": "record_batches.RecordBatches", "init_args": {"out_dir": str(record)}})
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(REPO / "train.py"), *fit_args(tmp_path / "run", steps=4, epochs=2),
               "--trainer.limit_train_batches=null", "--trainer.logger=false", "--overlays.every_n_epochs=0",
               "--data.name=litdata", f"--data.data_dir={shards}", "--data.context_outliers=0",
               "--data.crop_scale=null", "--data.hflip=0", "--data.translate=0", "--test_after_fit=false",
               "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp",
               "--step_checkpoint.every_n_train_steps=1"]  # fmt: skip
    env = {**run_env(), "PYTHONPATH": f"{REPO / 'tests'}:{REPO}", "TMPDIR": str(tmp_path)}  # torchrun's temp files
    done = subprocess.run([*command, f"--trainer.callbacks+={callback}"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    seen = [json.loads((record / f"rank{rank}.json").read_text()) for rank in range(2)]
    everything = {d for d, _ in items_of(shard_module(shards).train_set)}
    for epoch in ("0", "1"):
        first, second = (rank[epoch] for rank in seen)
        assert len(first) == len(second) == 32  # 64 images: 4 batches of 8 per rank
        assert not set(first) & set(second)
        assert set(first) | set(second) == everything
    # every rank resumes the run in its folder (rank zero holds the lock; the others must not take it)
    last = tmp_path / "run" / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 8
    resumed = [*command, "--trainer.max_epochs=3", "--ckpt_path=last"]
    done = subprocess.run(resumed, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert torch.load(last, weights_only=True)["global_step"] == 12
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["version_0"]
