"""Token pooling heads."""

from __future__ import annotations

import torch
from torch import nn

from vision_attn.layers.attention_tap import AttentionTap

__all__ = ["SequencePool"]


class SequencePool(nn.Module):
    """Sequence pooling of CCT (Hassani et al. 2021): softmax-weighted mean of the tokens.

    ``[B, N, C] -> [B, C]`` with weights ``softmax_N(Linear(C, 1)(x))``; the weights pass through an
    :class:`~vision_attn.layers.attention_tap.AttentionTap` (kind ``'pool'``) so attention maps can read the tokens
    the head pools (no parameters: the state dict is unchanged).
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.attention_pool = nn.Linear(dim, 1)
        self.weights_tap = AttentionTap("pool")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = self.weights_tap(self.attention_pool(x).softmax(dim=1))  # B, N, 1
        return (weights.transpose(1, 2) @ x).squeeze(1)
