"""Sanity checks for saliency maps (Adebayo et al., NeurIPS 2018, "Sanity Checks for Saliency Maps"): does a
method's map depend on the model's weights, and on the class it explains?

* :func:`cascading_randomization`: re-initialise the model's layers from the head down, one group at a time, and
  measure the rank correlation (Spearman) between the trained model's maps and each randomised model's maps;
* :func:`class_sensitivity`: the rank correlation between the maps for the predicted class and for the runner-up
  class;
* :func:`spearman`: per-image Spearman correlation of two batches of maps (ties get their average rank).

A method whose maps barely change when the weights are randomised shows what the input looks like, not what the
model computes; :func:`passes_randomization` states the test the evaluation table applies.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from vision_attn.explain._common import unwrap_model
from vision_attn.explain.registry import get_method
from vision_attn.explain.runner import explain_batches

__all__ = [
    "RANDOMIZATION_MARGIN",
    "cascade_groups",
    "cascading_randomization",
    "class_sensitivity",
    "passes_randomization",
    "randomized_copy",
    "spearman",
]

# a method passes when its maps correlate with the fully randomised model's at least this much less than with its
# own maps under another seed (1 for a deterministic method): the line Adebayo et al. draw by eye, made explicit
RANDOMIZATION_MARGIN = 0.5
_CONTAINERS = (nn.ModuleList, nn.Sequential)


def _ranks(values: torch.Tensor) -> torch.Tensor:
    """Rank of each entry of each row ``[B, N]`` (0-based), ties sharing their average rank."""
    batch, count = values.shape
    order = values.argsort(dim=1, stable=True)
    ordered = values.gather(1, order)
    starts = torch.ones_like(ordered, dtype=torch.bool)
    starts[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    group = starts.long().cumsum(dim=1) - 1  # tie group of each sorted entry
    position = torch.arange(count, dtype=torch.float64, device=values.device).expand(batch, count)
    sums = torch.zeros(batch, count, dtype=torch.float64, device=values.device).scatter_add_(1, group, position)
    sizes = torch.zeros_like(sums).scatter_add_(1, group, torch.ones_like(position))
    average = (sums / sizes.clamp(min=1)).gather(1, group)
    return torch.empty_like(average).scatter_(1, order, average)


def spearman(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation of each pair of maps ``[B, ...]``, ``[B]`` in [-1, 1]; a constant map has no
    ranking, so its correlation is 0."""
    if first.shape != second.shape:
        raise ValueError(f"maps to compare must have one shape, got {tuple(first.shape)} and {tuple(second.shape)}")
    a, b = (_ranks(m.detach().flatten(1).double()) for m in (first, second))
    a, b = a - a.mean(dim=1, keepdim=True), b - b.mean(dim=1, keepdim=True)
    denominator = (a.square().sum(dim=1) * b.square().sum(dim=1)).sqrt()
    return torch.where(denominator > 0, (a * b).sum(dim=1) / denominator.clamp(min=1e-300), 0.0).float()


def cascade_groups(model: nn.Module) -> list[tuple[str, list[str]]]:
    """The model's top-level parts from the output back to the input, as Adebayo et al. randomise them: the head
    first, then each block of a block list (``blocks``, ``layers``, ``stages``, a ResNet's ``layer4``...) from the last,
    down to the embedding, which also takes the parameters the model holds itself (position embedding, class and
    register tokens); parts without parameters are left out. Returns ``[(name, [dotted names of its submodules and
    parameters])]``."""
    model = unwrap_model(model)
    groups: list[tuple[str, list[str]]] = []
    for name, child in reversed(list(model.named_children())):
        if isinstance(child, _CONTAINERS) and len(child) > 1:
            parts = [(f"{name}.{i}", block) for i, block in enumerate(child)]
            groups += [(part, [part]) for part, block in reversed(parts) if any(True for _ in block.parameters())]
        elif any(True for _ in child.parameters()):
            groups.append((name, [name]))
    own = [name for name, _ in model.named_parameters(recurse=False)]
    if own and groups:
        groups[-1] = (groups[-1][0], [*groups[-1][1], *own])
    elif own:
        groups.append(("parameters", own))
    return groups


