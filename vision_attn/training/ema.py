"""Weight EMA that follows optimizer steps, not micro-batches (timm's ``ModelEmaV3``)."""

from __future__ import annotations

from timm.utils import ModelEmaV3
from torch import nn

__all__ = ["StepEMA"]


class StepEMA(ModelEmaV3):
    """timm's ``ModelEmaV3`` (its copy is ``.module``, so checkpoints hold ``ema.module.*``), updated at most once
    per optimizer step: under gradient accumulation Lightning ends several batches on one step. Never trained by
    the optimizer (and invisible to DDP)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        super().__init__(model, decay=decay)
        self.requires_grad_(False)
        self.last_step = -1

    def follow(self, model: nn.Module, step: int) -> None:
        """Update from ``model`` if optimizer step ``step`` has not been followed yet."""
        if step != self.last_step:
            self.last_step = step
            self.update(model, step=step)
