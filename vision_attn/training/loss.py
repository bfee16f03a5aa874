"""The recipe's classification loss, with outlier exposure for context-only images."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from vision_attn.data.outliers import OUTLIER_LABEL

__all__ = ["classification_loss"]


def classification_loss(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Label-smoothed cross-entropy, averaged over the batch; an image whose target is ``OUTLIER_LABEL`` (-1: a
    context-only image from ``data.context_outliers``) counts as the cross-entropy against the uniform distribution
    instead (outlier exposure, Hendrycks et al. 2019)."""
    outlier = targets == OUTLIER_LABEL
    if not outlier.any():
        return F.cross_entropy(logits, targets, label_smoothing=label_smoothing)
    known = ~outlier
    loss = F.cross_entropy(logits[known], targets[known], label_smoothing=label_smoothing, reduction="sum")
    uniform = -logits[outlier].log_softmax(dim=-1).mean(dim=-1).sum()
    return (loss + uniform) / targets.shape[0]
