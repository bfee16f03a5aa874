"""The adapter interface, its registry, and the geometry every adapter shares (token grids, windows, pooling)."""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from vision_attn.explain._common import NotApplicableError
from vision_attn.explain.flow import TokenFlow, TokenGrid

__all__ = [
    "LAYOUTS",
    "Capture",
    "FamilyAdapter",
    "FeatureLayout",
    "Refused",
    "adapters",
    "adaptive_sources",
    "canonical",
    "conv_sources",
    "find_adapter",
    "head_pool_type",
    "modules_of",
    "readout_weights",
    "register_adapter",
    "window_index",
]

# how a module lays out its attention probabilities; every layout is turned into [B, heads, windows, q, k]
LAYOUTS = ("bhqk", "(bw)hqk", "bwhqk", "bhwqk")


def canonical(layout: Any, probs: torch.Tensor, batch: int) -> torch.Tensor:
    """``probs`` in ``layout`` (see :data:`LAYOUTS`, or a function ``(probs, batch) -> ...``) as ``[B, heads, windows,
    q, k]``."""
    if callable(layout):
        return layout(probs, batch)
    if layout == "bhqk":
        return probs.unsqueeze(2)
    if layout == "(bw)hqk":
        return probs.reshape(batch, -1, *probs.shape[1:]).transpose(1, 2)
    if layout == "bwhqk":
        return probs.transpose(1, 2)
    if layout == "bhwqk":
        return probs
    raise ValueError(f"layout {layout!r} is unknown; expected one of {LAYOUTS}")


@dataclass(frozen=True)
class FeatureLayout:
    """How a layer's output is a feature map: ``'nchw'``, ``'nhwc'``, ``'tokens'`` ``[B, N, C]`` with
    ``num_prefix_tokens`` then a ``grid`` (``None``: the model's patch grid for the image), or ``'custom'``: the
    family's own ``convert(output) -> [B, C, h, w]`` (a reordering, e.g. Hiera's reroll)."""

    kind: str
    num_prefix_tokens: int = 0
    grid: tuple[int, int] | None = None
    convert: Callable[[torch.Tensor], torch.Tensor] | None = None


@dataclass
class Capture:
    """What an adapter gets besides the events: the batch size, the image size, the token options a user gave
    (``num_prefix_tokens``, ``grid_size``) and the sequence-pooling weights recorded by a CCT head."""

    batch: int
    image_size: tuple[int, int]
    num_prefix_tokens: int | None = None
    grid_size: Any = None
    pool_weights: torch.Tensor | None = None
    unaccounted: list[tuple[str, str, tuple[int, ...]]] = field(default_factory=list)


