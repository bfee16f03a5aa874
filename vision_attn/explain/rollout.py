"""Attention rollout and gradient-weighted rollout: pure, batched ``list[[B, H, N, N]] -> [B, gh, gw]``.

The layers are the global attention layers of a :class:`~vision_attn.explain.flow.TokenFlow`; the readout row is
propagated from the top (``r · Â_L ⋯ Â_1``), so no ``N x N`` matrix product is ever formed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Integral

import torch

from vision_attn.explain.flow import (
    TokenFlow,
    TokenGrid,
    attention_mix,
    flow_attention,
    flow_gradient_rollout,
    flow_rollout,
)

__all__ = [
    "HEAD_FUSIONS",
    "TOKEN_POOLS",
    "attention_rollout",
    "check_attentions",
    "check_grid_size",
    "fuse_heads",
    "gradient_rollout",
    "last_layer_attention",
    "token_pool_weights",
    "tokens_to_grid",
]

HEAD_FUSIONS = ("mean", "max", "min")
TOKEN_POOLS = ("token", "distilled", "avg", "avg_all", "seq")


def check_attentions(attentions: Sequence[torch.Tensor], name: str = "attentions") -> tuple[int, int]:
    """Raise ``TypeError``/``ValueError`` unless ``attentions`` is a non-empty list of ``[B, H, N, N]`` tensors.

    Every layer must have the same ``B`` and ``N`` (the head count may differ). Returns ``(B, N)``.
    """
    if isinstance(attentions, torch.Tensor) or not isinstance(attentions, Sequence):
        raise TypeError(f"{name} must be a list of [B, heads, N, N] tensors (one per layer), got {type(attentions)}")
    if len(attentions) == 0:
        raise ValueError(f"{name} is empty; expected one [B, heads, N, N] tensor per attention layer")
    for i, attn in enumerate(attentions):
        if not isinstance(attn, torch.Tensor):
            raise TypeError(f"{name}[{i}] must be a torch.Tensor, got {type(attn).__name__}")
        if attn.ndim != 4 or attn.shape[-1] != attn.shape[-2]:
            raise ValueError(f"{name}[{i}] must be 4-D [B, heads, N, N], got shape {tuple(attn.shape)}")
    first = attentions[0].shape
    for i, attn in enumerate(attentions):
        if attn.shape[0] != first[0] or attn.shape[-1] != first[-1]:
            raise ValueError(
                f"{name}[{i}] has shape {tuple(attn.shape)}, which does not match {name}[0] {tuple(first)}: "
                "every layer needs the same batch size B and token count N"
            )
    return attentions[0].shape[0], attentions[0].shape[-1]


def _check_prefix(num_prefix_tokens: int, num_tokens: int) -> None:
    if not isinstance(num_prefix_tokens, int) or isinstance(num_prefix_tokens, bool) or num_prefix_tokens < 0:
        raise ValueError(f"num_prefix_tokens must be an int >= 0, got {num_prefix_tokens!r}")
    if num_prefix_tokens >= num_tokens:
        raise ValueError(
            f"num_prefix_tokens {num_prefix_tokens} leaves no patch tokens in attention over N={num_tokens} tokens"
        )


def check_grid_size(grid_size: int | Sequence[int], name: str = "grid_size") -> tuple[int, int]:
    """Return ``grid_size`` (an int or a pair) as ``(gh, gw)``; ``TypeError``/``ValueError`` unless positive ints."""
    if isinstance(grid_size, Integral) and not isinstance(grid_size, bool):
        pair: tuple = (int(grid_size), int(grid_size))
    elif isinstance(grid_size, (Sequence, torch.Size)) and not isinstance(grid_size, str):
        pair = tuple(grid_size)
    else:
        raise TypeError(f"{name} must be an int or a pair (gh, gw) of ints, got {grid_size!r}")
    if len(pair) != 2 or not all(isinstance(v, Integral) and not isinstance(v, bool) and v > 0 for v in pair):
        raise ValueError(f"{name} must be a positive int or a pair (gh, gw) of positive ints, got {grid_size!r}")
    return int(pair[0]), int(pair[1])


def _resolve_grid(num_patches: int, grid_size: int | Sequence[int] | None) -> tuple[int, int]:
    if grid_size is None:
        side = math.isqrt(num_patches)
        if side * side != num_patches:
            raise ValueError(
                f"{num_patches} patch tokens fit no square grid; pass grid_size=(gh, gw) with gh * gw == {num_patches}"
            )
        return side, side
    gh, gw = check_grid_size(grid_size)
    if gh * gw != num_patches:
        raise ValueError(
            f"grid_size {(gh, gw)} holds {gh * gw} tokens, but the attention has {num_patches} patch tokens"
        )
    return gh, gw


def token_pool_weights(
    pool: str, num_tokens: int, num_prefix_tokens: int = 1, sequence_weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Return the weights with which a model's head pools its ``num_tokens`` output tokens: ``[N]``, or ``[B, N]``
    for ``'seq'``; pass them as ``pool_weights`` to the rollout functions so they read the rows the head reads.

    ``pool`` (see :data:`TOKEN_POOLS`): ``'token'`` the class token (row 0); ``'distilled'`` the mean of the class
    and distillation tokens (rows 0 and 1, DeiT's averaged heads); ``'avg'`` the mean of the patch tokens (rows
    ``num_prefix_tokens:``); ``'avg_all'`` the mean of all tokens; ``'seq'`` sequence pooling (CCT, Hassani et al.
    2021) with ``sequence_weights`` ``[B, N - num_prefix_tokens]`` (the pooling softmax over the patch tokens).
    """
    if pool not in TOKEN_POOLS:
        raise ValueError(f"pool {pool!r} is unknown; expected one of {TOKEN_POOLS}")
    _check_prefix(num_prefix_tokens, num_tokens)
    needs = {"token": 1, "distilled": 2}.get(pool, 0)
    if num_prefix_tokens < needs:
        raise ValueError(
            f"pool {pool!r} reads {needs} prefix token(s) (class{', distillation' if needs == 2 else ''}), but "
            f"num_prefix_tokens is {num_prefix_tokens}"
        )
    if pool == "seq":
        if not isinstance(sequence_weights, torch.Tensor) or sequence_weights.ndim != 2:
            shape = tuple(sequence_weights.shape) if isinstance(sequence_weights, torch.Tensor) else sequence_weights
            raise ValueError(f"pool 'seq' needs sequence_weights [B, N - num_prefix_tokens], got {shape}")
        if sequence_weights.shape[1] != num_tokens - num_prefix_tokens:
            raise ValueError(
                f"sequence_weights weigh {sequence_weights.shape[1]} tokens, but there are "
                f"{num_tokens - num_prefix_tokens} patch tokens ({num_tokens} tokens, {num_prefix_tokens} prefix)"
            )
        weights = sequence_weights.new_zeros(sequence_weights.shape[0], num_tokens)
        weights[:, num_prefix_tokens:] = sequence_weights
        return weights
    weights = torch.zeros(num_tokens)
    if pool == "token":
        weights[0] = 1.0
    elif pool == "distilled":
        weights[:2] = 0.5
    elif pool == "avg":
        weights[num_prefix_tokens:] = 1.0 / (num_tokens - num_prefix_tokens)
    else:  # avg_all
        weights[:] = 1.0 / num_tokens
    return weights


