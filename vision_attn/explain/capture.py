"""Record attention probabilities and gate maps from outside a model, without leaving any state on it."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import Function
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle

from vision_attn.layers.attention_tap import HookPoint, attention_hook_points

__all__ = [
    "AttentionCall",
    "AttentionRecorder",
    "explicit_attention",
    "fused_attention",
    "gradient_weighted_attention",
]

_SOFTMAXES = frozenset({torch.softmax, F.softmax, torch.Tensor.softmax, torch.special.softmax})
_SDPA = F.scaled_dot_product_attention


def _softmax_dim(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int | None:
    dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
    return dim if isinstance(dim, int) else None


def explicit_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    matmul: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = torch.matmul,
    softmax: Callable[[torch.Tensor], torch.Tensor] = lambda scores: torch.softmax(scores, dim=-1),
) -> tuple[torch.Tensor, torch.Tensor]:
    """``F.scaled_dot_product_attention`` as explicit ops: ``(output [.., Lq, Dv], probabilities [.., Lq, Lk])``.
    ``matmul`` and ``softmax`` (over the last dimension) may be replaced, e.g. by the ops of LRP rules."""
    if enable_gqa and k.shape[-3] != q.shape[-3]:
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
        v = v.repeat_interleave(q.shape[-3] // v.shape[-3], dim=-3)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = matmul(q * scale, k.transpose(-2, -1))
    if is_causal:
        causal = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).tril()
        scores = scores.masked_fill(~causal, -math.inf)
    if attn_mask is not None:  # a constant: True = attend, or added to the scores
        scores = scores.masked_fill(~attn_mask, -math.inf) if attn_mask.dtype == torch.bool else scores + attn_mask
    probs = softmax(scores)
    attn = F.dropout(probs, p=dropout_p) if dropout_p > 0.0 else probs
    return matmul(attn, v), probs


def _block_probs(
    queries: torch.Tensor,
    keys: torch.Tensor,
    attn_mask: torch.Tensor | None,
    rows: slice,
    heads: int,
    probs: torch.Tensor,
) -> torch.Tensor:
    """Attention probabilities of the query rows ``rows`` into the buffer ``probs`` ``[X heads, b, Lk]`` (if its
    block size fits, else a new one): ``queries`` ``[X heads, Lq, D]`` pre-scaled, ``keys`` ``[X heads, Lk, D]``,
    ``attn_mask`` broadcastable to ``[X, heads, Lq, Lk]`` (boolean: True attends; else added)."""
    if probs.shape[1] != rows.stop - rows.start:  # buffers reused block to block (a fresh large tensor costs more)
        probs = queries.new_empty(queries.shape[0], rows.stop - rows.start, keys.shape[1])
    torch.bmm(queries[:, rows], keys.transpose(1, 2), out=probs)
    if attn_mask is not None:
        mask = attn_mask[..., rows, :] if attn_mask.shape[-2] == queries.shape[1] else attn_mask
        scores = probs.view(-1, heads, *probs.shape[1:])
        scores.masked_fill_(~mask, -math.inf) if mask.dtype == torch.bool else scores.add_(mask)
    return torch._softmax(probs, -1, False, out=probs)


def _flat(t: torch.Tensor) -> torch.Tensor:
    """``[X, heads, L, D] -> [X heads, L, D]``."""
    return t.reshape(-1, t.shape[-2], t.shape[-1])


def fused_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
    head_fusion: str = "mean",
    block: int = 128,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention ``[X, heads, Lq, D]`` computed in blocks of ``block`` query rows: ``(output [X, heads, Lq, Dv], the
    probabilities fused over heads [X, Lq, Lk])`` (``head_fusion``: ``'mean'``, ``'max'`` or ``'min'``). The
    per-head probabilities of one block live only while it is computed (in a buffer reused block to block), so this
    costs about 1.5 fused kernels and keeps one ``[Lq, Lk]`` map per image instead of one per head."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    batch, heads, lq, _ = q.shape
    out = q.new_empty(batch * heads, lq, v.shape[-1])
    fused = q.new_empty(batch, lq, k.shape[-2])
    queries, keys, values = _flat(q * scale), _flat(k), _flat(v)
    reduce = {"mean": torch.sum, "max": torch.amax, "min": torch.amin}[head_fusion]  # the mean: scaled once below
    probs = q.new_empty(0, 0, 0)
    for start in range(0, lq, block):
        rows = slice(start, min(start + block, lq))
        probs = _block_probs(queries, keys, attn_mask, rows, heads, probs)
        torch.bmm(probs, values, out=out[:, rows])
        reduce(probs.view(batch, heads, -1, probs.shape[-1]), dim=1, out=fused[:, rows])
    if head_fusion == "mean":
        fused.div_(heads)
    return out.view(*q.shape[:-1], v.shape[-1]), fused


def gradient_weighted_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grad_out: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
    block: int = 128,
) -> torch.Tensor:
    """``mean_heads(relu(∇A ⊙ A))`` ``[X, Lq, Lk]`` of an attention call ``[X, heads, L, D]`` from its inputs and the
    gradient of its output (``∇A = ∇O · Vᵀ``, as ``O = A V``), recomputed in blocks of query rows: gradient rollout's
    layer map without keeping any per-head map (Chefer et al. 2021)."""
    return attention_backward(q, k, v, None, grad_out, attn_mask, scale, block)[3]


def attention_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor | None,
    grad_out: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
    block: int = 128,
    mask_grad: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """The backward pass of an attention call ``[X, heads, L, D]`` (output ``out``, its gradient ``grad_out``) in
    blocks of query rows, with gradient rollout's layer map on the way: ``(∇q, ∇k, ∇v, mean_heads(relu(∇A ⊙ A))
    [X, Lq, Lk])``; ``out=None`` gives the map only (``(None, None, None, map)``). Five matrix products per block,
    the ones a fused kernel's backward does, where a fused backward followed by the map's recomputation does seven;
    the blocks' per-head maps live in buffers reused block to block. Query rows whose output gradient is zero (all
    but the class token's in a ViT's last block) are skipped: their map rows and ``∇q`` rows are zero, and they add
    nothing to ``∇k`` and ``∇v``. ``mask_grad`` (zeros of an additive ``attn_mask``'s shape, e.g. a learned
    relative-position bias) receives the mask's gradient."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    batch, heads, lq, _ = q.shape
    lk = k.shape[-2]
    grads = out is not None

    queries, keys, values, grad_out = _flat(q * scale), _flat(k), _flat(v), _flat(grad_out)
    out = _flat(out) if grads else None
    attn_mask = attn_mask.detach() if attn_mask is not None else None
    live = grad_out.any(dim=-1).any(dim=0).nonzero().squeeze(1)  # query rows with a gradient
    sparse = len(live) < lq
    if sparse:
        queries, grad_out = queries[:, live], grad_out[:, live]
        out = out[:, live] if grads else None
        if attn_mask is not None and attn_mask.shape[-2] == lq:
            attn_mask = attn_mask[..., live, :]
    rows_total = queries.shape[1]
    fused = q.new_empty(batch, rows_total, lk)
    if grads:  # rowsum(∇A ⊙ A) = rowsum(∇O ⊙ O): the softmax backward's correction, for all rows at once
        correction = (grad_out * out).sum(dim=-1, keepdim=True)
        grad_q = torch.empty_like(queries)  # ∇k and ∇v: written by the first block, accumulated by the others
        grad_k, grad_v = (torch.empty_like(t) if rows_total else torch.zeros_like(t) for t in (keys, values))
    probs = weighted = positive = q.new_empty(0, 0, 0)
    for start in range(0, rows_total, block):
        rows = slice(start, min(start + block, rows_total))
        if probs.shape[1] != rows.stop - start:  # buffers reused block to block (a fresh large tensor costs more)
            weighted, positive = (q.new_empty(batch * heads, rows.stop - start, lk) for _ in range(2))
        probs = _block_probs(queries, keys, attn_mask, rows, heads, probs)  # X heads, b, Lk
        torch.bmm(grad_out[:, rows], values.transpose(1, 2), out=weighted).mul_(probs)  # ∇A ⊙ A
        torch.clamp(weighted, min=0, out=positive)
        torch.sum(positive.view(batch, heads, -1, lk), dim=1, out=fused[:, rows])  # the mean: scaled once below
        if grads:
            accumulate = torch.bmm if start == 0 else lambda a, b, out: out.baddbmm_(a, b)
            accumulate(probs.transpose(1, 2), grad_out[:, rows], out=grad_v)
            weighted.addcmul_(probs, correction[:, rows], value=-1.0)  # A ⊙ (∇A - rowsum): ∇ of the scores
            if mask_grad is not None:  # an additive mask's gradient is the scores' (summed where it broadcasts)
                _add_mask_grad(mask_grad, weighted.view(batch, heads, -1, lk), live[rows] if sparse else rows)
            torch.bmm(weighted, keys, out=grad_q[:, rows])
            accumulate(weighted.transpose(1, 2), queries[:, rows], out=grad_k)
    fused.div_(heads)
    if sparse:
        fused = q.new_zeros(batch, lq, lk).index_copy_(1, live, fused)
    if not grads:
        return None, None, None, fused
    grad_q.mul_(scale)
    if sparse:
        grad_q = q.new_zeros(batch * heads, lq, q.shape[-1]).index_copy_(1, live, grad_q)
    return grad_q.view_as(q), grad_k.view_as(k), grad_v.view(*v.shape), fused