class FamilyAdapter:
    """Describes one transformer family for the token methods (see :mod:`vision_attn.explain.families`).

    Subclasses set :attr:`family` (a label for messages and the docs) and implement :meth:`matches` and
    :meth:`describe`; the other methods have defaults for a plain ViT-like model.
    """

    family: str = ""

    def matches(self, model: nn.Module) -> bool:
        """Whether ``model`` is of this family (from the modules it is built of)."""
        raise NotImplementedError

    def problem(self, model: nn.Module) -> str:
        """Why the token methods cannot read ``model`` (``''`` when they can), without running it."""
        return ""

    def owners(self, model: nn.Module) -> dict[str, nn.Module]:
        """Token-attention modules besides ours and timm's ``Attention`` (a ``fused_attn`` flag and ``attn_drop``)."""
        return {}

    def pools(self, model: nn.Module) -> dict[str, nn.Module]:
        """Attention-pool heads among the owners: their map is the readout (always a mean over heads)."""
        return {}

    def skipped(self, model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
        """Modules that compute attention the token methods leave out, with the reason."""
        return {}

    def layout(self, name: str) -> str:
        """How owner ``name`` lays out its probabilities (:data:`LAYOUTS`)."""
        return "bhqk"

    def observe(self, model: nn.Module, recorder: Any) -> None:
        """Ask ``recorder.observe`` for what :meth:`describe` needs besides the attention (grids, shifts, merges)."""

    def describe(
        self, model: nn.Module, events: list[tuple[str, str, Any]], weights: list[torch.Tensor], capture: Capture
    ) -> TokenFlow:
        """Build the :class:`~vision_attn.explain.flow.TokenFlow` of one forward pass: ``events`` in forward order
        (``('attention', owner name, index into weights)`` and the observers' ``('context', name, payload)``),
        ``weights`` the attention of each call as ``[B, windows, q, k]`` (or ``[B, heads, windows, q, k]``)."""
        raise NotImplementedError

    def embedding(self, model: nn.Module) -> nn.Module | None:
        """The module whose output holds the token embeddings, where relevance is read (``patch_embed``)."""
        module = getattr(model, "patch_embed", None)
        return module if isinstance(module, nn.Module) else None

    def embedding_layout(self, model: nn.Module) -> str | None:
        """``'nhwc'`` / ``'nchw'`` / ``'tokens'`` for the embedding output, ``None``: told from its shape."""
        return None

    def cam_layer(self, model: nn.Module) -> tuple[nn.Module, FeatureLayout] | None:
        """Grad-CAM's default target layer and how its output is a feature map (``None``: the generic search)."""
        return None


class Refused(FamilyAdapter):
    """A family the token methods refuse, with the ``reason``; found when ``model`` holds a module of ``classes``
    (the Grad-CAM layer may still be given: ``cam`` returns it)."""

    def __init__(
        self,
        family: str,
        classes: Callable[[], tuple[type, ...]],
        reason: str,
        cam: Callable[[nn.Module], tuple[nn.Module, FeatureLayout] | None] | None = None,
        embedding: Callable[[nn.Module], nn.Module | None] | None = None,
    ) -> None:
        self.family = family
        self._classes = classes
        self.reason = reason
        self._cam = cam
        self._embedding = embedding

    def matches(self, model: nn.Module) -> bool:
        classes = self._classes()
        return bool(classes) and any(isinstance(m, classes) for m in model.modules())

    def problem(self, model: nn.Module) -> str:
        return f"model {type(model).__name__} ({self.family}): {self.reason}"

    def describe(
        self, model: nn.Module, events: list[tuple[str, str, Any]], weights: list[torch.Tensor], capture: Capture
    ) -> TokenFlow:
        raise NotApplicableError(self.problem(model))

    def embedding(self, model: nn.Module) -> nn.Module | None:
        return self._embedding(model) if self._embedding is not None else super().embedding(model)

    def cam_layer(self, model: nn.Module) -> tuple[nn.Module, FeatureLayout] | None:
        return self._cam(model) if self._cam is not None else None


_ADAPTERS: list[FamilyAdapter] = []
_FALLBACKS: list[FamilyAdapter] = []


def register_adapter(adapter: FamilyAdapter, fallback: bool = False) -> FamilyAdapter:
    """Add ``adapter``: tried in registration order, before every ``fallback`` adapter (the plain-ViT one)."""
    if not isinstance(adapter, FamilyAdapter):
        raise TypeError(f"adapter must be a FamilyAdapter, got {type(adapter).__name__}")
    (_FALLBACKS if fallback else _ADAPTERS).append(adapter)
    return adapter


def adapters() -> list[FamilyAdapter]:
    """The registered adapters, in the order they are tried."""
    return [*_ADAPTERS, *_FALLBACKS]


_FOUND: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def find_adapter(model: nn.Module) -> FamilyAdapter | None:
    """The adapter of ``model``'s family, or ``None`` when no adapter knows it (a CNN). Remembered per model while
    its modules stay the same (their types, in order)."""
    key = tuple(type(m) for m in model.modules())
    found = _FOUND.get(model)
    if found is not None and found[0] == key and found[1] == len(_ADAPTERS) + len(_FALLBACKS):
        return found[2]
    adapter = next((a for a in adapters() if a.matches(model)), None)
    _FOUND[model] = (key, len(_ADAPTERS) + len(_FALLBACKS), adapter)
    return adapter


# --- geometry shared by the adapters ----------------------------------------------------------------------------


def modules_of(model: nn.Module, classes: tuple[type, ...] | type) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every submodule of ``model`` that is an instance of ``classes``, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, classes)]


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    return (int(value), int(value)) if isinstance(value, int) else (int(value[0]), int(value[1]))


def conv_sources(
    grid: tuple[int, int],
    kernel: int | Sequence[int],
    stride: int | Sequence[int],
    padding: int | Sequence[int] = 0,
    ceil_mode: bool = False,
) -> tuple[tuple[int, int], list[list[int]]]:
    """The output grid of a convolution / pooling window over ``grid`` and, per output position (row-major), the
    input positions under its window (clipped at the borders): ``((oh, ow), sources)``."""
    (kh, kw), (sh, sw), (ph, pw) = _pair(kernel), _pair(stride), _pair(padding)
    size = []
    for n, k, s, p in ((grid[0], kh, sh, ph), (grid[1], kw, sw, pw)):
        span = (n + 2 * p - k) / s
        size.append((math.ceil(span) if ceil_mode else math.floor(span)) + 1)
    oh, ow = size
    sources = []
    for i in range(oh):
        rows = [r for r in range(i * sh - ph, i * sh - ph + kh) if 0 <= r < grid[0]]
        for j in range(ow):
            cols = [c for c in range(j * sw - pw, j * sw - pw + kw) if 0 <= c < grid[1]]
            sources.append([r * grid[1] + c for r in rows for c in cols])
    return (oh, ow), sources


