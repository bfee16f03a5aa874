"""The LRP-gamma rule on linear layers and convolutions and the CP-LRP attention rule (issue 22): hand-computed
cases, gamma = 0 against the gradient rule, conservation, zennit's ``Gamma`` as an oracle (when installed), and both
as options of ``attnlrp`` on whole models."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import vision_attn
from vision_attn.explain import explain
from vision_attn.explain.lrp import LRPRules
from vision_attn.explain.relevance import attnlrp


def _relevance(
    fn: Callable[..., torch.Tensor], inputs: list[torch.Tensor], relevance_out: torch.Tensor, **rules: Any
) -> list[torch.Tensor | None]:
    """The relevance ``x * g`` of each input of ``fn`` run under ``LRPRules(**rules)`` in float64, for output
    relevance ``relevance_out`` (``None`` for an input the rules give no gradient path)."""
    leaves = [t.detach().double().requires_grad_(True) for t in inputs]
    with LRPRules(**rules):
        out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, relevance_out.double() / out.detach(), allow_unused=True)
    return [None if g is None else (x * g).detach() for x, g in zip(leaves, grads, strict=True)]


def _f64(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal up to the gamma rule's stabiliser (1e-6 added to each denominator)."""
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


# --- LRP-gamma on hand-computed cases --------------------------------------------------------------------------------


def test_gamma_rule_on_a_linear_layer_hand_computed() -> None:
    x = torch.tensor([1.0, -2.0, 3.0])
    weight = torch.tensor([[1.0, 1.0, 0.5], [2.0, 3.0, -1.0]])
    bias = torch.tensor([0.5, -1.0])
    linear = lambda t: F.linear(t, weight.double(), bias.double())  # noqa: E731
    # z0 = 1 - 2 + 1.5 + 0.5 = 1 > 0: x+ (W + γW+) + x- (W + γW-) + b + γb+ with γ = 1/2:
    #   1 * 1.5 = 1.5, -2 * 1 = -2, 3 * 0.75 = 2.25, bias 0.75; denominator 2.5 -> [0.6, -0.8, 0.9] (bias 0.3)
    (rel,) = _relevance(linear, [x], _f64(1.0, 0.0), linear_rule="gamma", linear_gamma=0.5)
    _close(rel, _f64(0.6, -0.8, 0.9))
    # z1 = 2 - 6 - 3 - 1 = -8 < 0: x+ (W + γW-) + x- (W + γW+) + b + γb-:
    #   1 * 2 = 2, -2 * 4.5 = -9, 3 * -1.5 = -4.5, bias -1.5; denominator -13 -> [-2, 9, 4.5] / 13 (bias 1.5 / 13)
    (rel,) = _relevance(linear, [x], _f64(0.0, 1.0), linear_rule="gamma", linear_gamma=0.5)
    _close(rel, _f64(-2.0, 9.0, 4.5) / 13)
    # epsilon-LRP (the plain gradient) shares z0 as its contributions [1, -2, 1.5] (bias 0.5): gamma changes it
    (eps,) = _relevance(linear, [x], _f64(1.0, 0.0))
    torch.testing.assert_close(eps, _f64(1.0, -2.0, 1.5))
    # the same graph gives the plain gradient with propagate = False
    rules = LRPRules(linear_rule="gamma", linear_gamma=0.5)
    leaf = x.double().requires_grad_(True)
    with rules:
        out = linear(leaf)
    rules.propagate = False
    (plain,) = torch.autograd.grad(out, leaf, _f64(1.0, 1.0))
    torch.testing.assert_close(plain, _f64(3.0, 4.0, -0.5))