def _add_mask_grad(mask_grad: torch.Tensor, grad_scores: torch.Tensor, rows: slice | torch.Tensor) -> None:
    """Add the gradient ``[X, heads, b, Lk]`` of the scores of query rows ``rows`` to ``mask_grad``, the gradient of
    an additive mask broadcast to ``[X, heads, Lq, Lk]`` (contiguous, any of its dimensions 1 or absent)."""
    grad = mask_grad.view((1,) * (4 - mask_grad.ndim) + tuple(mask_grad.shape))
    per_row = grad.shape[2] != 1
    part = grad_scores.sum_to_size(*grad.shape[:2], grad_scores.shape[2] if per_row else 1, grad.shape[3])
    if not per_row:
        grad.add_(part)
    elif isinstance(rows, slice):
        grad[:, :, rows].add_(part)
    else:
        grad.index_add_(2, rows, part)


class _WeighedAttention(Function):
    """``F.scaled_dot_product_attention`` with its fused kernel forward; the backward is
    :func:`attention_backward`, which hands the layer map of gradient rollout to ``call``."""

    @staticmethod
    def forward(
        ctx: Any, call: AttentionCall, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Any, scale: Any
    ) -> torch.Tensor:
        out = _SDPA(q, k, v, attn_mask=attn_mask, scale=scale)
        ctx.call, ctx.scale = call, scale
        ctx.save_for_backward(q, k, v, out, attn_mask)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
        q, k, v, out, mask = ctx.saved_tensors
        mask_grad = mask.new_zeros(mask.shape) if ctx.needs_input_grad[4] else None  # e.g. a relative-position bias
        grad_q, grad_k, grad_v, ctx.call.fused = attention_backward(
            q, k, v, out, grad_out, mask, ctx.scale, mask_grad=mask_grad
        )
        return None, grad_q, grad_k, grad_v, mask_grad, None


