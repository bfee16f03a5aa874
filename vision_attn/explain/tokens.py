"""What the token methods read of a transformer: :func:`capture_token_flow` runs the model once and returns the
shared description, a :class:`~vision_attn.explain.flow.TokenFlow`, built by the model's family adapter
(:mod:`vision_attn.explain.families`); the token methods of :mod:`vision_attn.explain.methods` consume it and never
look at a model's family themselves. :func:`token_layout` and :func:`token_pool` read a ViT's token layout and head;
:func:`capture_token_attention` gives the per-head attention of plain ViTs, as before.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vision_attn.explain._common import NotApplicableError, check_logits, resolve_targets
from vision_attn.explain.capture import AttentionCall, AttentionRecorder
from vision_attn.explain.flow import TokenFlow
from vision_attn.explain.rollout import check_grid_size
from vision_attn.layers.pooling import SequencePool

__all__ = [
    "TOKEN_OPTIONS",
    "TokenAttention",
    "capture_token_attention",
    "capture_token_flow",
    "declared_prefix",
    "token_attention_problem",
    "token_layout",
    "token_pool",
]

TOKEN_OPTIONS = ("num_prefix_tokens", "grid_size")  # options every token method takes (checked against the model)


def _token_methods() -> tuple[str, ...]:
    from vision_attn.explain.registry import get_method, list_methods

    return tuple(m for m in list_methods() if "token_attention" in get_method(m).needs)


def _model_grid(model: nn.Module, image_size: tuple[int, int]) -> tuple[int, int] | None:
    patch_embed = getattr(model, "patch_embed", None)
    if patch_embed is not None and hasattr(patch_embed, "dynamic_feat_size"):
        gh, gw = patch_embed.dynamic_feat_size(tuple(image_size))
        return int(gh), int(gw)
    if patch_embed is not None and getattr(patch_embed, "grid_size", None) is not None:
        gh, gw = patch_embed.grid_size
        return int(gh), int(gw)
    return None


def token_layout(
    model: nn.Module,
    image_size: tuple[int, int],
    num_prefix_tokens: int | None = None,
    grid_size: int | Sequence[int] | None = None,
) -> tuple[int, tuple[int, int] | None]:
    """Return ``(num_prefix_tokens, (gh, gw))`` of a ViT-style ``model`` for inputs of ``image_size``.

    Read from ``model.num_prefix_tokens`` and ``model.patch_embed`` (``dynamic_feat_size`` or ``grid_size``) —
    works for our ViTs and timm's (class, distillation and register tokens). Given values must agree with what the
    model declares (``ValueError`` otherwise) and are needed only where it declares nothing; ``grid_size`` may be an
    int (square). The grid is ``None`` when the model has no ``patch_embed`` (rollout then needs a square count).
    """
    declared = getattr(model, "num_prefix_tokens", None)
    if num_prefix_tokens is None:
        num_prefix_tokens = declared if declared is not None else int(getattr(model, "cls_token", None) is not None)
    elif isinstance(declared, int) and num_prefix_tokens != declared:
        raise ValueError(
            f"num_prefix_tokens {num_prefix_tokens!r} does not match model {type(model).__name__}, which has "
            f"{declared} prefix tokens (class, distillation and register tokens); leave it out"
        )
    model_grid = _model_grid(model, image_size)
    if grid_size is None:
        return int(num_prefix_tokens), model_grid
    grid = check_grid_size(grid_size)
    if model_grid is not None and grid != model_grid:
        raise ValueError(
            f"grid_size {grid_size!r} does not match the token grid {model_grid} of model {type(model).__name__} "
            f"for {image_size[0]}x{image_size[1]} images; leave it out"
        )
    return int(num_prefix_tokens), grid


def declared_prefix(model: nn.Module) -> int:
    """``model.num_prefix_tokens``, else 1 with a ``cls_token`` and 0 without."""
    prefix = getattr(model, "num_prefix_tokens", None)
    return int(prefix) if isinstance(prefix, int) else int(getattr(model, "cls_token", None) is not None)


def token_pool(model: nn.Module) -> str:
    """Return how ``model``'s head pools its output tokens: ``'token'``, ``'distilled'``, ``'avg'``, ``'avg_all'``,
    ``'seq'`` (rows of :func:`~vision_attn.explain.rollout.token_pool_weights`), ``'map'`` (an attention-pool head,
    timm ``AttentionPoolLatent``: its query's attention is the readout) or ``'prr'`` (timm ``AttentionPoolPrr``: a
    self-attention then the class or average row).

    Reads ``attn_pool`` (our :class:`~vision_attn.layers.SequencePool`: ``'seq'``; timm's attention pools),
    ``head_dist`` (timm's distilled DeiT: ``'distilled'``), ``global_pool`` (``'token'``/``'avg'``;
    ``pool_include_prefix`` gives ``'avg_all'``); a model that declares none of these is read as ``'token'`` with
    prefix tokens, else ``'avg'``. Raises :class:`NotApplicableError` for pools no row weighting describes (timm's
    ``'max'``, ``'avgmax'``, an unknown pooling module).
    """
    from vision_attn.explain.families.vit import _attention_pools, _self_attention_pools

    name = type(model).__name__
    global_pool = getattr(model, "global_pool", None)
    attn_pool = getattr(model, "attn_pool", None)
    if isinstance(attn_pool, SequencePool):
        return "seq"
    if isinstance(attn_pool, _attention_pools()):
        return "map"
    if isinstance(attn_pool, _self_attention_pools()):
        return "prr"
    if isinstance(attn_pool, nn.Module):
        raise NotApplicableError(
            f"model {name} pools its tokens with {type(attn_pool).__name__} (global_pool={global_pool!r}); the "
            f"token methods {_token_methods()} read class-token, distillation-token, average, sequence or "
            "attention pooling only; use a Grad-CAM method"
        )
    if isinstance(getattr(model, "head_dist", None), nn.Module):
        return "distilled"
    if global_pool == "token":
        return "token"
    if global_pool == "avg":
        return "avg_all" if getattr(model, "pool_include_prefix", False) else "avg"
    if isinstance(global_pool, str) and global_pool:
        raise NotApplicableError(
            f"model {name} pools its tokens by global_pool={global_pool!r}, which no weighting of token rows "
            f"describes; the token methods {_token_methods()} need 'token', 'avg', sequence or attention pooling; "
            "use a Grad-CAM method"
        )
    return "token" if declared_prefix(model) > 0 else "avg"


def token_attention_problem(model: nn.Module) -> str:
    """Why the token methods cannot read ``model`` (``''`` when they can, as far as the modules tell): no family
    adapter knows its attention (a CNN), or its adapter refuses it (with the reason)."""
    from vision_attn.explain.families import find_adapter

    adapter = find_adapter(model)
    if adapter is None:
        kinds = sorted(set(AttentionRecorder(model).kinds.values()))
        found = f" (it has only {', '.join(kinds)} maps)" if kinds else ""
        cnn_methods = ("gradcam", "gradcam++", "layercam", "spatial")
        return (
            f"model {type(model).__name__} has no token-attention modules{found}; the attention methods "
            f"{_token_methods()} need a transformer; use one of {cnn_methods} for a CNN"
        )
    return adapter.problem(model)


def _refusal(model: nn.Module, adapter: object, unaccounted: list[tuple[str, str, tuple[int, ...]]]) -> str:
    calls = ", ".join(f"{op} in {where or 'the model'} {list(shape)}" for where, op, shape in unaccounted[:4])
    more = f" and {len(unaccounted) - 4} more" if len(unaccounted) > 4 else ""
    return (
        f"model {type(model).__name__} computes attention its family adapter ({adapter.family}) does not describe "
        f"({calls}{more}): a map from the attention it does describe would leave these layers out; use a Grad-CAM "
        "method or attnlrp"
    )


def _check_token_options(
    model: nn.Module, flow: TokenFlow, num_prefix_tokens: int | None, grid_size: int | Sequence[int] | None
) -> None:
    """``num_prefix_tokens`` / ``grid_size`` a user gave must match the finest tokens the adapter found."""
    finest = flow.finest
    if num_prefix_tokens is not None and num_prefix_tokens != finest.num_prefix_tokens:
        raise ValueError(
            f"num_prefix_tokens {num_prefix_tokens!r} does not match model {type(model).__name__}, whose maps are read "
            f"on {finest.num_prefix_tokens} prefix tokens and a {finest.grid} grid; leave it out"
        )
    if grid_size is not None and check_grid_size(grid_size) != finest.grid:
        raise ValueError(
            f"grid_size {grid_size!r} does not match the token grid {finest.grid} of model {type(model).__name__}; "
            "leave it out"
        )


def capture_token_flow(
    model: nn.Module,
    images: torch.Tensor,
    target: int | Sequence[int] | torch.Tensor | None = None,
    gradients: bool = False,
    head_fusion: str = "mean",
    num_prefix_tokens: int | None = None,
    grid_size: int | Sequence[int] | None = None,
    keep_heads: bool = False,
) -> TokenFlow:
    """Run ``model`` once on ``images`` ``[B, C, H, W]`` and describe it for the token methods: a
    :class:`~vision_attn.explain.flow.TokenFlow` built by the model's family adapter.

    Each attention layer's map is reduced over heads as it is recorded (``head_fusion``; ``keep_heads=True`` keeps
    ``[B, heads, W, q, k]``), so at most one map per layer is kept. ``gradients=True`` runs one backward pass of the
    ``target`` logits (``None``: the predicted classes) instead, and each layer's map is ``mean_h(relu(∇A ⊙ A))``,
    computed as its gradient arrives (with ``keep_heads`` the attention and its gradient are kept per head, in
    :attr:`TokenFlow.gradients`). Attention-pool heads always give their plain attention (mean over heads): it is the
    readout. Parameter ``.grad`` fields are left untouched. Raises :class:`NotApplicableError` when no adapter knows
    the model, its adapter refuses it, or the model computes attention the adapter does not describe.
    """
    from vision_attn.explain.families import find_adapter
    from vision_attn.explain.families.base import Capture, canonical
    from vision_attn.explain.rollout import fuse_heads

    name = type(model).__name__
    adapter = find_adapter(model)
    problem = token_attention_problem(model)
    if adapter is None or problem:
        raise NotApplicableError(problem)
    if head_fusion not in ("mean", "max", "min"):
        raise ValueError(f"head_fusion {head_fusion!r} is unknown; expected one of ('mean', 'max', 'min')")
    batch = images.shape[0]
    pools = adapter.pools(model)
    weights: list[Any] = []
    layouts: list[Any] = []
    first_in_graph: list[torch.Tensor] = []
    per_head_grads: list[torch.Tensor | None] = []

    def on_attention(owner: str, probs: torch.Tensor, fused: bool = False) -> int:
        layout = adapter.layout(owner)
        index = len(weights)
        layouts.append(layout)
        if fused:  # heads fused blockwise: [X, q, k] of a 4-D layout, or an attention call weighed after backward
            if isinstance(probs, AttentionCall) and probs.output is not None and not first_in_graph:
                first_in_graph.append(probs.output)
            fused_map = probs if isinstance(probs, AttentionCall) else canonical(layout, probs[:, None], batch)[:, 0]
            weights.append(fused_map)
            per_head_grads.append(None)
            return index
        attention = canonical(layout, probs.detach(), batch)  # B, heads, W, q, k (a view)
        if owner in pools:
            weights.append(attention.mean(dim=1))
        elif gradients and probs.requires_grad:
            if not first_in_graph:
                first_in_graph.append(probs)
            weights.append(attention if keep_heads else None)
            per_head_grads.append(None)

            def reduce(grad: torch.Tensor, index: int = index, attention: torch.Tensor = attention) -> None:
                grad = canonical(layout, grad, batch)
                if keep_heads:
                    per_head_grads[index] = grad.detach()
                else:
                    weights[index] = (grad * attention).clamp(min=0).mean(dim=1)

            probs.register_hook(reduce)
            return index
        else:
            weights.append(attention.clone() if keep_heads else fuse_heads(attention, head_fusion))
        per_head_grads.append(None)
        return index

    owners = adapter.owners(model)
    fast = not keep_heads  # heads fused blockwise inside each SDPA call (gradients: weighed after the backward)
    recorder = AttentionRecorder(
        model,
        detach=not gradients,
        owners=owners,
        skip={n: m for n, (m, _) in adapter.skipped(model).items()},
        on_attention=on_attention,
        head_fusion=("gradient" if gradients else head_fusion) if fast else None,
        fusable={
            n for n in AttentionRecorder(model, owners=owners).token_names
            if n not in pools and isinstance(adapter.layout(n), str) and adapter.layout(n) in ("bhqk", "(bw)hqk")
        } if fast else frozenset(),
    )  # fmt: skip
    adapter.observe(model, recorder)
    targets = None
    if gradients:
        with torch.enable_grad(), recorder:
            leaf = images.detach().requires_grad_(True)
            logits = model(leaf)
            check_logits(logits, model, need_classes=True)
            targets = resolve_targets(target, logits)
            if recorder.unaccounted:
                raise NotApplicableError(_refusal(model, adapter, recorder.unaccounted))
            score = logits.gather(1, targets[:, None]).sum()  # images are independent: d(sum)/dA_b = d(logit_b)/dA_b
            # the backward needs to reach the first attention call only (its hooks and those above it fire)
            first = next((t for t in first_in_graph if t.requires_grad), leaf)
            torch.autograd.grad(score, first, allow_unused=True)
        logits = logits.detach()
    else:
        with torch.no_grad(), recorder:
            logits = model(images)
        check_logits(logits, model)
        if recorder.unaccounted:
            raise NotApplicableError(_refusal(model, adapter, recorder.unaccounted))
    for i, value in enumerate(weights):
        if isinstance(value, AttentionCall):
            weights[i] = canonical(layouts[i], value.weighted()[:, None], batch)[:, 0]
            value = weights[i]
        if value is None:  # a layer no gradient reached (it does not affect the target)
            raise NotApplicableError(f"model {name}: no gradient of the target logit reached attention call {i}")
    events = list(recorder.events)
    sequence = recorder.pool_weights
    capture = Capture(
        batch, tuple(images.shape[-2:]), num_prefix_tokens, grid_size, None if sequence is None else sequence.detach()
    )
    flow = adapter.describe(model, events, weights, capture)
    _check_token_options(model, flow, num_prefix_tokens, grid_size)
    flow.logits, flow.targets = logits, targets
    flow.skipped = {n: reason for n, (_, reason) in adapter.skipped(model).items()}
    if keep_heads and gradients:
        flow.gradients = [per_head_grads[i] for kind, _, i in events if kind == "attention" and weights[i].ndim == 5]
    return flow


@dataclass
class TokenAttention:
    """One forward pass of a plain ViT-style model (global attention over one token set in every block), as the
    token methods read it before :class:`~vision_attn.explain.flow.TokenFlow` described every family.

    ``attentions`` (and ``gradients`` of the ``targets`` logits, if asked for): ``[B, heads, N, N]`` per attention
    layer, detached; ``readout``: the weights ``[N]`` or ``[B, N]`` with which the head pools the output tokens;
    ``num_prefix_tokens`` and ``grid`` ``(gh, gw)`` place the patch tokens; ``logits`` ``[B, num_classes]``.
    """

    attentions: list[torch.Tensor]
    gradients: list[torch.Tensor] | None
    readout: torch.Tensor
    num_prefix_tokens: int
    grid: tuple[int, int] | None
    logits: torch.Tensor
    targets: torch.Tensor | None


def capture_token_attention(
    model: nn.Module,
    images: torch.Tensor,
    target: int | Sequence[int] | torch.Tensor | None = None,
    gradients: bool = False,
    num_prefix_tokens: int | None = None,
    grid_size: int | Sequence[int] | None = None,
) -> TokenAttention:
    """Run ``model`` once on ``images`` ``[B, C, H, W]`` and return its attention per layer and head, for models
    whose every block attends globally over one token set (ViT-style; :func:`capture_token_flow` describes every
    family). ``gradients=True`` also runs one backward pass of the ``target`` logits (``None``: the predicted
    classes) and returns the gradients of the attention probabilities; parameter ``.grad`` fields are left untouched.
    ``num_prefix_tokens``/``grid_size`` are checked against the model (:func:`token_layout`). Raises
    :class:`NotApplicableError` for other models (windowed, hierarchical, class attention).
    """
    flow = capture_token_flow(
        model, images, target, gradients=gradients, num_prefix_tokens=num_prefix_tokens, grid_size=grid_size,
        keep_heads=True,
    )  # fmt: skip
    layers = flow.attention_mixes
    tokens = layers[0].source
    readout = flow.readout_rows() if flow.readout.ndim == 2 else flow.readout.clone()
    single = readout.ndim == 1
    readout = readout[None] if single else readout
    for mix in reversed(flow.mixes[flow.mixes.index(layers[-1]) + 1 :]):
        readout = mix.pass_skip(readout)  # a pool that reads the patch tokens only
    below = flow.mixes[: flow.mixes.index(layers[-1]) + 1]
    plain = all(m.is_attention and m.source == m.target == tokens and m.weights.shape[2] == 1 for m in below)
    if not plain:
        raise NotApplicableError(
            f"model {type(model).__name__} ({flow.family}) does not attend globally over one token set in every "
            "block; capture_token_flow describes it"
        )
    attentions = [m.weights[:, :, 0] for m in layers]
    grads = [g[:, :, 0] for g in flow.gradients] if gradients else None
    return TokenAttention(
        attentions, grads, readout[0] if single else readout, tokens.num_prefix_tokens, tokens.grid, flow.logits,
        flow.targets,
    )  # fmt: skip
