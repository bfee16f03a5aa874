"""Attention maps: capture, rollout, gradient rollout, Grad-CAM, metrics and overlays (``vision-attn explain``).

Computing is pure and batched (``list[Tensor[B, H, N, N]] -> Tensor[B, gh, gw]``); plotting lives in
:mod:`vision_attn.explain.plot` and is imported on demand.
"""

from vision_attn.explain._common import NotApplicableError, token_pool, unwrap_model
from vision_attn.explain.api import (
    CLASS_METHODS,
    METHODS,
    TOKEN_METHODS,
    attention_gradients,
    explain,
    record_attentions,
)
from vision_attn.explain.cam import CAM_METHODS, grad_cam
from vision_attn.explain.capture import AttentionRecorder
from vision_attn.explain.metrics import deletion_auc, energy_pointing, insertion_auc, pointing_game, random_maps
from vision_attn.explain.rollout import (
    HEAD_FUSIONS,
    TOKEN_POOLS,
    attention_rollout,
    fuse_heads,
    gradient_rollout,
    last_layer_attention,
    token_pool_weights,
    tokens_to_grid,
)

__all__ = [
    "CAM_METHODS",
    "CLASS_METHODS",
    "HEAD_FUSIONS",
    "METHODS",
    "TOKEN_METHODS",
    "TOKEN_POOLS",
    "AttentionRecorder",
    "NotApplicableError",
    "attention_gradients",
    "attention_rollout",
    "deletion_auc",
    "energy_pointing",
    "explain",
    "fuse_heads",
    "grad_cam",
    "gradient_rollout",
    "insertion_auc",
    "last_layer_attention",
    "pointing_game",
    "random_maps",
    "record_attentions",
    "token_pool",
    "token_pool_weights",
    "tokens_to_grid",
    "unwrap_model",
]
