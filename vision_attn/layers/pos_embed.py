"""Absolute position embeddings: fixed 2-D sin-cos tables and resampling of learned ones (timm helpers)."""

from __future__ import annotations

import torch
from timm.layers import resample_abs_pos_embed
from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed

__all__ = ["resample_abs_pos_embed", "sincos_2d_pos_embed"]


def sincos_2d_pos_embed(grid_size: tuple[int, int], dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """Return fixed 2-D sin-cos position embeddings ``[1, gh * gw, dim]`` (MoCo v3 / MAE layout)."""
    if dim % 4:
        raise ValueError(f"embed_dim {dim} must be divisible by 4 for sin-cos position embeddings")
    return build_sincos2d_pos_embed(list(grid_size), dim=dim, temperature=temperature).unsqueeze(0)
