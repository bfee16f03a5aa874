"""Relevance maps of ViT-family models from layer-wise relevance propagation: ``(model, images [B, C, H, W],
targets [B]) -> maps [B, gh, gw]`` (float32, raw: not normalised, not upsampled), batched.

* :func:`attnlrp` — AttnLRP (Achtibat et al., ICML 2024): one forward and one backward pass;
* :func:`transformer_attribution` — Chefer, Gur & Wolf (CVPR 2021): one forward and two backward passes (the plain
  attention gradients and the LRP relevance of the attention maps come from the same forward graph).

Both run the rules of :mod:`vision_attn.explain.lrp` from outside the model: no copy of its code, no hook left
behind, fused attention and train/eval flags as they were, no ``.grad`` written.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from vision_attn.explain._common import (
    NotApplicableError,
    check_logits,
    check_model_images,
    eval_mode,
    require_classes,
    resolve_targets,
    to_model_inputs,
    unwrap_model,
)
from vision_attn.explain.capture import AttentionRecorder
from vision_attn.explain.families import find_adapter
from vision_attn.explain.families.base import Capture, canonical
from vision_attn.explain.flow import flow_gradient_rollout
from vision_attn.explain.lrp import ATTENTION_RULES, LRPRules, embedding_module, lrp_forward, safe_divide
from vision_attn.explain.tokens import _refusal, token_attention_problem, token_layout

__all__ = ["LEVELS", "attnlrp", "transformer_attribution"]

LEVELS = ("tokens", "pixels")  # where attnlrp reads the relevance: the token embeddings or the input pixels
TA_LINEAR_RULES = ("gradient", "alpha1beta0")  # transformer_attribution's: gradient x input or Chefer's z+ rule

Targets = int | Sequence[int] | torch.Tensor | None


def _prepare(model: nn.Module, images: torch.Tensor, method: str) -> tuple[nn.Module, torch.Tensor]:
    """``(model, inputs)``: the unwrapped model, the checked images on its device."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    model = unwrap_model(model)
    embedding_module(model)
    check_model_images(model, images)
    require_classes(model, method)
    return model, to_model_inputs(model, images)


def _token_grid(model: nn.Module, module: nn.Module, image_size: tuple[int, int], count: int) -> tuple[int, int]:
    """The grid of ``count`` embedding tokens ``[B, N, D]``: the model's patch grid, the embedding module's, or a
    square."""
    _, grid = token_layout(model, image_size)
    if grid is None:
        size = getattr(module, "grid_size", None)
        if hasattr(module, "dynamic_feat_size"):
            size = module.dynamic_feat_size(image_size)
        grid = tuple(int(v) for v in size) if size is not None else None
    if grid is None:
        side = math.isqrt(count)
        grid = (side, side) if side * side == count else None
    if grid is None or grid[0] * grid[1] != count:
        raise NotApplicableError(
            f"model {type(model).__name__}'s token embeddings hold {count} tokens, which fit its grid {grid} of "
            f"{image_size[0]}x{image_size[1]} images nowhere"
        )
    return grid


def _embedding_map(
    model: nn.Module, embeddings: torch.Tensor, grad: torch.Tensor, image_size: tuple[int, int]
) -> torch.Tensor:
    """Relevance ``embeddings ⊙ grad`` summed over channels, as a map ``[B, gh, gw]``: tokens ``[B, N, D]`` on the
    patch grid, ``[B, gh, gw, D]`` (NHWC, a patch embedding whose ``output_fmt`` says so) or ``[B, D, gh, gw]``."""
    relevance = (embeddings * grad).detach().float()
    module = embedding_module(model)
    if relevance.ndim == 4:
        fmt = getattr(module, "output_fmt", None)
        grid = token_layout(model, image_size)[1]
        adapter = find_adapter(model)
        declared = adapter.embedding_layout(model) if adapter is not None else None
        nhwc = declared == "nhwc" or getattr(fmt, "value", fmt) == "NHWC"
        nhwc = nhwc or (declared is None and grid is not None and tuple(relevance.shape[1:3]) == grid)
        return relevance.sum(dim=-1) if nhwc else relevance.sum(dim=1)
    if relevance.ndim == 3:
        per_token = relevance.sum(dim=-1)  # B, N
        return per_token.reshape(-1, *_token_grid(model, module, image_size, per_token.shape[1]))
    raise NotApplicableError(
        f"model {type(model).__name__}'s token embeddings have shape {tuple(embeddings.shape)}; relevance maps need "
        "[B, N, D] tokens or a [B, D, h, w] / [B, h, w, D] feature map"
    )


def _scores(logits: torch.Tensor, model: nn.Module, targets: Targets) -> tuple[torch.Tensor, torch.Tensor]:
    """``(one-hot [B, classes] of each image's target, targets [B])``; NaN/Inf logits are an error."""
    check_logits(logits, model, need_classes=True)
    targets = resolve_targets(targets, logits)
    one_hot = torch.zeros_like(logits).scatter_(1, targets[:, None], 1.0)
    return one_hot.detach(), targets


