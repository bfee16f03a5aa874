"""Lightning training: every config end to end (fast_dev_run), resume, export, bad hyper-parameters (issue 5)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import vision_attn
from vision_attn.data import ImageDataModule
from vision_attn.training import ImageClassifier, export_checkpoint
from vision_attn.training.cli import main

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
CIFAR_CONFIGS = {"cct_cifar10", "vit_spt_lsa_cifar10", "resnet_attn_cifar10"}


def _tiny(tmp_path: Path) -> list[str]:
    """Overrides that make any config a few-second CPU run writing only under ``tmp_path``."""
    return [
        "--data.num_workers=0",
        "--data.batch_size=4",
        "--data.eval_batch_size=4",
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        f"--run_dir={tmp_path}",
        "--overlays.num_images=2",
    ]


def run_folder(run_dir: Path, version: int = 0) -> Path:
    """``run_dir/version_<version>``, checked to exist."""
    folder = run_dir / f"version_{version}"
    assert folder.is_dir(), sorted(p.name for p in run_dir.iterdir())
    return folder


def test_configs_are_complete() -> None:
    names = {p.stem for p in CONFIGS}
    assert {"default", "finetune_vit_imagefolder"} | CIFAR_CONFIGS <= names
    for path in CONFIGS:
        config = yaml.safe_load(path.read_text())
        assert {"model", "data", "trainer"} <= set(config), path.name
        assert config["run_dir"] == f"runs/{config['run_dir'].split('/')[-1]}", path.name
        assert "logger" not in config["trainer"], f"{path.name}: the CLI points the loggers at the run folder"


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_config_fast_dev_run(config: Path, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    args = ["fit", "--config", str(config), "--trainer.fast_dev_run=1", *_tiny(tmp_path)]
    if config.stem in CIFAR_CONFIGS or config.stem.startswith("finetune"):
        folder = request.getfixturevalue("cifar_folder")  # a few CIFAR-10 JPEG classes, never the network
        args += ["--data.name=image_folder", f"--data.data_dir={folder}"]  # download: true stays (nothing to fetch)
    if config.stem.startswith("finetune"):
        args += ["--model.pretrained=false", "--data.img_size=64", "--model.model_args={}"]  # no download, small
    if config.stem.endswith("_shards_multinode"):  # LitData shards of the CIFAR-10 JPEGs, on this one CPU
        pytest.importorskip("litdata")  # the `datasets` extra
        from vision_attn.data.shards import write_shards

        shards = tmp_path / "shards"
        write_shards(ImageDataModule("image_folder", str(request.getfixturevalue("cifar_folder")), img_size=32), shards)
        args += [f"--data.data_dir={shards}", "--trainer.strategy=auto", "--trainer.num_nodes=1",
                 "--trainer.sync_batchnorm=false", f"--run_dir={tmp_path / 'run'}"]  # fmt: skip
        tmp_path = tmp_path / "run"
    assert main(args) == 0
    run = run_folder(tmp_path)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["global_step"] == 1
    assert torch.isfinite(torch.tensor(summary["metrics"]["val/loss"]))
    assert list((run / "attention").glob("*.png")), "the overlay callback wrote no PNG"
    meta = json.loads((run / "export" / "model.json").read_text())
    if config.stem in CIFAR_CONFIGS:  # 32 px from the config, not image_folder's 224, with no --data.img_size
        assert meta["img_size"] == 32


def test_fit_resume_export_and_reload(tmp_path: Path) -> None:
    base = [
        "fit", "--config", str(REPO / "configs" / "default.yaml"), *_tiny(tmp_path),
        "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=2", "--trainer.max_time=null",
        "--model.schedule=steps",
        "--step_checkpoint.every_n_train_steps=1", "--trainer.logger=false", "--overlays.every_n_epochs=0",
        "--model.ema_decay=0.9", "--model.mixup_alpha=0.2", "--model.cutmix_alpha=1.0",
        "--data.context_outliers=0",  # Mixup/CutMix cannot mix the default config's context outliers
    ]  # fmt: skip
    assert main([*base, "--trainer.max_epochs=1"]) == 0
    last = run_folder(tmp_path) / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 3
    # resume: the step count continues (3 -> 6) and only the new epoch's 3 batches are trained
    assert main([*base, "--trainer.max_epochs=2", "--ckpt_path=last"]) == 0
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 6
    summary = json.loads((run_folder(tmp_path) / "summary.json").read_text())
    assert summary["global_step"] == 6
    assert not (tmp_path / "version_1").exists(), "the resumed run did not continue in its own folder"
    assert summary["train_images"] == 3 * 4
    assert summary["train_images_per_second"] > 0
    # export: the EMA network reloads outside Lightning with identical outputs
    out = export_checkpoint(last, tmp_path / "reexport" / "vit.safetensors")
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["model_name"] == "va_vitc2_seq_tiny_patch8_64"
    assert meta["model_args"]["in_chans"] == 1
    assert len(meta["class_names"]) == 10
    model = vision_attn.create_model(meta["model_name"], checkpoint_path=out).eval()
    module = ImageClassifier.load_from_checkpoint(last, map_location="cpu").eval()
    assert not any(p.requires_grad for p in module.ema.parameters())
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), module(x))
    assert (run_folder(tmp_path) / "export" / "model.json").is_file()  # the ExportBackbone callback's own export
    # the eval preprocessing validation used is recorded with the checkpoint and the export, and read back
    recorded = {"input_size": [1, 64, 64], "crop_pct": 1.0, "interpolation": "bilinear", "crop_mode": "center"}
    assert {k: ckpt["vision_attn"][k] for k in recorded} == {**recorded, "input_size": (1, 64, 64)}
    config = json.loads((run_folder(tmp_path) / "export" / "config.json").read_text())["pretrained_cfg"]
    assert {k: config[k] for k in recorded} == recorded
    _, info = vision_attn.load_trained(run_folder(tmp_path) / "export")
    assert vision_attn.resolve_data_config(model, info)["mean"] == pytest.approx((0.1198,))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lr": 0.0}, "lr must be > 0"),
        ({"lr": -1e-3}, "lr must be > 0"),
        ({"mixup_alpha": -0.1}, "mixup_alpha must be >= 0"),
        ({"label_smoothing": 1.0}, "label_smoothing must be in"),
        ({"ema_decay": 1.0}, "ema_decay must be in"),
        ({"warmup_epochs": -1}, "warmup_epochs must be >= 0"),
        ({"model": "no_such_model"}, "neither a vision_attn model"),
        ({"model_args": {"in_chans": 3}, "in_chans": 1}, "model_args in_chans=3 does not match the data's in_chans=1"),
    ],
)
def test_bad_hyper_parameters(kwargs: dict, message: str) -> None:
    kwargs = {"model": "va_vit_tiny_patch8_64", "model_args": {"embed_dim": 24, "depth": 1, "num_heads": 2}, **kwargs}
    with pytest.raises(ValueError, match=message):
        ImageClassifier(**kwargs)


def test_warmup_longer_than_run(tmp_path: Path) -> None:
    args = ["fit", "--config", str(REPO / "configs" / "default.yaml"), *_tiny(tmp_path), "--trainer.logger=false",
            "--trainer.limit_train_batches=2", "--trainer.max_epochs=1", "--model.warmup_epochs=3"]  # fmt: skip
    with pytest.raises(ValueError, match=r"warmup_epochs=3.0 \(6 steps\) is longer than the run \(2 steps"):
        main(args)


def test_model_data_mismatch_caught_before_training() -> None:
    data = ImageDataModule(num_workers=0)  # 1 x 64 x 64, 10 classes
    import lightning as L

    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    net = vision_attn.create_model("va_vit_tiny_patch4_32", embed_dim=24, depth=1, num_heads=2)  # 3 x 32 x 32
    with pytest.raises(ValueError, match=r"in_chans=1, img_size=64.*expects"):
        trainer.fit(ImageClassifier(net), datamodule=data)
    assert trainer.global_step == 0


def test_vision_attn_console_script_dispatches(tmp_path: Path) -> None:
    from vision_attn.cli import main as cli_main

    args = ["validate", "--config", str(REPO / "configs" / "default.yaml"), *_tiny(tmp_path),
            "--trainer.limit_val_batches=1", "--trainer.logger=false"]  # fmt: skip
    assert cli_main(args) == 0


@pytest.mark.slow
def test_ddp_two_cpu_processes(tmp_path: Path) -> None:
    cmd = [
        sys.executable, str(REPO / "train.py"), "fit", "--config", str(REPO / "configs" / "default.yaml"),
        *_tiny(tmp_path), "--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=2", "--trainer.logger=false",
        "--trainer.max_time=null", "--model.schedule=steps",
    ]  # fmt: skip
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (tmp_path / "version_1").exists(), "the second process claimed a run folder of its own"
    ckpt = torch.load(run_folder(tmp_path) / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 2  # 2 batches per process, gradients averaged across the 2 processes
    summary = json.loads((run_folder(tmp_path) / "summary.json").read_text())
    assert summary["train_images_per_second"] > 0


def test_training_logs_window_means_on_the_logger_steps() -> None:
    """``train/loss`` and ``train/acc1`` are logged only on the steps the loggers write, as the mean over the batches
    since the previous log, and once more on the epoch's last batch."""
    import lightning as L
    from lightning.pytorch.loggers import Logger
    from torch.utils.data import DataLoader, TensorDataset

    class Memory(Logger):
        name, version = "memory", 0

        def __init__(self) -> None:
            super().__init__()
            self.rows: list[tuple[int | None, dict[str, float]]] = []

        def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
            self.rows.append((step, dict(metrics)))

        def log_hyperparams(self, params: object, *args: object, **kwargs: object) -> None:
            pass

    class Losses(L.Callback):
        def __init__(self) -> None:
            self.values: list[float] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.values.append(float(outputs["loss"]))

    torch.manual_seed(0)
    module = ImageClassifier("va_vit_tiny_patch4_32", model_args={"depth": 1}, num_classes=3, in_chans=3,
                             img_size=32, warmup_epochs=0)  # fmt: skip
    loader = DataLoader(TensorDataset(torch.randn(28, 3, 32, 32), torch.randint(0, 3, (28,))), batch_size=4)
    memory, losses = Memory(), Losses()
    trainer = L.Trainer(max_epochs=1, log_every_n_steps=3, logger=memory, callbacks=[losses], accelerator="cpu",
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(module, loader)  # 7 batches: logged after batches 3 and 6 (windows of 3), and batch 7 (the last)
    logged = {step: m for step, m in memory.rows if "train/loss" in m}
    assert sorted(logged) == [2, 5]
    for step in (2, 5):
        assert logged[step]["train/loss"] == pytest.approx(sum(losses.values[step - 2 : step + 1]) / 3, rel=1e-5)
        accuracy = logged[step]["train/acc1"] * 12  # correct predictions among the window's 12 images
        assert accuracy == pytest.approx(round(accuracy), abs=1e-4)
        assert 0 <= accuracy <= 12
        assert logged[step]["lr"] > 0
    assert float(trainer.callback_metrics["train/loss"]) == pytest.approx(losses.values[6], rel=1e-5)
