"""``gradient_rollout``: gradient-weighted attention rollout (Chefer et al. 2021, "Generic Attention-model
Explainability for Interpreting Bi-Modal and Encoder-Decoder Transformers")."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from vision_attn.explain.flow import flow_gradient_rollout
from vision_attn.explain.registry import register_method
from vision_attn.explain.tokens import capture_token_flow


@register_method(
    "gradient_rollout",
    needs=("token_attention", "class_target"),
    description="rollout of the attention weighted by its gradient for the target class (positive part, mean "
    "over heads)",
    reference="Chefer et al. 2021 (generic attention explainability)",
)
def gradient_rollout(
    model: nn.Module,
    images: torch.Tensor,
    target: int | Sequence[int] | torch.Tensor | None = None,
    num_prefix_tokens: int | None = None,
    grid_size: int | Sequence[int] | None = None,
) -> torch.Tensor:
    """Gradient-weighted rollout of the ``target`` logits (``None``: the predicted classes), ``[B, gh, gw]``."""
    flow = capture_token_flow(
        model, images, target, gradients=True, num_prefix_tokens=num_prefix_tokens, grid_size=grid_size
    )
    return flow_gradient_rollout(flow)