def attnlrp(
    model: nn.Module,
    images: torch.Tensor,
    targets: Targets = None,
    level: str = "tokens",
    linear_gamma: float | None = None,
    conv_gamma: float | None = None,
    attention_rule: str = "attnlrp",
) -> torch.Tensor:
    """AttnLRP relevance of each patch token for the target logit: ``images [B, C, H, W] -> [B, gh, gw]``.

    Achtibat et al., ICML 2024, "AttnLRP: Attention-Aware Layer-wise Relevance Propagation for Transformers", in its
    efficient gradient x input form (as in their ``lxt.efficient``): one forward pass under
    :class:`~vision_attn.explain.lrp.LRPRules` ``('attnlrp')`` — uniform rule (half the gradient to each factor) on
    ``q @ k^T``, ``A @ v`` and every other product of two input-dependent tensors, identity rule on element-wise
    non-linearities, layer / RMS norm with the std held constant, plain gradient through softmax (their Prop. 3.1
    equals gradient x input), linear layers, residual additions and pooling — and one backward pass of the sum of the
    images' target logits (images are independent). The relevance of a token is its embedding (the output of
    ``model.patch_embed``) times that gradient, summed over channels; position embeddings, class, register and
    distillation tokens keep their shares, so the map holds the patch tokens only, on the model's grid.
    ``targets``: ``None`` = the predicted class, an int for all images, or one index per image.
    ``level='pixels'`` reads the relevance at the input pixels instead (summed over channels, ``[B, H, W]``): the
    rules then continue through the patch embedding (its convolutions and linear layers with the plain gradient).

    The options the AttnLRP authors tune for ViTs (their lxt ViT example with zennit): ``linear_gamma`` /
    ``conv_gamma`` (``None``: the plain gradient, epsilon-LRP) give every linear layer / convolution the LRP-gamma
    rule with that gamma (Montavon et al. 2019, as zennit's ``Gamma``; a convolution followed by batch norm is merged
    with it first, as zennit's canonizer does); ``attention_rule='cp'`` is CP-LRP inside
    the attention: the attention probabilities (every softmax output, attention pooling included) are constants and
    relevance flows through the values only (q and k get none).

    Relevance is conserved by every rule but the softmax (its Taylor decomposition at x leaves a bias term, Prop.
    3.1); biases, position embeddings and prefix tokens take their shares: with none of these, the summed relevance
    of the embeddings equals the target logit minus what the softmaxes absorb. Fused attention
    (``F.scaled_dot_product_attention``) keeps its kernel (the rule scales the gradients of q, k and v), so no flag
    is switched; the cost is about one forward and one backward pass of the batch. Raises
    :class:`~vision_attn.explain.NotApplicableError` for models without token embeddings (CNNs) or without a
    classifier.
    """
    if level not in LEVELS:
        raise ValueError(f"level {level!r} is unknown; expected one of {LEVELS}")
    if attention_rule not in ATTENTION_RULES:
        raise ValueError(f"attention_rule {attention_rule!r} is unknown; expected one of {ATTENTION_RULES}")
    gammas: dict[str, Any] = {}
    if linear_gamma is not None:
        gammas.update(linear_rule="gamma", linear_gamma=linear_gamma)
    if conv_gamma is not None:
        gammas.update(conv_rule="gamma", conv_gamma=conv_gamma)
    rules = LRPRules("attnlrp", attention_rule=attention_rule, **gammas)
    model, inputs = _prepare(model, images, "attnlrp")
    with eval_mode(model, caller="attnlrp"):
        logits, embeddings = lrp_forward(model, inputs, rules, leaf=level)
    one_hot, _ = _scores(logits, model, targets)
    (grad,) = torch.autograd.grad(logits, embeddings, grad_outputs=one_hot)
    if level == "pixels":
        return (embeddings * grad).detach().float().sum(dim=1).to(images.device)  # B, C, H, W -> B, H, W
    return _embedding_map(model, embeddings, grad, (images.shape[-2], images.shape[-1])).to(images.device)


