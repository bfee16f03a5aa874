"""``attnlrp``: Achtibat et al., ICML 2024, "AttnLRP: Attention-Aware Layer-wise Relevance Propagation for
Transformers" (efficient form: one forward, one backward pass with the paper's rules per operation)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from vision_attn.explain._common import apply_sign
from vision_attn.explain.registry import register_method
from vision_attn.explain.relevance import attnlrp as attnlrp_relevance


@register_method(
    "attnlrp",
    needs=("token_embeddings", "class_target"),
    description="LRP relevance of each token embedding (or pixel) for the target class, with AttnLRP's rules for "
    "softmax, products, norms and non-linearities; its positive part by default",
    reference="Achtibat et al. 2024",
)
def attnlrp(
    model: nn.Module,
    images: torch.Tensor,
    target: int | Sequence[int] | torch.Tensor | None = None,
    level: str = "tokens",
    sign: str = "positive",
    linear_gamma: float | None = None,
    conv_gamma: float | None = None,
    attention_rule: str = "attnlrp",
) -> torch.Tensor:
    """AttnLRP relevance for the ``target`` logits of the patch tokens, ``[B, gh, gw]`` (or of the pixels with
    ``level='pixels'``, ``[B, H, W]``), its ``sign`` part; ``linear_gamma`` / ``conv_gamma`` (LRP-gamma on linear
    layers / convolutions) and ``attention_rule='cp'`` (CP-LRP) as in :func:`vision_attn.explain.relevance.attnlrp`."""
    relevance = attnlrp_relevance(
        model, images, target, level=level, linear_gamma=linear_gamma, conv_gamma=conv_gamma,
        attention_rule=attention_rule,
    )  # fmt: skip
    return apply_sign(relevance, sign)
