"""``attention``: one layer's raw attention (Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words", Fig. 6), or an
attention-pool head's own map (``layer='pool'``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from vision_attn.explain._common import NotApplicableError
from vision_attn.explain.flow import flow_attention, flow_pool_map
from vision_attn.explain.registry import register_method
from vision_attn.explain.tokens import capture_token_flow


@register_method(
    "attention",
    needs=("token_attention",),
    description="one layer's attention (default the last) from the tokens the head pools to the patches, or an "
    "attention-pool head's own map (layer='pool'); class-agnostic",
    reference="Dosovitskiy et al. 2021",
)
def attention(
    model: nn.Module,
    images: torch.Tensor,
    target: int | Sequence[int] | torch.Tensor | None = None,
    head_fusion: str = "mean",
    layer: int | str = -1,
    num_prefix_tokens: int | None = None,
    grid_size: int | Sequence[int] | None = None,
) -> torch.Tensor:
    """Raw attention of layer ``layer`` (an index among the attention layers), heads fused by ``head_fusion``, read
    with the head's readout and carried to the finest grid through token merges; ``layer='pool'``: the
    attention-pool head's query attention over the tokens (mean over heads and latents). ``[B, gh, gw]``; ``target``
    is not used."""
    if isinstance(layer, str) and layer != "pool":
        raise ValueError(f"layer {layer!r} is unknown; expected an attention-layer index or 'pool'")
    flow = capture_token_flow(
        model, images, head_fusion=head_fusion, num_prefix_tokens=num_prefix_tokens, grid_size=grid_size
    )
    if layer == "pool":
        if not flow.pool:
            raise NotApplicableError(
                f"attention(layer='pool') shows an attention-pool head's map, but model {type(model).__name__} has no "
                "attention-pool head (timm AttentionPoolLatent, global_pool='map'); use an attention-layer index"
            )
        return flow_pool_map(flow)
    return flow_attention(flow, layer)
