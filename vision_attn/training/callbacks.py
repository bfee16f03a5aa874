"""Side work during training (files written on rank zero only): attention overlays, export, a final summary with
throughput, prediction CSVs, and the guard that makes failures (no training step, SIGTERM) visible."""

from __future__ import annotations

import csv
import io
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException

from vision_attn._io import atomic_open, atomic_write_bytes, atomic_write_text, check_writable_dir
from vision_attn.export import write_export
from vision_attn.models import load_trained

__all__ = ["AttentionOverlays", "ExportBackbone", "PredictionWriter", "RunGuard", "TrainSummary"]


def _add_png(writer: Any, tag: str, png: bytes, rgb: np.ndarray, step: int) -> None:
    """Add the PNG-encoded ``rgb`` ([H, W, 3] uint8) to a TensorBoard ``writer`` as an image: torch's
    ``SummaryWriter`` takes the encoded bytes as they are (its ``add_image`` would resize and encode them again);
    any other writer gets ``add_image(rgb)``."""
    from torch.utils.tensorboard import SummaryWriter  # what Lightning's TensorBoardLogger writes with

    file_writer = getattr(writer, "file_writer", None)
    if not isinstance(writer, SummaryWriter) or file_writer is None:
        writer.add_image(tag, rgb, step, dataformats="HWC")
        return
    from tensorboard.compat.proto.summary_pb2 import Summary

    height, width, channels = rgb.shape
    image = Summary.Image(height=height, width=width, colorspace=channels, encoded_image_string=png)
    file_writer.add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)


def _log_dir(trainer: L.Trainer) -> Path:
    """``trainer.log_dir`` — a collective under DDP, so call it on every rank (``setup``), never in rank-zero code."""
    return Path(trainer.log_dir or trainer.default_root_dir)


class _LogDirCallback(L.Callback):
    """Resolves the run's log folder on every rank in ``setup``, for use later in rank-zero-only hooks."""

    log_dir: Path | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.log_dir = _log_dir(trainer)


