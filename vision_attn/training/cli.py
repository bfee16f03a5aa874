"""LightningCLI entry point: ``python train.py fit|validate|test|predict --config configs/<name>.yaml``."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from vision_attn.data import ImageDataModule
from vision_attn.training.callbacks import AttentionOverlays, ExportBackbone, TrainSummary
from vision_attn.training.module import ImageClassifier

__all__ = ["VisionAttnCLI", "main"]

TRAINER_DEFAULTS: dict[str, Any] = {
    "logger": [
        {"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": {"save_dir": "runs", "name": "run"}},
        {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "runs", "name": "run"}},
    ],
}


class VisionAttnCLI(LightningCLI):
    """LightningCLI with the recipe's callbacks and the data's ``num_classes``/``in_chans``/``img_size`` linked into
    the model.

    Callbacks: ``checkpoint`` (best by ``val/acc1`` + ``last.ckpt`` after each validation), ``step_checkpoint``
    (``last.ckpt`` every ``every_n_train_steps``, same folder), ``overlays`` (attention maps), ``export``
    (safetensors + JSON at the end of fit) and ``summary`` (final metrics, wall time, images/s).
    """

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.dirpath": "runs/run/checkpoints",  # fixed (not per version) so --ckpt_path last finds it
                "checkpoint.monitor": "val/acc1",
                "checkpoint.mode": "max",
                "checkpoint.save_top_k": 1,
                "checkpoint.save_last": True,
                "checkpoint.every_n_epochs": 1,
                "checkpoint.filename": "best-epoch={epoch:03d}-acc1={val/acc1:.4f}",
                "checkpoint.auto_insert_metric_name": False,
                "checkpoint.enable_version_counter": False,  # both callbacks write the one last.ckpt
            }
        )
        # a second ModelCheckpoint refreshes last.ckpt every N steps (off by default) so a killed run loses little;
        # Lightning forbids step and epoch triggers on one callback
        parser.add_lightning_class_args(ModelCheckpoint, "step_checkpoint")
        parser.set_defaults({"step_checkpoint.save_top_k": 0, "step_checkpoint.save_last": True,
                             "step_checkpoint.every_n_train_steps": 0,
                             "step_checkpoint.enable_version_counter": False})  # fmt: skip
        parser.link_arguments("checkpoint.dirpath", "step_checkpoint.dirpath")
        parser.add_lightning_class_args(AttentionOverlays, "overlays")
        parser.add_lightning_class_args(ExportBackbone, "export")
        parser.add_lightning_class_args(TrainSummary, "summary")
        for key in ("num_classes", "in_chans", "img_size"):
            parser.link_arguments(f"data.{key}", f"model.{key}", apply_on="instantiate")
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=True,
            help="after fit, evaluate the best checkpoint (by val/acc1) once on the test split",
        )

    def before_instantiate_classes(self) -> None:
        """Drop the default Rich progress bar when ``trainer.enable_progress_bar`` is false."""
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        if config is not None and config.get("trainer", {}).get("enable_progress_bar") is False:
            self.trainer_defaults["callbacks"] = []


def main(argv: list[str] | None = None) -> int:
    """Run LightningCLI on ``argv`` (default ``sys.argv[1:]``), e.g. ``['fit', '--config', 'configs/default.yaml']``;
    returns the exit code."""
    # train.py passes sys.argv on purpose; Lightning warns about "both args and command line arguments"
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    cli = VisionAttnCLI(
        ImageClassifier,
        ImageDataModule,
        args=list(sys.argv[1:] if argv is None else argv),
        trainer_defaults={**TRAINER_DEFAULTS, "callbacks": [RichProgressBar()]},
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"default_env": False},
    )
    if cli.subcommand == "fit" and cli.config["fit"].get("test_after_fit", True):
        test_after_fit(cli.trainer, cli.model, cli.datamodule)
    return 0


def test_after_fit(trainer: L.Trainer, model: L.LightningModule, datamodule: L.LightningDataModule) -> None:
    """Evaluate once on the test split after ``fit``: the best checkpoint by the validation metric (selected on the
    held-out part of the train split, never on the test split), else the final weights. Skipped when the fit
    was interrupted. The metrics are printed and added to ``summary.json`` by ``TrainSummary``."""
    if trainer.interrupted or not hasattr(datamodule, "test_dataloader"):
        return
    callback = trainer.checkpoint_callback
    best = getattr(callback, "best_model_path", "") if callback is not None else ""
    ckpt_path = best if best and Path(best).is_file() and not trainer.fast_dev_run else None
    trainer.test(model, datamodule=datamodule, ckpt_path=ckpt_path)
