"""What the token methods read of a ViT-style model, described once: its token layout (prefix tokens, patch grid),
the rows its head pools, and its attention probabilities (with their gradients where a method needs them).

:func:`capture_token_attention` runs the model once and returns a :class:`TokenAttention`; the token methods of
:mod:`vision_attn.explain.methods` consume it and never look at a model's family themselves.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from vision_attn.explain._common import NotApplicableError, check_logits, resolve_targets
from vision_attn.explain.capture import AttentionRecorder
from vision_attn.explain.rollout import check_grid_size, token_pool_weights
from vision_attn.layers.pooling import SequencePool

__all__ = [
    "TOKEN_OPTIONS",
    "TokenAttention",
    "capture_token_attention",
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


def token_pool(model: nn.Module) -> str:
    """Return how ``model``'s head pools its output tokens, as a pool of
    :func:`~vision_attn.explain.rollout.token_pool_weights`: ``'token'``, ``'distilled'``, ``'avg'``, ``'avg_all'``
    or ``'seq'``.

    Reads ``attn_pool`` (our :class:`~vision_attn.layers.SequencePool`: ``'seq'``), ``head_dist`` (timm's distilled
    DeiT: ``'distilled'``), ``global_pool`` (``'token'``/``'avg'``; ``pool_include_prefix`` gives ``'avg_all'``);
    a model that declares none of these is read as ``'token'`` with prefix tokens, else ``'avg'``. Raises
    :class:`NotApplicableError` for pools no row weighting describes (timm's ``'max'``, ``'avgmax'``, attention
    pooling ``'map'``).
    """
    name = type(model).__name__
    global_pool = getattr(model, "global_pool", None)
    attn_pool = getattr(model, "attn_pool", None)
    if isinstance(attn_pool, SequencePool):
        return "seq"
    if isinstance(attn_pool, nn.Module):
        raise NotApplicableError(
            f"model {name} pools its tokens with {type(attn_pool).__name__} (global_pool={global_pool!r}); the "
            f"token methods {_token_methods()} read class-token, distillation-token, average or sequence pooling "
            "only; use a Grad-CAM method"
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
            f"describes; the token methods {_token_methods()} need 'token', 'avg' or sequence pooling; use a "
            "Grad-CAM method"
        )
    prefix = getattr(model, "num_prefix_tokens", None)
    if prefix is None:
        prefix = int(getattr(model, "cls_token", None) is not None)
    return "token" if prefix > 0 else "avg"


def token_attention_problem(model: nn.Module) -> str:
    """Why the token methods cannot read ``model`` (``''`` when they can, as far as the modules tell): no token
    attention the recorder captures, or a head pooling that no weighting of token rows describes."""
    recorder = AttentionRecorder(model)
    if not recorder.has_token_attention:
        kinds = sorted(set(recorder.kinds.values()))
        found = f" (it has only {', '.join(kinds)} maps)" if kinds else ""
        cnn_methods = ("gradcam", "gradcam++", "layercam", "spatial")
        return (
            f"model {type(model).__name__} has no token-attention modules{found}; the attention methods "
            f"{_token_methods()} need a ViT-style model; use one of {cnn_methods} for a CNN"
        )
    try:
        token_pool(model)
    except NotApplicableError as err:
        return str(err)
    return ""


@dataclass
class TokenAttention:
    """One forward pass of a token model, as the token methods read it.

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


def _global_attentions(recorder: AttentionRecorder, model: nn.Module, batch_size: int) -> list[torch.Tensor]:
    attentions = recorder.attentions
    if not attentions:
        raise NotApplicableError(token_attention_problem(model) or f"model {type(model).__name__} ran no attention")
    if any(a.shape[0] != batch_size for a in attentions):
        shapes = sorted({tuple(a.shape) for a in attentions})
        raise NotApplicableError(
            f"model {type(model).__name__} has attention maps of shapes {shapes} for {batch_size} images: "
            f"windowed or pooled attention (e.g. Swin) has no global [B, heads, N, N] map for {_token_methods()}; "
            "use one of ('gradcam', 'gradcam++', 'layercam')"
        )
    return attentions


def capture_token_attention(
    model: nn.Module,
    images: torch.Tensor,
    target: int | Sequence[int] | torch.Tensor | None = None,
    gradients: bool = False,
    num_prefix_tokens: int | None = None,
    grid_size: int | Sequence[int] | None = None,
) -> TokenAttention:
    """Run ``model`` once on ``images`` ``[B, C, H, W]`` and describe it for the token methods.

    ``gradients=True`` also runs one backward pass of the ``target`` logits (``None``: the predicted classes) and
    returns the gradients of the attention probabilities; parameter ``.grad`` fields are left untouched (the
    gradients come from ``torch.autograd.grad``). ``num_prefix_tokens``/``grid_size`` are checked against the model
    (:func:`token_layout`). Raises :class:`NotApplicableError` when the model has no global token attention.
    """
    num_prefix, grid = token_layout(model, tuple(images.shape[-2:]), num_prefix_tokens, grid_size)
    pool = token_pool(model)
    targets = grads = None
    if gradients:
        with torch.enable_grad(), AttentionRecorder(model, detach=False) as recorder:
            logits = model(images.detach().requires_grad_(True))
            check_logits(logits, model, need_classes=True)
            attentions = _global_attentions(recorder, model, images.shape[0])
            targets = resolve_targets(target, logits)
            score = logits.gather(1, targets[:, None]).sum()  # images are independent: d(sum)/dA_b = d(logit_b)/dA_b
            grads = [g.detach() for g in torch.autograd.grad(score, attentions)]
        attentions = [a.detach() for a in attentions]
        logits = logits.detach()
    else:
        with torch.no_grad(), AttentionRecorder(model) as recorder:
            logits = model(images)
        check_logits(logits, model)
        attentions = _global_attentions(recorder, model, images.shape[0])
    sequence = recorder.pool_weights
    sequence = None if sequence is None else sequence.detach()
    readout = token_pool_weights(pool, attentions[0].shape[-1], num_prefix, sequence)
    return TokenAttention(attentions, grads, readout, num_prefix, grid, logits, targets)
