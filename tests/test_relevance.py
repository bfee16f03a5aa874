"""Relevance maps (issue 22): the LRP rules on hand-computed cases, conservation, AttnLRP against explicit references
(our own and lxt's), Transformer Attribution against an explicit reference of Chefer et al.'s relprop rules, and both
methods on every ViT family, batched, fused or explicit, leaving the model as found."""

from __future__ import annotations

import math
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import Function
from torch.overrides import TorchFunctionMode

import vision_attn
from vision_attn.explain import NotApplicableError
from vision_attn.explain.lrp import LRPRules, lrp_forward
from vision_attn.explain.relevance import attnlrp, transformer_attribution

METHODS = {"attnlrp": attnlrp, "transformer_attribution": transformer_attribution}


def _rule_relevance(
    fn: Callable[..., torch.Tensor], inputs: list[torch.Tensor], out_grad: torch.Tensor, **rules: Any
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``(output, relevance x * g of each input)`` of ``fn`` run under ``LRPRules(**rules)`` (input x gradient)."""
    leaves = [t.detach().double().requires_grad_(True) for t in inputs]
    with LRPRules(**rules):
        out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, out_grad.double())
    return out.detach(), [(x * g).detach() for x, g in zip(leaves, grads, strict=True)]


# --- each rule on a hand-computed case ------------------------------------------------------------------------------


@pytest.mark.parametrize("rules", ["attnlrp", "chefer"])
def test_uniform_rule_halves_a_product_of_two_input_dependent_factors(rules: str) -> None:
    a, b = torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0], [4.0]])
    out, (rel_a, rel_b) = _rule_relevance(torch.matmul, [a, b], torch.ones(1, 1), rules=rules)
    assert out.item() == 11.0  # relevance of the output: 11 x 1
    # each product term a_i b_i goes half to a_i and half to b_i: [1*3, 2*4] / 2
    torch.testing.assert_close(rel_a, torch.tensor([[1.5, 4.0]], dtype=torch.float64))
    torch.testing.assert_close(rel_b, torch.tensor([[1.5], [4.0]], dtype=torch.float64))
    # a product with a constant (a weight) is linear: plain gradient x input, all relevance to the input
    leaf = a.double().requires_grad_(True)
    with LRPRules(rules, linear_rule="gradient"):
        out = leaf @ b.double()
    (grad,) = torch.autograd.grad(out, leaf, torch.ones(1, 1, dtype=torch.float64))
    torch.testing.assert_close(leaf * grad, torch.tensor([[3.0, 8.0]], dtype=torch.float64))
    # three input-dependent factors of an einsum: a third each of 2 * 5 * 7
    x, y, z = torch.tensor([2.0]), torch.tensor([5.0]), torch.tensor([7.0])
    _, rels = _rule_relevance(lambda p, q, r: torch.einsum("i,i,i->i", p, q, r), [x, y, z], torch.ones(1), rules=rules)
    torch.testing.assert_close(torch.stack(rels), torch.full((3, 1), 70.0 / 3, dtype=torch.float64))


def test_softmax_rules_hand_computed() -> None:
    x = 1 + torch.tensor([0.0, math.log(2.0), math.log(3.0)])  # softmax = [1, 2, 3] / 6
    out_grad = torch.tensor([1.0, 0.0, 0.0])  # relevance of the output: [1/6, 0, 0]
    _, (attn,) = _rule_relevance(lambda t: t.softmax(dim=-1), [x], out_grad, rules="attnlrp")
    # AttnLRP Prop. 3.1: R_in = x * (R_out - s * sum(R_out)) = x * ([1/6, 0, 0] - [1, 2, 3] / 36)
    log2, log3 = math.log(2.0), math.log(3.0)
    expected = torch.tensor([5 / 36, -2 * (1 + log2) / 36, -3 * (1 + log3) / 36], dtype=torch.float64)
    torch.testing.assert_close(attn, expected)
    _, (chefer,) = _rule_relevance(lambda t: F.softmax(t, dim=-1), [x], out_grad, rules="chefer")
    torch.testing.assert_close(chefer, torch.tensor([1 / 6, 0.0, 0.0], dtype=torch.float64))  # identity rule


def test_layer_norm_and_rms_norm_rules_hand_computed() -> None:
    x = torch.tensor([1.0, 2.0, 3.0, 6.0])  # mean 3, variance 3.5
    weight, bias = torch.ones(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)
    out_grad = torch.tensor([1.0, 0.0, 0.0, 0.0])
    rstd = 1 / math.sqrt(3.5 + 1e-5)

    def norm(t: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(t, (4,), weight, bias, 1e-5)

    out, (attn,) = _rule_relevance(norm, [x], out_grad, rules="attnlrp")
    # std held constant: the gradient of (x - mean) * rstd is rstd * (g - mean(g)) = rstd * [0.75, -0.25, ...]
    expected = rstd * torch.tensor([0.75, -0.5, -0.75, -1.5], dtype=torch.float64)
    torch.testing.assert_close(attn, expected)
    torch.testing.assert_close(attn.sum(), out[0])  # conserved: the output's relevance is y_0 = -2 * rstd
    _, (chefer,) = _rule_relevance(norm, [x], out_grad, rules="chefer")
    torch.testing.assert_close(chefer, torch.tensor([-2 * rstd, 0, 0, 0], dtype=torch.float64))  # identity
    x = torch.tensor([1.0, 2.0, 2.0, 4.0])  # root mean square 2.5
    _, (rms,) = _rule_relevance(lambda t: F.rms_norm(t, (4,), weight, 0.0), [x], out_grad, rules="attnlrp")
    torch.testing.assert_close(rms, torch.tensor([0.4, 0.0, 0.0, 0.0], dtype=torch.float64))


@pytest.mark.parametrize("rules", ["attnlrp", "chefer"])
def test_identity_rule_on_element_wise_non_linearities(rules: str) -> None:
    x = torch.tensor([2.0, -1.0, 0.5, -3.0])
    for fn in (F.gelu, F.silu, torch.tanh, lambda t: t.sigmoid()):
        out, (rel,) = _rule_relevance(fn, [x], torch.ones(4), rules=rules)
        torch.testing.assert_close(rel, out)  # all of each output's relevance to its input, none elsewhere
    # modules built with inplace=True (flag by name or by position) get the rule and leave their input as it was
    for module in (nn.SiLU(inplace=True), nn.Hardswish(inplace=True), nn.ELU(inplace=True)):
        leaf = x.double().requires_grad_(True)
        with LRPRules(rules):
            out = module(leaf * 1.0)
        (grad,) = torch.autograd.grad(out, leaf, torch.ones(4, dtype=torch.float64))
        torch.testing.assert_close(leaf * grad, out.detach(), msg=type(module).__name__)
    # in gradient x input form an input of exactly 0 holds no relevance (sigmoid(0) = 0.5 is lost), as in lxt
    out, (rel,) = _rule_relevance(torch.sigmoid, [torch.zeros(1)], torch.ones(1), rules=rules)
    assert out.item() == 0.5
    assert rel.item() == 0.0
    # the plain gradient would give x * gelu'(x) instead (here 2 * 1.0852 != gelu(2) = 1.9545)
    assert abs(2 * torch.func.grad(F.gelu)(torch.tensor(2.0)).item() - F.gelu(torch.tensor(2.0)).item()) > 0.1


def test_chefer_linear_alpha1beta0_rule_hand_computed() -> None:
    x, weight, bias = torch.tensor([1.0, -2.0]), torch.tensor([[1.0, -1.0], [2.0, 3.0]]), torch.tensor([5.0, -1.0])
    # output 0: contributions 1*1 = 1, (-1)*(-2) = 2 -> [1/3, 2/3]; output 1: 2*1 = 2, 3*(-2) = -6 -> [1, 0]
    for relevance_out, expected in (([1.0, 0.0], [1 / 3, 2 / 3]), ([1.0, 1.0], [4 / 3, 2 / 3])):
        y = F.linear(x, weight, bias)
        out_grad = torch.tensor(relevance_out) / y  # so that y * g is the output's relevance
        linear = lambda t: F.linear(t, weight.double(), bias.double())  # noqa: E731
        _, (rel,) = _rule_relevance(linear, [x], out_grad, rules="chefer")
        torch.testing.assert_close(rel, torch.tensor(expected, dtype=torch.float64))
    rules = LRPRules("chefer")
    leaf = x.double().requires_grad_(True)
    with rules:
        out = F.linear(leaf, weight.double(), bias.double())
    rules.propagate = False  # the same graph gives the plain gradient
    (plain,) = torch.autograd.grad(out, leaf, torch.tensor([1.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(plain, torch.tensor([3.0, 2.0], dtype=torch.float64))


def test_chefer_normalized_add_rule_hand_computed() -> None:
    a, b = torch.tensor([[1.0, 2.0]]), torch.tensor([[-3.0, 1.0]])
    # epsilon shares a * g = [1, 2] (sum 3) and b * g = [-3, 1] (sum -2); total relevance 1 is split 3/5 : 2/5
    _, (rel_a, rel_b) = _rule_relevance(torch.add, [a, b], torch.ones(1, 2), rules="chefer")
    torch.testing.assert_close(rel_a, torch.tensor([[0.2, 0.4]], dtype=torch.float64))
    torch.testing.assert_close(rel_b, torch.tensor([[0.6, -0.2]], dtype=torch.float64))
    _, (plain_a, plain_b) = _rule_relevance(torch.add, [a, b], torch.ones(1, 2), rules="attnlrp")
    torch.testing.assert_close(plain_a + plain_b, (a + b).double())  # AttnLRP: epsilon-LRP, the plain gradient


@pytest.mark.parametrize("rules", ["attnlrp", "chefer"])
def test_fused_attention_rule_equals_the_explicit_ops(rules: str) -> None:
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 4, generator=gen) for _ in range(3))
    mask = torch.rand(5, 5, generator=gen) > 0.3
    mask.fill_diagonal_(True)
    out_grad = torch.randn(2, 3, 5, 4, generator=gen)

    def explicit(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        scores = (q * 0.5) @ k.transpose(-2, -1)
        return scores.masked_fill(~mask, -math.inf).softmax(dim=-1) @ v

    def fused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # default scale 4 ** -0.5

    out_f, rel_f = _rule_relevance(fused, [q, k, v], out_grad, rules=rules)
    out_e, rel_e = _rule_relevance(explicit, [q, k, v], out_grad, rules=rules)
    torch.testing.assert_close(out_f, out_e)
    for fused_rel, explicit_rel in zip(rel_f, rel_e, strict=True):
        torch.testing.assert_close(fused_rel, explicit_rel)
    # and the rules do act: the plain gradient x input of the same ops differs
    leaves = [t.double().requires_grad_(True) for t in (q, k, v)]
    grads = torch.autograd.grad(explicit(*leaves), leaves, out_grad.double())
    assert not torch.allclose(leaves[0] * grads[0], rel_e[0])


# --- explicit references: relevance carried by autograd Functions whose backward returns relevance ---------------


def _sd(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Chefer et al.'s safe_divide, written out again for the reference."""
    den = b.clamp(min=1e-9) + b.clamp(max=1e-9)
    den = den + den.eq(0).to(den.dtype) * 1e-9
    return a / den * b.ne(0).to(b.dtype)


class _RefLinear(Function):
    @staticmethod
    def forward(ctx, x, weight, bias, rule):
        ctx.save_for_backward(x, weight)
        ctx.rule = rule
        y = F.linear(x, weight, bias)
        ctx.y = y
        return y

    @staticmethod
    def backward(ctx, rel):
        x, weight = ctx.saved_tensors
        if ctx.rule == "epsilon":  # R_x = x * ((R / y) @ W), y with its bias
            return x * ((rel / ctx.y) @ weight), None, None, None
        px, nx, pw, nw = x.clamp(min=0), x.clamp(max=0), weight.clamp(min=0), weight.clamp(max=0)
        share = _sd(rel, F.linear(px, pw) + F.linear(nx, nw))  # layers_ours.Linear.relprop, alpha = 1
        return px * (share @ pw) + nx * (share @ nw), None, None, None


class _RefMatmul(Function):  # both factors get half (AttnLRP's uniform rule; Chefer's einsum relprop then / 2)
    @staticmethod
    def forward(ctx, a, b):
        out = a @ b
        ctx.save_for_backward(a, b, out)
        return out

    @staticmethod
    def backward(ctx, rel):
        a, b, out = ctx.saved_tensors
        share = _sd(rel, out) / 2
        return a * (share @ b.transpose(-2, -1)), b * (a.transpose(-2, -1) @ share)


class _RefSoftmax(Function):
    @staticmethod
    def forward(ctx, x, rule):
        s = x.softmax(dim=-1)
        ctx.save_for_backward(x, s)
        ctx.rule = rule
        return s

    @staticmethod
    def backward(ctx, rel):
        x, s = ctx.saved_tensors
        if ctx.rule == "identity":
            return rel, None
        return x * (rel - s * rel.sum(dim=-1, keepdim=True)), None  # AttnLRP Prop. 3.1


class _RefLayerNorm(Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps, rule):
        y = F.layer_norm(x, x.shape[-1:], weight, bias, eps)
        ctx.save_for_backward(x, weight, y)
        ctx.eps, ctx.rule = eps, rule
        return y

    @staticmethod
    def backward(ctx, rel):
        x, weight, y = ctx.saved_tensors
        if ctx.rule == "identity":
            return rel, None, None, None, None
        # epsilon rule on the linear map x -> (x - mean) / std * w + b with std a constant
        rstd = (x.var(dim=-1, unbiased=False, keepdim=True) + ctx.eps).rsqrt()
        scaled = rel / y * weight
        return x * rstd * (scaled - scaled.mean(dim=-1, keepdim=True)), None, None, None, None


class _RefIdentity(Function):
    @staticmethod
    def forward(ctx, x, fn):
        return fn(x)

    @staticmethod
    def backward(ctx, rel):
        return rel, None


class _RefAdd(Function):
    @staticmethod
    def forward(ctx, a, b, rule):
        ctx.save_for_backward(a, b)
        ctx.rule = rule
        return a + b

    @staticmethod
    def backward(ctx, rel):
        a, b = ctx.saved_tensors
        share = _sd(rel, a + b)
        rel_a, rel_b = a * share, b * share
        if ctx.rule == "epsilon":
            return rel_a, rel_b, None
        # layers_ours.Add.relprop, with its sums per image
        sum_a, sum_b = rel_a.sum(dim=(1, 2), keepdim=True), rel_b.sum(dim=(1, 2), keepdim=True)
        total = rel.sum(dim=(1, 2), keepdim=True)
        fact_a = _sd(sum_a.abs(), sum_a.abs() + sum_b.abs()) * total
        fact_b = _sd(sum_b.abs(), sum_a.abs() + sum_b.abs()) * total
        return rel_a * _sd(fact_a, sum_a), rel_b * _sd(fact_b, sum_b), None


class _RefConstant(Function):  # multiplying by a constant moves no relevance
    @staticmethod
    def forward(ctx, x, factor):
        return x * factor

    @staticmethod
    def backward(ctx, rel):
        return rel, None


OURS_ATTNLRP = SimpleNamespace(
    linear=lambda x, w, b: _RefLinear.apply(x, w, b, "epsilon"),
    matmul=_RefMatmul.apply,
    softmax=lambda x: _RefSoftmax.apply(x, "taylor"),
    layer_norm=lambda x, w, b, eps: _RefLayerNorm.apply(x, w, b, eps, "std_constant"),
    gelu=lambda x: _RefIdentity.apply(x, F.gelu),
    add=lambda a, b: _RefAdd.apply(a, b, "epsilon"),
    constant=_RefConstant.apply,
)
CHEFER = SimpleNamespace(
    linear=lambda x, w, b: _RefLinear.apply(x, w, b, "alpha1beta0"),
    matmul=_RefMatmul.apply,
    softmax=lambda x: _RefSoftmax.apply(x, "identity"),
    layer_norm=lambda x, w, b, eps: _RefLayerNorm.apply(x, w, b, eps, "identity"),
    gelu=lambda x: _RefIdentity.apply(x, F.gelu),
    add=lambda a, b: _RefAdd.apply(a, b, "normalized"),
    constant=_RefConstant.apply,
)
PLAIN = SimpleNamespace(
    linear=F.linear,
    matmul=torch.matmul,
    softmax=lambda x: x.softmax(dim=-1),
    layer_norm=lambda x, w, b, eps: F.layer_norm(x, x.shape[-1:], w, b, eps),
    gelu=F.gelu,
    add=torch.add,
    constant=torch.mul,
)


def _lxt_ops() -> SimpleNamespace:
    lf = pytest.importorskip("lxt.explicit.functional")
    lr = pytest.importorskip("lxt.explicit.rules")
    tiny = 1e-30  # lxt's stabilisers add epsilon regardless of sign; in float64 they are made negligible
    return SimpleNamespace(
        linear=lambda x, w, b: lf.linear_epsilon(x, w, b, epsilon=tiny),
        matmul=lambda a, b: lf.matmul(a, b, epsilon=tiny),
        softmax=lambda x: lf.softmax(x, -1),
        layer_norm=lambda x, w, b, eps: lf.layer_norm_grad_fn.apply(x, w, b, eps, tiny),
        gelu=lambda x: lr.identity(F.gelu, x),
        add=lambda a, b: lf.add2(a, b, epsilon=tiny),
        constant=lambda x, c: lf.mul2(x, c),
    )


def _reference_vit(model: nn.Module, images: torch.Tensor, ops: SimpleNamespace) -> tuple[Any, ...]:
    """timm ``VisionTransformer`` (class token, no LayerScale) written out with ``ops`` carrying the rules; returns
    ``(logits, patch-token embeddings [B, N, D] (leaf), attention probabilities per block)``."""
    embeddings = model.patch_embed(images).detach().requires_grad_(True)  # B, N, D
    batch, dim = embeddings.shape[0], embeddings.shape[-1]
    x = torch.cat([model.cls_token.detach().expand(batch, -1, -1), embeddings], dim=1)
    x = ops.add(x, model.pos_embed.detach().expand_as(x))
    attentions = []
    for block in model.blocks:
        attn, mlp = block.attn, block.mlp
        h = ops.layer_norm(x, block.norm1.weight.detach(), block.norm1.bias.detach(), block.norm1.eps)
        qkv = ops.linear(h, attn.qkv.weight.detach(), attn.qkv.bias.detach())
        q, k, v = qkv.reshape(batch, -1, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        scores = ops.matmul(ops.constant(q, attn.scale), k.transpose(-2, -1))
        probs = ops.softmax(scores)
        attentions.append(probs)
        h = ops.matmul(probs, v).transpose(1, 2).reshape(batch, -1, dim)
        x = ops.add(x, ops.linear(h, attn.proj.weight.detach(), attn.proj.bias.detach()))
        h = ops.layer_norm(x, block.norm2.weight.detach(), block.norm2.bias.detach(), block.norm2.eps)
        h = ops.gelu(ops.linear(h, mlp.fc1.weight.detach(), mlp.fc1.bias.detach()))
        x = ops.add(x, ops.linear(h, mlp.fc2.weight.detach(), mlp.fc2.bias.detach()))
    x = ops.layer_norm(x, model.norm.weight.detach(), model.norm.bias.detach(), model.norm.eps)
    logits = ops.linear(x[:, 0], model.head.weight.detach(), model.head.bias.detach())
    return logits, embeddings, attentions


def _reference_model(depth: int = 2) -> nn.Module:
    """A timm ViT (class token) in float64 whose weights, biases, norms and embeddings are all far from their
    initialisation, so that every rule moves relevance visibly."""
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=48, num_heads=3, depth=depth, num_classes=5
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("weight") and param.ndim == 1:  # norms
                param.copy_(1 + 0.3 * torch.randn_like(param))
            elif param.ndim >= 2 and "embed" not in name and "token" not in name:
                param.normal_(0.0, 1.5 / math.sqrt(param.shape[-1]))
            else:
                param.normal_(0.0, 0.3)
    return model.double().eval()


def _token_relevance(model: nn.Module, images: torch.Tensor, ops: SimpleNamespace, targets: torch.Tensor) -> Any:
    logits, embeddings, _ = _reference_vit(model, images, ops)
    start = torch.zeros_like(logits).scatter_(1, targets[:, None], logits.detach().gather(1, targets[:, None]))
    (relevance,) = torch.autograd.grad(logits, embeddings, start)  # explicit: the backward carries relevance
    return relevance.sum(dim=-1).reshape(-1, *model.patch_embed.grid_size)


@pytest.mark.parametrize("oracle", ["explicit", "lxt"])
def test_attnlrp_matches_an_explicit_reference(oracle: str) -> None:
    ops = OURS_ATTNLRP if oracle == "explicit" else _lxt_ops()
    model = _reference_model()
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    targets = torch.tensor([0, 3, 1])
    expected = _token_relevance(model, images, ops, targets)
    maps = attnlrp(model, images, targets)
    torch.testing.assert_close(maps, expected.float(), rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    # the reference is sensitive to the rules: plain gradient x input is far from it
    plain = _token_relevance(model, images, PLAIN, targets)
    assert (plain - expected).abs().amax() > 0.1 * expected.abs().amax()


def _chefer_reference(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, start_layer: int, ops: Any):
    """Transformer Attribution written out: R_A from the explicit relprop rules (relevance 1 at the target logit),
    ∇A from plain autograd, R = prod (I + mean_h(relu(∇A ⊙ R_A))), class-token row, patch columns."""
    logits, _, attentions = _reference_vit(model, images, ops)
    one_hot = torch.zeros_like(logits).scatter_(1, targets[:, None], 1.0)
    rel_attn = torch.autograd.grad(logits, attentions, one_hot)
    plain_logits, _, plain_attentions = _reference_vit(model, images, PLAIN)
    grads = torch.autograd.grad(plain_logits, plain_attentions, one_hot)
    num_tokens = attentions[0].shape[-1]
    rollout = torch.eye(num_tokens, dtype=images.dtype).expand(images.shape[0], -1, -1)
    for layer in range(start_layer, len(attentions)):
        cam = (grads[layer] * rel_attn[layer]).clamp(min=0).mean(dim=1)  # B, N, N
        rollout = (cam + torch.eye(num_tokens, dtype=images.dtype)) @ rollout
    return rollout[:, 0, 1:].reshape(-1, *model.patch_embed.grid_size)


@pytest.mark.parametrize(("start_layer", "linear_rule"), [(0, "alpha1beta0"), (1, "alpha1beta0"), (0, "gradient")])
def test_transformer_attribution_matches_chefer_relprop_reference(start_layer: int, linear_rule: str) -> None:
    model = _reference_model()
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    targets = torch.tensor([4, 0, 2])
    ops = CHEFER
    if linear_rule == "gradient":
        ops = SimpleNamespace(**{**vars(CHEFER), "linear": OURS_ATTNLRP.linear})
    expected = _chefer_reference(model, images, targets, start_layer, ops)
    maps = transformer_attribution(model, images, targets, start_layer=start_layer, linear_rule=linear_rule)
    torch.testing.assert_close(maps, expected.float(), rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    if linear_rule == "alpha1beta0" and start_layer == 0:  # the reference tells the linear rules apart
        other = _chefer_reference(model, images, targets, 0, SimpleNamespace(**{**vars(CHEFER), "linear": F.linear}))
        assert (other - expected).abs().amax() > 0.01 * expected.abs().amax()


# --- conservation ---------------------------------------------------------------------------------------------------


class _SoftmaxRecorder(TorchFunctionMode):
    """Records (input, output) of every softmax; entered outside ``LRPRules`` so it sees the ops the rules run."""

    def __init__(self) -> None:
        super().__init__()
        self.pairs: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in (torch.Tensor.softmax, F.softmax, torch.softmax):
            self.pairs.append((args[0], out))
        return out


def _conservation_terms(
    model: nn.Module, images: torch.Tensor, rules: LRPRules, start: Callable, softmax: bool = True
) -> dict:
    """Run ``model`` under ``rules`` and return the summed relevance (per image) at the token embeddings, at each
    block input, at the logits, and what each linear/norm bias and each softmax takes out of the flow."""
    events: list[tuple[str, Any]] = []
    handles = [block.register_forward_pre_hook(lambda m, a: events.append(("block", a[0]))) for block in model.blocks]
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.LayerNorm)) and module.bias is not None:
            handles.append(module.register_forward_hook(lambda m, a, out: events.append(("bias", (out, m.bias)))))
    recorder = _SoftmaxRecorder()
    try:
        with recorder:
            logits, embeddings = lrp_forward(model, images, rules)
    finally:
        for handle in handles:
            handle.remove()
    tensors = [embeddings]
    for kind, value in events:
        tensors.extend([value] if kind == "block" else [value[0]])
    pairs = recorder.pairs if softmax else []
    for scores, probs in pairs:
        tensors.extend([scores, probs])
    start_grad = start(logits)
    grads = torch.autograd.grad(logits, tensors, start_grad)
    rel = [(t * g).detach().flatten(1).sum(dim=1) for t, g in zip(tensors, grads, strict=True)]  # per image
    blocks, biases, index = [], [], 1
    for kind, value in events:
        if kind == "block":
            blocks.append(rel[index])
            biases.append(torch.zeros_like(rel[0]))  # bias shares from this block on
        else:
            (_, grad), bias = (value[0], grads[index]), value[1]
            biases[-1] = biases[-1] + (bias.detach() * grad).flatten(1).sum(dim=1)
        index += 1
    absorbed = [rel[index + 2 * i + 1] - rel[index + 2 * i] for i in range(len(pairs))]  # R_out - R_in
    return dict(
        embeddings=rel[0], blocks=blocks, biases=biases, softmax=absorbed, logits=(logits * start_grad).sum(dim=1)
    )


@pytest.mark.parametrize("zero_biases", [True, False], ids=["biases zeroed", "with biases"])
def test_attnlrp_conserves_relevance_up_to_softmax_and_bias_shares(zero_biases: bool) -> None:
    """AttnLRP conserves relevance at every rule but two: a bias takes ``Σ b ⊙ g``, and the softmax rule (Prop. 3.1,
    Taylor expansion at x) takes ``Σ R_A - Σ R_scores``. Block by block, in float64, the relevance at a block's input
    is that at the next block's input (or the logit) less exactly these shares (tolerance 1e-9 relative)."""
    torch.manual_seed(0)
    model = vision_attn.create_model(
        "va_vit_tiny_patch4_32", depth=2, num_classes=4, class_token=False, global_pool="avg", pos_embed="none"
    ).double()  # no class token, no position embedding: the embeddings are the first block's input
    for block in model.blocks:
        block.attn.fused_attn = False  # explicit softmax, so the recorder sees its input and output
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.copy_(torch.zeros_like(param) if zero_biases else 0.3 * torch.randn_like(param))
            elif param.ndim >= 2:
                param.normal_(0.0, 1.5 / math.sqrt(param.shape[-1]))
    model.eval()
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    targets = torch.tensor([1, 3])
    terms = _conservation_terms(
        model, images, LRPRules("attnlrp"), lambda logits: torch.zeros_like(logits).scatter_(1, targets[:, None], 1.0)
    )
    logit = terms["logits"]
    scale = logit.abs().max().item()
    torch.testing.assert_close(terms["embeddings"], terms["blocks"][0], rtol=1e-9, atol=1e-9 * scale)
    following = [*terms["blocks"][1:], logit]
    for i, (here, after) in enumerate(zip(terms["blocks"], following, strict=True)):
        expected = after - terms["softmax"][i] - terms["biases"][i]
        torch.testing.assert_close(here, expected, rtol=1e-9, atol=1e-9 * scale, msg=f"block {i}")
    absorbed = torch.stack(terms["softmax"]).abs().sum(dim=0)
    assert (absorbed > 1e-3 * logit.abs()).all(), "the softmax shares are too small for this test to see them"
    bias_share = torch.stack(terms["biases"]).abs().sum(dim=0)
    assert (bias_share == 0).all() if zero_biases else (bias_share > 1e-3 * logit.abs()).all()
    # and on the whole: the logit = embeddings' relevance + softmax shares + bias shares
    total = terms["embeddings"] + sum(terms["softmax"]) + sum(terms["biases"])
    torch.testing.assert_close(total, logit, rtol=1e-9, atol=1e-9 * scale)


def test_chefer_rules_conserve_relevance_at_every_block_input() -> None:
    """Chefer's rules are conservative (z+ linear rule without bias, identity rules, halved products, normalised
    adds): relevance 1 at the target logit sums to 1 at every block's input, biases and all (tolerance 1e-7: the
    1e-9 stabilisers of safe_divide)."""
    model = _reference_model(depth=3)
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    targets = torch.tensor([2, 4])

    def start(logits: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(logits).scatter_(1, targets[:, None], 1.0 / logits.detach().gather(1, targets[:, None]))

    terms = _conservation_terms(model, images, LRPRules("chefer"), start, softmax=False)
    torch.testing.assert_close(terms["logits"], torch.ones(2, dtype=torch.float64))
    for i, block in enumerate(terms["blocks"]):
        torch.testing.assert_close(block, torch.ones(2, dtype=torch.float64), rtol=0, atol=1e-7, msg=f"block {i}")


# --- every ViT family: batched, fused or explicit, model left as found ---------------------------------------------


def _timm_vit(**kwargs: Any) -> nn.Module:
    args = dict(img_size=32, patch_size=8, embed_dim=48, num_heads=3, depth=2, num_classes=4)
    return timm.create_model("vit_tiny_patch16_224", **{**args, **kwargs})


FAMILIES: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "timm vit": (lambda: _timm_vit(), (3, 32, 32)),
    "va_vit_tiny_patch4_32": (lambda: vision_attn.create_model("va_vit_tiny_patch4_32", depth=2), (3, 32, 32)),
    "va_cct_2_3x2_32": (lambda: vision_attn.create_model("va_cct_2_3x2_32"), (3, 32, 32)),
    "default va_vitc2_seq": (lambda: vision_attn.create_model("va_vitc2_seq_tiny_patch8_64", in_chans=1), (1, 64, 64)),
    "deit distilled": (
        lambda: timm.create_model("deit_tiny_distilled_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=4),
        (3, 32, 32),
    ),
    "registers": (lambda: vision_attn.create_model("va_vit_tiny_patch4_32", depth=2, reg_tokens=4), (3, 32, 32)),
    "avg pool": (lambda: _timm_vit(global_pool="avg", reg_tokens=2), (3, 32, 32)),
    "non-square dynamic": (lambda: _timm_vit(dynamic_img_size=True), (3, 32, 48)),
}


def _snapshot(model: nn.Module) -> dict[str, Any]:
    return dict(
        state={k: v.clone() for k, v in model.state_dict().items()},
        training=[m.training for m in model.modules()],
        fused=[getattr(m, "fused_attn", None) for m in model.modules()],
        requires_grad=[p.requires_grad for p in model.parameters()],
        parameters=[id(p) for p in model.parameters()],  # the same Parameter objects, not swapped copies
        forward=[type(m).forward for m in model.modules()],
    )


def _assert_as_found(model: nn.Module, before: dict[str, Any]) -> None:
    after = _snapshot(model)
    assert after.keys() == before.keys()
    for key in ("training", "fused", "requires_grad", "parameters", "forward"):
        assert after[key] == before[key], key
    for name, value in before["state"].items():
        assert torch.equal(after["state"][name], value), name
    for module in model.modules():
        assert "forward" not in vars(module), type(module).__name__  # no patched forward
        hooks = (module._forward_hooks, module._forward_pre_hooks, module._backward_hooks)
        assert not any(hooks), type(module).__name__
        assert not getattr(module, "_backward_pre_hooks", None)
    assert all(p.grad is None for p in model.parameters())
    assert not torch.overrides._get_current_function_mode_stack()  # no rule mode left active


@pytest.mark.parametrize("family", FAMILIES, ids=list(FAMILIES))
def test_relevance_maps_on_every_vit_family(family: str) -> None:
    factory, shape = FAMILIES[family]
    torch.manual_seed(0)
    model = factory().eval()
    images = torch.randn(3, *shape, generator=torch.Generator().manual_seed(3))
    grid = model.patch_embed.dynamic_feat_size(shape[1:]) if family == "non-square dynamic" else None
    grid = tuple(grid or model.patch_embed.grid_size)
    targets = torch.tensor([0, 1, 3])
    for name, method in METHODS.items():
        before = _snapshot(model)
        maps = method(model, images, targets)
        _assert_as_found(model, before)
        assert maps.shape == (3, *grid), name
        assert maps.dtype == torch.float32, name
        assert torch.isfinite(maps).all(), name
        assert (maps.abs().amax(dim=(1, 2)) > 0).all(), name
        single = torch.cat([method(model, images[i : i + 1], targets[i : i + 1]) for i in range(3)])
        torch.testing.assert_close(maps, single, rtol=1e-4, atol=1e-5 * maps.abs().max().item(), msg=name)
        flags = [(m, m.fused_attn) for m in model.modules() if hasattr(m, "fused_attn")]
        try:  # the other attention path gives the same relevance
            for module, flag in flags:
                module.fused_attn = not flag
            other = method(model, images, targets)
        finally:
            for module, flag in flags:
                module.fused_attn = flag
        torch.testing.assert_close(maps, other, rtol=1e-4, atol=1e-5 * maps.abs().max().item(), msg=name)


def test_models_in_train_mode_are_explained_in_eval_mode_and_put_back() -> None:
    model = _timm_vit(drop_rate=0.5, attn_drop_rate=0.5, proj_drop_rate=0.5)
    images = torch.randn(2, 3, 32, 32)
    expected = {name: method(model.eval(), images) for name, method in METHODS.items()}
    model.train()
    for name, method in METHODS.items():
        before = _snapshot(model)
        with pytest.warns(UserWarning, match="is in train mode"):
            maps = method(model, images)
        _assert_as_found(model, before)
        torch.testing.assert_close(maps, expected[name], msg=name)
    assert all(m.training for m in model.modules())


def test_relevance_methods_explain_windowed_and_attention_pooled_models() -> None:
    """AttnLRP's rules are per operation: a Swin (windows, shifts, patch merging) and timm's attention pooling ('map')
    are explained as they are; Transformer Attribution rolls its relevance-weighted maps out through the same token
    flow as gradient rollout (windows placed on the grid, merges, the pool's attention as the readout)."""
    swin = timm.create_model(
        "swin_tiny_patch4_window7_224", img_size=32, window_size=4, embed_dim=24, depths=(1, 1), num_heads=(1, 2),
        num_classes=3,
    ).eval()  # fmt: skip
    map_pool = _timm_vit(global_pool="map").eval()
    images = torch.randn(2, 3, 32, 32)
    for model, grid in ((swin, (8, 8)), (map_pool, (4, 4))):
        for name, method in METHODS.items():
            before = _snapshot(model)
            maps = method(model, images, torch.tensor([0, 2]))
            _assert_as_found(model, before)
            assert maps.shape == (2, *grid), name
            assert torch.isfinite(maps).all(), name
            assert (maps.flatten(1).std(dim=1) > 0).all(), name
            single = torch.cat([method(model, images[i : i + 1], torch.tensor([2 * i])) for i in range(2)])
            torch.testing.assert_close(maps, single, rtol=1e-4, atol=1e-6 * maps.abs().max().item(), msg=name)


# --- refusals and bad input -----------------------------------------------------------------------------------------


def test_models_that_cannot_be_explained_are_refused_with_the_reason() -> None:
    cnn = vision_attn.create_model("va_resnet18_32", num_classes=3).eval()
    headless = vision_attn.create_model("va_vit_tiny_patch4_32", depth=1, num_classes=0).eval()
    images = torch.randn(1, 3, 32, 32)
    for name, method in METHODS.items():
        before = _snapshot(cnn)
        with pytest.raises(NotApplicableError, match="no patch_embed module"):
            method(cnn, images)
        _assert_as_found(cnn, before)
        with pytest.raises(NotApplicableError, match=f"method '{name}' explains a class logit.*num_classes=0"):
            method(headless, images)


def test_bad_arguments_name_the_argument() -> None:
    model = _timm_vit().eval()
    images = torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match=r"start_layer 2 is out of range for 2 attention layers"):
        transformer_attribution(model, images, start_layer=2)
    with pytest.raises(ValueError, match=r"start_layer True is out of range"):
        transformer_attribution(model, images, start_layer=True)
    with pytest.raises(ValueError, match=r"linear_rule 'z\+' is unknown; expected one of \('gradient', 'alpha1beta0'"):
        transformer_attribution(model, images, linear_rule="z+")
    with pytest.raises(ValueError, match=r"rules 'lrp' is unknown"):
        LRPRules("lrp")
    with pytest.raises(ValueError, match=r"target \[0, 7\] is out of range; the model has 4 classes"):
        attnlrp(model, images, [0, 7])
    with pytest.raises(TypeError, match="target must be None"):
        attnlrp(model, images, "cat")
    with pytest.raises(ValueError, match=r"images has 1 channels .* expects in_chans=3"):
        attnlrp(model, torch.randn(2, 1, 32, 32))
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module"):
        attnlrp(lambda x: x, images)
    assert all(not m._forward_hooks for m in model.modules())


def test_attnlrp_at_the_pixels_carries_the_tokens_relevance_through_a_bias_free_patch_embedding() -> None:
    from vision_attn.explain import explain
    from vision_attn.explain._common import apply_sign

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=4).eval()
    with torch.no_grad():
        model.patch_embed.proj.bias.zero_()  # a linear patch embedding without bias conserves relevance
    x = torch.randn(3, 3, 32, 32)
    tokens = attnlrp(model, x, level="tokens")
    pixels = attnlrp(model, x, level="pixels")
    assert tokens.shape == (3, 4, 4)
    assert pixels.shape == (3, 32, 32)
    torch.testing.assert_close(pixels.sum(dim=(1, 2)), tokens.sum(dim=(1, 2)), rtol=1e-4, atol=1e-5)
    patches = pixels.reshape(3, 4, 8, 4, 8).sum(dim=(2, 4))  # each patch's pixels hold its token's relevance
    torch.testing.assert_close(patches, tokens, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match=r"level 'image' is unknown; expected one of \('tokens', 'pixels'\)"):
        attnlrp(model, x, level="image")
    signed = torch.tensor([[-2.0, 0.0, 1.0]])
    assert apply_sign(signed, "positive").tolist() == [[0.0, 0.0, 1.0]]
    assert apply_sign(signed, "absolute").tolist() == [[2.0, 0.0, 1.0]]
    maps = explain(model, x, "attnlrp")  # the registered method shows the positive part by default
    positive = apply_sign(tokens, "positive")
    expected = torch.nn.functional.interpolate(positive[:, None], size=(32, 32), mode="bilinear")[:, 0]
    expected = (expected - expected.flatten(1).amin(1)[:, None, None]) / (
        expected.flatten(1).amax(1) - expected.flatten(1).amin(1)
    )[:, None, None]
    torch.testing.assert_close(maps, expected)