class AttentionOverlays(_LogDirCallback):
    """Each validation epoch, draw attention-map overlays for a fixed batch of validation images.

    ``method='auto'`` uses attention rollout (Abnar & Zuidema 2020) for models with token attention, the
    model's own spatial attention maps for attention CNNs, and Grad-CAM otherwise (all from
    :func:`vision_attn.explain.explain`). The grid (rows titled "true / predicted" class) is written to
    ``<log_dir>/attention/epoch=NNN.png`` and logged to TensorBoard as an image. Bounding boxes are drawn when
    the dataset has them. ``every_n_epochs=0`` turns it off.
    """

    AUTO_ORDER = ("rollout", "spatial", "gradcam")

    def __init__(self, num_images: int = 8, method: str = "auto", every_n_epochs: int = 1) -> None:
        super().__init__()
        if num_images < 1:
            raise ValueError(f"num_images must be >= 1, got {num_images}")
        if every_n_epochs < 0:
            raise ValueError(f"every_n_epochs must be >= 0 (0 = off), got {every_n_epochs}")
        self.num_images = num_images
        self.method = method
        self.every_n_epochs = every_n_epochs
        self._images: torch.Tensor | None = None
        self._boxes: torch.Tensor | None = None
        self._labels: torch.Tensor | None = None
        self._resolved: str | None = None

    def _fixed_batch(self, trainer: L.Trainer) -> None:
        data = trainer.datamodule
        dataset = getattr(data, "val_set", None)
        if dataset is None:
            return
        count = min(self.num_images, len(dataset))
        items = [dataset[i] for i in range(count)]
        self._images = torch.stack([image for image, _ in items])
        self._labels = torch.tensor([label for _, label in items])
        base, indices = getattr(dataset, "base", None), getattr(dataset, "indices", None)
        boxes, native = getattr(base, "boxes", None), getattr(base, "images", None)
        config = getattr(data, "data_config", None)
        if boxes is not None and native is not None and config is not None:
            from vision_attn.data.preprocess import prepare_images

            rows = indices[:count] if indices is not None else np.arange(count)
            # the boxes go through the same eval pipeline as the images, so they outline the object drawn
            self._boxes = prepare_images([native[row] for row in rows], config, boxes=boxes[rows]).boxes

    def _explain(self, net: torch.nn.Module, images: torch.Tensor) -> tuple[str, torch.Tensor]:
        from vision_attn.explain import explain

        if self._resolved is not None:
            return self._resolved, explain(net, images, self._resolved)
        methods = self.AUTO_ORDER if self.method == "auto" else (self.method,)
        errors = []
        for method in methods:
            try:
                maps = explain(net, images, method)
            except (ValueError, TypeError, RuntimeError) as err:
                errors.append(f"{method}: {err}")
                continue
            self._resolved = method
            return method, maps
        raise ValueError("no attention-map method works for this model: " + "; ".join(errors))

    @rank_zero_only
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Draw and save the overlays (skipped during the sanity check and between ``every_n_epochs``)."""
        if trainer.sanity_checking or not self.every_n_epochs or trainer.current_epoch % self.every_n_epochs:
            return
        if self._images is None:
            self._fixed_batch(trainer)
            if self._images is None:
                return
        from PIL import Image

        from vision_attn.explain.plot import grid_image

        net = pl_module.eval_net if hasattr(pl_module, "eval_net") else pl_module
        was_training = net.training
        net.eval()
        images = self._images.to(pl_module.device)
        try:
            with torch.no_grad():
                preds = net(images).argmax(dim=1).cpu()
            with torch.inference_mode(False), torch.enable_grad():
                method, maps = self._explain(net, images.clone())
        finally:
            net.train(was_training)
        data = trainer.datamodule
        classes = getattr(data, "classes", None)

        def name(y: torch.Tensor) -> str:
            return classes[int(y)] if classes else str(int(y))

        titles = [f"{name(y)} / {name(p)}" for y, p in zip(self._labels, preds, strict=True)]
        rgb = grid_image(
            self._images, {f"{method} (true / predicted)": maps.cpu()}, row_titles=titles, boxes=self._boxes,
            mean=getattr(data, "mean", None), std=getattr(data, "std", None),
        )  # fmt: skip
        buffer = io.BytesIO()
        Image.fromarray(rgb).save(buffer, format="png")  # encoded once, for the file and for TensorBoard (~50 ms)
        png = buffer.getvalue()
        path = (self.log_dir or Path(trainer.default_root_dir)) / "attention" / f"epoch={trainer.current_epoch:03d}.png"
        atomic_write_bytes(path, png)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                _add_png(logger.experiment, f"attention/{method}", png, rgb, trainer.global_step)


class ExportBackbone(_LogDirCallback):
    """At the end of ``fit``, export the best checkpoint's network (else the current one) as a timm / Hugging Face
    folder ``<dirpath>`` (``config.json`` + ``<filename>.safetensors`` + ``<filename>.json``; default ``dirpath``:
    ``<log_dir>/export``), written in one atomic step; ``vision_attn.load_trained(dirpath)`` and
    ``timm.create_model("local-dir:<dirpath>", pretrained=True)`` load it."""

    def __init__(self, dirpath: str | None = None, filename: str = "model", use_best: bool = True) -> None:
        super().__init__()
        self.dirpath = dirpath
        self.filename = filename
        self.use_best = use_best
        self.path: Path | None = None

    def _out_dir(self, trainer: L.Trainer) -> Path:
        return Path(self.dirpath) if self.dirpath else (self.log_dir or Path(trainer.default_root_dir)) / "export"

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Resolve the log folder and, for ``fit``, fail now (not after training) if the export folder is not
        writable."""
        super().setup(trainer, pl_module, stage)
        if stage == "fit" and trainer.is_global_zero:
            check_writable_dir(self._out_dir(trainer), "export.dirpath")

    @rank_zero_only
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Write the export folder."""
        out = self._out_dir(trainer)
        best = getattr(trainer.checkpoint_callback, "best_model_path", "") if self.use_best else ""
        info = pl_module.export_info() if hasattr(pl_module, "export_info") else {}
        if best and Path(best).is_file() and info.get("model_name"):
            net, loaded = load_trained(best)  # its EMA weights when it has them
            meta = {**info, **{k: v for k, v in loaded.items() if v is not None}, "source_checkpoint": Path(best).name}
        else:
            net = pl_module.eval_net if hasattr(pl_module, "eval_net") else pl_module
            meta = info
        result = write_export(net, out, ("hub",), meta=meta, stem=self.filename)
        self.path = result.files["hub"]
        print(f"exported the network to {out}/ (config.json, {self.path.name}, {self.path.with_suffix('.json').name})")


class TrainSummary(_LogDirCallback):
    """Measure fit wall time and training images/s (validation excluded); at the end of ``fit`` print the final
    metrics and write them to ``<log_dir>/summary.json``; a ``test`` run in the same process after ``fit`` adds
    its metrics there under ``'test'``."""

    def __init__(self) -> None:
        super().__init__()
        self._fit_start = 0.0
        self._last = 0.0
        self.train_seconds = 0.0
        self.train_images = 0
        self._summary: dict[str, Any] | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._fit_start = time.perf_counter()

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last = time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        now = time.perf_counter()
        self.train_seconds += now - self._last
        self._last = now
        self.train_images += int(batch[0].shape[0]) * trainer.world_size

    def summary(self, trainer: L.Trainer) -> dict[str, Any]:
        """Final metrics, checkpoint paths, wall time and throughput as a dict."""
        metrics = {k: round(float(v), 5) for k, v in sorted(trainer.callback_metrics.items()) if v.numel() == 1}
        ckpt = trainer.checkpoint_callback
        best_score = getattr(ckpt, "best_model_score", None)
        net = getattr(trainer.lightning_module, "net", trainer.lightning_module)
        return {
            "metrics": metrics,
            "num_parameters": sum(p.numel() for p in net.parameters()),
            "epochs": trainer.current_epoch,
            "global_step": trainer.global_step,
            "fit_seconds": round(time.perf_counter() - self._fit_start, 1),
            "train_images": self.train_images,
            "train_images_per_second": round(self.train_images / max(self.train_seconds, 1e-9), 1),
            "best_model_path": getattr(ckpt, "best_model_path", None),
            "best_model_score": None if best_score is None else round(float(best_score), 5),
            "last_model_path": getattr(ckpt, "last_model_path", None),
        }

    @rank_zero_only
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Print the summary table and write ``summary.json``."""
        from rich.console import Console
        from rich.table import Table

        summary = self.summary(trainer)
        table = Table(title="final metrics")
        table.add_column("name")
        table.add_column("value")
        for key, value in summary["metrics"].items():
            table.add_row(key, f"{value:.4f}")
        for key, value in summary.items():
            if key != "metrics":
                table.add_row(key, str(value))
        Console().print(table)
        self._summary = summary
        self._write(trainer)

    @rank_zero_only
    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """After the test that follows ``fit``, add the test metrics (and which weights were tested) to
        ``summary.json`` under ``'test'``."""
        if self._summary is None:
            return  # a plain ``test`` run: Lightning prints its own table and there is no fit summary to extend
        ckpt = trainer.ckpt_path
        self._summary["test"] = {
            "metrics": {
                k: round(float(v), 5)
                for k, v in sorted(trainer.callback_metrics.items())
                if k.startswith("test/") and v.numel() == 1
            },
            "checkpoint": str(ckpt) if ckpt else "final weights",
        }
        self._write(trainer)

    def _write(self, trainer: L.Trainer) -> None:
        path = (self.log_dir or Path(trainer.default_root_dir)) / "summary.json"
        atomic_write_text(path, json.dumps(self._summary, indent=2) + "\n")


