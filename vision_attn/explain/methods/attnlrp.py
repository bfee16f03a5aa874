"""``attnlrp``: Achtibat et al., ICML 2024, "AttnLRP: Attention-Aware Layer-wise Relevance Propagation for
Transformers" (efficient form: one forward, one backward pass with the paper's rules per operation)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from vision_attn.explain.registry import register_method
from vision_attn.explain.relevance import attnlrp as attnlrp_relevance


@register_method(
    "attnlrp",
    needs=("token_embeddings", "class_target"),
    description="LRP relevance of each token embedding for the target class, with AttnLRP's rules for softmax, "
    "products, norms and non-linearities",
    reference="Achtibat et al. 2024",
)
def attnlrp(
    model: nn.Module, images: torch.Tensor, target: int | Sequence[int] | torch.Tensor | None = None
) -> torch.Tensor:
    """AttnLRP relevance of the patch tokens for the ``target`` logits, ``[B, gh, gw]`` (see
    :func:`vision_attn.explain.relevance.attnlrp`)."""
    return attnlrp_relevance(model, images, target)
