"""Record attention probabilities and gate maps from outside a model, without leaving any state on it."""

from __future__ import annotations

from types import TracebackType
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from vision_attn.layers.attention_tap import HookPoint, attention_hook_points

__all__ = ["AttentionRecorder"]


class AttentionRecorder:
    """Context manager that records every attention / gate map of ``model`` during its forward passes.

    While active, token-attention modules (ours and timm's: a ``fused_attn`` flag and an ``attn_drop``
    submodule) run their explicit softmax path, and hooks from
    :func:`~vision_attn.layers.attention_tap.attention_hook_points` record:

    * :attr:`attentions`: the post-softmax token attention ``[B, heads, N, N]`` of every attention block, in
      forward (= block) order;
    * :attr:`maps`: every recorded map by hook-point name (token attention and the CNN ``AttentionTap`` maps:
      ``attention`` ``[B, heads, Nq, Nk]``, ``spatial`` ``[B, 1|C, H, W]``, ``channel`` ``[B, C, 1, 1]``),
      with its kind in :attr:`kinds`; :attr:`token_names` names the token-attention hook points;
    * :attr:`pool_weights`: the token-pooling weights ``[B, N]`` of a sequence-pooling head (CCT), if any.

    The records are those of the latest ``model(...)`` call (they are cleared when it starts). On exit every
    ``fused_attn`` flag is restored and every hook removed, also when an exception is raised; the records stay
    readable. ``detach=True`` stores detached tensors; ``detach=False`` keeps them in the autograd graph, so
    ``torch.autograd.grad(score, recorder.attentions)`` gives attention gradients.

    Example::

        with AttentionRecorder(model) as rec:
            logits = model(images)
        attentions = rec.attentions  # list of [B, heads, N, N]
    """

    def __init__(self, model: nn.Module, detach: bool = True) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.detach = detach
        self.hook_points: list[HookPoint] = list(attention_hook_points(model))
        self._records: list[tuple[str, torch.Tensor]] = []
        self._handles: list[RemovableHandle] = []
        self._saved_flags: list[tuple[nn.Module, Any]] = []
        self.token_names = frozenset(p.name for p in self.hook_points if p.use_input and hasattr(p.owner, "fused_attn"))
        self.kinds: dict[str, str] = {p.name: p.kind for p in self.hook_points}
        self._active = False

    @property
    def attentions(self) -> list[torch.Tensor]:
        """Token attention probabilities ``[B, heads, N, N]``, one per attention call, in forward order."""
        return [t for name, t in self._records if name in self.token_names]

    @property
    def pool_weights(self) -> torch.Tensor | None:
        """Token-pooling weights ``[B, N]`` of the latest ``'pool'`` tap (CCT sequence pooling), else ``None``."""
        pools = [t for name, t in self._records if self.kinds.get(name) == "pool"]
        return pools[-1].flatten(1) if pools else None

    @property
    def maps(self) -> dict[str, torch.Tensor]:
        """Every recorded map by hook-point name (the latest call of a module wins), in forward order."""
        return dict(self._records)

    @property
    def has_token_attention(self) -> bool:
        """Whether ``model`` has token-attention modules (ViT-style) that :attr:`attentions` can record."""
        return bool(self.token_names)

    def clear(self) -> None:
        """Drop all records."""
        self._records = []

    def _store(self, name: str, tensor: torch.Tensor) -> None:
        self._records.append((name, tensor.detach() if self.detach else tensor))

    def _make_hook(self, point: HookPoint) -> Any:
        if point.use_input:

            def pre_hook(module: nn.Module, args: tuple[Any, ...]) -> None:
                self._store(point.name, args[0])

            return point.module.register_forward_pre_hook(pre_hook)

        def hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
            self._store(point.name, output)

        return point.module.register_forward_hook(hook)

    def __enter__(self) -> AttentionRecorder:
        if self._active:
            raise RuntimeError("AttentionRecorder is already active; it cannot be entered twice at once")
        self._active = True
        self.clear()
        try:
            for point in self.hook_points:
                if point.name in self.token_names:
                    self._saved_flags.append((point.owner, point.owner.fused_attn))
                    point.owner.fused_attn = False
                self._handles.append(self._make_hook(point))
            self._handles.append(self.model.register_forward_pre_hook(lambda module, args: self.clear()))
        except BaseException:
            self._restore()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._restore()

    def _restore(self) -> None:
        for handle in self._handles:
            handle.remove()
        for owner, flag in reversed(self._saved_flags):
            owner.fused_attn = flag
        self._handles, self._saved_flags = [], []
        self._active = False
