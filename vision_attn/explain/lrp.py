"""Layer-wise relevance propagation (LRP) as a modified gradient, applied per operation from outside a model.

While an :class:`LRPRules` context is active, every torch operation that a rule covers runs through an autograd
``Function`` whose forward is the operation itself (same values, same kernels) and whose backward implements the
rule in gradient x input form: the "gradient" ``g`` that reaches a tensor ``x`` makes ``x * g`` its relevance. One
``torch.autograd.grad`` call over the graph then propagates relevance through the whole model; operations no rule
covers (by default linear layers under AttnLRP and convolutions; eval-mode BatchNorm, residual additions, pooling,
indexing, reshapes, constants added or multiplied) keep their plain gradient, which is epsilon-LRP (epsilon -> 0)
there.

A tensor is *input-dependent* when it requires grad; :func:`lrp_forward` runs the model with detached parameters
and makes its token embeddings the only leaf that requires grad, so that products of two input-dependent tensors
(``q @ k^T``, ``A @ v``, gates) are told apart from products with weights.

=====================================  ==========================================  ===============================
operation                              ``'attnlrp'`` (Achtibat et al. 2024)         ``'chefer'`` (Chefer et al. 2021)
=====================================  ==========================================  ===============================
``F.linear``                           gradient (epsilon-LRP)                      alpha=1, beta=0 (z+); bias out
matmul / bmm / einsum / mul of k       uniform: gradient / k (Eq. 7)               same (their ``einsum`` relprop
input-dependent operands                                                           halved in ``Attention``)
softmax                                gradient (= Prop. 3.1, Taylor at x)         identity
``F.layer_norm`` / ``F.rms_norm``      gradient with the std held constant         identity
                                       (Prop. 3.4)
element-wise non-linearities (GELU,    identity: gradient = out / in (Eq. 9)       identity
SiLU, tanh, sigmoid, ...)
``a + b``, both input-dependent        gradient (epsilon-LRP)                      their normalised ``Add`` (per
                                                                                   image)
``F.scaled_dot_product_attention``     fused kernel, gradient scaled: q, k by      decomposed into the explicit
                                       1/4, v by 1/2 (lxt's ``divide_gradient``)   ops with the rules above
=====================================  ==========================================  ===============================

Options of either rule set: ``linear_rule='gamma'`` and ``conv_rule='gamma'`` give ``F.linear`` and
``F.conv1d/2d/3d`` the generalised LRP-gamma rule (Montavon et al. 2019, as zennit's ``Gamma``; the AttnLRP authors
combine it with their rules for ViTs) with ``linear_gamma`` / ``conv_gamma``; under the gamma rule, a convolution
whose output goes straight into an eval-mode batch norm is one layer with the batch norm merged into its weights
(zennit's ``SequentialMergeBatchNorm`` canonizer; a no-op for the gradient rule). AttnLRP's ``attention_rule='cp'`` is
CP-LRP inside the attention (lxt's ``cp_LRP`` map for ViTs): every softmax's output is a constant, so relevance flows
through the values only; ``F.scaled_dot_product_attention`` keeps its kernel with ``q`` and ``k`` detached.

``LRPRules.propagate = False`` makes every rule ``Function`` return its plain gradient instead, so one forward
graph serves both a plain and an LRP backward pass (Transformer Attribution needs both); a CP-LRP softmax has no
gradient either way.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import Function
from torch.overrides import TorchFunctionMode

from vision_attn.explain._common import NotApplicableError
from vision_attn.explain.capture import explicit_attention

__all__ = [
    "ATTENTION_RULES", "CONV_RULES", "LINEAR_RULES", "RULE_SETS", "LRPRules", "embedding_module", "lrp_forward",
    "safe_divide",
]  # fmt: skip

RULE_SETS = ("attnlrp", "chefer")
LINEAR_RULES = ("gradient", "alpha1beta0", "gamma")
CONV_RULES = ("gradient", "gamma")
ATTENTION_RULES = ("attnlrp", "cp")
_CONVS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}  # the convolutions the gamma rule covers: spatial dimensions


def safe_divide(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """``numerator / denominator`` stabilised as in Chefer et al.'s ``layers_ours.safe_divide``: their clamps add 1e-9
    to the denominator (a sum of exactly 0 becomes 1e-9), and entries whose denominator is 0 give 0."""
    den = denominator + 1e-9
    den = den.masked_fill(den == 0, 1e-9)
    return (numerator / den).masked_fill_(denominator == 0, 0.0)


def _ratio(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """``numerator / denominator``, 0 where that is not finite (an input of exactly 0 holds no relevance)."""
    return torch.nan_to_num(numerator / denominator, nan=0.0, posinf=0.0, neginf=0.0)


def _plain_vjp(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """The plain vector-Jacobian product of ``fn`` at ``x`` (recomputed; used for cheap element-wise ops)."""
    with torch.enable_grad():
        leaf = x.detach().requires_grad_(True)
        (result,) = torch.autograd.grad(fn(leaf), leaf, grad)
    return result


class _GradScale(Function):
    """Identity forward; backward multiplies the gradient by ``factor`` (the uniform rule of a product).

    With ``copy=False`` the output is a view of ``x``, which nothing may modify in place (used where the consumer is
    known: the inputs of ``F.scaled_dot_product_attention``); else a copy, which the model may modify.
    """

    @staticmethod
    def forward(ctx: Any, rules: LRPRules, x: torch.Tensor, factor: float, copy: bool = True) -> torch.Tensor:
        ctx.rules, ctx.factor = rules, factor
        return x.clone() if copy else x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, torch.Tensor, None, None]:
        return None, grad * ctx.factor if ctx.rules.propagate else grad, None, None


class _IdentityRule(Function):
    """``y = fn(x)`` for a shape-preserving ``fn``; the identity rule ``R_x = R_y`` gives the gradient
    ``y * g / x``."""

    @staticmethod
    def forward(ctx: Any, rules: LRPRules, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        y = fn(x)
        ctx.rules, ctx.fn = rules, fn
        ctx.save_for_backward(x, y)
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, None, torch.Tensor]:
        x, y = ctx.saved_tensors
        if not ctx.rules.propagate:
            return None, None, _plain_vjp(ctx.fn, x, grad)
        return None, None, _ratio(y * grad, x)


class _NormRule(Function):
    """Layer norm (``rms=False``) or RMS norm with the standard deviation held constant (AttnLRP, Prop. 3.4): the
    gradient of ``(x - mean(x)) / std * weight`` (RMS: ``x / rms * weight``) with ``std`` a constant."""

    @staticmethod
    def forward(
        ctx: Any,
        rules: LRPRules,
        x: torch.Tensor,
        normalized_shape: tuple[int, ...],
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        eps: float | None,
        rms: bool,
    ) -> torch.Tensor:
        ctx.rules, ctx.shape, ctx.eps, ctx.rms = rules, tuple(normalized_shape), eps, rms
        if rms:
            y, rstd = F.rms_norm(x, ctx.shape, weight, eps), None
        else:
            y, _, rstd = torch.native_layer_norm(x, ctx.shape, weight, bias, eps)
        ctx.save_for_backward(x, weight, bias, rstd)
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        x, weight, bias, rstd = ctx.saved_tensors
        if not ctx.rules.propagate:
            grad_x = _plain_vjp(lambda t: _norm(t, ctx.shape, weight, bias, ctx.eps, ctx.rms), x, grad)
            return None, grad_x, None, None, None, None, None
        dims = tuple(range(-len(ctx.shape), 0))
        scaled = grad if weight is None else grad * weight
        if ctx.rms:
            eps = torch.finfo(x.dtype).eps if ctx.eps is None else ctx.eps
            grad_x = scaled * torch.rsqrt(x.pow(2).mean(dim=dims, keepdim=True) + eps)
        else:  # centring is linear and symmetric: its own transpose
            grad_x = (scaled - scaled.mean(dim=dims, keepdim=True)) * rstd
        return None, grad_x.to(x.dtype), None, None, None, None, None


def _norm(
    x: torch.Tensor,
    shape: tuple[int, ...],
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float | None,
    rms: bool,
) -> torch.Tensor:
    if rms:
        return F.rms_norm(x, shape, weight, eps)
    return F.layer_norm(x, shape, weight, bias, eps)


class _LinearAlpha1Beta0(Function):
    """``F.linear`` with the alpha=1, beta=0 (z+) rule of Chefer et al.'s ``Linear.relprop``: each output's relevance
    goes to the inputs in proportion to their positive contributions ``(x_i w_ji)^+``; the bias takes none."""

    @staticmethod
    def forward(
        ctx: Any, rules: LRPRules, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        y = F.linear(x, weight, bias)
        ctx.rules = rules
        ctx.save_for_backward(x, weight, y)
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, torch.Tensor, None, None]:
        x, weight, y = ctx.saved_tensors
        if not ctx.rules.propagate:
            return None, grad @ weight, None, None
        w_pos, w_neg = weight.clamp(min=0), weight.clamp(max=0)
        positive = F.linear(x.clamp(min=0), w_pos) + F.linear(x.clamp(max=0), w_neg)  # Σ_i (x_i w_ji)^+ >= 0
        # safe_divide(R, Z+) for Z+ >= 0: relevance per unit of positive contribution (0 where there is none)
        share = (y * grad).div_(positive + 1e-9).masked_fill_(positive == 0, 0.0)
        return None, torch.where(x > 0, share @ w_pos, share @ w_neg), None, None


def _stabilize(denominator: torch.Tensor, epsilon: float = 1e-6) -> torch.Tensor:
    """``denominator`` moved ``epsilon`` away from 0, by its sign (``+`` for +0): zennit's ``stabilize`` default."""
    return denominator + torch.copysign(denominator.new_tensor(epsilon), denominator)