def test_gamma_rule_on_a_convolution_hand_computed() -> None:
    x = torch.tensor([3.0, 1.0, 1.0, -2.0]).reshape(1, 1, 1, 4)
    weight = torch.tensor([1.0, -3.0]).reshape(1, 1, 1, 2)
    bias = torch.tensor([0.5])
    conv = lambda t: F.conv2d(t, weight.double(), bias.double())  # noqa: E731  # 3 outputs: 0.5, -1.5, 7.5
    gamma = dict(conv_rule="gamma", conv_gamma=1.0)  # W + γW+ = [2, -3], W + γW- = [1, -6]; b + γb+ = 1, b + γb- = 0.5
    # z0 = 0.5 > 0: 3 * 2 = 6, 1 * -3 = -3, bias 1; denominator 4 -> [1.5, -0.75]
    (rel,) = _relevance(conv, [x], _f64(1.0, 0.0, 0.0).reshape(1, 1, 1, 3), **gamma)
    _close(rel.flatten(), _f64(1.5, -0.75, 0.0, 0.0))
    # z1 = -1.5 < 0: 1 * 1 = 1, 1 * -6 = -6, bias 0.5; denominator -4.5 -> [-2/9, 4/3]
    (rel,) = _relevance(conv, [x], _f64(0.0, 1.0, 0.0).reshape(1, 1, 1, 3), **gamma)
    _close(rel.flatten(), _f64(0.0, -2 / 9, 4 / 3, 0.0))
    # z2 = 7.5 > 0, a negative input: 1 * 2 = 2, -2 * -6 = 12, bias 1; denominator 15 -> [2/15, 4/5]
    (rel,) = _relevance(conv, [x], _f64(0.0, 0.0, 1.0).reshape(1, 1, 1, 3), **gamma)
    _close(rel.flatten(), _f64(0.0, 0.0, 2 / 15, 0.8))
    # the gradient rule (the default for convolutions) shares z0 = 0.5 as [3, -3] (bias 0.5)
    (eps,) = _relevance(conv, [x], _f64(1.0, 0.0, 0.0).reshape(1, 1, 1, 3))
    torch.testing.assert_close(eps.flatten(), _f64(6.0, -6.0, 0.0, 0.0))


_LAYERS = {
    "linear": (lambda: nn.Linear(6, 5), (4, 3, 6), "linear"),
    "conv1d": (lambda: nn.Conv1d(4, 6, 3, stride=2, padding=1), (2, 4, 9), "conv"),
    "conv2d": (lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2), (2, 4, 7, 7), "conv"),
    "conv2d same": (lambda: nn.Conv2d(3, 4, (3, 2), padding="same", dilation=2), (2, 3, 6, 6), "conv"),
    "conv2d unbatched": (lambda: nn.Conv2d(3, 4, 3), (3, 6, 6), "conv"),
    "conv3d": (lambda: nn.Conv3d(2, 3, 2), (1, 2, 4, 4, 4), "conv"),
}


def _layer_case(name: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor, str]:
    """A float64 layer with mixed-sign weights and bias, mixed-sign inputs, and an output relevance."""
    torch.manual_seed(seed)
    make, shape, kind = _LAYERS[name]
    layer = make().double()
    with torch.no_grad():
        layer.bias.normal_(0.0, 0.5)
    x = torch.randn(shape, dtype=torch.float64)
    with torch.no_grad():  # relevance y * g, as a layer receives it: the gradient g is what is random
        return layer, x, layer(x) * torch.randn_like(layer(x)), kind


def _gamma_relevance(layer: nn.Module, x: torch.Tensor, relevance_out: torch.Tensor, kind: str, gamma: float | None):
    rules = {} if gamma is None else {f"{kind}_rule": "gamma", f"{kind}_gamma": gamma}
    params = {key: value.detach() for key, value in layer.named_parameters()}
    (rel,) = _relevance(lambda t: torch.func.functional_call(layer, params, (t,)), [x], relevance_out, **rules)
    return rel


