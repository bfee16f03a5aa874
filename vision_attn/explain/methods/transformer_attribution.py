"""``transformer_attribution``: Chefer, Gur & Wolf, CVPR 2021, "Transformer Interpretability Beyond Attention
Visualization" (LRP relevance of the attention maps times their gradients, rolled out over the blocks)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from vision_attn.explain.registry import register_method
from vision_attn.explain.relevance import _transformer_attribution


@register_method(
    "transformer_attribution",
    needs=("token_attention", "token_embeddings", "class_target"),
    description="rollout of the attention maps' LRP relevance times their gradient for the target class "
    "(positive part, mean over heads)",
    reference="Chefer, Gur & Wolf 2021",
)
def transformer_attribution(
    model: nn.Module,
    images: torch.Tensor,
    target: int | Sequence[int] | torch.Tensor | None = None,
    start_layer: int = 0,
    linear_rule: str = "alpha1beta0",
) -> torch.Tensor:
    """Transformer Attribution of the ``target`` logits, ``[B, gh, gw]`` (see
    :func:`vision_attn.explain.relevance.transformer_attribution`)."""
    return _transformer_attribution(model, images, target, start_layer, linear_rule)
