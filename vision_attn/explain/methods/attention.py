"""``attention``: one layer's raw attention (Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words", Fig. 6)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from vision_attn.explain.registry import register_method
from vision_attn.explain.rollout import last_layer_attention
from vision_attn.explain.tokens import capture_token_attention


@register_method(
    "attention",
    needs=("token_attention",),
    description="one layer's attention (default the last) from the tokens the head pools to the patches; "
    "class-agnostic",
    reference="Dosovitskiy et al. 2021",
)
def attention(
    model: nn.Module,
    images: torch.Tensor,
    target: int | Sequence[int] | torch.Tensor | None = None,
    head_fusion: str = "mean",
    layer: int = -1,
    num_prefix_tokens: int | None = None,
    grid_size: int | Sequence[int] | None = None,
) -> torch.Tensor:
    """Raw attention of layer ``layer``, heads fused by ``head_fusion``, ``[B, gh, gw]``; ``target`` is not used."""
    tokens = capture_token_attention(model, images, num_prefix_tokens=num_prefix_tokens, grid_size=grid_size)
    return last_layer_attention(
        tokens.attentions, tokens.num_prefix_tokens, head_fusion, tokens.grid, layer, tokens.readout
    )
