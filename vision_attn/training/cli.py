"""LightningCLI entry point: ``python train.py fit|validate|test|predict --config configs/<name>.yaml``.

Every command writes into its own run folder ``<run_dir>/version_K/`` (logs, ``config.yaml``, ``summary.json``,
``checkpoints/``, ``export/``, ``attention/``, ``predictions.csv``); see :mod:`vision_attn.training.runs`.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
from jsonargparse import Namespace
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException

from vision_attn._io import atomic_write_text, check_writable_dir
from vision_attn.data import ImageDataModule
from vision_attn.training.callbacks import AttentionOverlays, ExportBackbone, PredictionWriter, RunGuard, TrainSummary
from vision_attn.training.checkpoint_io import AtomicCheckpointIO
from vision_attn.training.module import ImageClassifier
from vision_attn.training.runs import (
    CHECKPOINT_DIR,
    RunFolder,
    claim_run_folder,
    find_checkpoint,
    is_resumable,
    newest_step_in,
    open_run_folder,
    read_checkpoint,
    run_folder_of,
)

__all__ = ["VisionAttnCLI", "main"]

RUN_FOLDER_ENV = "VISION_ATTN_RUN_FOLDER"  # rank zero hands its run folder to the DDP processes it starts
SIGTERM_EXIT_CODE = 128 + 15  # the shell's code for "ended by SIGTERM"
_PROCESS_START = time.time()  # ranks of one launch start within seconds of each other
LAUNCH_CLOCK_SLACK = 30.0  # seconds a launch file may predate this process and still be this launch's
_CSV_LOGGERS = ("lightning.pytorch.loggers.CSVLogger", "lightning.pytorch.loggers.csv_logs.CSVLogger")
_OUR_CSV_LOGGER = "vision_attn.training.loggers.CSVLogger"
TRAINER_DEFAULTS: dict[str, Any] = {
    "logger": [  # both write into the run folder (save_dir, name and version are set per run)
        {"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": {"save_dir": "runs"}},
        {"class_path": _OUR_CSV_LOGGER, "init_args": {"save_dir": "runs"}},
    ],
}


class RunConfig(SaveConfigCallback):
    """Write the resolved config into the run folder, atomically: ``config.yaml``, or ``config.resumed-N.yaml``
    when a resumed run continues in a folder that already has one (the first run's config is kept)."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.already_saved:
            return
        folder = Path(trainer.log_dir or trainer.default_root_dir)  # a collective under DDP: every rank calls it
        if trainer.is_global_zero:
            name, count = "config.yaml", 0
            while (folder / name).exists():
                count += 1
                name = f"config.resumed-{count}.yaml"
            text = self.parser.dump(self.config, skip_none=False)
            command = getattr(stage, "value", stage)  # Lightning passes a TrainerFn (a str enum)
            atomic_write_text(folder / name, f"# vision-attn {command}: the resolved config of this run\n{text}")
        self.already_saved = True


class VisionAttnCLI(LightningCLI):
    """LightningCLI with the recipe's callbacks, one run folder per command and the data's
    ``num_classes``/``in_chans``/``img_size`` linked into the model.

    Callbacks: ``checkpoint`` (best by ``val/acc1`` + ``last.ckpt`` after each validation), ``step_checkpoint``
    (``last.ckpt`` every ``every_n_train_steps``, same folder), ``overlays`` (attention maps), ``export``
    (safetensors + JSON at the end of fit), ``summary`` (final metrics, wall time, images/s) and ``predictions``
    (the CSV of ``predict``); checkpoints are written atomically (:class:`AtomicCheckpointIO`) and
    :class:`RunGuard` turns a run without training steps into an error and SIGTERM into a saved, resumable stop.

    ``run_folders`` (a list owned by the caller) receives the run folder this process holds, so the caller can
    release it whatever happens.
    """

    def __init__(self, *args: Any, run_folders: list[RunFolder] | None = None, **kwargs: Any) -> None:
        self.run_folders = run_folders if run_folders is not None else []
        self.run_folder: Path | None = None
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--run_dir",
            type=str,
            default="runs/run",
            help="every command writes into its own <run_dir>/version_K/ (a resumed fit into the folder it resumes); "
            "--ckpt_path last|best look there",
        )
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
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
        parser.add_lightning_class_args(AttentionOverlays, "overlays")
        parser.add_lightning_class_args(ExportBackbone, "export")
        parser.add_lightning_class_args(TrainSummary, "summary")
        parser.add_lightning_class_args(PredictionWriter, "predictions")
        for key in ("num_classes", "in_chans", "img_size"):
            parser.link_arguments(f"data.{key}", f"model.{key}", apply_on="instantiate")
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=True,
            help="after fit, evaluate the best checkpoint (by val/acc1) once on the test split",
        )

    def _parse_ckpt_path(self) -> None:
        """Keep the model options of the config and command line. (Lightning's LightningCLI replaces them with the
        hyper-parameters saved in ``--ckpt_path``, silently undoing ``--model.lr ...``; here the given values are
        used and :meth:`ImageClassifier.on_load_checkpoint` reports or rejects any difference.)"""

    def before_instantiate_classes(self) -> None:
        """Drop the default Rich progress bar when ``trainer.enable_progress_bar`` is false; check the run length;
        resolve ``--ckpt_path last|best``; claim the run folder and point every output into it."""
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        if config is None:
            return
        if config.get("trainer", {}).get("enable_progress_bar") is False:
            self.trainer_defaults["callbacks"] = []
        if self.subcommand is not None:
            self._prepare_run(config, self.subcommand)

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        """The trainer, with atomic checkpoint writes and :class:`RunGuard` as its first callback."""
        trainer = super().instantiate_trainer(**kwargs)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # the default; a user's plugin is kept
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        trainer.callbacks.insert(0, RunGuard())  # before ExportBackbone: no export of an untrained network
        return trainer

    # --- run folder ---------------------------------------------------------------------------------------
    def _prepare_run(self, config: Namespace, subcommand: str) -> None:
        for key in ("trainer.default_root_dir", "checkpoint.dirpath", "step_checkpoint.dirpath"):
            if config.get(key) is not None:
                raise ValueError(
                    f"{key} {config.get(key)!r} cannot be set: every run writes into its own <run_dir>/version_K/ "
                    "(checkpoints in its checkpoints/); set --run_dir instead"
                )
        if subcommand == "fit":
            _check_run_length(config.trainer)
        inherited = os.environ.get(RUN_FOLDER_ENV)
        is_worker = inherited is not None and int(os.environ.get("LOCAL_RANK", "0") or 0) > 0
        launched = _launcher_rank() > 0  # started by torchrun / srun beside rank zero, not by it
        config.ckpt_path = _resolve_ckpt_path(config.get("ckpt_path"), config.run_dir, subcommand,
                                              quiet=is_worker or launched)  # fmt: skip
        if is_worker:  # a DDP process started by rank zero: same folder, rank zero holds the lock
            folder = Path(inherited)
        elif launched:  # torchrun / srun started it beside rank zero: the folder rank zero claimed and named
            folder = _wait_for_run_folder(config.run_dir)
        else:
            run = self._open_run(config, subcommand)
            self.run_folders.append(run)
            folder = run.path
            os.environ[RUN_FOLDER_ENV] = str(folder)
            _name_run_folder(config.run_dir, folder, run)
        self.run_folder = folder
        config.trainer.default_root_dir = str(folder)
        config.checkpoint.dirpath = config.step_checkpoint.dirpath = str(folder / CHECKPOINT_DIR)
        if config.trainer.get("fast_dev_run"):  # Lightning still writes last.ckpt at its end: --ckpt_path last
            config.checkpoint.save_last = config.step_checkpoint.save_last = False  # must never find a smoke test
        if config.export.dirpath is None:
            config.export.dirpath = str(folder / "export")
        elif subcommand == "fit" and not is_worker:
            check_writable_dir(config.export.dirpath, "export.dirpath")
        _point_loggers_at(config.trainer, folder)

    def _open_run(self, config: Namespace, subcommand: str) -> RunFolder:
        """A new version folder, or (a fit resuming the newest checkpoint of a run folder) that run's folder."""
        ckpt = config.ckpt_path
        resumed = run_folder_of(ckpt) if subcommand == "fit" and ckpt and Path(ckpt).is_file() else None
        if resumed is not None:
            step = int((read_checkpoint(ckpt) or {}).get("global_step", -1))
            if newest_step_in(resumed) > step:  # continuing there would overwrite its later checkpoints
                print(f"fit: {ckpt} is not the newest checkpoint of {resumed}; continuing in a new run folder")
                resumed = None
        run = open_run_folder(resumed) if resumed is not None else claim_run_folder(config.run_dir)
        if subcommand == "fit" and not config.trainer.get("fast_dev_run"):
            check_writable_dir(run.path / CHECKPOINT_DIR, "checkpoint folder")
        print(f"{subcommand}: {'continuing in' if run.resumed else 'writing into'} run folder {run.path}")
        return run


