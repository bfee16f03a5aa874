"""The learning-rate schedule of the recipe: linear warmup, then cosine down to ``min_lr_ratio``, over the run's
optimizer steps or over its wall-clock budget (``trainer.max_time``)."""

from __future__ import annotations

import math

import lightning as L
from lightning.pytorch.callbacks import Timer

__all__ = ["WarmupCosine", "find_timer"]


def find_timer(trainer: L.Trainer) -> Timer | None:
    """The trainer's ``Timer`` callback (Lightning adds one for ``max_time``), else ``None``."""
    return next((cb for cb in trainer.callbacks if isinstance(cb, Timer)), None)


class WarmupCosine:
    """LR multiplier per optimizer step for ``torch.optim.lr_scheduler.LambdaLR``: 1.0 until :meth:`start` fixes
    the step counts (``LambdaLR`` calls it at construction), then linear warmup and a cosine to ``min_lr_ratio``.

    ``schedule='time'`` runs the cosine over the wall-clock budget of ``timer`` instead of the step count, so a
    time-boxed run anneals fully however fast the machine is.
    """

    def __init__(self, min_lr_ratio: float, schedule: str = "steps") -> None:
        self.min_lr_ratio = min_lr_ratio
        self.schedule = schedule
        self.steps: tuple[int, int] | None = None  # (warmup, total) optimizer steps
        self.timer: Timer | None = None

    def start(self, trainer: L.Trainer, warmup_epochs: float) -> None:
        """Fix the step counts from ``trainer`` (once the data are set up), rejecting a warmup longer than the run
        (except in ``fast_dev_run``) and a step schedule without an end."""
        estimated = trainer.estimated_stepping_batches
        if not math.isfinite(estimated) and self.schedule == "steps":
            raise ValueError(
                f"trainer.max_epochs={trainer.max_epochs} with max_steps={trainer.max_steps} gives a run without end, "
                "but schedule='steps' needs its length: set trainer.max_epochs >= 1 or trainer.max_steps >= 1 (or "
                "model.schedule=time with trainer.max_time)"
            )
        total_steps = max(1, int(estimated)) if math.isfinite(estimated) else 2**62
        steps_per_epoch = max(1, math.ceil(trainer.num_training_batches / trainer.accumulate_grad_batches))
        warmup_steps = round(warmup_epochs * steps_per_epoch)
        if warmup_steps > total_steps:
            if not trainer.fast_dev_run:
                raise ValueError(
                    f"warmup_epochs={warmup_epochs} ({warmup_steps} steps) is longer than the run "
                    f"({total_steps} steps: trainer.max_epochs={trainer.max_epochs}, max_steps={trainer.max_steps})"
                )
            warmup_steps = total_steps
        self.steps = (warmup_steps, total_steps)
        self.timer = find_timer(trainer)

    def __call__(self, step: int) -> float:
        """LR multiplier at optimizer step ``step``."""
        if self.steps is None:
            return 1.0
        warmup_steps, total_steps = self.steps
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if self.schedule == "time" and self.timer is not None:
            elapsed = self.timer.time_elapsed("train")
            progress = elapsed / max(1e-9, elapsed + self.timer.time_remaining("train"))
        else:
            progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, max(0.0, progress))))
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * cosine