def transformer_attribution(
    model: nn.Module,
    images: torch.Tensor,
    targets: Targets = None,
    start_layer: int = 0,
    linear_rule: str = "alpha1beta0",
) -> torch.Tensor:
    """Transformer Attribution of Chefer, Gur & Wolf, CVPR 2021, "Transformer Interpretability Beyond Attention
    Visualization": ``images [B, C, H, W] -> [B, gh, gw]`` for the target logit.

    Per attention block from ``start_layer``: ``Ā = mean_heads(relu(∇A ⊙ R_A))``, ``R = I``, ``R += Ā @ R``;
    returns the rows of ``R`` the model's head pools (class token, average, distillation tokens, CCT sequence-pooling
    weights; :func:`~vision_attn.explain.token_pool`) over the patch-token columns. ``∇A`` is the plain gradient of
    the target logit with respect to the attention probabilities; ``R_A = A ⊙ g_A`` their LRP relevance with the
    relprop rules of the authors' code (``baselines/ViT/ViT_LRP.py``, ``modules/layers_ours.py``), started from
    relevance 1 at the target logit: linear layers alpha=1, beta=0 (``linear_rule='alpha1beta0'``; bias takes no
    relevance), identity rule on softmax, layer norm and GELU, half the relevance to each factor of ``q @ k^T`` and
    ``A @ v``, residual additions split by their normalised ``Add``. Both come from one forward pass (explicit
    attention, switched by :class:`~vision_attn.explain.AttentionRecorder` and restored) and two backward passes.

    Deviations from their code: their sums in ``Add.relprop`` run over the whole tensor of a batch of one, here over
    each image; products other than attention's two (CCT sequence pooling, gates) get the same halving; in gradient
    x input form a value of exactly 0 carries no relevance (their identity rules pass it on to the next rule, which
    then drops it unless that rule is a linear layer's); their patch-embedding and input rules are not needed
    (relevance stops at ``A``).
    ``linear_rule='gradient'`` replaces the z+ rule by gradient x input (epsilon-LRP) on linear layers: not their
    method, but about half the cost of the backward passes. Raises
    :class:`~vision_attn.explain.NotApplicableError` for models without global token attention (CNNs, windowed
    attention), heads no row reading describes (timm ``'map'``, ``'max'``), or without a classifier.
    """
    return _transformer_attribution(model, images, targets, start_layer, linear_rule).float()


def _transformer_attribution(
    model: nn.Module, images: torch.Tensor, targets: Targets, start_layer: int, linear_rule: str
) -> torch.Tensor:
    """:func:`transformer_attribution` in float64 (the rollout's precision; ``explain`` scales it)."""
    if linear_rule not in TA_LINEAR_RULES:
        raise ValueError(f"linear_rule {linear_rule!r} is unknown; expected one of {TA_LINEAR_RULES}")
    model, inputs = _prepare(model, images, "transformer_attribution")
    adapter = find_adapter(model)
    problem = token_attention_problem(model)
    if adapter is None or problem:
        raise NotApplicableError(problem)
    pools = adapter.pools(model)
    probs: list[tuple[str, torch.Tensor]] = []

    def collect(owner: str, attention: torch.Tensor) -> int:
        probs.append((owner, attention))
        return len(probs) - 1

    rules = LRPRules("chefer", linear_rule=linear_rule)
    recorder = AttentionRecorder(
        model, detach=False, owners=adapter.owners(model),
        skip={n: m for n, (m, _) in adapter.skipped(model).items()}, on_attention=collect,
    )  # fmt: skip
    adapter.observe(model, recorder)
    with eval_mode(model, caller="transformer_attribution"):
        logits, _ = lrp_forward(model, inputs, rules, inner=recorder)
    name = type(model).__name__
    if recorder.unaccounted:
        raise NotApplicableError(_refusal(model, adapter, recorder.unaccounted))
    one_hot, _ = _scores(logits, model, targets)
    layers = [i for i, (owner, _) in enumerate(probs) if owner not in pools]
    if not layers:
        raise NotApplicableError(f"model {name} has no token-attention modules; transformer_attribution needs one")
    tensors = [p for _, p in probs]
    rules.propagate = False
    gradients = torch.autograd.grad(logits, tensors, grad_outputs=one_hot, retain_graph=True, allow_unused=True)
    rules.propagate = True
    modified = torch.autograd.grad(
        logits, tensors, grad_outputs=safe_divide(one_hot, logits.detach()), allow_unused=True
    )
    batch = inputs.shape[0]
    weights = []
    for (owner, attention), grad, lrp_grad in zip(probs, gradients, modified, strict=True):
        layout = adapter.layout(owner)
        attention = canonical(layout, attention.detach(), batch)
        if owner in pools:  # the readout: the pool's own attention
            weights.append(attention.mean(dim=1))
            continue
        if grad is None or lrp_grad is None:
            raise NotApplicableError(f"model {name}: the target logit does not depend on attention {owner}")
        relevance = attention * canonical(layout, lrp_grad.detach(), batch)  # R_A = A ⊙ g_A
        weights.append((canonical(layout, grad.detach(), batch) * relevance).clamp(min=0).mean(dim=1))
    capture = Capture(batch, (images.shape[-2], images.shape[-1]), pool_weights=recorder.pool_weights)
    if capture.pool_weights is not None:
        capture.pool_weights = capture.pool_weights.detach()
    flow = adapter.describe(model, list(recorder.events), weights, capture)
    return flow_gradient_rollout(flow, start_layer).to(images.device)