def _launch_file(run_dir: str) -> Path | None:
    """Where rank zero names its run folder for the ranks an external launcher started beside it (one file per
    launch: torchrun's run id, SLURM's job and step), ``None`` without such a launcher."""
    launch = os.environ.get("TORCHELASTIC_RUN_ID")
    if launch is None and "SLURM_JOB_ID" in os.environ and "SLURM_PROCID" in os.environ:
        launch = f"slurm-{os.environ['SLURM_JOB_ID']}.{os.environ.get('SLURM_STEP_ID', '0')}"
    if launch is None or int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")) or 1) < 2:
        return None
    return Path(run_dir) / f".launch-{''.join(c if c.isalnum() or c in '-_.' else '_' for c in launch)}"


def _name_run_folder(run_dir: str, folder: Path, run: RunFolder) -> None:
    """Rank zero of an external launch: write ``folder`` into the launch file (removed when the run releases it)."""
    path = _launch_file(run_dir)
    if path is not None:
        atomic_write_text(path, str(folder))
        run.on_release(path)


def _wait_for_run_folder(run_dir: str, timeout: float = 300.0) -> Path:
    """The run folder rank zero named in the launch file; a ``ValueError`` after ``timeout`` seconds (``run_dir``
    must be on a filesystem all nodes share, as checkpoints for ``--ckpt_path`` must). A file older than this process
    (minus :data:`LAUNCH_CLOCK_SLACK` for clocks that differ between nodes) is a killed launch's leftover with the
    same launch id, never this launch's: it is waited past, so a rank never writes into an earlier run's folder."""
    path = _launch_file(run_dir)
    deadline = time.monotonic() + timeout
    while path is not None:
        with contextlib.suppress(OSError):
            if path.stat().st_mtime >= _PROCESS_START - LAUNCH_CLOCK_SLACK:
                return Path(path.read_text(encoding="utf-8").strip())
        if time.monotonic() > deadline:
            break
        time.sleep(0.1)
    raise ValueError(
        f"rank {_launcher_rank()}: rank zero did not name its run folder in {str(path)!r} within {timeout:.0f} s; "
        "run_dir must be a folder that every node shares"
    )