def adaptive_sources(grid: tuple[int, int], out: tuple[int, int]) -> list[list[int]]:
    """Per output position of an adaptive pooling ``grid -> out``, the input positions of its bin (PyTorch's bins)."""
    sources = []
    for i in range(out[0]):
        r0, r1 = (i * grid[0]) // out[0], -((-(i + 1) * grid[0]) // out[0])
        for j in range(out[1]):
            c0, c1 = (j * grid[1]) // out[1], -((-(j + 1) * grid[1]) // out[1])
            sources.append([r * grid[1] + c for r in range(r0, r1) for c in range(c0, c1)])
    return sources


def window_index(
    grid: tuple[int, int],
    partition: Callable[[torch.Tensor], torch.Tensor],
    shift: Sequence[int] = (0, 0),
    pad_to: Sequence[int] | None = None,
    offset: int = 0,
) -> torch.Tensor:
    """Which token each window position holds, by running the family's own ``partition`` (NHWC -> ``[windows, ...,
    1]``) on a grid of token indices: ``[windows, w]`` (long). The grid is first rolled by ``-shift`` (a shifted
    window) and zero-padded to a multiple of ``pad_to``; padding gets index ``grid count + offset`` ("no token").
    Indices are offset by ``offset`` (prefix tokens)."""
    gh, gw = grid
    count = gh * gw
    index = torch.arange(1, count + 1, dtype=torch.float64).reshape(1, gh, gw, 1)
    if any(shift):
        index = torch.roll(index, shifts=(-int(shift[0]), -int(shift[1])), dims=(1, 2))
    if pad_to is not None:
        pad_h, pad_w = (-gh) % int(pad_to[0]), (-gw) % int(pad_to[1])
        index = torch.nn.functional.pad(index, (0, 0, 0, pad_w, 0, pad_h))
    windows = partition(index)
    windows = windows.reshape(windows.shape[0], -1).round().long() - 1
    return torch.where(windows < 0, torch.full_like(windows, count), windows) + offset


def head_pool_type(model: nn.Module) -> str | None:
    """How the head of a hierarchical model pools its last tokens: ``model.global_pool`` (a string) or the
    ``pool_type`` of its head's pooling layer (timm ``ClassifierHead`` / ``NormMlpClassifierHead``)."""
    pool = getattr(model, "global_pool", None)
    if isinstance(pool, str):
        return pool
    for owner in (model, getattr(model, "head", None)):
        pool = getattr(owner, "global_pool", None)
        if isinstance(pool, str):
            return pool
        if isinstance(getattr(owner, "pool_type", None), str):
            return owner.pool_type
        pool_type = getattr(pool, "pool_type", None)
        if isinstance(pool_type, str):
            return pool_type
    return None


def readout_weights(pool: str, tokens: TokenGrid, name: str = "") -> torch.Tensor:
    """The rows ``[N]`` a head reads: ``'token'`` the class token, ``'distilled'`` class and distillation tokens,
    ``'avg'`` the mean of the patch tokens, ``'avg_all'`` of all tokens; other pools raise
    :class:`NotApplicableError`."""
    weights = torch.zeros(tokens.num_tokens)
    prefix = tokens.num_prefix_tokens
    if pool == "token" and prefix >= 1:
        weights[0] = 1.0
    elif pool == "distilled" and prefix >= 2:
        weights[:2] = 0.5
    elif pool in ("avg", "fast", "avg_all") and tokens.num_patches > 0:
        start = 0 if pool == "avg_all" else prefix
        weights[start:] = 1.0 / (tokens.num_tokens - start)
    else:
        raise NotApplicableError(
            f"model {name} pools its tokens by {pool!r}, which no weighting of token rows describes; the token methods "
            "read class-token, distillation-token, average, sequence or attention pooling; use a Grad-CAM method"
        )
    return weights


def names_of(items: Iterable[tuple[str, Any]]) -> list[str]:
    """The names of ``(name, item)`` pairs."""
    return [n for n, _ in items]
