"""Hook points where attention probabilities or gate maps exist, for capture from outside the model.

Models keep no attention tensors. A module that computes an attention/gate map passes it through a no-op
module, and :class:`vision_attn.explain.AttentionRecorder` hooks that module:

* token attention (ViT ``Attention`` here and in timm, and the modules a family adapter of
  :mod:`vision_attn.explain.families` names): the post-softmax probabilities ``[B, heads, N, N]``, taken from the
  module's softmax over the keys or its ``F.scaled_dot_product_attention`` call while it runs;
* anything else (CNN gates, spatial maps, conv-attention probabilities, token-pooling weights): the output of
  an :class:`AttentionTap` placed where the map is computed.

timm's CNN attention modules are not edited and get no rule here: :mod:`vision_attn.layers.cnn_attn` wraps
them in thin subclasses (same parameters and state-dict keys) that route their map through an
:class:`AttentionTap` (SE / ECA / CBAM channel gates ``channel``; CBAM spatial and coordinate-attention gates
``spatial``; non-local affinities ``attention``); :class:`vision_attn.layers.bot.BotAttention` (timm's
``BottleneckAttn``) and :class:`vision_attn.layers.aa_conv.AugmentedConv2d` tap their probabilities
(``attention``); :class:`vision_attn.layers.pooling.SequencePool` taps its token weights (``pool``), which the
explain methods use to read the tokens the head pools. These have no fused path, so taps fire on every forward.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from torch import nn

__all__ = ["AttentionTap", "HookPoint", "attention_hook_points"]

TAP_KINDS = ("attention", "spatial", "channel", "pool")


class AttentionTap(nn.Identity):
    """Identity module marking an attention map of ``kind`` in ``('attention', 'spatial', 'channel', 'pool')``.

    ``attention``: probabilities ``[B, heads, N_query, N_key]``; ``spatial``: a gate ``[B, 1|C, H, W]``;
    ``channel``: a gate ``[B, C, 1, 1]`` (or ``[B, C]``); ``pool``: token-pooling weights ``[B, N, 1]``.
    """

    def __init__(self, kind: str = "attention") -> None:
        super().__init__()
        if kind not in TAP_KINDS:
            raise ValueError(f"kind {kind!r} is not one of {TAP_KINDS}")
        self.kind = kind

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}"


@dataclass(frozen=True)
class HookPoint:
    """Where to record one map: ``module``'s input (``use_input``) or output, owned by ``owner`` (named ``name``)."""

    name: str
    owner: nn.Module
    module: nn.Module
    kind: str
    use_input: bool


def attention_hook_points(model: nn.Module) -> Iterator[HookPoint]:
    """Yield every hook point of ``model`` in module (= forward) order."""
    for name, module in model.named_modules():
        if isinstance(module, AttentionTap):
            yield HookPoint(name, module, module, module.kind, use_input=False)
        elif hasattr(module, "fused_attn") and isinstance(getattr(module, "attn_drop", None), nn.Module):
            yield HookPoint(name, module, module.attn_drop, "attention", use_input=True)
