"""Windowed and hierarchical transformers: Swin v1, Swin v2 (and v2-CR), MaxViT / CoAtNet, DaViT and SAM's ViT.

Rules (Liu et al. 2021 "Swin Transformer", Liu et al. 2022 "Swin Transformer V2", Tu et al. 2022 "MaxViT", Dai et
al. 2021 "CoAtNet", Ding et al. 2022 "DaViT", Kirillov et al. 2023 "Segment Anything"; the placement rules are ours):

* window attention: each window's ``[heads, w², w²]`` map is placed at its tokens' own grid positions, found by
  running the family's own partition function on a grid of token indices (a shifted window's roll undone; padding
  tokens are no tokens); in a shifted window, pairs of tokens from different sides of the wrap (the pairs Swin's mask
  excludes) are zero. MaxViT's grid attention is the same with its grid partition.
* token merging and downsampling between stages: a coarse token stands for the fine tokens under its merging window,
  with equal shares (rows sum to 1, no residual): Swin's 2x2 patch merging, DaViT's strided convolution, a CoAtNet
  block's pooling; a stage whose first layer is a strided convolution block (MaxViT's MBConv) merges the stride
  cell of each coarse token.
* MaxViT v2's parallel block and grid attention (each writes half the channels) count as one layer whose map is
  the mean of the two (ours).
* DaViT's channel attention mixes channels within each token: it is left out (identity between tokens), with that
  reason.
* the head's global average pooling reads every last token with an equal share.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
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
    readout_weights,
    register_adapter,
    window_index,
)
from vision_attn.explain.flow import TokenFlow, TokenGrid, TokenMap, TokenMix, attention_mix, merge_mix

__all__ = ["BlockInfo", "HierarchicalAdapter", "MergeInfo", "StageInfo"]


@dataclass
class BlockInfo:
    """One attention block as its adapter reads it on a call: the ``grid`` it attends on (prefix-free), and per
    attention module the window partition (``None``: global), the shift, the padding multiple and whether pairs
    across a shifted window's wrap are masked. ``pool``: the block first pools its tokens (CoAtNet), sources per
    coarse token. ``keys``: the keys are pooled from the grid (spatial reduction): their grid and each key's sources.
    ``queries``: the queries are pooled (MViTv2): the output grid and each output token's residual sources (``None``:
    no residual path through pooling: an identity on the same grid). ``prefix``: class tokens before the grid (kept as
    they are by merges)."""

    grid: tuple[int, int] | None
    partitions: list[Callable[[torch.Tensor], torch.Tensor] | None]
    shift: tuple[int, int] = (0, 0)
    pad_to: tuple[int, int] | None = None
    window: tuple[int, int] | None = None
    pool: tuple[tuple[int, int], list[list[int]]] | None = None
    keys: tuple[tuple[int, int], list[list[int]]] | None = None
    queries: tuple[tuple[int, int], list[list[int]] | None] | None = None
    prefix: int = 0
    kind: str = "block"


@dataclass
class StageInfo:
    """A stage starts on ``grid`` with ``prefix`` class tokens (its blocks then say ``grid=None``: the stage's)."""

    grid: tuple[int, int]
    prefix: int = 0
    kind: str = "stage"


@dataclass
class MergeInfo:
    """A merge between stages: the fine ``grid``, the coarse grid ``out`` and each coarse token's ``sources``."""

    grid: tuple[int, int]
    out: tuple[int, int]
    sources: list[list[int]]
    prefix: int = 0
    kind: str = "merge"


def _grid_of(x: torch.Tensor, channels_last: bool) -> tuple[int, int]:
    return (int(x.shape[1]), int(x.shape[2])) if channels_last else (int(x.shape[-2]), int(x.shape[-1]))


def _pair(value: Any) -> tuple[int, int]:
    return (int(value), int(value)) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _with_prefix(sources: list[list[int]], tokens: TokenGrid) -> list[list[int]]:
    """Grid sources offset past the prefix tokens, which stand for themselves."""
    prefix = tokens.num_prefix_tokens
    return [[i] for i in range(prefix)] + [[prefix + j for j in src] for src in sources]


def stride_sources(grid: tuple[int, int], out: tuple[int, int]) -> list[list[int]]:
    """Each coarse token of ``out`` stands for the fine tokens of its stride cell in ``grid`` (equal shares)."""
    stride = (-(-grid[0] // out[0]), -(-grid[1] // out[1]))
    size, sources = conv_sources(grid, stride, stride, 0, ceil_mode=True)
    if size != out:
        raise NotApplicableError(f"a {grid} grid does not downsample to {out} by a stride")
    return sources


def shift_mask(
    grid: tuple[int, int], window: tuple[int, int], shift: tuple[int, int], partition: Callable
) -> torch.Tensor:
    """``[windows, w², w²]``: which pairs of a shifted window Swin lets attend (same region of the rolled, padded
    grid: the regions of Swin's ``get_attn_mask``)."""
    hp = -(-grid[0] // window[0]) * window[0]
    wp = -(-grid[1] // window[1]) * window[1]

    def regions(size: int, w: int, s: int) -> torch.Tensor:
        index = torch.arange(size)
        return (index >= size - w).long() + (index >= size - s).long()

    labels = regions(hp, window[0], shift[0])[:, None] * 3 + regions(wp, window[1], shift[1])[None, :]
    windows = partition(labels.double().reshape(1, hp, wp, 1)).reshape(-1, window[0] * window[1])
    return windows[:, :, None] == windows[:, None, :]


class HierarchicalAdapter(FamilyAdapter):
    """A family of attention blocks on a token grid that changes between stages (configured per family).

    ``classes()`` returns ``{'blocks': {class: (read(module, args) -> BlockInfo, attention attribute names)}, 'merges':
    {class: read(module, args, out) -> MergeInfo}, 'skip': {class: reason}}``: read sees a block's call arguments
    (an empty attribute name: the block is the attention module itself), a merge's arguments and output; ``layout``
    tells how an attention module lays out its maps (default ``'(bw)hqk'``). Grids that change between blocks with
    no merge module (a strided conv block) merge stride cells. ``readout(model, tokens)`` gives the head's rows
    (default: the head's global pooling).
    """

    def __init__(
        self,
        family: str,
        classes: Callable[[], dict[str, Any]],
        embedding: Callable[[nn.Module], nn.Module | None] | None = None,
        embedding_layout: str | None = None,
        cam: Callable[[nn.Module], tuple[nn.Module, FeatureLayout] | None] | None = None,
        layout: Callable[[nn.Module], Any] | None = None,
        readout: Callable[[nn.Module, TokenGrid], torch.Tensor] | None = None,
    ) -> None:
        self.family = family
        self._readout = readout
        self._classes = classes
        self._embedding = embedding
        self._embedding_layout = embedding_layout
        self._cam = cam
        self._layout = layout
        self._layouts: dict[str, Any] = {}

    def config(self) -> dict[str, Any]:
        return self._classes()

    def matches(self, model: nn.Module) -> bool:
        blocks = tuple(self.config()["blocks"])
        return bool(blocks) and any(isinstance(m, blocks) for m in model.modules())

    def problem(self, model: nn.Module) -> str:
        pool = head_pool_type(model)
        if self._readout is None and pool not in ("avg", "fast", None, ""):
            return (
                f"model {type(model).__name__} ({self.family}) pools its last tokens by {pool!r}, which no weighting "
                "of token rows describes; the token methods read average pooling; use a Grad-CAM method"
            )
        return ""

    def _blocks(self, model: nn.Module) -> list[tuple[str, nn.Module, tuple[str, ...]]]:
        blocks = self.config()["blocks"]
        found = []
        for name, module in model.named_modules():
            for cls, (_, attrs) in blocks.items():
                if isinstance(module, cls):
                    found.append((name, module, attrs))
                    break
        return found

    def owners(self, model: nn.Module) -> dict[str, nn.Module]:
        owners = {}
        for name, module, attrs in self._blocks(model):
            for attr in attrs:
                sub = getattr(module, attr, None) if attr else module
                if isinstance(sub, nn.Module):
                    key = f"{name}.{attr}" if attr else name
                    owners[key] = sub
                    if self._layout is not None:
                        self._layouts[key] = self._layout(sub)
        return owners

    def layout(self, name: str) -> Any:
        return self._layouts.get(name, "(bw)hqk")

    def skipped(self, model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
        skip = self.config().get("skip", {})
        return {n: (m, reason) for n, m in model.named_modules() for cls, reason in skip.items() if isinstance(m, cls)}

    def observe(self, model: nn.Module, recorder: Any) -> None:
        config = self.config()
        for name, module, _ in self._blocks(model):
            read = next(r for cls, (r, _) in config["blocks"].items() if isinstance(module, cls))
            recorder.observe(module, lambda m, args, out, read=read: read(m, args), pre=True, name=name)
        for name, module in model.named_modules():
            for cls, read in config.get("merges", {}).items():
                if isinstance(module, cls):
                    recorder.observe(module, lambda m, args, out, read=read: read(m, args, out), name=name)
            for cls, read in config.get("stages", {}).items():
                if isinstance(module, cls):
                    recorder.observe(module, lambda m, args, out, read=read: read(m, args), pre=True, name=name)

    def describe(
        self, model: nn.Module, events: list[tuple[str, str, Any]], weights: list[torch.Tensor], capture: Capture
    ) -> TokenFlow:
        name = type(model).__name__
        mixes: list[TokenMix] = []
        current: TokenGrid | None = None
        block: BlockInfo | None = None
        block_name = ""
        pending: list[torch.Tensor] = []

        def close_block() -> None:
            nonlocal block, current
            if block is None:
                return
            expected = len(block.partitions)
            if len(pending) != expected:
                raise NotApplicableError(
                    f"model {name}: block {block_name} ran {len(pending)} attention calls, expected {expected}"
                )
            mixes.append(self._block_mix(block_name, block, pending, current))
            current = mixes[-1].target
            block, pending[:] = None, []

        for kind, where, payload in events:
            if kind == "attention":
                if block is None:
                    raise NotApplicableError(
                        f"model {name}: attention {where} ran outside the blocks its adapter reads"
                    )
                pending.append(weights[payload])
                continue
            close_block()
            if isinstance(payload, MergeInfo):
                if current is None:
                    continue  # a stem before the first attention: the finest grid is the first block's
                if current.grid != payload.grid:
                    mixes.append(self._stride_merge(f"{where} (stride)", current, payload.grid))
                    current = mixes[-1].target
                target = TokenGrid(current.num_prefix_tokens, payload.out)
                mixes.append(merge_mix(where, current, target, _with_prefix(payload.sources, current)))
                current = target
            elif isinstance(payload, StageInfo):
                if current is None:
                    current = TokenGrid(payload.prefix, payload.grid)
                elif current.grid != payload.grid:
                    mixes.append(self._stride_merge(f"{where} (stride)", current, payload.grid))
                    current = mixes[-1].target
            elif isinstance(payload, BlockInfo):
                if payload.grid is None:
                    if current is None:
                        raise NotApplicableError(f"model {name}: block {where} ran before its stage said its grid")
                    payload.grid = current.grid
                grid = payload.grid if payload.pool is None else payload.pool[0]
                if current is None:
                    current = TokenGrid(payload.prefix, payload.grid)
                if payload.pool is not None:
                    if current.grid != payload.grid:
                        mixes.append(self._stride_merge(f"{where} (stride)", current, payload.grid))
                        current = mixes[-1].target
                    out, sources = payload.pool
                    target = TokenGrid(current.num_prefix_tokens, out)
                    mixes.append(merge_mix(f"{where} (pool)", current, target, _with_prefix(sources, current)))
                    current = target
                elif current.grid != grid:  # a strided conv block between attention blocks
                    mixes.append(self._stride_merge(f"{where} (stride)", current, grid))
                    current = mixes[-1].target
                block, block_name = payload, where
        close_block()
        if not mixes:
            raise NotApplicableError(f"model {name} ran no attention block")
        if self._readout is not None:
            readout = self._readout(model, mixes[-1].target)
        else:
            readout = readout_weights(head_pool_type(model) or "avg", mixes[-1].target, name)
        return TokenFlow(mixes, readout, family=self.family)

    @staticmethod
    def _stride_merge(name: str, source: TokenGrid, grid: tuple[int, int]) -> TokenMix:
        target = TokenGrid(source.num_prefix_tokens, grid)
        return merge_mix(name, source, target, _with_prefix(stride_sources(source.grid, grid), source))

    @staticmethod
    def _block_mix(name: str, block: BlockInfo, maps: list[torch.Tensor], tokens: TokenGrid) -> TokenMix:
        parts = []
        for partition, weights in zip(block.partitions, maps, strict=True):
            if partition is None:  # global attention
                index = torch.arange(tokens.num_tokens)[None]
            else:
                index = window_index(block.grid, partition, block.shift, block.pad_to, tokens.num_prefix_tokens)
                if any(block.shift):
                    mask = shift_mask(block.grid, block.window, block.shift, partition)
                    weights = weights * mask.to(weights.device, weights.dtype)
            parts.append((index, weights))
        if len(parts) == 1 and (block.keys is not None or block.queries is not None):  # pooled keys / queries
            keys = key_sources = skip = None
            if block.keys is not None:
                key_grid, sources = block.keys
                keys = TokenGrid(tokens.num_prefix_tokens, key_grid)
                key_sources = TokenMap.from_sources(_with_prefix(sources, tokens), tokens.num_tokens)
            target = tokens
            if block.queries is not None:
                out, skip_sources = block.queries
                target = TokenGrid(tokens.num_prefix_tokens, out)
                if skip_sources is not None:
                    skip = TokenMap.from_sources(_with_prefix(skip_sources, tokens), tokens.num_tokens)
            queries = torch.arange(target.num_tokens)[None]
            return attention_mix(
                name, tokens, parts[0][1], queries=queries, target=target, key_tokens=keys, key_sources=key_sources,
                skip=skip,
            )  # fmt: skip
        if len(parts) == 1:
            index, weights = parts[0]
            return attention_mix(name, tokens, weights, queries=index, keys=index)
        # parallel attentions over the same tokens (each writes part of the channels): their mean (ours)
        width = max(i.shape[1] for i, _ in parts)
        if any(i.shape[1] != width for i, _ in parts):
            raise NotApplicableError(f"block {name} runs parallel attentions of different window sizes")
        index = torch.cat([i for i, _ in parts])
        weights = torch.cat([w / len(parts) for _, w in parts], dim=-3)
        return attention_mix(name, tokens, weights, queries=index, keys=index)

    def embedding(self, model: nn.Module) -> nn.Module | None:
        return self._embedding(model) if self._embedding is not None else super().embedding(model)

    def embedding_layout(self, model: nn.Module) -> str | None:
        return self._embedding_layout

    def cam_layer(self, model: nn.Module) -> tuple[nn.Module, FeatureLayout] | None:
        return self._cam(model) if self._cam is not None else None


# --- Swin v1, v2, v2-CR --------------------------------------------------------------------------------------------


def _swin_classes() -> dict[str, Any]:
    from timm.models import swin_transformer as v1
    from timm.models import swin_transformer_v2 as v2
    from timm.models import swin_transformer_v2_cr as cr

    def block(partition: Callable) -> Callable[[nn.Module, tuple[Any, ...]], BlockInfo]:
        def read(module: nn.Module, args: tuple[Any, ...]) -> BlockInfo:
            window, shift = _pair(module.window_size), _pair(module.shift_size)
            return BlockInfo(_grid_of(args[0], True), [lambda t: partition(t, window)], shift, window, window)

        return read

    def merge(module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> MergeInfo:
        grid = _grid_of(args[0], channels_last=True)
        size, sources = conv_sources(grid, 2, 2, 0, ceil_mode=True)
        return MergeInfo(grid, size, sources)

    return {
        "blocks": {
            v1.SwinTransformerBlock: (block(v1.window_partition), ("attn",)),
            v2.SwinTransformerV2Block: (block(v2.window_partition), ("attn",)),
            cr.SwinTransformerV2CrBlock: (block(cr.window_partition), ("attn",)),
        },
        "merges": {v1.PatchMerging: merge, v2.PatchMerging: merge, cr.PatchMerging: merge},
    }


def _last_stage(model: nn.Module) -> tuple[nn.Module, FeatureLayout] | None:
    """The last stage's output (timm ``feature_info``), NHWC for Swin v1/v2, else NCHW."""
    info = getattr(model, "feature_info", None)
    if not info:
        return None
    module = model.get_submodule(info[-1]["module"])
    kind = "nhwc" if getattr(model, "output_fmt", "NCHW") == "NHWC" else "nchw"
    return module, FeatureLayout(kind)


register_adapter(HierarchicalAdapter("Swin", _swin_classes, cam=_last_stage))


# --- MaxViT, MaxxViT, CoAtNet ---------------------------------------------------------------------------------------


def _maxvit_classes() -> dict[str, Any]:
    from timm.models import maxxvit as mx

    def partition(block: bool, size: tuple[int, int], nchw: bool) -> Callable[[torch.Tensor], torch.Tensor]:
        if nchw:
            fn = mx.window_partition_nchw if block else mx.grid_partition_nchw
            return lambda t: fn(t.permute(0, 3, 1, 2), size)
        fn = mx.window_partition if block else mx.grid_partition
        return lambda t: fn(t, size)

    def cl(module: nn.Module, args: tuple[Any, ...]) -> BlockInfo:
        size = _pair(module.partition_size)
        return BlockInfo(_grid_of(args[0], True), [partition(module.partition_block, size, False)])

    def nchw(module: nn.Module, args: tuple[Any, ...]) -> BlockInfo:
        size = _pair(module.partition_size)
        return BlockInfo(_grid_of(args[0], False), [partition(module.partition_block, size, True)])

    def parallel(module: nn.Module, args: tuple[Any, ...]) -> BlockInfo:
        size = _pair(module.partition_size)
        return BlockInfo(_grid_of(args[0], True), [partition(True, size, False), partition(False, size, False)])

    def transformer(module: nn.Module, args: tuple[Any, ...]) -> BlockInfo:
        grid = _grid_of(args[0], False)
        pool = None
        if isinstance(module.shortcut, mx.Downsample2d):
            layer = module.shortcut.pool
            pool = conv_sources(
                grid, layer.kernel_size, layer.stride, layer.padding, getattr(layer, "ceil_mode", False)
            )
        return BlockInfo(grid, [None], pool=pool)

    return {
        "blocks": {
            mx.PartitionAttentionCl: (cl, ("attn",)),
            mx.PartitionAttention2d: (nchw, ("attn",)),
            mx.ParallelPartitionAttention: (parallel, ("attn_block", "attn_grid")),
            mx.TransformerBlock2d: (transformer, ("attn",)),
        },
    }


def _maxvit_cam(model: nn.Module) -> tuple[nn.Module, FeatureLayout] | None:
    return model.stages[-1], FeatureLayout("nchw")


register_adapter(
    HierarchicalAdapter(
        "MaxViT / CoAtNet", _maxvit_classes, embedding=lambda m: getattr(m, "stem", None), cam=_maxvit_cam
    )
)


# --- DaViT -----------------------------------------------------------------------------------------------------------


def _davit_classes() -> dict[str, Any]:
    from timm.models import davit

    def spatial(module: nn.Module, args: tuple[Any, ...]) -> BlockInfo:
        window = _pair(module.window_size)
        return BlockInfo(_grid_of(args[0], False), [lambda t: davit.window_partition(t, window)], pad_to=window)

    def downsample(module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> MergeInfo:
        conv = module.conv
        grid = _grid_of(args[0], False)
        size, sources = conv_sources(grid, conv.kernel_size, conv.stride, conv.padding, ceil_mode=module.even_k)
        return MergeInfo(grid, size, sources)

    reason = "channel attention ([heads, C, C]) mixes the channels within each token, not tokens"
    return {
        "blocks": {davit.SpatialBlock: (spatial, ("attn",))},
        "merges": {davit.Downsample: downsample},
        "skip": {davit.ChannelAttention: reason, davit.ChannelAttentionV2: reason},
    }


register_adapter(
    HierarchicalAdapter(
        "DaViT",
        _davit_classes,
        embedding=lambda m: getattr(m, "stem", None),
        cam=lambda m: (m.stages[-1], FeatureLayout("nchw")),
    )
)


# --- SAM ViT (windowed and global blocks) ----------------------------------------------------------------------------


def _sam_classes() -> dict[str, Any]:
    from timm.models import vision_transformer_sam as sam

    def block(module: nn.Module, args: tuple[Any, ...]) -> BlockInfo:
        grid = _grid_of(args[0], True)
        size = int(module.window_size)
        if size > 0:
            return BlockInfo(grid, [lambda t: sam.window_partition(t, size)[0]], pad_to=(size, size))
        return BlockInfo(grid, [None])

    return {"blocks": {sam.Block: (block, ("attn",))}}


def _sam_layout(attn: nn.Module) -> Callable[[torch.Tensor, int], torch.Tensor]:
    heads = attn.num_heads

    def layout(probs: torch.Tensor, batch: int) -> torch.Tensor:  # [B * windows * heads, N, N]
        return probs.reshape(batch, -1, heads, *probs.shape[-2:]).transpose(1, 2)

    return layout


register_adapter(
    HierarchicalAdapter(
        "SAM ViT",
        _sam_classes,
        layout=_sam_layout,
        cam=lambda m: (m.blocks[-1], FeatureLayout("nhwc")),
    )
)
