"""What differs between transformer families, described once per family by an adapter found from the model.

An adapter (:class:`FamilyAdapter`) knows, for one family: which modules hold the attention (and which compute
attention that the token methods leave out, with the reason), how each module lays out its probabilities (windows,
heads), which token grid each layer works on, how windows and shifts place tokens, how tokens merge or are pooled
between stages, and which rows the head reads. From one forward pass it builds the shared description,
:class:`~vision_attn.explain.flow.TokenFlow`, that every token method consumes; it also names where relevance is read
(the token embeddings) and Grad-CAM's default layer. Adapters are found by :func:`find_adapter` from the modules a
model is built of (the way timm keeps a ``checkpoint_filter_fn`` beside each model); methods never look at a family.

:func:`register_adapter` adds one (user code may describe its own family); the built-in ones live in the modules of
this package.
"""

from __future__ import annotations

from vision_attn.explain.families.base import (
    FamilyAdapter,
    FeatureLayout,
    Refused,
    adapters,
    find_adapter,
    register_adapter,
)

# isort: off
from vision_attn.explain.families import vit  # noqa: F401  (each module registers its adapters)
from vision_attn.explain.families import class_attention  # noqa: F401
from vision_attn.explain.families import windows  # noqa: F401
from vision_attn.explain.families import pyramid  # noqa: F401
from vision_attn.explain.families import multiscale  # noqa: F401
from vision_attn.explain.families import refused  # noqa: F401
# isort: on

__all__ = ["FamilyAdapter", "FeatureLayout", "Refused", "adapters", "find_adapter", "register_adapter"]