class AttentionCall:
    """One ``F.scaled_dot_product_attention`` call kept for :func:`gradient_weighted_attention`: its detached inputs,
    mask and scale, and (once the backward pass reaches it) the gradient of its output; or, where the call ran
    through :func:`attention_backward` (``fused`` set by its backward), its layer map itself."""

    def __init__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Any, scale: float | None) -> None:
        self.q, self.k, self.v, self.mask, self.scale = q.detach(), k.detach(), v.detach(), mask, scale
        self.grad_out: torch.Tensor | None = None
        self.fused: torch.Tensor | None = None
        self.output: torch.Tensor | None = None  # the call's output in the graph (while the forward pass runs)

    def weighted(self) -> torch.Tensor:
        """``mean_heads(relu(∇A ⊙ A))`` ``[X, Lq, Lk]``; ``None`` gradient (unused output): zeros."""
        if self.fused is not None:
            return self.fused
        if self.grad_out is None:
            return self.q.new_zeros(self.q.shape[0], self.q.shape[-2], self.k.shape[-2])
        mask = self.mask.detach() if isinstance(self.mask, torch.Tensor) else None
        return gradient_weighted_attention(self.q, self.k, self.v, self.grad_out, mask, self.scale)


class _ProbabilityCapture(TorchFunctionMode):
    """While a token-attention module runs, hand its attention probabilities to the recorder: the output of a softmax
    over the last dimension, or, for ``F.scaled_dot_product_attention``, the probabilities of the same computation
    done as explicit ops (whose output is returned, so gradients reach the probabilities). Softmaxes and attention
    calls outside the described modules are counted as unaccounted attention."""

    def __init__(self, recorder: AttentionRecorder) -> None:
        super().__init__()
        self.recorder = recorder
        self.weighed = False  # an attention call of a gradient rollout has run (the first one stays fused)

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if func is _SDPA:
            owner = self.recorder._owner()
            if owner is None or owner[1] == "skip":
                if owner is None:
                    self.recorder._unaccounted("scaled_dot_product_attention", args[0])
                return func(*args, **kwargs)
            names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
            bound = dict(zip(names, args, strict=False))
            bound.update(kwargs)
            q, k, v = (bound.pop(n) for n in names[:3])
            fuse = self.recorder.head_fusion
            plain = not (bound.get("dropout_p") or bound.get("is_causal") or bound.get("enable_gqa"))
            if fuse is not None and owner[0] in self.recorder.fusable and plain and q.ndim == k.ndim == 4:
                if fuse == "gradient":
                    mask = bound.get("attn_mask")
                    call = AttentionCall(q, k, v, mask, bound.get("scale"))
                    grads = q.requires_grad or k.requires_grad or v.requires_grad
                    if grads and self.weighed:
                        # the backward pass goes on beneath this call: it gives the layer map on the way
                        out = _WeighedAttention.apply(call, q, k, v, mask, bound.get("scale"))
                    else:  # the fused kernel and its backward; the layer map is recomputed from ∇O after it (the
                        out = func(q, k, v, **bound)  # backward pass stops at the first call's output)
                        if out.requires_grad:
                            out.register_hook(lambda grad, call=call: setattr(call, "grad_out", grad.detach()))
                            call.output = out
                            self.weighed = True
                    self.recorder._capture(owner[0], call, fused=True)
                    return out
                out, fused = fused_attention(q, k, v, bound.get("attn_mask"), bound.get("scale"), fuse)
                self.recorder._capture(owner[0], fused, fused=True)
                return out
            out, probs = explicit_attention(q, k, v, **bound)
            self.recorder._capture(owner[0], probs)
            return out
        out = func(*args, **kwargs)
        if func in _SOFTMAXES and isinstance(out, torch.Tensor) and out.ndim >= 3:
            dim = _softmax_dim(args, kwargs)
            if dim is not None and dim % out.ndim == out.ndim - 1:
                owner = self.recorder._owner()
                if owner is None:
                    self.recorder._unaccounted("softmax", out)
                elif owner[1] == "owner":
                    self.recorder._capture(owner[0], out)
        return out