def _launcher_rank() -> int:
    """This process's global rank as set by an external launcher (``RANK``: torchrun; ``SLURM_PROCID``: srun), else
    0. Lightning's own launcher passes its run folder to the processes it starts instead."""
    for key in ("RANK", "SLURM_PROCID"):
        value = os.environ.get(key, "")
        if value.isdigit():
            return int(value)
    return 0


def _check_run_length(trainer: Namespace) -> None:
    """Reject a fit that would make no training step or never end, before anything is built."""
    max_epochs, max_steps = trainer.get("max_epochs"), trainer.get("max_steps")
    limit = trainer.get("limit_train_batches")
    if max_epochs is not None and (max_epochs == 0 or max_epochs < -1):
        raise ValueError(
            f"trainer.max_epochs must be >= 1 (or -1: no epoch limit, with trainer.max_steps or max_time), "
            f"got {max_epochs}"
        )
    if max_steps is not None and (max_steps == 0 or max_steps < -1):
        raise ValueError(f"trainer.max_steps must be >= 1 (or -1: no step limit), got {max_steps}")
    if max_epochs == -1 and (max_steps is None or max_steps == -1) and not trainer.get("max_time"):
        raise ValueError("trainer.max_epochs -1 (no epoch limit) needs trainer.max_steps or trainer.max_time to end")
    if limit is not None and limit <= 0:
        raise ValueError(
            f"trainer.limit_train_batches must be > 0 (a fraction of the batches, or a count), got {limit}: "
            "no training step would run"
        )


