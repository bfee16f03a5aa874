"""Multiscale transformers that pool queries inside their attention: MViTv2 (Li et al. 2022, "MViTv2: Improved
Multiscale Vision Transformers") and Hiera (Ryali et al. 2023, "Hiera: A Hierarchical Vision Transformer without the
Bells-and-Whistles").

Rules (ours): an attention layer whose queries are pooled is an operator from the fine tokens to the coarse ones;
its attention rows (over keys pooled from the fine tokens, each standing for the tokens under its pooling window with
equal shares) are placed at the coarse tokens, and its residual path, a pooling of the fine tokens, is a merge (each
coarse token the mean of its window's tokens) instead of the identity. Hiera keeps its tokens "unrolled" (mask units
interleaved): its adapter runs the model's own ``Unroll`` on token indices to place them on the grid, and reads mask
unit attention as window attention over the tokens of each unit.
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
    conv_sources,
    head_pool_type,
    modules_of,
    readout_weights,
    register_adapter,
)
from vision_attn.explain.families.windows import BlockInfo, HierarchicalAdapter
from vision_attn.explain.flow import TokenFlow, TokenGrid, TokenMap, TokenMix, attention_mix, merge_mix

__all__ = ["HieraAdapter"]


# --- MViTv2 ----------------------------------------------------------------------------------------------------------


def _window(module: nn.Module | None, grid: tuple[int, int]) -> tuple[tuple[int, int], list[list[int]]] | None:
    if module is None:
        return None
    return conv_sources(grid, module.kernel_size, module.stride, module.padding)


def _mvit_classes() -> dict[str, Any]:
    from timm.models import mvitv2

    def block(module: nn.Module, args: tuple[Any, ...]) -> BlockInfo:
        x, feat_size = args[0], args[1]
        grid = (int(feat_size[0]), int(feat_size[1]))
        attn = module.attn
        keys = _window(attn.pool_k, grid)
        queries = _window(attn.pool_q, grid)
        skip = _window(module.shortcut_pool_attn, grid)
        if queries is not None:
            queries = (queries[0], skip[1] if skip is not None and skip[0] == queries[0] else None)
            if queries[1] is None and queries[0] != grid:
                raise NotApplicableError("an MViTv2 block pools its queries without a pooled shortcut")
        return BlockInfo(grid, [None], keys=keys, queries=queries, prefix=int(x.shape[1]) - grid[0] * grid[1])

    return {"blocks": {mvitv2.MultiScaleBlock: (block, ("attn",))}}


def _mvit_readout(model: nn.Module, tokens: TokenGrid) -> torch.Tensor:
    return readout_weights(model.global_pool or "avg", tokens, type(model).__name__)


def _mvit_cam(model: nn.Module) -> tuple[nn.Module, FeatureLayout]:
    return model.stages[-1].blocks[-1].norm1, FeatureLayout("tokens", model.num_prefix_tokens)


register_adapter(
    HierarchicalAdapter(
        "MViTv2",
        _mvit_classes,
        readout=_mvit_readout,
        layout=lambda m: "bhqk",
        embedding_layout="tokens",
        cam=_mvit_cam,
    )
)


# --- Hiera -----------------------------------------------------------------------------------------------------------


def _hiera_classes() -> tuple[type, type]:
    from timm.models import hiera

    return hiera.HieraBlock, hiera.MaskUnitAttention


class HieraAdapter(FamilyAdapter):
    """Hiera: unrolled tokens, mask unit attention, query pooling (see the module docstring)."""

    family = "Hiera"

    def matches(self, model: nn.Module) -> bool:
        block, _ = _hiera_classes()
        unroll = getattr(model, "unroll", None)
        return isinstance(unroll, nn.Module) and any(isinstance(m, block) for m in model.modules())

    def problem(self, model: nn.Module) -> str:
        pool = head_pool_type(model)
        if pool not in ("avg", None, ""):
            return f"model {type(model).__name__} (Hiera) pools by {pool!r}; the token methods read average pooling"
        return ""

    def owners(self, model: nn.Module) -> dict[str, nn.Module]:
        owners = dict(modules_of(model, _hiera_classes()[1]))
        self._layouts = {n: "bhwqk" if m.use_mask_unit_attn else "bhqk" for n, m in owners.items()}
        return owners

    def layout(self, name: str) -> str:
        return self._layouts.get(name, "bhqk")

    def observe(self, model: nn.Module, recorder: Any) -> None:
        def report(module: nn.Module, args: tuple[Any, ...], out: Any) -> Any:
            return ("unroll", tuple(args[0].shape))

        recorder.observe(model.unroll, report, name="unroll")
        for name, block in modules_of(model, _hiera_classes()[0]):
            recorder.observe(block, lambda m, args, out: ("block", int(args[0].shape[1])), pre=True, name=name)

    def describe(
        self, model: nn.Module, events: list[tuple[str, str, Any]], weights: list[torch.Tensor], capture: Capture
    ) -> TokenFlow:
        name = type(model).__name__
        grid = self._grid(model, capture)
        count = grid[0] * grid[1]
        order = model.unroll(torch.arange(count, dtype=torch.float64).reshape(1, count, 1)).reshape(-1).round().long()
        raster = TokenGrid(0, grid)
        current = TokenGrid(0, None, count)
        mixes: list[TokenMix] = [merge_mix("unroll", raster, current, [[int(i)] for i in order])]
        blocks = dict(modules_of(model, _hiera_classes()[0]))
        block = None
        for kind, where, payload in events:
            if kind == "context" and isinstance(payload, tuple) and payload[0] == "block":
                block = blocks[where]
                if payload[1] != current.num_tokens:
                    raise NotApplicableError(f"model {name}: block {where} got {payload[1]} tokens")
            elif kind == "attention":
                mixes.append(self._block_mix(where, block, weights[payload], current))
                current = mixes[-1].target
        readout = readout_weights("avg", current, name)
        return TokenFlow(mixes, readout, family=self.family)

    @staticmethod
    def _grid(model: nn.Module, capture: Capture) -> tuple[int, int]:
        size = getattr(model, "tokens_spatial_shape", None)
        if size is None or len(size) != 2:
            raise NotApplicableError(f"model {type(model).__name__} has no 2-D token grid (tokens_spatial_shape)")
        return int(size[0]), int(size[1])

    @staticmethod
    def _block_mix(name: str, block: nn.Module, weights: torch.Tensor, tokens: TokenGrid) -> TokenMix:
        attn = block.attn
        count = tokens.num_tokens
        stride = int(attn.q_stride)
        out = TokenGrid(0, None, count // stride)
        windows = weights.shape[-3]
        per_window = count // windows  # tokens per mask unit: t = u * windows + w
        unit = torch.arange(per_window)[None, :] * windows + torch.arange(windows)[:, None]  # W, T
        pooled = torch.arange(per_window // stride)[None, :] * windows + torch.arange(windows)[:, None]  # W, T'
        skip = None
        if stride > 1:  # max pooling of the residual: coarse t' from t = s * (N / stride) + t'
            sources = [[s * out.num_tokens + t for s in range(stride)] for t in range(out.num_tokens)]
            skip = TokenMap.from_sources(sources, count)
        return attention_mix(name, tokens, weights, queries=pooled, keys=unit, target=out, skip=skip)

    def cam_layer(self, model: nn.Module) -> tuple[nn.Module, FeatureLayout] | None:
        last = len(model.blocks) - 1

        def spatial(x: torch.Tensor) -> torch.Tensor:  # unrolled tokens -> B, C, h, w (Hiera's own reroll)
            return model.reroll(x, last).permute(0, 3, 1, 2)

        return model.blocks[last], FeatureLayout("custom", convert=spatial)


register_adapter(HieraAdapter())