def _reinitialize(model: nn.Module, names: list[str], generator: torch.Generator) -> None:
    """Re-initialise the submodules and parameters ``names`` of ``model``: submodules by their own
    ``reset_parameters`` (timm and PyTorch layers; BatchNorm statistics reset too), every other parameter
    (position embeddings, class tokens, LayerScale) from N(0, 0.02^2)."""
    params: list[torch.Tensor] = []
    covered: set[int] = set()
    for name in names:
        if name in dict(model.named_parameters()):
            params.append(model.get_parameter(name))
            continue
        module = model.get_submodule(name)
        params += list(module.parameters())
        for sub in module.modules():
            for reset in ("reset_parameters", "reset_running_stats"):
                if callable(getattr(sub, reset, None)):
                    getattr(sub, reset)()
            if callable(getattr(sub, "reset_parameters", None)):
                covered |= {id(p) for p in sub.parameters(recurse=False)}
    with torch.no_grad():
        for param in params:
            if id(param) not in covered:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)


def randomized_copy(model: nn.Module, depth: int, seed: int = 0) -> nn.Module:
    """A copy of ``model`` with its first ``depth`` :func:`cascade_groups` re-initialised (seeded); the model
    itself is untouched."""
    copied = copy.deepcopy(unwrap_model(model))
    groups = cascade_groups(copied)
    if not 0 <= depth <= len(groups):
        raise ValueError(f"depth must be in [0, {len(groups)}] (the model's cascade groups), got {depth}")
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _, names in groups[:depth]:
            _reinitialize(copied, names, generator)
    return copied


def cascading_randomization(
    model: nn.Module,
    images: torch.Tensor,
    method: str,
    target: int | Sequence[int] | torch.Tensor | None = None,
    seed: int = 0,
    batch_size: int = 32,
    **options: Any,
) -> list[tuple[str, torch.Tensor]]:
    """Adebayo et al.'s cascading model-parameter randomisation for ``method``: ``[(stage, rho [B])]``, the Spearman
    correlation between the trained model's maps and the maps after re-initialising the layers from the head down
    to that stage (``'head'`` ... ``'all'``). ``target``: ``None`` explains each image's class as the *trained* model
    predicts it, at every stage (so the randomised models explain the same classes)."""
    model = unwrap_model(model)
    get_method(method)
    if target is None:
        with torch.no_grad():
            target = model(images).argmax(dim=1)
    reference = explain_batches(model, images, method, target, batch_size, **options)
    stages = []
    groups = cascade_groups(model)
    for depth in range(1, len(groups) + 1):
        randomized = randomized_copy(model, depth, seed).eval()
        maps = explain_batches(randomized, images, method, target, batch_size, **options)
        name = "all" if depth == len(groups) else groups[depth - 1][0]
        stages.append((name, spearman(reference, maps)))
    return stages


def class_sensitivity(
    model: nn.Module,
    images: torch.Tensor,
    method: str,
    batch_size: int = 32,
    **options: Any,
) -> torch.Tensor:
    """Spearman correlation ``[B]`` between each image's map for its predicted class and for its runner-up class:
    near 1 for a map that does not depend on the class it explains (class-agnostic methods are exactly 1)."""
    model = unwrap_model(model)
    with torch.no_grad():
        top2 = model(images).topk(2, dim=1).indices
    first, second = (explain_batches(model, images, method, top2[:, k], batch_size, **options) for k in (0, 1))
    return spearman(first, second)


def passes_randomization(randomized_rho: float, self_rho: float = 1.0, margin: float = RANDOMIZATION_MARGIN) -> bool:
    """Whether a method passes the randomisation check: its maps' mean correlation with the fully randomised model's
    (``randomized_rho``) lies at least ``margin`` below their correlation with themselves under another seed
    (``self_rho``: 1 for a deterministic method, about 0 for random maps)."""
    return randomized_rho <= self_rho - margin
