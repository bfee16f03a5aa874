"""Side work during training, on rank zero only: attention overlays, export, a final summary with throughput."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

from vision_attn.export import write_export
from vision_attn.models import load_trained

__all__ = ["AttentionOverlays", "ExportBackbone", "TrainSummary"]


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
    :func:`vision_attn.explain.explain`). The grid is written to ``<log_dir>/attention/epoch=NNN.png`` and
    logged to TensorBoard as an image. Bounding boxes are drawn when the dataset has them. ``every_n_epochs=0``
    turns it off.
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
        boxes = getattr(base, "boxes", None)
        native = getattr(base, "images", None)
        if boxes is not None and native is not None and native.shape[-1] == self._images.shape[-1]:
            rows = indices[:count] if indices is not None else np.arange(count)
            self._boxes = torch.as_tensor(boxes[rows], dtype=torch.float32)

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
        from vision_attn.explain.plot import method_grid

        net = pl_module.eval_net if hasattr(pl_module, "eval_net") else pl_module
        was_training = net.training
        net.eval()
        try:
            with torch.inference_mode(False), torch.enable_grad():
                method, maps = self._explain(net, self._images.to(pl_module.device).clone())
        finally:
            net.train(was_training)
        data = trainer.datamodule
        classes = getattr(data, "classes", None)
        titles = [classes[int(y)] if classes else str(int(y)) for y in self._labels]
        out_dir = (self.log_dir or Path(trainer.default_root_dir)) / "attention"
        out_dir.mkdir(parents=True, exist_ok=True)
        fig = method_grid(
            self._images, {method: maps.cpu()}, out_dir / f"epoch={trainer.current_epoch:03d}.png",
            row_titles=titles, boxes=self._boxes, mean=getattr(data, "mean", None), std=getattr(data, "std", None),
        )  # fmt: skip
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                fig.canvas.draw()
                rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3]
                logger.experiment.add_image(f"attention/{method}", rgb, trainer.global_step, dataformats="HWC")


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

    @rank_zero_only
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Write the export folder."""
        out = Path(self.dirpath) if self.dirpath else (self.log_dir or Path(trainer.default_root_dir)) / "export"
        best = getattr(trainer.checkpoint_callback, "best_model_path", "") if self.use_best else ""
        info = pl_module.export_info() if hasattr(pl_module, "export_info") else {}
        if best and Path(best).is_file() and info.get("model_name"):
            net, loaded = load_trained(best)  # its EMA weights when it has them
            meta = {**info, **{k: v for k, v in loaded.items() if v is not None}, "source_checkpoint": str(best)}
        else:
            net = pl_module.eval_net if hasattr(pl_module, "eval_net") else pl_module
            meta = info
        result = write_export(net, out, ("hub",), meta=meta, stem=self.filename)
        self.path = result.files["hub"]
        print(f"exported the network to {out}/ (config.json, {self.path.name}, {self.path.with_suffix('.json').name})")


class TrainSummary(_LogDirCallback):
    """Measure fit wall time and training images/s (validation excluded); at the end of ``fit`` print the final
    metrics and write them to ``<log_dir>/summary.json``."""

    def __init__(self) -> None:
        super().__init__()
        self._fit_start = 0.0
        self._last = 0.0
        self.train_seconds = 0.0
        self.train_images = 0

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
        return {
            "metrics": metrics,
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
        path = (self.log_dir or Path(trainer.default_root_dir)) / "summary.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(summary, indent=2) + "\n")