@pytest.mark.parametrize("name", list(_LAYERS))
def test_gamma_zero_is_the_gradient_rule_and_gamma_changes_it(name: str) -> None:
    layer, x, relevance_out, kind = _layer_case(name)
    with torch.no_grad():
        out = layer(x)
    stabilised = out + torch.where(out >= 0, 1e-6, -1e-6)  # gamma = 0 divides by z moved 1e-6 away from 0
    plain = _gamma_relevance(layer, x, relevance_out * out / stabilised, kind, None)
    torch.testing.assert_close(_gamma_relevance(layer, x, relevance_out, kind, 0.0), plain)
    assert (_gamma_relevance(layer, x, relevance_out, kind, 0.25) - plain).abs().max() > 0.05 * plain.abs().max()


@pytest.mark.parametrize("name", list(_LAYERS))
def test_gamma_rule_conserves_relevance_without_bias(name: str) -> None:
    layer, x, relevance_out, kind = _layer_case(name, seed=1)
    total = relevance_out.sum()
    for gamma in (0.1, 1.0, 100.0):
        rel = _gamma_relevance(layer, x, relevance_out, kind, gamma)
        assert abs(rel.sum() - total) > 1e-3 * relevance_out.abs().sum(), "the bias takes no share"
        with torch.no_grad():
            bias = layer.bias.clone()
            layer.bias.zero_()
        rel = _gamma_relevance(layer, x, relevance_out, kind, gamma)
        with torch.no_grad():
            layer.bias.copy_(bias)
        torch.testing.assert_close(rel.sum(), total, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(_LAYERS))
@pytest.mark.parametrize("gamma", [0.01, 0.25, 100.0])
def test_gamma_rule_matches_zennit(name: str, gamma: float) -> None:
    rules = pytest.importorskip("zennit.rules")
    layer, x, relevance_out, kind = _layer_case(name, seed=2)
    handle = rules.Gamma(gamma=gamma).register(layer)  # zennit's backward carries the relevance itself
    try:
        leaf = x.clone().requires_grad_(True)
        (expected,) = torch.autograd.grad(layer(leaf), leaf, relevance_out)
    finally:
        handle.remove()
    ours = _gamma_relevance(layer, x, relevance_out, kind, gamma)
    torch.testing.assert_close(ours, expected, rtol=1e-7, atol=1e-9)


def _conv_bn_stem(eps: float = 1e-5) -> nn.Sequential:
    """conv (no bias) - batch norm - in-place ReLU - conv - batch norm, float64, eval mode, non-trivial statistics."""
    torch.manual_seed(3)
    stem = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4, eps=eps), nn.ReLU(inplace=True),
        nn.Conv2d(4, 3, 3, stride=2, padding=1), nn.BatchNorm2d(3, eps=eps),
    ).double()  # fmt: skip
    with torch.no_grad():
        for module in stem:
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_()
                module.running_var.uniform_(0.5, 2.0)
                module.weight.normal_()
                module.bias.normal_()
    return stem.eval()


def _stem_relevance(stem: nn.Module, x: torch.Tensor, relevance_out: torch.Tensor, **rules: Any) -> torch.Tensor:
    state = {**{k: v.detach() for k, v in stem.named_parameters()}, **dict(stem.named_buffers())}
    (rel,) = _relevance(lambda t: torch.func.functional_call(stem, state, (t,)), [x], relevance_out, **rules)
    return rel