class RunGuard(L.Callback):
    """Failures are failures, not quiet successes.

    * A ``fit`` that made no training step (e.g. ``batch_size`` larger than the training set with ``drop_last``,
      ``limit_train_batches`` rounding to 0 batches) raises a ``ValueError`` at its end, before the export writes
      untrained weights (place this callback before :class:`ExportBackbone`).
    * On SIGTERM, Lightning stops after the current step; this callback then saves a resumable ``last.ckpt`` in
      the checkpoint folder (``--ckpt_path last`` continues from it) and lets the exit be a failure.
    """

    def __init__(self) -> None:
        super().__init__()
        self.sigterm_checkpoint: str | None = None

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Raise when the fit made no optimizer step."""
        if trainer.global_step == 0:
            raise ValueError(
                f"fit made no training step ({trainer.num_training_batches} training batches per epoch, "
                f"trainer.max_epochs={trainer.max_epochs}, max_steps={trainer.max_steps}, "
                f"limit_train_batches={trainer.limit_train_batches}); nothing was trained or exported. Check "
                "data.batch_size against the number of training images (the last partial batch is dropped)"
            )

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """Save ``last.ckpt`` when a fit is stopped by SIGTERM."""
        callback = trainer.checkpoint_callback
        if not isinstance(exception, SIGTERMException) or trainer.state.fn != TrainerFn.FITTING:
            return
        if callback is None or not getattr(callback, "dirpath", None):
            return
        path = os.path.join(callback.dirpath, f"{callback.CHECKPOINT_NAME_LAST}{callback.FILE_EXTENSION}")
        trainer.save_checkpoint(path)  # every rank takes part; rank zero writes
        self.sigterm_checkpoint = path
        if trainer.is_global_zero:
            print(f"SIGTERM: saved a resumable checkpoint at step {trainer.global_step} to {path}")


class PredictionWriter(BasePredictionWriter):
    """During ``predict``, write one CSV row per image to ``<log_dir>/<filename>`` (atomically): ``index`` (in the
    predicted dataset), ``path`` (for image-folder data), ``label`` (predicted class), ``probability`` (of that
    class) and ``true_label`` when the data have labels. With several processes each writes its own
    ``<stem>.rank<R>.csv``."""

    def __init__(self, filename: str = "predictions.csv") -> None:
        super().__init__(write_interval="epoch")
        if not filename or Path(filename).name != filename:
            raise ValueError(f"predictions.filename must be a plain file name, got {filename!r}")
        self.filename = filename
        self.path: Path | None = None
        self._log_dir: Path | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Resolve the log folder on every rank (``trainer.log_dir`` is a collective under DDP)."""
        super().setup(trainer, pl_module, stage)
        if stage == "predict":
            self._log_dir = Path(trainer.log_dir or trainer.default_root_dir)
            check_writable_dir(self._log_dir, "predictions folder")

    def write_on_epoch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        predictions: Sequence[Any],
        batch_indices: Sequence[Any],
    ) -> None:
        """Write the CSV of all batches predicted by this process."""
        loader = trainer.predict_dataloaders
        dataset = getattr(loader, "dataset", None)
        classes = getattr(trainer.datamodule, "classes", None) if trainer.datamodule is not None else None
        if len(batch_indices) > 1:
            raise ValueError(f"PredictionWriter writes one predict dataloader, got {len(batch_indices)}")
        per_batch = list(batch_indices[0]) if batch_indices else []  # one list of dataset indices per batch
        per_batch += [None] * (len(predictions) - len(per_batch))
        rows = []
        position = 0
        for batch, indices in zip(predictions, per_batch, strict=True):
            count = len(batch["preds"])
            indices = list(indices) if indices else list(range(position, position + count))
            position += count
            for row, index in enumerate(indices):
                pred = int(batch["preds"][row])
                item = {"index": index, "path": _sample_path(dataset, index), "label": _name(classes, pred),
                        "probability": f"{float(batch['probs'][row, pred]):.6f}"}  # fmt: skip
                if "targets" in batch:
                    item["true_label"] = _name(classes, int(batch["targets"][row]))
                rows.append(item)
        columns = [c for c in ("index", "path", "label", "probability", "true_label") if rows and c in rows[0]]
        columns = [c for c in columns if rows[0][c] is not None]
        stem = Path(self.filename).stem
        name = self.filename if trainer.world_size == 1 else f"{stem}.rank{trainer.global_rank}.csv"
        self.path = (self._log_dir or Path(trainer.default_root_dir)) / name
        with atomic_open(self.path, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        print(f"wrote {len(rows)} predictions to {self.path}")


def _name(classes: Sequence[str] | None, index: int) -> str:
    return str(classes[index]) if classes and 0 <= index < len(classes) else str(index)


def _sample_path(dataset: Any, index: int) -> str | None:
    """The file behind item ``index`` of a (subset of an) image-folder dataset, else ``None``."""
    base, indices = getattr(dataset, "base", dataset), getattr(dataset, "indices", None)
    samples = getattr(base, "samples", None)
    if samples is None:
        return None
    return str(samples[int(indices[index]) if indices is not None else index][0])
