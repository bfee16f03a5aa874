"""``spatial``: the attention CNNs' own maps (CBAM and coordinate-attention gates; the attention each position
receives in non-local blocks, AA-conv and BoT)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from vision_attn.explain._common import NotApplicableError, check_logits, normalize_maps, upsample_maps
from vision_attn.explain.capture import AttentionRecorder
from vision_attn.explain.registry import register_method


def _received_attention(attention: torch.Tensor, image_size: tuple[int, int], name: str) -> torch.Tensor:
    """Attention each key position receives, mean over heads and queries: ``[B, h, Nq, Nk] -> [B, gh, gw]``.

    The key grid follows the image's aspect ratio (``gh * gw == Nk``, ``gh / gw ~ H / W``).
    """
    num_keys = attention.shape[-1]
    height, width = image_size
    gh = max(1, round(math.sqrt(num_keys * height / width)))
    gw = num_keys // gh
    if gh * gw != num_keys:
        raise ValueError(
            f"attention map {name} has {num_keys} key positions, which fit no grid of the image's aspect "
            f"{height}x{width}"
        )
    return attention.float().mean(dim=(1, 2)).reshape(-1, gh, gw)


@register_method(
    "spatial",
    needs=("spatial_attention",),
    description="the attention CNN modules' own spatial maps (gates; attention received), each scaled to [0, 1], "
    "averaged over modules; class-agnostic",
    reference="Woo et al. 2018 (CBAM); Hou et al. 2021; Wang et al. 2018; Bello et al. 2019; Srinivas et al. 2021",
)
def spatial(
    model: nn.Module,
    images: torch.Tensor,
    target: int | Sequence[int] | torch.Tensor | None = None,
    layer: int | None = None,
) -> torch.Tensor:
    """The mean of every spatial attention map (or only map ``layer``), ``[B, H, W]``; ``target`` is not used."""
    size = (images.shape[-2], images.shape[-1])
    with torch.no_grad(), AttentionRecorder(model) as recorder:
        check_logits(model(images), model)
    maps = []
    for name, tensor in recorder.maps.items():
        if recorder.kinds[name] == "spatial":
            maps.append(tensor.float().mean(dim=1))  # B, 1|C, h, w -> B, h, w
        elif recorder.kinds[name] == "attention" and name not in recorder.token_names and tensor.ndim == 4:
            maps.append(_received_attention(tensor, size, name))
    if not maps:
        kinds = sorted(set(recorder.kinds.values()))
        raise NotApplicableError(
            f"model {type(model).__name__} has no spatial attention maps (AttentionTap kind 'spatial' or conv "
            f"attention 'attention'); found kinds {kinds}"
        )
    if layer is not None:
        if not isinstance(layer, int) or not -len(maps) <= layer < len(maps):
            raise ValueError(f"layer {layer!r} is out of range for {len(maps)} spatial maps")
        maps = [maps[layer]]
    return torch.stack([normalize_maps(upsample_maps(m, size)) for m in maps]).mean(dim=0)
