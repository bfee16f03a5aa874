"""``rollout``: attention rollout (Abnar & Zuidema 2020, "Quantifying Attention Flow in Transformers")."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from vision_attn.explain.registry import register_method
from vision_attn.explain.rollout import attention_rollout
from vision_attn.explain.tokens import capture_token_attention


@register_method(
    "rollout",
    needs=("token_attention",),
    description="attention flowing from the tokens the head pools to the patches, through every layer (with the "
    "residual); class-agnostic",
    reference="Abnar & Zuidema 2020",
)
def rollout(
    model: nn.Module,
    images: torch.Tensor,
    target: int | Sequence[int] | torch.Tensor | None = None,
    head_fusion: str = "mean",
    discard_ratio: float = 0.0,
    start_layer: int = 0,
    num_prefix_tokens: int | None = None,
    grid_size: int | Sequence[int] | None = None,
) -> torch.Tensor:
    """Attention rollout read at the tokens the head pools, ``[B, gh, gw]``; ``target`` is not used."""
    tokens = capture_token_attention(model, images, num_prefix_tokens=num_prefix_tokens, grid_size=grid_size)
    return attention_rollout(
        tokens.attentions, tokens.num_prefix_tokens, head_fusion, discard_ratio, tokens.grid, start_layer,
        tokens.readout,
    )  # fmt: skip
