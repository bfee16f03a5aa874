"""Attention maps: capture, rollout, gradient rollout, Grad-CAM, metrics and overlays (``vision-attn explain``).

Computing is pure and batched (``list[Tensor[B, H, N, N]] -> Tensor[B, gh, gw]``); plotting lives in
:mod:`vision_attn.explain.plot` and is imported on demand. Methods are looked up by name in one registry
(:func:`register_method`, :func:`list_methods`); the built-in ones register themselves on import.
"""

from vision_attn.explain import methods  # noqa: F401  (registers the built-in methods)
from vision_attn.explain._common import NotApplicableError, unwrap_model
from vision_attn.explain.api import attention_gradients, explain, record_attentions
from vision_attn.explain.cam import CAM_METHODS, grad_cam
from vision_attn.explain.capture import AttentionRecorder
from vision_attn.explain.families import find_adapter, register_adapter
from vision_attn.explain.flow import TokenFlow, TokenMix
from vision_attn.explain.metrics import deletion_auc, energy_pointing, insertion_auc, pointing_game, random_maps
from vision_attn.explain.registry import (
    NEEDS,
    ExplainMethod,
    applicable_methods,
    get_method,
    list_methods,
    register_method,
)
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
from vision_attn.explain.tokens import (
    TokenAttention,
    capture_token_attention,
    capture_token_flow,
    token_layout,
    token_pool,
)

__all__ = [
    "CAM_METHODS",
    "HEAD_FUSIONS",
    "NEEDS",
    "TOKEN_POOLS",
    "AttentionRecorder",
    "ExplainMethod",
    "NotApplicableError",
    "TokenAttention",
    "TokenFlow",
    "TokenMix",
    "applicable_methods",
    "attention_gradients",
    "attention_rollout",
    "capture_token_attention",
    "capture_token_flow",
    "deletion_auc",
    "energy_pointing",
    "explain",
    "find_adapter",
    "fuse_heads",
    "get_method",
    "grad_cam",
    "gradient_rollout",
    "insertion_auc",
    "last_layer_attention",
    "list_methods",
    "pointing_game",
    "random_maps",
    "record_attentions",
    "register_adapter",
    "register_method",
    "token_layout",
    "token_pool",
    "token_pool_weights",
    "tokens_to_grid",
    "unwrap_model",
]
