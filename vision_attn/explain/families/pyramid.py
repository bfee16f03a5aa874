"""Pyramid transformers with spatially reduced keys or local groups, and pooling between stages: Twins (Chu et al.
2021), PVT v2 (Wang et al. 2022) and PiT (Heo et al. 2021).

Rules (the placement rules are ours): a spatially reduced key (a strided convolution or an adaptive pooling of the
grid) stands for the grid tokens under its window, with equal shares, so a query's attention over the keys spreads
over the tokens each key was built from (rows still sum to 1); Twins' locally grouped attention is window attention
(windows placed at their tokens' grid positions, padding no token); the patch embedding that starts each stage (a
strided convolution) and PiT's pooling (a strided depthwise convolution; class tokens pass through their own linear
layer) merge each coarse token from the fine tokens under its window. Convolutional position encodings and
depthwise convolutions in the MLPs are convolutions, which rollout does not follow (like the MLPs).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vision_attn.explain.families.base import (
    FeatureLayout,
    adaptive_sources,
    conv_sources,
    readout_weights,
    register_adapter,
)
from vision_attn.explain.families.windows import BlockInfo, HierarchicalAdapter, MergeInfo, StageInfo
from vision_attn.explain.flow import TokenGrid

__all__: list[str] = []


def _conv(module: nn.Module, grid: tuple[int, int]) -> tuple[tuple[int, int], list[list[int]]]:
    return conv_sources(grid, module.kernel_size, module.stride, module.padding)


def _grid(size: Any) -> tuple[int, int]:
    return int(size[0]), int(size[1])


# --- Twins -------------------------------------------------------------------------------------------------------


def _twins_classes() -> dict[str, Any]:
    from timm.models import twins

    def local(module: nn.Module, args: tuple[Any, ...]) -> BlockInfo:
        ws = int(module.ws)

        def partition(t: torch.Tensor) -> torch.Tensor:  # 1, Hp, Wp, 1 -> windows, ws * ws (LocallyGroupedAttn)
            _, hp, wp, _ = t.shape
            return t.reshape(1, hp // ws, ws, wp // ws, ws, 1).transpose(2, 3).reshape(-1, ws * ws)

        return BlockInfo(_grid(args[1]), [partition], pad_to=(ws, ws))

    def subsampled(module: nn.Module, args: tuple[Any, ...]) -> BlockInfo:
        grid = _grid(args[1])
        keys = _conv(module.sr, grid) if module.sr is not None else None
        return BlockInfo(grid, [None], keys=keys)

    def embed(module: nn.Module, args: tuple[Any, ...], out: Any) -> MergeInfo:
        grid = _grid(args[0].shape[-2:])
        size, sources = _conv(module.proj, grid)
        return MergeInfo(grid, size, sources)

    return {
        "blocks": {twins.LocallyGroupedAttn: (local, ("",)), twins.GlobalSubSampleAttn: (subsampled, ("",))},
        "merges": {twins.PatchEmbed: embed},
    }


def _twins_layout(module: nn.Module) -> str:
    from timm.models import twins

    return "bwhqk" if isinstance(module, twins.LocallyGroupedAttn) else "bhqk"


register_adapter(
    HierarchicalAdapter(
        "Twins", _twins_classes, layout=_twins_layout, embedding=lambda m: m.patch_embeds[0], embedding_layout="tokens"
    )
)


# --- PVT v2 --------------------------------------------------------------------------------------------------------


def _pvt_classes() -> dict[str, Any]:
    from timm.models import pvt_v2

    def attention(module: nn.Module, args: tuple[Any, ...]) -> BlockInfo:
        grid = _grid(args[1])
        keys = None
        if module.pool is not None:  # linear PVT: adaptive average pooling to 7x7, then a 1x1 convolution
            out = _grid(module.pool.output_size if not isinstance(module.pool.output_size, int) else (7, 7))
            keys = (out, adaptive_sources(grid, out))
        elif module.sr is not None:
            keys = _conv(module.sr, grid)
        return BlockInfo(grid, [None], keys=keys)

    def embed(module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> MergeInfo:
        grid = _grid(args[0].shape[-2:])
        size, sources = _conv(module.proj, grid)
        return MergeInfo(grid, size, sources)

    return {"blocks": {pvt_v2.Attention: (attention, ("",))}, "merges": {pvt_v2.OverlapPatchEmbed: embed}}


register_adapter(HierarchicalAdapter("PVT v2", _pvt_classes, layout=lambda m: "bhqk", embedding_layout="nhwc"))


# --- PiT -----------------------------------------------------------------------------------------------------------


def _pit_classes() -> dict[str, Any]:
    from timm.models import pit
    from timm.models.vision_transformer import Block

    def stage(module: nn.Module, args: tuple[Any, ...]) -> StageInfo:
        x, cls_tokens = args[0]
        return StageInfo(_grid(x.shape[-2:]), int(cls_tokens.shape[1]))

    def block(module: nn.Module, args: tuple[Any, ...]) -> BlockInfo:
        return BlockInfo(None, [None])

    def pooling(module: nn.Module, args: tuple[Any, ...], out: Any) -> MergeInfo:
        grid = _grid(args[0].shape[-2:])
        size, sources = _conv(module.conv, grid)
        return MergeInfo(grid, size, sources)

    return {
        "blocks": {Block: (block, ("attn",))},
        "stages": {pit.Transformer: stage},
        "merges": {pit.Pooling: pooling},
        "marker": (pit.Transformer,),
    }


def _pit_readout(model: nn.Module, tokens: TokenGrid) -> torch.Tensor:
    pool = "distilled" if getattr(model, "head_dist", None) is not None else model.global_pool
    return readout_weights(pool, tokens, type(model).__name__)


def _pit_cam(model: nn.Module) -> tuple[nn.Module, FeatureLayout]:
    return model.transformers[-1].blocks[-1].norm1, FeatureLayout("tokens", int(model.cls_token.shape[1]))


class _PiTAdapter(HierarchicalAdapter):
    def matches(self, model: nn.Module) -> bool:
        return any(isinstance(m, self.config()["marker"]) for m in model.modules())


register_adapter(_PiTAdapter("PiT", _pit_classes, readout=_pit_readout, cam=_pit_cam, embedding_layout="nchw"))
