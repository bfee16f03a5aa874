"""``rollout``: attention rollout (Abnar & Zuidema 2020, "Quantifying Attention Flow in Transformers")."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from vision_attn.explain.flow import flow_rollout
from vision_attn.explain.registry import register_method
from vision_attn.explain.tokens import capture_token_flow


@register_method(
    "rollout",
    needs=("token_attention",),
    description="attention flowing from the tokens the head pools to the patches, through every layer (with the "
    "residual; through token merges and windows on hierarchical models); class-agnostic",
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
    """Attention rollout read at the tokens the head pools, ``[B, gh, gw]`` on the finest token grid; ``target`` is
    not used."""
    if not isinstance(discard_ratio, (int, float)) or not 0.0 <= discard_ratio < 1.0:
        raise ValueError(f"discard_ratio must be a float in [0, 1), got {discard_ratio!r}")
    flow = capture_token_flow(
        model, images, head_fusion=head_fusion, num_prefix_tokens=num_prefix_tokens, grid_size=grid_size
    )
    return flow_rollout(flow, discard_ratio=discard_ratio, start_layer=start_layer)
