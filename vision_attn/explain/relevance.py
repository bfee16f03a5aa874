"""Relevance maps of ViT-family models from layer-wise relevance propagation: ``(model, images [B, C, H, W],
targets [B]) -> maps [B, gh, gw]`` (float32, raw: not normalised, not upsampled), batched.

* :func:`attnlrp` — AttnLRP (Achtibat et al., ICML 2024): one forward and one backward pass;
* :func:`transformer_attribution` — Chefer, Gur & Wolf (CVPR 2021): one forward and two backward passes (the plain
  attention gradients and the LRP relevance of the attention maps come from the same forward graph).

Both run the rules of :mod:`vision_attn.explain.lrp` from outside the model: no copy of its code, no hook left
behind, fused attention and train/eval flags as they were, no ``.grad`` written.
"""

from __future__ import annotations

from collections.abc import Sequence

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
from vision_attn.explain.lrp import LINEAR_RULES, LRPRules, embedding_module, lrp_forward, safe_divide
from vision_attn.explain.rollout import gradient_rollout, token_pool_weights
from vision_attn.explain.tokens import token_layout, token_pool

__all__ = ["LEVELS", "attnlrp", "transformer_attribution"]

LEVELS = ("tokens", "pixels")  # where attnlrp reads the relevance: the token embeddings or the input pixels

Targets = int | Sequence[int] | torch.Tensor | None


def _prepare(
    model: nn.Module, images: torch.Tensor, method: str
) -> tuple[nn.Module, torch.Tensor, int, tuple[int, int]]:
    """``(model, inputs, num_prefix_tokens, (gh, gw))``: the unwrapped model, the checked images on its device."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    model = unwrap_model(model)
    embedding_module(model)
    check_model_images(model, images)
    require_classes(model, method)
    num_prefix, grid = token_layout(model, (images.shape[-2], images.shape[-1]))
    if grid is None:
        raise NotApplicableError(
            f"model {type(model).__name__} declares no token grid (patch_embed.grid_size or dynamic_feat_size); "
            f"{method!r} maps token relevance onto it"
        )
    return model, to_model_inputs(model, images), num_prefix, grid


def _scores(logits: torch.Tensor, model: nn.Module, targets: Targets) -> tuple[torch.Tensor, torch.Tensor]:
    """``(one-hot [B, classes] of each image's target, targets [B])``; NaN/Inf logits are an error."""
    check_logits(logits, model, need_classes=True)
    targets = resolve_targets(targets, logits)
    one_hot = torch.zeros_like(logits).scatter_(1, targets[:, None], 1.0)
    return one_hot.detach(), targets


def attnlrp(model: nn.Module, images: torch.Tensor, targets: Targets = None, level: str = "tokens") -> torch.Tensor:
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
    model, inputs, _, (gh, gw) = _prepare(model, images, "attnlrp")
    with eval_mode(model, caller="attnlrp"):
        logits, embeddings = lrp_forward(model, inputs, LRPRules("attnlrp"), leaf=level)
    one_hot, _ = _scores(logits, model, targets)
    (grad,) = torch.autograd.grad(logits, embeddings, grad_outputs=one_hot)
    relevance = (embeddings * grad).detach().float()
    if level == "pixels":
        return relevance.sum(dim=1).to(images.device)  # B, C, H, W -> B, H, W
    per_token = relevance.sum(dim=-1).reshape(relevance.shape[0], -1)  # B, N (embeddings [B, N, D] or [B, gh, gw, D])
    if per_token.shape[1] != gh * gw:
        raise NotApplicableError(
            f"model {type(model).__name__}'s patch_embed gives {per_token.shape[1]} tokens for a {gh}x{gw} grid"
        )
    return per_token.reshape(-1, gh, gw).to(images.device)


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
    if linear_rule not in LINEAR_RULES:
        raise ValueError(f"linear_rule {linear_rule!r} is unknown; expected one of {LINEAR_RULES}")
    model, inputs, num_prefix, grid = _prepare(model, images, "transformer_attribution")
    pool = token_pool(model)
    rules = LRPRules("chefer", linear_rule=linear_rule)
    with eval_mode(model, caller="transformer_attribution"), AttentionRecorder(model, detach=False) as recorder:
        logits, _ = lrp_forward(model, inputs, rules)
    attentions = recorder.attentions
    name = type(model).__name__
    if not attentions:
        raise NotApplicableError(f"model {name} has no token-attention modules; transformer_attribution needs a ViT")
    if any(a.shape[0] != inputs.shape[0] or a.shape[-1] != attentions[0].shape[-1] for a in attentions):
        shapes = sorted({tuple(a.shape) for a in attentions})
        raise NotApplicableError(
            f"model {name} has attention maps of shapes {shapes} for {inputs.shape[0]} images: windowed or pooled "
            "attention (e.g. Swin) has no global [B, heads, N, N] map for transformer_attribution; use attnlrp"
        )
    if (
        not isinstance(start_layer, int)
        or isinstance(start_layer, bool)
        or not -len(attentions) <= start_layer < len(attentions)
    ):
        raise ValueError(f"start_layer {start_layer!r} is out of range for {len(attentions)} attention layers")
    attentions = attentions[start_layer:]
    one_hot, _ = _scores(logits, model, targets)
    rules.propagate = False
    gradients = torch.autograd.grad(logits, attentions, grad_outputs=one_hot, retain_graph=True)
    rules.propagate = True
    modified = torch.autograd.grad(logits, attentions, grad_outputs=safe_divide(one_hot, logits.detach()))
    relevances = [(a * g).detach() for a, g in zip(attentions, modified, strict=True)]  # R_A = A ⊙ g_A
    sequence = recorder.pool_weights
    weights = token_pool_weights(
        pool, attentions[0].shape[-1], num_prefix, None if sequence is None else sequence.detach()
    )
    # gradient_rollout computes R += mean_h(relu(grad ⊙ X)) @ R; with X = R_A it is Chefer's rollout
    raw = gradient_rollout(relevances, [g.detach() for g in gradients], num_prefix, grid, pool_weights=weights)
    return raw.float().to(images.device)
