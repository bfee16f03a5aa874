"""Attention maps: capture, rollout, gradient rollout, Grad-CAM, metrics and overlays (``vision-attn explain``).

Computing is pure and batched (``list[Tensor[B, H, N, N]] -> Tensor[B, gh, gw]``); plotting lives in
:mod:`vision_attn.explain.plot` and is imported on demand.
"""

from vision_attn.explain.api import METHODS, attention_gradients, explain, record_attentions
from vision_attn.explain.cam import CAM_METHODS, grad_cam
from vision_attn.explain.capture import AttentionRecorder
from vision_attn.explain.metrics import deletion_auc, energy_pointing, insertion_auc, pointing_game, random_maps
from vision_attn.explain.rollout import (
    HEAD_FUSIONS,
    attention_rollout,
    fuse_heads,
    gradient_rollout,
    last_layer_attention,
    tokens_to_grid,
)

__all__ = [
    "CAM_METHODS",
    "HEAD_FUSIONS",
    "METHODS",
    "AttentionRecorder",
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
    "tokens_to_grid",
]