def test_gamma_rule_merges_a_batch_norm_into_the_convolution_before_it() -> None:
    stem = _conv_bn_stem()
    x = torch.randn(2, 2, 8, 8, dtype=torch.float64)
    relevance_out = stem(x).detach() * torch.randn(2, 3, 4, 4, dtype=torch.float64)
    rules = dict(conv_rule="gamma", conv_gamma=0.5)
    leaf = x.clone().requires_grad_(True)
    state = {**{k: v.detach() for k, v in stem.named_parameters()}, **dict(stem.named_buffers())}
    with LRPRules(**rules):
        out = torch.func.functional_call(stem, state, (leaf,))
    torch.testing.assert_close(out, stem(x), rtol=0, atol=0)  # the model's own values (its in-place ReLU too)
    merged = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 3, stride=2, padding=1))
    merged = merged.double().eval()
    with torch.no_grad():
        for conv, bn, target in ((stem[0], stem[1], merged[0]), (stem[3], stem[4], merged[2])):
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            target.weight.copy_(conv.weight * scale[:, None, None, None])
            bias = conv.bias if conv.bias is not None else torch.zeros_like(scale)
            target.bias.copy_((bias - bn.running_mean) * scale + bn.bias)
    expected = _stem_relevance(merged, x, relevance_out, **rules)
    torch.testing.assert_close(_stem_relevance(stem, x, relevance_out, **rules), expected)
    unmerged = _stem_relevance(stem, x, relevance_out, conv_rule="gradient")  # the gradient rule: merging is moot
    torch.testing.assert_close(unmerged, _stem_relevance(merged, x, relevance_out, conv_rule="gradient"))
    assert (expected - unmerged).abs().max() > 0.05 * expected.abs().max()


def test_gamma_rule_after_batch_norm_merging_matches_zennits_canonizer() -> None:
    composites = pytest.importorskip("zennit.composites")
    canonizers = pytest.importorskip("zennit.canonizers")
    rules = pytest.importorskip("zennit.rules")
    stem = _conv_bn_stem(eps=1e-12)  # zennit's merged batch norm still divides by sqrt(1 + eps)
    x = torch.randn(2, 2, 8, 8, dtype=torch.float64)
    relevance_out = stem(x).detach() * torch.randn(2, 3, 4, 4, dtype=torch.float64)
    composite = composites.LayerMapComposite(
        [(nn.Conv2d, rules.Gamma(gamma=0.25))], canonizers=[canonizers.SequentialMergeBatchNorm()]
    )
    leaf = x.clone().requires_grad_(True)
    with composite.context(stem) as modified:
        (expected,) = torch.autograd.grad(modified(leaf), leaf, relevance_out)
    ours = _stem_relevance(stem, x, relevance_out, conv_rule="gamma", conv_gamma=0.25)
    torch.testing.assert_close(ours, expected, rtol=1e-7, atol=1e-9)


# --- CP-LRP ----------------------------------------------------------------------------------------------------------