def _resolve_ckpt_path(ckpt: str | None, run_dir: str, subcommand: str, quiet: bool = False) -> str | None:
    """``'last'``/``'best'`` -> the file among ``run_dir``'s runs; a local file is checked to be a readable (for
    ``fit``: resumable) checkpoint; anything else (``None``, ``'hpc'``, ``'registry...'``, URLs) is passed on."""
    if ckpt in ("last", "best"):
        found = str(find_checkpoint(run_dir, ckpt, resumable=subcommand == "fit" and ckpt == "last"))
        if not quiet:
            print(f"{subcommand}: --ckpt_path {ckpt} is {found}")
        return found
    if ckpt is None or ckpt == "hpc" or ckpt.startswith("registry") or not _is_local_file_protocol(ckpt):
        return ckpt
    if not Path(ckpt).is_file():
        raise FileNotFoundError(f"ckpt_path {ckpt!r} does not exist (expected a .ckpt file, 'last' or 'best')")
    loaded = read_checkpoint(ckpt)
    if loaded is None or "state_dict" not in loaded:
        raise ValueError(
            f"ckpt_path {ckpt!r} is not a readable Lightning checkpoint (empty, truncated, not a .ckpt written by "
            "train.py, or holding code, which is never unpickled)"
        )
    if subcommand == "fit" and not is_resumable(loaded):
        raise ValueError(
            f"ckpt_path {ckpt!r} holds weights but no optimizer and loop state, so fit cannot resume from it "
            "(expected a full checkpoint such as checkpoints/last.ckpt)"
        )
    return ckpt


def _point_loggers_at(trainer: Namespace, folder: Path) -> None:
    """Make TensorBoard and CSV loggers write into ``folder`` itself (one folder, not one version folder each);
    Lightning's ``CSVLogger`` becomes ours, which appends to ``metrics.csv`` when a run is resumed."""
    loggers = trainer.get("logger")
    for logger in loggers if isinstance(loggers, list) else [loggers]:
        if not isinstance(logger, Namespace | dict) or "class_path" not in logger:
            continue
        if logger["class_path"] in _CSV_LOGGERS:
            logger["class_path"] = _OUR_CSV_LOGGER
        init = logger.get("init_args")
        if init is not None and {"save_dir", "name", "version"} <= set(init.keys()):
            init["save_dir"], init["name"], init["version"] = str(folder.parent), "", folder.name


def main(argv: list[str] | None = None) -> int:
    """Run LightningCLI on ``argv`` (default ``sys.argv[1:]``), e.g. ``['fit', '--config', 'configs/default.yaml']``;
    returns the exit code (143 when a fit was stopped by SIGTERM, after saving a resumable checkpoint)."""
    # train.py passes sys.argv on purpose; Lightning warns about "both args and command line arguments"
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    warnings.filterwarnings("ignore", message="Experiment logs directory .* exists and is not empty")
    warnings.filterwarnings("ignore", message="Checkpoint directory .* exists and is not empty")  # a resumed run
    runs: list[RunFolder] = []
    try:
        cli = VisionAttnCLI(
            ImageClassifier,
            ImageDataModule,
            args=list(sys.argv[1:] if argv is None else argv),
            trainer_defaults={**TRAINER_DEFAULTS, "callbacks": [RichProgressBar()]},
            save_config_callback=RunConfig,
            parser_kwargs={"default_env": False},
            run_folders=runs,
        )
        if cli.subcommand == "fit" and cli.config["fit"].get("test_after_fit", True):
            test_after_fit(cli.trainer, cli.model, cli.datamodule)
    except SIGTERMException:
        print("stopped by SIGTERM; resume with --ckpt_path last", file=sys.stderr)
        return SIGTERM_EXIT_CODE
    except MisconfigurationException as err:  # Lightning's word for a bad option: an input error like ours
        raise ValueError(str(err)) from err
    finally:
        for run in runs:
            run.release()
        if runs:
            os.environ.pop(RUN_FOLDER_ENV, None)
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
