"""Class attention: CaiT (Touvron et al. 2021, "Going deeper with Image Transformers") and XCiT (El-Nouby et al.
2021, "XCiT: Cross-Covariance Image Transformers").

Both run a self-attention stack over the patch tokens alone, then a few class-attention layers in which only the
class token (joined there) queries the class and patch tokens; the patch tokens pass those layers unchanged. Rollout
runs over the self-attention stack, and the class-attention rows are the readout composed with it: each
class-attention layer is a token operator whose class row is its attention (plus the residual) and whose patch rows
are the identity; the class token, a parameter, takes nothing from below when it joins. CaiT's talking-heads
self-attention is read at its softmax (before the heads are mixed: the mean over the pre-mixing heads is a
row-stochastic map, ours). XCiT's cross-covariance attention is over channels, not tokens: left out, with that
reason (its local patch interaction is a convolution, which rollout does not follow, like the MLPs).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vision_attn.explain._common import NotApplicableError
from vision_attn.explain.families.base import (
    Capture,
    FamilyAdapter,
    FeatureLayout,
    modules_of,
    readout_weights,
    register_adapter,
)
from vision_attn.explain.flow import TokenFlow, TokenGrid, TokenMix, attention_mix, merge_mix

__all__ = ["ClassAttentionAdapter"]


def _classes() -> dict[str, tuple[type, ...]]:
    from timm.models import cait, xcit

    return {
        "self": (cait.TalkingHeadAttn,),
        "class": (cait.ClassAttn,),
        "blocks": (cait.LayerScaleBlockClassAttn, xcit.ClassAttentionBlock),
        "skip": (xcit.XCA,),
    }


class ClassAttentionAdapter(FamilyAdapter):
    """CaiT and XCiT (see the module docstring)."""

    family = "CaiT / XCiT"

    def matches(self, model: nn.Module) -> bool:
        return any(isinstance(m, _classes()["blocks"]) for m in model.modules())

    def problem(self, model: nn.Module) -> str:
        pool = getattr(model, "global_pool", "token")
        if pool not in ("token", "avg"):
            return f"model {type(model).__name__} pools its tokens by {pool!r}; the token methods read 'token' or 'avg'"
        return ""

    def owners(self, model: nn.Module) -> dict[str, nn.Module]:
        classes = _classes()
        return dict(modules_of(model, classes["self"] + classes["class"]))

    def skipped(self, model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
        reason = "cross-covariance attention ([heads, C, C]) mixes channels, not tokens"
        return {n: (m, reason) for n, m in modules_of(model, _classes()["skip"])}

    def _grid(self, model: nn.Module, capture: Capture, count: int) -> tuple[int, int]:
        patch = getattr(model.patch_embed, "patch_size", None)
        grid = getattr(model.patch_embed, "grid_size", None)
        if grid is None and patch is not None:
            ph, pw = (patch, patch) if isinstance(patch, int) else patch
            grid = (capture.image_size[0] // ph, capture.image_size[1] // pw)
        if grid is None or grid[0] * grid[1] != count:
            raise NotApplicableError(f"model {type(model).__name__} has {count} patch tokens; its grid is {grid}")
        return int(grid[0]), int(grid[1])

    def describe(
        self, model: nn.Module, events: list[tuple[str, str, Any]], weights: list[torch.Tensor], capture: Capture
    ) -> TokenFlow:
        name = type(model).__name__
        class_owners = {n for n, _ in modules_of(model, _classes()["class"])}
        calls = [(n, weights[i]) for kind, n, i in events if kind == "attention"]
        first_class = next((i for i, (n, _) in enumerate(calls) if n in class_owners), None)
        if first_class is None:
            raise NotApplicableError(f"model {name} ran no class attention")
        self_calls, class_calls = calls[:first_class], calls[first_class:]
        count = class_calls[0][1].shape[-1] - 1
        patches = TokenGrid(0, self._grid(model, capture, count))
        with_class = TokenGrid(1, patches.grid)
        mixes: list[TokenMix] = [attention_mix(n, patches, w) for n, w in self_calls]
        joined = [[]] + [[i] for i in range(count)]  # the class token joins: a parameter, no source
        mixes.append(merge_mix("class token", patches, with_class, joined))
        for n, w in class_calls:
            if n not in class_owners or w.shape[-2] != 1:
                raise NotApplicableError(f"model {name}: {n} ran among the class-attention layers with shape {w.shape}")
            mixes.append(attention_mix(n, with_class, w, queries=torch.zeros(1, 1, dtype=torch.long)))
        pool = getattr(model, "global_pool", "token") or "token"
        return TokenFlow(mixes, readout_weights(pool, with_class, name), family=self.family)

    def cam_layer(self, model: nn.Module) -> tuple[nn.Module, FeatureLayout] | None:
        return model.blocks[-1], FeatureLayout("tokens", 0)


register_adapter(ClassAttentionAdapter())
