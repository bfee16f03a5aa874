"""The shared description of how tokens flow through a transformer, and the rollout family computed on it.

Every transformer family (plain ViTs, attention-pool heads, class attention, windowed and hierarchical models) is
described the same way, by the family's adapter (:mod:`vision_attn.explain.families`): a :class:`TokenFlow` holds,
in forward order, one :class:`TokenMix` per layer that moves information between tokens, and the ``readout``: the
weights with which the head pools the last layer's tokens.

A :class:`TokenMix` is a token-to-token operator ``T [N_out, N_in]`` from the layer's ``source`` tokens to its
``target`` tokens, never stored densely:

* an **attention** layer: ``weights`` ``[B, W, q, k]`` (heads already reduced) are ``W`` blocks of attention rows:
  query ``i`` of block ``w`` is target token ``queries[w, i]``, key ``j`` is key token ``keys[w, j]`` (an index equal
  to the count means "no token": padding). One block over all tokens is global attention; many are windows (Swin,
  MaxViT), mask units (Hiera) or class attention (one query row). ``key_sources`` ``[N_key, N_in]`` says which source
  tokens each key token was built from (spatially reduced or pooled keys, equal shares); ``skip`` ``[N_out, N_in]``
  is the residual path (``None``: identity; query pooling in MViTv2 and Hiera). ``residual=False``: no residual path
  (an attention-pool head).
* a **merge** (token merging, pooling between stages, reordering, a class token joining): ``weights`` is ``None`` and
  ``skip`` is the whole operator: each coarse token stands for the fine tokens it was built from, with equal shares.

The rollout family propagates the readout row from the top, ``r · T_L ⋯ T_1``: one vector-block product per layer,
never an ``N x N`` matrix product, and at most one head-fused map per layer is kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

__all__ = [
    "TokenFlow",
    "TokenGrid",
    "TokenMap",
    "TokenMix",
    "attention_mix",
    "flow_attention",
    "flow_gradient_rollout",
    "flow_pool_map",
    "flow_rollout",
    "merge_mix",
]


@dataclass(frozen=True)
class TokenGrid:
    """The tokens of one layer: ``num_prefix_tokens`` (class, distillation, register tokens) then a ``grid``
    ``(gh, gw)`` of patch tokens in row-major order; ``grid`` is ``None`` for an intermediate order that is not a
    row-major grid (Hiera's unrolled tokens), then ``num_patches`` says how many there are."""

    num_prefix_tokens: int
    grid: tuple[int, int] | None
    num_patches: int = -1

    def __post_init__(self) -> None:
        if self.grid is not None:
            object.__setattr__(self, "grid", (int(self.grid[0]), int(self.grid[1])))
            object.__setattr__(self, "num_patches", self.grid[0] * self.grid[1])
        if self.num_patches < 0:
            raise ValueError("a TokenGrid without a grid needs num_patches")

    @property
    def num_tokens(self) -> int:
        """Prefix plus patch tokens."""
        return self.num_prefix_tokens + self.num_patches


@dataclass(frozen=True)
class TokenMap:
    """A sparse token map ``M [N_out, N_in]`` as ``(rows, cols, values)``; ``apply(r)`` is ``r @ M``."""

    rows: torch.Tensor
    cols: torch.Tensor
    values: torch.Tensor
    shape: tuple[int, int]

    def apply(self, r: torch.Tensor) -> torch.Tensor:
        """``r [B, N_out] -> r @ M [B, N_in]``."""
        rows, cols = self.rows.to(r.device), self.cols.to(r.device)
        contributions = r[:, rows] * self.values.to(device=r.device, dtype=r.dtype)
        return r.new_zeros(r.shape[0], self.shape[1]).index_add_(1, cols, contributions)

    def row_sums(self) -> torch.Tensor:
        """``M @ 1``: ``[N_out]``."""
        return torch.zeros(self.shape[0], dtype=self.values.dtype).index_add_(0, self.rows, self.values)

    def dense(self) -> torch.Tensor:
        """The full ``[N_out, N_in]`` matrix (for tests and small models)."""
        return torch.zeros(self.shape, dtype=self.values.dtype).index_put_(
            (self.rows, self.cols), self.values, accumulate=True
        )

    @staticmethod
    def from_sources(sources: Sequence[Sequence[int]], num_in: int) -> TokenMap:
        """Row ``i`` spread with equal shares over the input tokens ``sources[i]`` (an empty row stays zero)."""
        rows, cols, values = [], [], []
        for i, src in enumerate(sources):
            for j in src:
                rows.append(i)
                cols.append(int(j))
                values.append(1.0 / len(src))
        return TokenMap(
            torch.tensor(rows, dtype=torch.long),
            torch.tensor(cols, dtype=torch.long),
            torch.tensor(values, dtype=torch.float64),
            (len(sources), num_in),
        )


@dataclass
class TokenMix:
    """One layer's token-to-token operator ``T [N_out, N_in]`` (see the module docstring): an attention layer
    (``weights`` ``[B, W, q, k]`` placed by ``queries`` ``[W, q]`` / ``keys`` ``[W, k]``, keys built from the source
    tokens by ``key_sources``, residual path ``skip``) or a merge (``weights is None``; ``skip`` is the operator)."""

    name: str
    source: TokenGrid
    target: TokenGrid
    weights: torch.Tensor | None = None
    queries: torch.Tensor | None = None
    keys: torch.Tensor | None = None
    key_tokens: TokenGrid | None = None
    key_sources: TokenMap | None = None
    skip: TokenMap | None = None
    residual: bool = True

    @property
    def is_attention(self) -> bool:
        """Whether this is an attention layer (else a merge)."""
        return self.weights is not None

    @property
    def keys_grid(self) -> TokenGrid:
        """The key tokens (the source tokens unless the keys are pooled)."""
        return self.key_tokens if self.key_tokens is not None else self.source

    def with_weights(self, weights: torch.Tensor) -> TokenMix:
        """A copy with other ``weights`` of the same shape (e.g. gradient-weighted maps)."""
        if self.weights is None or weights.shape != self.weights.shape:
            raise ValueError(f"weights {tuple(weights.shape)} do not fit mix {self.name}")
        return TokenMix(**{**self.__dict__, "weights": weights})

    def attend(self, r: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """``r [B, N_out] -> r @ (A K) [B, N_in]``: the attention part only (``weights`` default: the mix's)."""
        weights = self.weights if weights is None else weights
        batch = r.shape[0]
        queries, keys = self.queries.to(r.device), self.keys.to(r.device)
        num_keys = self.keys_grid.num_tokens
        padded = torch.cat([r, r.new_zeros(batch, 1)], dim=1)  # index num_out: no token
        rows = padded[:, queries].to(weights.dtype)  # B, W, q: the product in the maps' own precision
        if weights.shape[0] != batch:
            weights = weights.expand(batch, *weights.shape[1:])
        cols = torch.einsum("bwq,bwqk->bwk", rows, weights).to(r.dtype)  # B, W, k; the sum in the row's precision
        out = r.new_zeros(batch, num_keys + 1).index_add_(1, keys.flatten(), cols.flatten(1))[:, :num_keys]
        return out if self.key_sources is None else self.key_sources.apply(out)

    def pass_skip(self, r: torch.Tensor) -> torch.Tensor:
        """``r @ skip``: the residual path (identity when ``skip`` is ``None``)."""
        if self.skip is not None:
            return self.skip.apply(r)
        if not self.residual:
            return r.new_zeros(r.shape[0], self.source.num_tokens)
        return r

    def carry(self, r: torch.Tensor) -> torch.Tensor:
        """Carry ``r`` past this layer without reading its attention: the residual path, or the attention (mean
        over heads) where there is no residual path (an attention-pool head)."""
        if self.is_attention and not self.residual:
            weights = self.weights if self.weights.ndim == 4 else self.weights.mean(dim=1)
            return self.attend(r, weights.to(r.dtype))
        return self.pass_skip(r)

    def row_sums(self, weights: torch.Tensor) -> torch.Tensor:
        """Row sums ``[B, N_out]`` of the attention part, over real key tokens only."""
        num_keys = self.keys_grid.num_tokens
        valid = (self.keys < num_keys).to(weights.device)  # W, k
        sums = weights.sum(dim=-1) if bool(valid.all()) else (weights * valid[None, :, None, :]).sum(dim=-1)
        batch, num_out = weights.shape[0], self.target.num_tokens
        out = weights.new_zeros(batch, num_out + 1)
        out.index_add_(1, self.queries.to(weights.device).flatten(), sums.flatten(1))
        return out[:, :num_out]


def attention_mix(
    name: str,
    source: TokenGrid,
    weights: torch.Tensor,
    queries: torch.Tensor | None = None,
    keys: torch.Tensor | None = None,
    target: TokenGrid | None = None,
    key_tokens: TokenGrid | None = None,
    key_sources: TokenMap | None = None,
    skip: TokenMap | None = None,
    residual: bool = True,
) -> TokenMix:
    """An attention :class:`TokenMix`; ``queries``/``keys`` default to all target/key tokens (global attention)."""
    target = source if target is None else target
    key_grid = source if key_tokens is None else key_tokens
    if queries is None:
        queries = torch.arange(target.num_tokens)[None]
    if keys is None:
        keys = torch.arange(key_grid.num_tokens)[None]
    expected = (queries.shape[0], queries.shape[1], keys.shape[1])
    if weights.ndim not in (4, 5) or tuple(weights.shape[-3:]) != expected:
        raise ValueError(
            f"attention of {name} has shape {tuple(weights.shape)}; its layout expects [B, (heads,) {expected[0]}, "
            f"{expected[1]}, {expected[2]}]"
        )
    if skip is None and residual and target.num_tokens != source.num_tokens:
        raise ValueError(f"{name} changes the token count {source.num_tokens} -> {target.num_tokens} with no skip map")
    return TokenMix(name, source, target, weights, queries.long(), keys.long(), key_tokens, key_sources, skip, residual)


def merge_mix(name: str, source: TokenGrid, target: TokenGrid, sources: Sequence[Sequence[int]]) -> TokenMix:
    """A merge: target token ``i`` stands for the source tokens ``sources[i]`` with equal shares (rows sum to 1; an
    empty row, e.g. a class token that joins here, takes nothing from below)."""
    if len(sources) != target.num_tokens:
        raise ValueError(f"merge {name} gives sources for {len(sources)} tokens, expected {target.num_tokens}")
    return TokenMix(name, source, target, skip=TokenMap.from_sources(sources, source.num_tokens))


@dataclass
class TokenFlow:
    """A model's forward pass as the token methods read it: ``mixes`` in forward order (attention layers and merges),
    the ``readout`` ``[B, N_last]`` (or ``[N_last]``) with which the head pools the last tokens, the ``logits`` and the
    ``targets`` of a gradient pass. ``pool`` tells whether the readout is an attention-pool head's own map;
    ``skipped`` names attention the family adapter leaves out, with the reason (e.g. XCiT's channel attention);
    ``gradients``: per-head attention gradients ``[B, heads, W, q, k]`` of the attention layers, when captured so."""

    mixes: list[TokenMix]
    readout: torch.Tensor
    logits: torch.Tensor | None = None
    targets: torch.Tensor | None = None
    pool: bool = False
    skipped: dict[str, str] = field(default_factory=dict)
    family: str = ""
    gradients: list[torch.Tensor] | None = None

    @property
    def finest(self) -> TokenGrid:
        """The tokens the maps are read on: the first layer's source tokens."""
        return self.mixes[0].source if self.mixes else self.last

    @property
    def last(self) -> TokenGrid:
        """The tokens the head reads."""
        return self.mixes[-1].target

    @property
    def attention_mixes(self) -> list[TokenMix]:
        """The attention layers (not the merges), in forward order."""
        return [m for m in self.mixes if m.is_attention]

    def readout_rows(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The readout as ``[B, N_last]``."""
        attention = self.attention_mixes
        batch = attention[0].weights.shape[0] if attention else 1
        rows = self.readout.to(dtype)
        return rows.expand(batch, -1).clone() if rows.ndim == 1 else rows.clone()

    def to_map(self, r: torch.Tensor) -> torch.Tensor:
        """Relevance ``[B, N_finest]`` of the finest tokens -> the patch map ``[B, gh, gw]`` (prefix tokens dropped)."""
        finest = self.finest
        if finest.grid is None:
            raise ValueError("the finest tokens of the flow lie on no grid")
        return r[:, finest.num_prefix_tokens :].reshape(r.shape[0], *finest.grid)


def _dtype(flow: TokenFlow) -> torch.dtype:
    """The readout row is propagated in float64: a map is min-max scaled afterwards, so a small attention part on top
    of a uniform residual part (an average-pooled head, small gradients) must survive the sum; the row is a vector, so
    this costs little."""
    return torch.float64


def _discard(mix: TokenMix, weights: torch.Tensor, discard_ratio: float) -> torch.Tensor:
    """Zero the ``discard_ratio`` lowest entries of each row among the patch-token keys it attends to."""
    keys = mix.keys.to(weights.device)
    key_grid = mix.keys_grid
    patch = (keys >= key_grid.num_prefix_tokens) & (keys < key_grid.num_tokens)  # W, k
    counts = patch.sum(dim=1)  # W
    num_discard = (discard_ratio * counts.double()).long()  # W
    if int(num_discard.max()) == 0:
        return weights
    masked = weights.masked_fill(~patch[None, :, None, :], float("inf"))
    if bool((num_discard == num_discard[0]).all()):
        lowest = masked.topk(int(num_discard[0]), dim=-1, largest=False).indices
        return weights.scatter(-1, lowest, 0.0)
    rank = masked.argsort(dim=-1).argsort(dim=-1)  # rank of each entry in its row, lowest first
    return weights.masked_fill(rank < num_discard[None, :, None, None], 0.0)


def _check_layer(start_layer: int, count: int, name: str = "start_layer") -> int:
    if not isinstance(start_layer, int) or isinstance(start_layer, bool) or not -count <= start_layer < count:
        raise ValueError(f"{name} {start_layer!r} is out of range for {count} attention layers")
    return start_layer % count


def flow_rollout(
    flow: TokenFlow, head_fusion: str | None = None, discard_ratio: float = 0.0, start_layer: int = 0
) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema 2020) of a :class:`TokenFlow`: ``[B, gh, gw]`` on the finest grid.

    Per attention layer ``T = norm(0.5·A·K + 0.5·S)`` (``A`` the head-fused attention, zeroing the ``discard_ratio``
    lowest patch entries of each row; ``K`` the key sources; ``S`` the residual path; rows renormalised to sum 1);
    per merge ``T = M``; the map is ``r · T_L ⋯ T_1`` with ``r`` the readout, over the finest patch tokens. Attention
    layers below ``start_layer`` pass relevance through their residual path only. ``head_fusion`` is for weights
    captured per head (``[B, H, W, q, k]``); flows captured with the heads fused ignore it.
    """
    from vision_attn.explain.rollout import fuse_heads

    if not isinstance(discard_ratio, (int, float)) or not 0.0 <= discard_ratio < 1.0:
        raise ValueError(f"discard_ratio must be a float in [0, 1), got {discard_ratio!r}")
    attention = flow.attention_mixes
    start = _check_layer(start_layer, len(attention))
    dtype = _dtype(flow)
    r = flow.readout_rows(dtype)
    index = len(attention)
    for mix in reversed(flow.mixes):
        if not mix.is_attention:
            r = mix.pass_skip(r)
            continue
        index -= 1
        if index < start and mix.residual:
            r = mix.pass_skip(r)
            continue
        weights = mix.weights
        if weights.ndim == 5:
            weights = fuse_heads(weights.to(torch.promote_types(weights.dtype, torch.float32)), head_fusion or "mean")
        if discard_ratio > 0:
            weights = _discard(mix, weights, discard_ratio)
        sums = mix.row_sums(weights).to(dtype)
        skip_sums = mix.skip.row_sums().to(dtype).to(r.device) if mix.skip is not None else 1.0
        norm = 0.5 * sums + 0.5 * skip_sums if mix.residual else sums
        scaled = torch.where(norm > 0, r / norm.clamp(min=torch.finfo(dtype).tiny), torch.zeros_like(r))
        r = (0.5 if mix.residual else 1.0) * mix.attend(scaled, weights)
        if mix.residual:
            r = r + 0.5 * mix.pass_skip(scaled)
    return flow.to_map(r)


def flow_gradient_rollout(flow: TokenFlow, start_layer: int = 0) -> torch.Tensor:
    """Gradient-weighted rollout (Chefer et al. 2021) of a :class:`TokenFlow` whose attention ``weights`` are the
    head-reduced ``mean_h(relu(∇A ⊙ A))`` (or any such map, e.g. Chefer's relevance-weighted one): per attention layer
    ``T = S + Ā·K`` (the original ``R += Ā R`` with the residual path ``S``), per merge ``T = M``; the map is
    ``r · T_L ⋯ T_1`` over the finest patch tokens, ``[B, gh, gw]``."""
    attention = flow.attention_mixes
    start = _check_layer(start_layer, len(attention))
    dtype = _dtype(flow)
    r = flow.readout_rows(dtype)
    index = len(attention)
    for mix in reversed(flow.mixes):
        if mix.is_attention:
            index -= 1
            if index >= start or not mix.residual:
                weights = mix.weights
                if weights.ndim == 5:
                    weights = weights.mean(dim=1)
                attended = mix.attend(r, weights)
                r = mix.pass_skip(r) + attended if mix.residual else attended
                continue
        r = mix.pass_skip(r)
    return flow.to_map(r)


def flow_attention(flow: TokenFlow, layer: int = -1, head_fusion: str | None = None) -> torch.Tensor:
    """Raw attention of one attention layer (default the last) read with the head's readout (Dosovitskiy et al. 2021,
    Fig. 6): the readout is carried down to that layer through the token merges and residual paths of the layers
    above, multiplied by its head-fused attention, and carried on to the finest grid the same way. ``[B, gh, gw]``."""
    from vision_attn.explain.rollout import fuse_heads

    attention = flow.attention_mixes
    chosen = attention[_check_layer(layer, len(attention), "layer")]
    dtype = _dtype(flow)
    r = flow.readout_rows(dtype)
    for mix in reversed(flow.mixes):
        if mix is chosen:
            weights = mix.weights
            if weights.ndim == 5:
                weights = fuse_heads(
                    weights.to(torch.promote_types(weights.dtype, torch.float32)), head_fusion or "mean"
                )
            r = mix.attend(r, weights)
        else:
            r = mix.carry(r)
    return flow.to_map(r)


def flow_pool_map(flow: TokenFlow) -> torch.Tensor:
    """An attention-pool head's own map (its query's attention over the last tokens, mean over heads and latents),
    carried to the finest grid through the token merges: ``[B, gh, gw]``."""
    r = flow.readout_rows(_dtype(flow))
    for mix in reversed(flow.mixes):
        r = mix.carry(r)
    return flow.to_map(r)