class AttentionRecorder:
    """Context manager that records every attention / gate map of ``model`` during its forward passes.

    Token-attention modules are ours and timm's (a ``fused_attn`` flag and an ``attn_drop`` submodule) plus any
    ``owners`` a family adapter names (class attention, talking heads, window attention without a dropout module,
    attention-pool heads). While active, their ``fused_attn`` flags are off, and their probabilities are recorded from
    outside: the output of their softmax over the keys, or, where a module calls ``F.scaled_dot_product_attention``
    anyway, the probabilities of that same computation done as explicit ops (a ``TorchFunctionMode``). Modules in
    ``skip`` compute attention that is deliberately not recorded (XCiT's attention over channels). The records:

    * :attr:`attentions`: the post-softmax token attention of every token-attention call, in forward order (``[B,
      heads, N, N]`` for a ViT; the module's own layout for windows, e.g. ``[B * windows, heads, w², w²]``);
    * :attr:`maps`: every recorded map by hook-point name (token attention and the CNN ``AttentionTap`` maps:
      ``attention`` ``[B, heads, Nq, Nk]``, ``spatial`` ``[B, 1|C, H, W]``, ``channel`` ``[B, C, 1, 1]``),
      with its kind in :attr:`kinds`; :attr:`token_names` names the token-attention modules;
    * :attr:`pool_weights`: the token-pooling weights ``[B, N]`` of a sequence-pooling head (CCT), if any;
    * :attr:`events`: token attention and what ``observe``\\ d modules reported, in forward order (for adapters);
    * :attr:`unaccounted`: softmaxes over the last dimension and attention calls outside the token-attention and
      ``skip`` modules, as ``(module name, op, shape)``.

    The records are those of the latest ``model(...)`` call (they are cleared when it starts). On exit every
    ``fused_attn`` flag is restored and every hook removed, also when an exception is raised; the records stay
    readable. ``detach=True`` stores detached tensors; ``detach=False`` keeps them in the autograd graph, so
    ``torch.autograd.grad(score, recorder.attentions)`` gives attention gradients. ``on_attention(name, probs)``, if
    given, returns what is stored for each token-attention call instead (e.g. a head-fused map).

    ``head_fusion`` (``'mean'``/``'max'``/``'min'``) with ``fusable`` owner names: those owners run their fused path,
    and their ``F.scaled_dot_product_attention`` call ``[X, heads, L, D]`` is computed blockwise with only the
    head-fused map ``[X, Lq, Lk]`` kept (:func:`fused_attention`; ``on_attention(name, fused, True)``): the memory
    and time of at most one map per layer, for methods that need no per-head map and no gradient. ``head_fusion=
    'gradient'``: the SDPA call runs as it is and an :class:`AttentionCall` is recorded instead, from which
    :func:`gradient_weighted_attention` gives gradient rollout's layer map after the backward pass.

    Example::

        with AttentionRecorder(model) as rec:
            logits = model(images)
        attentions = rec.attentions  # list of [B, heads, N, N]
    """

    def __init__(
        self,
        model: nn.Module,
        detach: bool = True,
        owners: Mapping[str, nn.Module] | None = None,
        skip: Mapping[str, nn.Module] | None = None,
        on_attention: Callable[..., Any] | None = None,
        head_fusion: str | None = None,
        fusable: frozenset[str] | set[str] = frozenset(),
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.detach = detach
        self.on_attention = on_attention
        self.head_fusion = head_fusion
        self.fusable = frozenset(fusable)
        skip = dict(skip or {})
        self.hook_points: list[HookPoint] = [
            p for p in attention_hook_points(model) if not (p.use_input and p.name in skip)
        ]
        owner_modules = {p.name: p.owner for p in self.hook_points if p.use_input and hasattr(p.owner, "fused_attn")}
        for name, module in (owners or {}).items():
            if name not in skip:
                owner_modules[name] = module
        self._owner_modules = owner_modules
        self._skip_modules = skip
        self.token_names = frozenset(owner_modules)
        self.kinds: dict[str, str] = {p.name: p.kind for p in self.hook_points}
        self.kinds.update(dict.fromkeys(owner_modules, "attention"))
        self._records: list[tuple[str, torch.Tensor]] = []
        self.events: list[tuple[str, str, Any]] = []
        self.unaccounted: list[tuple[str, str, tuple[int, ...]]] = []
        self._observers: list[tuple[str, nn.Module, Callable[..., Any], bool]] = []
        self._handles: list[RemovableHandle] = []
        self._saved_flags: list[tuple[nn.Module, Any]] = []
        self._stack: list[tuple[str, str | None]] = []
        self._roles: dict[int, tuple[str, str]] = {}
        self._names: dict[int, str] = {}
        self._mode: _ProbabilityCapture | None = None
        self._active = False

    @property
    def attentions(self) -> list[torch.Tensor]:
        """Token attention probabilities, one per attention call, in forward order (``[B, heads, N, N]`` for a ViT)."""
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

    def observe(self, module: nn.Module, fn: Callable[..., Any], pre: bool = False, name: str = "") -> None:
        """Call ``fn(module, args, output)`` (``output`` is ``None`` with ``pre=True``) on each call of ``module``
        while active and append ``('context', name, result)`` to :attr:`events` (``None`` results are dropped)."""
        if self._active:
            raise RuntimeError("observe() must be called before the recorder is entered")
        self._observers.append((name, module, fn, pre))

    def clear(self) -> None:
        """Drop all records."""
        self._records = []
        self.events = []
        self.unaccounted = []
        if self._mode is not None:  # a new forward pass: its first attention call is the fused one again
            self._mode.weighed = False

    def _store(self, name: str, tensor: torch.Tensor) -> None:
        self._records.append((name, tensor.detach() if self.detach else tensor))

    def _capture(self, name: str, probs: torch.Tensor, fused: bool = False) -> None:
        if self.on_attention is None:
            stored = probs
        else:
            stored = self.on_attention(name, probs, fused) if fused else self.on_attention(name, probs)
        stored = stored.detach() if self.detach and isinstance(stored, torch.Tensor) else stored
        self._records.append((name, stored))
        self.events.append(("attention", name, stored))

    def _owner(self) -> tuple[str, str] | None:
        """``(name, 'owner'|'skip')`` of the innermost running token-attention or skipped module, else ``None``."""
        for name, role in reversed(self._stack):
            if role is not None:
                return name, role
        return None

    def _unaccounted(self, op: str, tensor: torch.Tensor) -> None:
        where = next((name for name, _ in reversed(self._stack)), "")
        self.unaccounted.append((where, op, tuple(tensor.shape)))

    def _make_hook(self, point: HookPoint) -> RemovableHandle:
        def hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
            self._store(point.name, output)

        return point.module.register_forward_hook(hook)

    def _install_stack(self) -> None:
        roles = {id(m): (n, "owner") for n, m in self._owner_modules.items()}
        roles.update({id(m): (n, "skip") for n, m in self._skip_modules.items()})
        for path, module in self.model.named_modules():
            name, role = roles.get(id(module), (path, None))  # an owner is recorded under the name it was given

            def push(module: nn.Module, args: tuple[Any, ...], name: str = name, role: str | None = role) -> None:
                self._stack.append((name, role))

            def pop(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
                if self._stack:
                    self._stack.pop()

            self._handles.append(module.register_forward_pre_hook(push))
            self._handles.append(module.register_forward_hook(pop, always_call=True))

    def _install_observer(self, name: str, module: nn.Module, fn: Callable[..., Any], pre: bool) -> None:
        def report(result: Any) -> None:
            if result is not None:
                self.events.append(("context", name, result))

        if pre:
            self._handles.append(module.register_forward_pre_hook(lambda m, args: report(fn(m, args, None))))
        else:
            self._handles.append(module.register_forward_hook(lambda m, args, out: report(fn(m, args, out))))

    def __enter__(self) -> AttentionRecorder:
        if self._active:
            raise RuntimeError("AttentionRecorder is already active; it cannot be entered twice at once")
        self._active = True
        self.clear()
        try:
            for name, module in self._owner_modules.items():
                if hasattr(module, "fused_attn"):
                    self._saved_flags.append((module, module.fused_attn))
                    # fused maps are computed from the SDPA call, blockwise; else the explicit path
                    module.fused_attn = self.head_fusion is not None and name in self.fusable
            for point in self.hook_points:
                if not point.use_input:
                    self._handles.append(self._make_hook(point))
            self._handles.append(self.model.register_forward_pre_hook(lambda module, args: self.clear()))
            self._install_stack()
            for name, module, fn, pre in self._observers:
                self._install_observer(name, module, fn, pre)
            self._mode = _ProbabilityCapture(self)
            self._mode.__enter__()
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
        if self._mode is not None:
            self._mode.__exit__(None, None, None)
            self._mode = None
        for handle in self._handles:
            handle.remove()
        for owner, flag in reversed(self._saved_flags):
            owner.fused_attn = flag
        self._handles, self._saved_flags, self._stack = [], [], []
        self._active = False
