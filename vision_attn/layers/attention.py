"""Multi-head self-attention: one module, a fused SDPA fast path and an explicit softmax path."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from timm.layers import use_fused_attn
from torch import nn

__all__ = ["Attention"]


class Attention(nn.Module):
    """Multi-head self-attention with timm's parameter names (``qkv``, ``q_norm``, ``k_norm``, ``proj``).

    ``fused_attn`` selects ``F.scaled_dot_product_attention``; otherwise probabilities are computed explicitly
    and pass through ``attn_drop`` — the single place they exist, hooked by ``AttentionRecorder``.

    Locality Self-Attention (Lee et al. 2021, "Vision Transformer for Small-Size Datasets") is enabled with
    ``learned_temperature=True`` (a learnable per-head softmax temperature, initialised at ``head_dim**-0.5``)
    and ``diagonal_mask=True`` (a token does not attend to itself).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
        learned_temperature: bool = False,
        diagonal_mask: bool = False,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.fused_attn = use_fused_attn()
        self.diagonal_mask = diagonal_mask
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.log_temperature = (
            nn.Parameter(torch.full((num_heads, 1, 1), math.log(self.scale))) if learned_temperature else None
        )
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each B, H, N, D
        q, k = self.q_norm(q), self.k_norm(k)
        scale = self.scale
        if self.log_temperature is not None:
            q, scale = q * self.log_temperature.exp(), 1.0
        mask = ~torch.eye(N, dtype=torch.bool, device=x.device) if self.diagonal_mask else None  # True = attend

        if self.fused_attn:
            x = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=self.attn_drop.p if self.training else 0.0, scale=scale
            )
        else:
            attn = (q * scale) @ k.transpose(-2, -1)  # B, H, N, N
            if mask is not None:
                attn = attn.masked_fill(~mask, float("-inf"))
            attn = self.attn_drop(attn.softmax(dim=-1))
            x = attn @ v

        x = x.transpose(1, 2).reshape(B, N, C)  # B, H, N, D -> B, N, C
        return self.proj_drop(self.proj(x))