def test_cp_rule_gives_queries_and_keys_no_relevance_and_values_all_of_it() -> None:
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 4, generator=gen, dtype=torch.float64) for _ in range(3))
    mask = torch.rand(5, 5, generator=gen) > 0.3
    mask.fill_diagonal_(True)
    relevance_out = torch.randn(2, 3, 5, 4, generator=gen, dtype=torch.float64)
    attn = (q @ k.transpose(-2, -1) * 0.5).masked_fill(~mask, -math.inf).softmax(dim=-1)
    # A constant: A @ v is linear in v, so v's relevance is v * (Aᵀ g) and sums to the output's relevance
    out = attn @ v
    expected_v = v * (attn.transpose(-2, -1) @ (relevance_out / out))

    def explicit(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return ((q * 0.5) @ k.transpose(-2, -1)).masked_fill(~mask, -math.inf).softmax(dim=-1) @ v

    def fused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    for fn in (explicit, fused):
        rel_q, rel_k, rel_v = _relevance(fn, [q, k, v], relevance_out, attention_rule="cp")
        assert rel_q is None
        assert rel_k is None
        torch.testing.assert_close(rel_v, expected_v)
        torch.testing.assert_close(rel_v.sum(), relevance_out.sum())
    rel_q, _, rel_v = _relevance(fused, [q, k, v], relevance_out)  # AttnLRP: q gets some, v half of A @ v
    assert rel_q is not None
    assert rel_q.abs().max() > 1e-3
    torch.testing.assert_close(rel_v, expected_v / 2)


def _zero_biases(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.zero_()
            elif param.ndim >= 2:
                param.normal_(0.0, 1.5 / math.sqrt(param[0].numel()))
    return model.double().eval()


@pytest.mark.parametrize("global_pool", ["avg", "seq"])
def test_cp_and_gamma_rules_conserve_the_logit_in_a_vit_without_biases(global_pool: str) -> None:
    """Without biases, CP-LRP (no softmax rule left) with LRP-gamma on every linear layer is conservative: the
    relevance of the token embeddings sums to the target logit, on the fused and the explicit attention path alike;
    AttnLRP's softmax rule does not conserve it."""
    torch.manual_seed(0)
    model = vision_attn.create_model(
        "va_vit_tiny_patch4_32", depth=2, num_classes=4, class_token=False, global_pool=global_pool, pos_embed="none"
    )
    model = _zero_biases(model)
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    targets = torch.tensor([1, 3])
    with torch.no_grad():
        logit = model(images).gather(1, targets[:, None])[:, 0]
    maps = attnlrp(model, images, targets, linear_gamma=0.25, attention_rule="cp")
    torch.testing.assert_close(maps.double().sum(dim=(1, 2)), logit, rtol=1e-4, atol=1e-5)
    for block in model.blocks:
        block.attn.fused_attn = False
    explicit = attnlrp(model, images, targets, linear_gamma=0.25, attention_rule="cp")
    torch.testing.assert_close(explicit, maps)
    default = attnlrp(model, images, targets).double().sum(dim=(1, 2))
    assert ((default - logit).abs() > 1e-3 * logit.abs()).all()


def test_conv_gamma_at_the_pixels_conserves_a_bias_free_patch_embedding() -> None:
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=4).eval()
    with torch.no_grad():
        model.patch_embed.proj.bias.zero_()
    x = torch.randn(3, 3, 32, 32)
    tokens = attnlrp(model, x, attention_rule="cp")
    pixels = attnlrp(model, x, level="pixels", conv_gamma=0.25, attention_rule="cp")
    patches = pixels.reshape(3, 4, 8, 4, 8).sum(dim=(2, 4))  # each patch's pixels hold its token's relevance
    torch.testing.assert_close(patches, tokens, rtol=1e-3, atol=1e-4 * tokens.abs().max().item())
    plain = attnlrp(model, x, level="pixels", attention_rule="cp")  # the gradient rule distributes it differently
    assert (plain - pixels).abs().max() > 0.05 * pixels.abs().max()


# --- options ----------------------------------------------------------------------------------------------------------


def test_attnlrp_method_options_reach_the_rules_and_bad_values_are_named() -> None:
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=4).eval()
    x = torch.randn(2, 3, 32, 32)
    default = explain(model, x, "attnlrp")
    options = dict(linear_gamma=0.1, attention_rule="cp")
    tuned = explain(model, x, "attnlrp", **options)
    assert (tuned - default).abs().max() > 0.05
    expected = attnlrp(model, x, **options).clamp(min=0)
    expected = F.interpolate(expected[:, None], size=(32, 32), mode="bilinear")[:, 0]
    low, high = expected.flatten(1).amin(1)[:, None, None], expected.flatten(1).amax(1)[:, None, None]
    torch.testing.assert_close(tuned, (expected - low) / (high - low))
    with pytest.raises(ValueError, match=r"linear_gamma must be a finite number >= 0 .* got -1"):
        attnlrp(model, x, linear_gamma=-1)
    with pytest.raises(ValueError, match=r"conv_gamma must be a finite number >= 0 .* got nan"):
        attnlrp(model, x, level="pixels", conv_gamma=float("nan"))
    with pytest.raises(ValueError, match=r"attention_rule 'chefer' is unknown; expected one of \('attnlrp', 'cp'\)"):
        attnlrp(model, x, attention_rule="chefer")
    with pytest.raises(ValueError, match=r"attention_rule 'cp' with rules 'chefer'"):
        LRPRules("chefer", attention_rule="cp")
    with pytest.raises(ValueError, match=r"conv_rule 'zplus' is unknown"):
        LRPRules(conv_rule="zplus")