def _readout(
    batch: int,
    num_tokens: int,
    num_prefix_tokens: int,
    pool_weights: torch.Tensor | None,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """The rows ``[B, N]`` the head reads: ``pool_weights`` ``[N]``/``[B, N]``, or by default row 0 when
    ``num_prefix_tokens > 0``, else the mean of all rows."""
    if pool_weights is None:
        weights = torch.zeros(num_tokens, dtype=dtype, device=device)
        if num_prefix_tokens > 0:
            weights[0] = 1.0
        else:
            weights[:] = 1.0 / num_tokens
        return weights.expand(batch, -1)
    if not isinstance(pool_weights, torch.Tensor):
        raise TypeError(f"pool_weights must be a tensor [N] or [B, N], got {type(pool_weights).__name__}")
    weights = pool_weights.to(device=device, dtype=dtype)
    weights = weights[None] if weights.ndim == 1 else weights
    if weights.ndim != 2 or weights.shape[1] != num_tokens or weights.shape[0] not in (1, batch):
        raise ValueError(
            f"pool_weights has shape {tuple(pool_weights.shape)}; expected [N] or [B, N] with N={num_tokens}, B={batch}"
        )
    if not torch.isfinite(weights).all():
        raise ValueError("pool_weights hold NaN or Inf values")
    return weights.expand(batch, -1)


def _read_rows(relevance: torch.Tensor, num_prefix_tokens: int, pool_weights: torch.Tensor | None) -> torch.Tensor:
    """Combine the rows of ``[B, N, N]`` into ``[B, N]``: ``pool_weights`` ``[N]``/``[B, N]`` or the default."""
    batch, num_tokens = relevance.shape[0], relevance.shape[-1]
    weights = _readout(batch, num_tokens, num_prefix_tokens, pool_weights, relevance.dtype, relevance.device)
    return (weights[:, None] @ relevance)[:, 0]  # B, 1, N @ B, N, N -> B, N


def _out_dtype(attentions: Sequence[torch.Tensor]) -> torch.dtype:
    return torch.promote_types(attentions[0].dtype, torch.float32)


def _flow(
    attentions: Sequence[torch.Tensor],
    num_prefix_tokens: int,
    grid_size: int | Sequence[int] | None,
    pool_weights: torch.Tensor | None,
    gradients: Sequence[torch.Tensor] | None = None,
) -> TokenFlow:
    """Global attention layers ``[B, H, N, N]`` as a :class:`~vision_attn.explain.flow.TokenFlow` (one window each,
    heads kept; with ``gradients``, ``relu(∇A ⊙ A)`` per head)."""
    batch, num_tokens = attentions[0].shape[0], attentions[0].shape[-1]
    tokens = TokenGrid(num_prefix_tokens, _resolve_grid(num_tokens - num_prefix_tokens, grid_size))
    dtype = torch.promote_types(attentions[0].dtype, torch.float32)
    mixes = []
    for i, attn in enumerate(attentions):
        weights = attn.to(dtype)
        if gradients is not None:
            weights = (gradients[i].to(dtype) * weights).clamp(min=0)
        mixes.append(attention_mix(f"layer {i}", tokens, weights.unsqueeze(2)))  # B, H, 1, N, N
    readout = _readout(batch, num_tokens, num_prefix_tokens, pool_weights, dtype, attentions[0].device)
    return TokenFlow(mixes, readout)


def tokens_to_grid(
    relevance: torch.Tensor,
    num_prefix_tokens: int = 1,
    grid_size: int | Sequence[int] | None = None,
    pool_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Turn a token-relevance matrix ``[B, N, N]`` into a patch map ``[B, gh, gw]``.

    The rows the model's head pools are combined by ``pool_weights`` (``[N]`` or ``[B, N]``, see
    :func:`token_pool_weights`); by default row 0 (the class token) when ``num_prefix_tokens > 0``, else the mean
    of all rows. The result is taken over the patch-token columns ``num_prefix_tokens:`` and reshaped row-major to
    ``grid_size`` (square if ``None``).
    """
    batch, num_tokens = relevance.shape[0], relevance.shape[-1]
    _check_prefix(num_prefix_tokens, num_tokens)
    gh, gw = _resolve_grid(num_tokens - num_prefix_tokens, grid_size)
    rows = _read_rows(relevance, num_prefix_tokens, pool_weights)  # B, N
    return rows[:, num_prefix_tokens:].reshape(batch, gh, gw)


def fuse_heads(attention: torch.Tensor, head_fusion: str = "mean") -> torch.Tensor:
    """Fuse the heads of ``[B, H, N, N]`` attention into ``[B, N, N]`` by ``'mean'``, ``'max'`` or ``'min'``."""
    if head_fusion == "mean":
        return attention.mean(dim=1)
    if head_fusion == "max":
        return attention.amax(dim=1)
    if head_fusion == "min":
        return attention.amin(dim=1)
    raise ValueError(f"head_fusion {head_fusion!r} is unknown; expected one of {HEAD_FUSIONS}")


def attention_rollout(
    attentions: Sequence[torch.Tensor],
    num_prefix_tokens: int = 1,
    head_fusion: str = "mean",
    discard_ratio: float = 0.0,
    grid_size: int | Sequence[int] | None = None,
    start_layer: int = 0,
    pool_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema 2020, "Quantifying Attention Flow in Transformers").

    ``attentions``: one ``[B, heads, N, N]`` tensor per layer, in block order. Per layer from ``start_layer``:
    fuse heads (``head_fusion``); if ``discard_ratio > 0``, zero that fraction of the lowest entries of each row
    outside the prefix-token columns; ``Â = 0.5·A + 0.5·I``; renormalize rows; ``R = Â_L ⋯ Â_start``. Returns
    the raw (unnormalized) map ``[B, gh, gw]``: the rows of ``R`` the model's head pools, combined by
    ``pool_weights`` (default: row 0 if ``num_prefix_tokens > 0``, else the mean of all rows), over the
    patch-token columns (see :func:`tokens_to_grid` and :func:`token_pool_weights`).
    """
    _, num_tokens = check_attentions(attentions)
    if head_fusion not in HEAD_FUSIONS:
        raise ValueError(f"head_fusion {head_fusion!r} is unknown; expected one of {HEAD_FUSIONS}")
    if not isinstance(discard_ratio, (int, float)) or not 0.0 <= discard_ratio < 1.0:
        raise ValueError(f"discard_ratio must be a float in [0, 1), got {discard_ratio!r}")
    if not isinstance(start_layer, int) or not -len(attentions) <= start_layer < len(attentions):
        raise ValueError(f"start_layer {start_layer!r} is out of range for {len(attentions)} attention layers")
    _check_prefix(num_prefix_tokens, num_tokens)
    _resolve_grid(num_tokens - num_prefix_tokens, grid_size)  # fail before the work

    flow = _flow(attentions, num_prefix_tokens, grid_size, pool_weights)
    return flow_rollout(flow, head_fusion, discard_ratio, start_layer).to(_out_dtype(attentions))


def gradient_rollout(
    attentions: Sequence[torch.Tensor],
    gradients: Sequence[torch.Tensor],
    num_prefix_tokens: int = 1,
    grid_size: int | Sequence[int] | None = None,
    pool_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Gradient-weighted attention rollout (Chefer et al. 2021, "Generic Attention-model Explainability for
    Interpreting Bi-Modal and Encoder-Decoder Transformers").

    ``attentions`` and ``gradients`` (of the target logit w.r.t. each attention, see
    :func:`vision_attn.explain.attention_gradients`): one ``[B, heads, N, N]`` tensor per layer, same shapes.
    ``R = I``; per layer ``Ā = mean_heads(clamp(∇A ⊙ A, min=0))``, ``R = R + Ā @ R``. Returns the raw map
    ``[B, gh, gw]`` read from ``R`` as in :func:`attention_rollout` (``pool_weights`` likewise).
    """
    _, num_tokens = check_attentions(attentions)
    check_attentions(gradients, name="gradients")
    if len(gradients) != len(attentions):
        raise ValueError(f"gradients has {len(gradients)} layers, but attentions has {len(attentions)}")
    for i, (attn, grad) in enumerate(zip(attentions, gradients, strict=True)):
        if attn.shape != grad.shape:
            raise ValueError(
                f"gradients[{i}] has shape {tuple(grad.shape)}, but attentions[{i}] has {tuple(attn.shape)}"
            )
    _check_prefix(num_prefix_tokens, num_tokens)
    _resolve_grid(num_tokens - num_prefix_tokens, grid_size)

    flow = _flow(attentions, num_prefix_tokens, grid_size, pool_weights, gradients)
    return flow_gradient_rollout(flow).to(_out_dtype(attentions))


def last_layer_attention(
    attentions: Sequence[torch.Tensor],
    num_prefix_tokens: int = 1,
    head_fusion: str = "mean",
    grid_size: int | Sequence[int] | None = None,
    layer: int = -1,
    pool_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Raw attention of one layer (default the last) as a map ``[B, gh, gw]``.

    Heads fused by ``head_fusion``; the rows the head pools (``pool_weights``; default the class-token row, or
    the mean of all rows without prefix tokens) over the patch-token columns, as in Dosovitskiy et al. 2021,
    "An Image is Worth 16x16 Words", Fig. 6.
    """
    check_attentions(attentions)
    if not isinstance(layer, int) or not -len(attentions) <= layer < len(attentions):
        raise ValueError(f"layer {layer!r} is out of range for {len(attentions)} attention layers")
    if head_fusion not in HEAD_FUSIONS:
        raise ValueError(f"head_fusion {head_fusion!r} is unknown; expected one of {HEAD_FUSIONS}")
    _check_prefix(num_prefix_tokens, attentions[0].shape[-1])
    flow = _flow(attentions, num_prefix_tokens, grid_size, pool_weights)
    return flow_attention(flow, layer, head_fusion).to(_out_dtype(attentions))
