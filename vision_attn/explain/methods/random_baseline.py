"""``random``: random maps, the baseline every localisation score is read against."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from vision_attn.explain.metrics import random_maps
from vision_attn.explain.registry import register_method
from vision_attn.explain.rollout import check_grid_size


@register_method("random", description="uniform random maps (seeded): the chance level of every score")
def random(
    model: nn.Module,
    images: torch.Tensor,
    target: int | Sequence[int] | torch.Tensor | None = None,
    seed: int = 0,
    grid_size: int | Sequence[int] | None = None,
) -> torch.Tensor:
    """Random maps ``[B, H, W]`` (``[B, gh, gw]`` cells with ``grid_size``), the same for a given ``seed``; the model
    is not run."""
    grid = None if grid_size is None else check_grid_size(grid_size)
    return random_maps(images.shape[0], tuple(images.shape[-2:]), grid_size=grid, seed=int(seed))