class _GammaRule(Function):
    """``layer(x, weight, bias)`` (``F.linear`` or ``F.conv1d/2d/3d``, linear in ``x``) with the generalised LRP-gamma
    rule (Montavon et al. 2019, "Layer-wise relevance propagation: an overview"; Andéol et al. 2021), exactly as
    zennit's ``Gamma`` (v0.5, ``zennit/rules.py``): an output ``z_j > 0`` shares its relevance in proportion to
    ``x+ (W + γW+) + x- (W + γW-)`` (plus ``b + γb+``), one with ``z_j < 0`` in proportion to
    ``x+ (W + γW-) + x- (W + γW+)`` (plus ``b + γb-``), each denominator stabilised by 1e-6 (by its sign); an
    output of exactly 0 passes none. ``γ = 0`` is epsilon-LRP (the plain gradient, up to the stabiliser); without a
    bias the rule conserves relevance.

    Computed without zennit's four modified copies of the layer: as ``W± = (W ± |W|) / 2`` (likewise ``b±``), both
    denominators are ``(1 + γ/2) z + sign(z) γ/2 (|x| |W| + |b|)``, and with ``s`` an output's relevance over its
    denominator the gradient is ``(1 + γ/2) Wᵀ s + sign(x) γ/2 |W|ᵀ (sign(z) s)``: one extra forward of the layer
    (on ``|x|``, ``|W|``, ``|b|``) and two transposed ones.
    """

    @staticmethod
    def forward(
        ctx: Any,
        rules: LRPRules,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        gamma: float,
        layer: Callable[..., torch.Tensor],
        transpose: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        output: Callable[[], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        y = layer(x, weight, bias) if output is None else output()
        ctx.rules, ctx.gamma, ctx.layer, ctx.transpose = rules, gamma, layer, transpose
        ctx.save_for_backward(x, weight, bias, y)
        return y.clone()  # the model may modify its copy in place (an in-place ReLU after a conv or batch norm)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        x, weight, bias, y = ctx.saved_tensors
        gamma, transpose = ctx.gamma, ctx.transpose
        nones = (None,) * 6
        if not ctx.rules.propagate:
            return None, transpose(grad, weight), *nones
        if gamma == 0:  # the denominator is z
            return None, transpose(y * grad / _stabilize(y), weight), *nones
        magnitude = ctx.layer(x.abs(), weight.abs(), None if bias is None else bias.abs())  # |x| |W| + |b|
        sign = y.sign()
        denominator = torch.addcmul(y * (1 + gamma / 2), sign, magnitude, value=gamma / 2)
        share = (y * grad).div_(_stabilize(denominator))
        grad_x = transpose(share, weight).mul_(1 + gamma / 2)
        return None, grad_x.addcmul_(x.sign(), transpose(share.mul_(sign), weight.abs()), value=gamma / 2), *nones


def _linear_transpose(grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return grad @ weight  # .., out -> .., in


def _check_gamma(value: object, name: str) -> float:
    """``value`` as a float if it is a finite number >= 0 (an LRP-gamma); else a ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0 (the LRP-gamma), got {value!r}")
    return float(value)


class _NormalizedAdd(Function):
    """``a + b`` with Chefer et al.'s ``Add.relprop``: epsilon-LRP shares ``a * g`` and ``b * g``, each rescaled per
    image so that the two sums split the relevance in proportion to their absolute values and add up to it."""

    @staticmethod
    def forward(ctx: Any, rules: LRPRules, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        ctx.rules = rules
        ctx.save_for_backward(a, b)
        return a + b

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, torch.Tensor, torch.Tensor]:
        if not ctx.rules.propagate:
            return None, grad, grad
        a, b = ctx.saved_tensors
        dims = tuple(range(1, grad.ndim)) if grad.ndim > 1 else tuple(range(grad.ndim))
        sum_a = (a * grad).sum(dim=dims, keepdim=True)
        sum_b = (b * grad).sum(dim=dims, keepdim=True)
        total = sum_a + sum_b  # the relevance of a + b
        magnitude = sum_a.abs() + sum_b.abs()
        scale_a = safe_divide(safe_divide(sum_a.abs(), magnitude) * total, sum_a)
        scale_b = safe_divide(safe_divide(sum_b.abs(), magnitude) * total, sum_b)
        return None, grad * scale_a, grad * scale_b


def _tensor_attrs(*names: str) -> list[Any]:
    return [getattr(torch.Tensor, name) for name in names if hasattr(torch.Tensor, name)]


_PRODUCTS = (
    torch.matmul, torch.bmm, torch.mul, torch.einsum,
    *_tensor_attrs("matmul", "__matmul__", "__rmatmul__", "bmm", "mul", "__mul__", "__rmul__"),
)  # fmt: skip
_ADDS = (torch.add, *_tensor_attrs("add", "__add__", "__radd__"))
_SOFTMAXES = (torch.softmax, F.softmax, *_tensor_attrs("softmax"))
_ELEMENTWISE = (
    F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid, F.elu, F.selu, F.celu, F.softplus,
    torch.sigmoid, torch.tanh, *_tensor_attrs("sigmoid", "tanh"),
)  # fmt: skip


def _needs_grad(value: object) -> bool:
    return isinstance(value, torch.Tensor) and value.requires_grad


@functools.cache
def _signature(func: Any) -> inspect.Signature | None:
    try:
        return inspect.signature(func)
    except (TypeError, ValueError):  # some builtins have none; they take no inplace flag
        return None


def _out_of_place(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``(args, kwargs)`` of ``func`` with an ``inplace`` flag (given by name or position) set to ``False``."""
    signature = _signature(func)
    if signature is None or "inplace" not in signature.parameters:
        return args, kwargs
    bound = signature.bind(*args, **kwargs)
    bound.arguments["inplace"] = False
    return bound.args, bound.kwargs


class LRPRules(TorchFunctionMode):
    """Context manager: forward passes run while it is active build a graph whose gradients are LRP relevance
    divided by the input (gradient x input = relevance), with the per-operation rules of ``rules`` (see the module
    docstring): ``'attnlrp'`` (Achtibat et al., ICML 2024, "AttnLRP: Attention-Aware Layer-wise Relevance
    Propagation for Transformers", its efficient gradient x input form) or ``'chefer'`` (the relprop rules of Chefer,
    Gur & Wolf, CVPR 2021, "Transformer Interpretability Beyond Attention Visualization", code
    ``baselines/ViT/ViT_LRP.py`` and ``modules/layers_ours.py``).

    ``linear_rule`` (default ``'gradient'`` for AttnLRP, ``'alpha1beta0'`` for Chefer) picks the rule of
    ``F.linear``, ``conv_rule`` (default ``'gradient'``) that of ``F.conv1d/2d/3d``; ``'gamma'`` is LRP-gamma with
    ``linear_gamma`` / ``conv_gamma`` (zennit's default 0.25; 0 is the plain gradient up to a 1e-6 stabiliser); a
    gamma-rule convolution followed by an eval-mode ``F.batch_norm`` is merged with it (zennit's canonizer).
    ``attention_rule`` (``None``: the rule set's own) may be ``'cp'`` with ``rules='attnlrp'``: CP-LRP, every softmax
    output held constant (the attention probabilities and attention-pooling weights such as CCT's sequence pooling).
    Only operations on input-dependent tensors (that require grad) get a rule; use
    :func:`lrp_forward` to run a model so. Nothing is changed on any module; call ``torch.autograd.grad`` after
    leaving the context. :attr:`propagate` (default ``True``) may be set to ``False`` before a backward pass to get
    the plain gradients of the same graph.
    """

    def __init__(
        self,
        rules: str = "attnlrp",
        linear_rule: str | None = None,
        linear_gamma: float = 0.25,
        conv_rule: str = "gradient",
        conv_gamma: float = 0.25,
        attention_rule: str | None = None,
    ) -> None:
        super().__init__()
        if rules not in RULE_SETS:
            raise ValueError(f"rules {rules!r} is unknown; expected one of {RULE_SETS}")
        if linear_rule is None:
            linear_rule = "alpha1beta0" if rules == "chefer" else "gradient"
        if linear_rule not in LINEAR_RULES:
            raise ValueError(f"linear_rule {linear_rule!r} is unknown; expected one of {LINEAR_RULES}")
        if conv_rule not in CONV_RULES:
            raise ValueError(f"conv_rule {conv_rule!r} is unknown; expected one of {CONV_RULES}")
        if attention_rule is None:
            attention_rule = rules
        elif rules != "attnlrp" or attention_rule not in ATTENTION_RULES:
            raise ValueError(
                f"attention_rule {attention_rule!r} with rules {rules!r} is unknown; expected one of "
                f"{ATTENTION_RULES} with rules='attnlrp' (or None: the rule set's own)"
            )
        self.rules, self.attention_rule = rules, attention_rule
        self.linear_rule, self.conv_rule = linear_rule, conv_rule
        self.linear_gamma = _check_gamma(linear_gamma, "linear_gamma")
        self.conv_gamma = _check_gamma(conv_gamma, "conv_gamma")
        self.propagate = True
        chefer = rules == "chefer"
        handlers: dict[Any, Callable[..., Any]] = dict.fromkeys(_PRODUCTS, self._product)
        handlers.update(dict.fromkeys(_ELEMENTWISE, self._identity))
        handlers[F.layer_norm] = self._layer_norm
        handlers[F.rms_norm] = self._rms_norm
        handlers[F.scaled_dot_product_attention] = self._sdpa
        if chefer:
            handlers.update(dict.fromkeys(_SOFTMAXES, self._identity))
            handlers.update(dict.fromkeys(_ADDS, self._add))
        if attention_rule == "cp":
            handlers.update(dict.fromkeys(_SOFTMAXES, self._constant))
        if linear_rule != "gradient":
            handlers[F.linear] = self._linear
        if conv_rule == "gamma":
            handlers.update(dict.fromkeys(_CONVS, self._conv))
            handlers[F.batch_norm] = self._batch_norm
        self._convs: dict[int, tuple[weakref.ref[torch.Tensor], tuple[Any, ...]]] = {}  # gamma-rule conv outputs
        self._handlers = handlers

    def __exit__(self, *exc: object) -> None:
        self._convs.clear()  # the record of gamma-rule conv outputs holds their inputs
        super().__exit__(*exc)

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        handler = self._handlers.get(func)
        if handler is not None and torch.is_grad_enabled():
            return handler(func, args, kwargs)
        return func(*args, **kwargs)

    # --- rules; each falls back to the plain op where its operands are not input-dependent -----------------------

    def _scale(self, x: torch.Tensor, factor: float, copy: bool = True) -> torch.Tensor:
        return _GradScale.apply(self, x, factor, copy) if factor != 1.0 and x.requires_grad else x

    def _product(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        operands = args[1:] if func is torch.einsum else args
        if func is torch.einsum and len(operands) == 1 and isinstance(operands[0], (list, tuple)):
            operands = operands[0]
        count = sum(_needs_grad(t) for t in operands)
        out = func(*args, **kwargs)
        return self._scale(out, 1.0 / count) if count > 1 and isinstance(out, torch.Tensor) else out

    def _identity(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if not args or not _needs_grad(args[0]):
            return func(*args, **kwargs)
        args, kwargs = _out_of_place(func, args, kwargs)  # the rule returns a new tensor; its input stays as it was
        return _IdentityRule.apply(self, lambda t: func(t, *args[1:], **kwargs), args[0])

    def _layer_norm(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return self._norm(func, args, kwargs, ("input", "normalized_shape", "weight", "bias", "eps"), 1e-5)

    def _rms_norm(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return self._norm(func, args, kwargs, ("input", "normalized_shape", "weight", "eps"), None)

    def _norm(
        self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], names: tuple[str, ...], eps: float | None
    ) -> Any:
        bound = {"weight": None, "bias": None, "eps": eps, **dict(zip(names, args, strict=False)), **kwargs}
        x = bound["input"]
        if not _needs_grad(x):
            return func(*args, **kwargs)
        if self.rules == "chefer":
            return self._identity(func, args, kwargs)
        rms = "bias" not in names
        return _NormRule.apply(self, x, bound["normalized_shape"], bound["weight"], bound["bias"], bound["eps"], rms)

    def _linear(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        bound = {"bias": None, **dict(zip(("input", "weight", "bias"), args, strict=False)), **kwargs}
        x, weight, bias = bound["input"], bound["weight"], bound["bias"]
        if not _needs_grad(x):
            return func(*args, **kwargs)
        if self.linear_rule == "alpha1beta0":
            return _LinearAlpha1Beta0.apply(self, x, weight, bias)
        return _GammaRule.apply(self, x, weight, bias, self.linear_gamma, F.linear, _linear_transpose)

    def _conv(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
        bound = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}
        bound.update(zip(names, args, strict=False))
        bound.update(kwargs)
        x, weight, bias = bound.pop("input"), bound.pop("weight"), bound.pop("bias")
        if not _needs_grad(x):
            return func(*args, **kwargs)
        dims = _CONVS[func]
        layer = functools.partial(func, **bound)
        grad_input = getattr(torch.nn.grad, f"conv{dims}d_input")

        def transpose(grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
            if isinstance(bound["padding"], str) or x.ndim == dims + 1:  # 'same' / 'valid', or no batch dimension
                return _plain_vjp(lambda t: layer(t, weight, None), x, grad)
            return grad_input(x.shape, weight, grad, **bound)

        y = _GammaRule.apply(self, x, weight, bias, self.conv_gamma, layer, transpose)
        self._convs[id(y)] = (weakref.ref(y), (x, weight, bias, layer, transpose))
        return y

    def _batch_norm(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Eval-mode batch norm of a gamma-rule convolution's output: one gamma-rule layer with the merged weights
        (zennit's ``SequentialMergeBatchNorm`` canonizer); the output is the batch norm's own."""
        names = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
        bound = {"running_mean": None, "running_var": None, "weight": None, "bias": None, "training": False,
                 "momentum": 0.1, "eps": 1e-5}  # fmt: skip
        bound.update(zip(names, args, strict=False))
        bound.update(kwargs)
        z, mean, var = bound["input"], bound["running_mean"], bound["running_var"]
        ref, conv = self._convs.get(id(z), (None, None))
        if ref is None or ref() is not z or bound["training"] or mean is None or var is None:
            return func(*args, **kwargs)
        x, weight, bias, layer, transpose = conv
        scale = torch.rsqrt(var + bound["eps"])  # BN(z) = z * scale + shift
        scale = scale if bound["weight"] is None else scale * bound["weight"]
        shift = -mean * scale if bound["bias"] is None else bound["bias"] - mean * scale
        merged_weight = weight * scale.reshape(-1, *(1,) * (weight.ndim - 1))
        merged_bias = shift if bias is None else bias * scale + shift
        output = functools.partial(func, **{**bound, "input": z.detach()})
        return _GammaRule.apply(self, x, merged_weight, merged_bias, self.conv_gamma, layer, transpose, output)

    def _constant(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """CP-LRP: the output (attention probabilities) is a constant; relevance takes the other factor's path."""
        return func(*args, **kwargs).detach()

    def _add(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if (
            len(args) == 2 and not kwargs and _needs_grad(args[0]) and _needs_grad(args[1])
            and args[0].shape == args[1].shape
        ):  # fmt: skip
            return _NormalizedAdd.apply(self, args[0], args[1])
        return func(*args, **kwargs)

    def _softmax(self, x: torch.Tensor) -> torch.Tensor:
        if self.rules == "chefer" and x.requires_grad:
            return _IdentityRule.apply(self, lambda t: t.softmax(dim=-1), x)
        return x.softmax(dim=-1)

    def _sdpa(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
        bound = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}
        bound.update(zip(names, args, strict=False))
        bound.update(kwargs)
        q, k, v = bound.pop("query"), bound.pop("key"), bound.pop("value")
        q_dep, k_dep, v_dep = _needs_grad(q), _needs_grad(k), _needs_grad(v)
        if not (q_dep or k_dep or v_dep):
            return func(*args, **kwargs)
        if self.attention_rule == "cp":  # the probabilities are constants: v takes all the relevance, q and k none
            return func(q.detach(), k.detach(), v, **bound)
        score_factor = 0.5 if q_dep and k_dep else 1.0  # q @ k^T: uniform rule when both depend on the input
        out_factor = 0.5 if (q_dep or k_dep) and v_dep else 1.0  # A @ v likewise
        if self.rules == "attnlrp":  # softmax has its plain gradient: scaling q, k and v is the whole rule
            q = self._scale(q, score_factor * out_factor, copy=False)
            k = self._scale(k, score_factor * out_factor, copy=False)
            return func(q, k, self._scale(v, out_factor, copy=False), **bound)
        return explicit_attention(  # the products and the softmax with the rules
            q, k, v, **bound, matmul=lambda a, b: self._product(torch.matmul, (a, b), {}), softmax=self._softmax
        )[0]


def embedding_module(model: nn.Module) -> nn.Module:
    """Return the module whose output holds ``model``'s token embeddings, where relevance is read: what the model's
    family adapter names (``patch_embed`` for ViTs and Swin, the stem of MaxViT and DaViT); raises
    :class:`~vision_attn.explain.NotApplicableError` for a model without one (a CNN)."""
    from vision_attn.explain.families import find_adapter

    adapter = find_adapter(model)
    module = adapter.embedding(model) if adapter is not None else getattr(model, "patch_embed", None)
    if not isinstance(module, nn.Module):
        raise NotApplicableError(
            f"model {type(model).__name__} has no patch_embed module: relevance is read at the token embeddings "
            "(the output of patch_embed), which transformers have; use a Grad-CAM method for a CNN"
        )
    return module


def lrp_forward(
    model: nn.Module, images: torch.Tensor, rules: LRPRules, leaf: str = "tokens", inner: Any = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``model(images)`` once under ``rules``; return ``(output, embeddings)``.

    ``embeddings`` is the output of ``model.patch_embed`` (``[B, N, D]`` or ``[B, gh, gw, D]``), swapped by a
    temporary forward hook for a detached leaf that requires grad, so the graph starts there and
    ``embeddings * torch.autograd.grad(score, embeddings)[0]`` is the relevance of each token embedding. With
    ``leaf='pixels'`` the graph starts at the images instead (``[B, C, H, W]``, returned in place of the
    embeddings): the relevance then also flows through the patch embedding (convolutions and linear layers keep
    their plain gradient, epsilon-LRP). ``inner``: a context entered inside ``rules`` (an
    :class:`~vision_attn.explain.AttentionRecorder`, which then sees the attention as the rules compute it). The model
    runs with its parameters detached (``torch.func.functional_call``), so input-dependent tensors are exactly those
    that require grad. The hook is removed and the parameters are back in place when this returns (also on error).
    Raises :class:`~vision_attn.explain.NotApplicableError` for a model without a patch embedding (the module its
    family adapter names) that runs once and returns a tensor (or a tuple starting with one).
    """
    if leaf not in ("tokens", "pixels"):
        raise ValueError(f"leaf must be 'tokens' or 'pixels', got {leaf!r}")
    parameters = {key: value.detach() for key, value in model.named_parameters()}
    inner = inner if inner is not None else contextlib.nullcontext()
    if leaf == "pixels":
        embedding_module(model)
        pixels = images.detach().requires_grad_(True)
        with torch.enable_grad(), rules, inner:
            return torch.func.functional_call(model, parameters, (pixels,)), pixels
    name = type(model).__name__
    patch_embed = embedding_module(model)
    captured: list[torch.Tensor] = []

    def swap(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        tensor = output[0] if isinstance(output, tuple) and output else output  # (tokens, grid size) in some families
        if not isinstance(tensor, torch.Tensor):
            raise NotApplicableError(
                f"model {name}'s patch_embed returned {type(output).__name__}; relevance needs one tensor of token "
                "embeddings"
            )
        captured.append(tensor.detach().requires_grad_(True))
        start = captured[-1].clone()  # the model may modify its embeddings in place (NaFlexViT adds positions)
        return (start, *output[1:]) if isinstance(output, tuple) else start

    handle = patch_embed.register_forward_hook(swap)
    try:
        with torch.enable_grad(), rules, inner:
            output = torch.func.functional_call(model, parameters, (images,))
    finally:
        handle.remove()
    if len(captured) != 1:
        raise NotApplicableError(
            f"model {name}'s patch_embed ran {len(captured)} times in one forward pass; relevance needs exactly 1"
        )
    return output, captured[0]
