"""The image-classification recipe as a ``LightningModule``; the network is passed in, never defined here."""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
import torch
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.optim import param_groups_weight_decay
from torch import nn
from torch.nn import functional as F
from torchmetrics.classification import MulticlassAccuracy

from vision_attn.data.outliers import OUTLIER_LABEL
from vision_attn.models import create_model
from vision_attn.training.ema import StepEMA
from vision_attn.training.loss import classification_loss
from vision_attn.training.resume import changed_hparams, check_weights_fit
from vision_attn.training.rng import rng_states, set_rng_states
from vision_attn.training.schedule import WarmupCosine, find_timer

__all__ = ["ImageClassifier"]

# parameter names (the last part of the dotted name, at any depth) that never get weight decay, besides every 1-D
# parameter (norms, biases): position embeddings, special tokens and LSA's learned softmax temperature
NO_DECAY_NAMES = frozenset({"pos_embed", "cls_token", "reg_token", "dist_token", "log_temperature"})


def _check_positive(name: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


class ImageClassifier(L.LightningModule):
    """Train an image classifier: AdamW (no decay on norms, biases, position embeddings and tokens), linear
    warmup + cosine schedule, label smoothing, timm Mixup/CutMix, optional weight EMA, top-1/top-5 accuracy.

    ``schedule='time'`` runs the cosine over the wall-clock budget ``trainer.max_time`` instead of the step
    count, so a time-boxed run anneals fully however fast the machine is.

    ``model`` is a registered model name (vision_attn or timm, built with ``model_args``) or an ``nn.Module``.
    ``num_classes``/``in_chans``/``img_size`` come from the data (LightningCLI links them) and are passed to a
    named model; a value in ``model_args`` that contradicts the data is an error. Before training the network
    is run once on a batch shaped like the data, so a mismatch fails early with both shapes in the message.
    """

    def __init__(
        self,
        model: str | nn.Module = "va_vit_tiny_patch8_64",
        model_args: dict[str, Any] | None = None,
        num_classes: int | None = None,
        in_chans: int | None = None,
        img_size: int | None = None,
        pretrained: bool = False,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_epochs: float = 1.0,
        min_lr_ratio: float = 0.01,
        label_smoothing: float = 0.1,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        mixup_prob: float = 1.0,
        mixup_switch_prob: float = 0.5,
        ema_decay: float | None = None,
        schedule: Literal["steps", "time"] = "steps",
    ) -> None:
        super().__init__()
        _check_positive("lr", lr)
        _check_positive("weight_decay", weight_decay, allow_zero=True)
        _check_positive("warmup_epochs", warmup_epochs, allow_zero=True)
        _check_positive("mixup_alpha", mixup_alpha, allow_zero=True)
        _check_positive("cutmix_alpha", cutmix_alpha, allow_zero=True)
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        for name, p in (("mixup_prob", mixup_prob), ("mixup_switch_prob", mixup_switch_prob)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {p}")
        if ema_decay is not None and not 0.0 < ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1) or None (no EMA), got {ema_decay}")
        if schedule not in ("steps", "time"):
            raise ValueError(f"schedule must be 'steps' or 'time', got {schedule!r}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must both be in [0, 1), got {betas}")

        # the data-linked sizes live in the resolved model_args (and in the DataModule's hparams), not twice
        ignore = ["num_classes", "in_chans", "img_size"] + (["model"] if isinstance(model, nn.Module) else [])
        self.save_hyperparameters(ignore=ignore)
        if isinstance(model, nn.Module):
            self.net = model
            self.model_name: str | None = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
            self.model_args: dict[str, Any] = dict(model_args or {})
        else:
            self.model_name = model
            self.model_args = self._resolve_model_args(model_args, num_classes, in_chans, img_size)
            try:
                self.net = create_model(model, pretrained, **self.model_args)
            except TypeError as err:  # CNNs take no img_size; it was only linked from the data
                if "img_size" not in str(err) or (model_args and "img_size" in model_args):
                    raise
                self.model_args.pop("img_size")
                self.net = create_model(model, pretrained, **self.model_args)
            self.hparams["model_args"] = dict(self.model_args)  # resolved, so the checkpoint rebuilds the net
        self.num_classes = num_classes or getattr(self.net, "num_classes", None)
        if not isinstance(self.num_classes, int) or self.num_classes < 1:
            raise ValueError(f"num_classes must be a positive int when the model does not say; got {num_classes}")

        self.mixup = None
        if mixup_alpha > 0 or cutmix_alpha > 0:
            self.mixup = Mixup(
                mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, prob=mixup_prob, switch_prob=mixup_switch_prob,
                label_smoothing=label_smoothing, num_classes=self.num_classes,
            )  # fmt: skip
        self.ema = StepEMA(self.net, decay=ema_decay) if ema_decay is not None else None
        self._lr_schedule = WarmupCosine(min_lr_ratio, schedule)  # its step counts are fixed in on_train_start
        self._train_window: torch.Tensor | None = None  # (loss, acc1, batches) summed since the last train log
        self._changed_hparams: dict[str, tuple[Any, Any]] = {}  # resumed with other values: name -> (checkpoint, now)

        top5 = min(5, self.num_classes)
        self.val_acc1 = MulticlassAccuracy(self.num_classes, top_k=1)
        self.val_acc5 = MulticlassAccuracy(self.num_classes, top_k=top5)
        self.test_acc1 = MulticlassAccuracy(self.num_classes, top_k=1)
        self.test_acc5 = MulticlassAccuracy(self.num_classes, top_k=top5)

    @staticmethod
    def _resolve_model_args(
        model_args: dict[str, Any] | None, num_classes: int | None, in_chans: int | None, img_size: int | None
    ) -> dict[str, Any]:
        args = dict(model_args or {})
        for key, value in (("num_classes", num_classes), ("in_chans", in_chans), ("img_size", img_size)):
            if value is None:
                continue
            if key in args and args[key] != value:
                raise ValueError(f"model_args {key}={args[key]!r} does not match the data's {key}={value!r}")
            args[key] = value
        return args

    @property
    def eval_net(self) -> nn.Module:
        """The network used for validation, test, predict and export: the EMA copy if enabled."""
        return self.ema.module if self.ema is not None else self.net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, num_classes]`` of ``x`` ``[B, C, H, W]`` from :attr:`eval_net`."""
        return self.eval_net(x)

    # --- checks -------------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        """Run the network once on a batch shaped like the data, before any training (and refuse Mixup/CutMix with
        context outliers)."""
        data = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if data is None or not hasattr(data, "in_chans"):
            return
        outliers = getattr(data, "context_outliers", 0)
        if stage == "fit" and outliers and self.mixup is not None:
            raise ValueError(
                "Mixup/CutMix (model.mixup_alpha / model.cutmix_alpha) cannot mix the context outliers of "
                f"data.context_outliers={outliers}: set one of them to 0"
            )
        self.check_input(data.in_chans, data.img_size, data.num_classes, getattr(data, "name", "the data"))

    def check_input(self, in_chans: int, img_size: int, num_classes: int, data_name: str = "the data") -> None:
        """Raise a ``ValueError`` naming both sides unless the network takes ``[2, in_chans, img_size, img_size]``
        and returns ``[2, num_classes]``."""
        x = torch.zeros(2, in_chans, img_size, img_size, device=self.device)
        was_training = self.net.training
        self.net.eval()
        try:
            with torch.no_grad():
                out = self.net(x)
        except (RuntimeError, ValueError, TypeError) as err:
            raise ValueError(
                f"model {self.model_name or type(self.net).__name__!r} does not take the images of {data_name} "
                f"(in_chans={in_chans}, img_size={img_size}; model_args={self.model_args}): {err}"
            ) from err
        finally:
            self.net.train(was_training)
        if out.ndim != 2 or out.shape[1] != num_classes:
            raise ValueError(
                f"model {self.model_name or type(self.net).__name__!r} outputs shape {tuple(out.shape)} but "
                f"{data_name} has num_classes={num_classes}"
            )

    # --- steps --------------------------------------------------------------------------------------------
    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Loss of one (Mixup/CutMix-ed) batch; logs ``train/loss``, ``train/acc1`` (means since the last log) and
        ``lr``."""
        images, targets = batch
        if self.mixup is not None:
            if (targets == OUTLIER_LABEL).any():
                raise ValueError(
                    "Mixup/CutMix (model.mixup_alpha / model.cutmix_alpha) cannot mix context outliers (target "
                    f"{OUTLIER_LABEL}): set data.context_outliers=0 or turn Mixup/CutMix off"
                )
            if images.shape[0] % 2:
                raise ValueError(f"Mixup/CutMix need an even batch size, got a batch of {images.shape[0]}")
            mixed, soft = self.mixup(images, targets)
            logits = self.net(mixed)
            loss = SoftTargetCrossEntropy()(logits, soft)
        else:
            logits = self.net(images)
            loss = classification_loss(logits, targets, self.hparams.label_smoothing)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"training loss is {loss.item()} at epoch {self.current_epoch}, step {self.global_step} "
                f"(lr {self.trainer.optimizers[0].param_groups[0]['lr']:.3g}); stopping rather than training on it. "
                "Lower model.lr, set trainer.gradient_clip_val, check the inputs for NaN, or resume from an earlier "
                "checkpoint with --ckpt_path"
            )
        known = targets != OUTLIER_LABEL  # context outliers have no class to be right about
        correct = logits.detach()[known].argmax(dim=-1) == targets[known]
        self._log_train_step(loss.detach(), correct.float().mean(), batch_idx)
        return loss

    def _log_train_step(self, loss: torch.Tensor, acc1: torch.Tensor, batch_idx: int) -> None:
        """Add the batch's loss and accuracy to the running window; on the steps the loggers write (every
        ``trainer.log_every_n_steps``) and on the epoch's last batch, log the window's means and the current lr.

        Each ``self.log`` call costs ~1 ms of Lightning bookkeeping: three per step were ~3 % of a training step of
        the default model on CPU. The mean over the window is also a steadier reading than one batch's value.
        """
        values = torch.stack([loss, acc1, torch.ones_like(acc1)])
        self._train_window = values if self._train_window is None else self._train_window + values
        trainer = self.trainer
        every = trainer.log_every_n_steps
        if not (
            every <= 1
            or (self.global_step + 1) % every == 0
            or batch_idx + 1 >= trainer.num_training_batches
            or trainer.is_last_batch
        ):
            return
        loss_sum, acc_sum, count = self._train_window.unbind()
        self._train_window = None
        self.log("train/loss", loss_sum / count, prog_bar=True)
        self.log("train/acc1", acc_sum / count, prog_bar=True)
        self.log("lr", trainer.optimizers[0].param_groups[0]["lr"], prog_bar=True)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Update the EMA weights once per optimizer step (not per micro-batch under gradient accumulation)."""
        if self.ema is not None:
            self.ema.follow(self.net, self.global_step)

    def _eval_step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> None:
        images, targets = batch
        logits = self.eval_net(images)
        acc1, acc5 = getattr(self, f"{stage}_acc1"), getattr(self, f"{stage}_acc5")
        acc1(logits, targets)
        acc5(logits, targets)
        self.log(f"{stage}/loss", F.cross_entropy(logits, targets), prog_bar=True, sync_dist=True)
        self.log(f"{stage}/acc1", acc1, prog_bar=True)
        self.log(f"{stage}/acc5", acc5)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        """Logs ``val/loss``, ``val/acc1``, ``val/acc5``."""
        self._eval_step(batch, "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        """Logs ``test/loss``, ``test/acc1``, ``test/acc5``."""
        self._eval_step(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        """Returns ``{'probs': [B, num_classes], 'preds': [B]}`` (and ``'targets'`` when the batch has labels)."""
        images = batch[0] if isinstance(batch, list | tuple) else batch
        probs = self.eval_net(images).softmax(dim=-1)
        out = {"probs": probs, "preds": probs.argmax(dim=-1)}
        if isinstance(batch, list | tuple) and len(batch) > 1:
            out["targets"] = batch[1]
        return out

    # --- optimization -------------------------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        """(Fused) AdamW over two parameter groups (decay / no decay) with a per-step warmup + cosine ``LambdaLR``."""
        hp = self.hparams
        no_decay = {name for name, _ in self.net.named_parameters() if name.rsplit(".", 1)[-1] in NO_DECAY_NAMES}
        if hasattr(self.net, "no_weight_decay"):
            no_decay |= set(self.net.no_weight_decay())
        groups = param_groups_weight_decay(self.net, hp.weight_decay, no_weight_decay_list=no_decay)
        for group, decays in zip(groups, (False, True), strict=True):  # timm's order: (no decay, decay)
            group["apply_weight_decay"] = decays  # saved with the optimizer: a resume can set a new weight_decay
        # the fused kernel (CPU and CUDA) is one op over all tensors: ~5x faster than the per-tensor loop on CPU
        fused = all(p.device.type in ("cpu", "cuda") for group in groups for p in group["params"]) or None
        optimizer = torch.optim.AdamW(groups, lr=hp.lr, betas=tuple(hp.betas), fused=fused)

        if hp.schedule == "time" and find_timer(self.trainer) is None:
            raise ValueError("schedule='time' needs a time budget: set trainer.max_time (e.g. '00:00:09:30')")
        # the step counts are only known once the data are set up (on_train_start); asking Lightning for them
        # here would build the train loader before a resumed run restores its position in the epoch
        self._lr_schedule.steps = None
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self.lr_factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def lr_factor(self, step: int) -> float:
        """LR multiplier at optimizer step ``step`` (:class:`~vision_attn.training.schedule.WarmupCosine`). A method,
        so ``LambdaLR`` stores no schedule state in checkpoints: the step counts are fixed anew at every start."""
        return self._lr_schedule(step)

    def on_train_start(self) -> None:
        """Fix the schedule's step counts (rejecting a warmup longer than the run) and set the optimizer's values
        from the hyper-parameters: a run resumed with ``--model.lr`` (``weight_decay``, ``betas``) uses the given
        value, not the one saved in the checkpoint's optimizer state."""
        trainer, hp = self.trainer, self.hparams
        if self.ema is not None:
            self.ema.last_step = self.global_step
        self._train_window = None
        self._lr_schedule.start(trainer, hp.warmup_epochs)
        for config in trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            scheduler.base_lrs = [float(hp.lr)] * len(scheduler.optimizer.param_groups)
            for group in scheduler.optimizer.param_groups:
                decays = group.get("apply_weight_decay", group["weight_decay"] > 0)
                group.update(initial_lr=float(hp.lr), weight_decay=float(hp.weight_decay) if decays else 0.0,
                             betas=tuple(hp.betas), lr=hp.lr * self.lr_factor(scheduler.last_epoch))  # fmt: skip
        if self._changed_hparams and trainer.is_global_zero:
            changes = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in self._changed_hparams.items())
            print(f"resuming with the given model options instead of the checkpoint's: {changes}")

    def export_info(self) -> dict[str, Any]:
        """What rebuilds the network without Lightning and feeds it as validation did: model name and args, the
        data's classes and eval preprocessing (``input_size``, mean/std, ``crop_pct``, ``interpolation``, ...)."""
        info: dict[str, Any] = {"model_name": self.model_name, "model_args": dict(self.model_args)}
        data = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if data is not None:
            for key in ("name", "img_size", "in_chans", "num_classes", "classes"):
                if getattr(data, key, None) is not None:
                    info["data_name" if key == "name" else key] = getattr(data, key)
            info.update(getattr(data, "data_config", None) or {"mean": data.mean, "std": data.std})
        return info

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store :meth:`export_info` under ``checkpoint['vision_attn']`` and the random states (dropout, Mixup) under
        ``checkpoint['rng_states']``, so a resumed run continues as the unbroken one would."""
        checkpoint["vision_attn"] = self.export_info()
        checkpoint["rng_states"] = rng_states()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Check that the checkpoint's weights fit this network and restore the random states saved by
        :meth:`on_save_checkpoint`.

        Values given on the command line or in the config win over the checkpoint's: the network is built from
        them, and the optimizer's (``lr``, ``weight_decay``, ``betas``) are set in :meth:`on_train_start`. A network
        value (``model``, ``model_args``, EMA on/off) whose weights do not fit the checkpoint's is a ``ValueError``
        naming both values.
        """
        self._changed_hparams = changed_hparams(checkpoint.get("hyper_parameters") or {}, self.hparams)
        check_weights_fit(self.state_dict(), checkpoint.get("state_dict") or {}, self._changed_hparams)
        if "rng_states" in checkpoint:
            set_rng_states(checkpoint["rng_states"])
