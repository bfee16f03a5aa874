"""One evaluation of explain methods on one model and one set of images: localisation against boxes and object
masks, faithfulness (deletion / insertion), the sanity checks of Adebayo et al. 2018, and the cost; what
``vision-attn evaluate-maps`` writes as ``scores.json`` and a markdown table.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from vision_attn._timing import timed_call
from vision_attn.explain._common import NotApplicableError, unwrap_model
from vision_attn.explain.metrics import mask_ap, mask_iou, mask_pixel_accuracy
from vision_attn.explain.registry import applicable_methods, get_method, list_methods
from vision_attn.explain.runner import ExplainInputs, explain_batches, predict, score_maps
from vision_attn.explain.sanity import (
    RANDOMIZATION_MARGIN,
    cascading_randomization,
    class_sensitivity,
    passes_randomization,
    spearman,
)

__all__ = ["COLUMNS", "MethodEvaluation", "as_json", "evaluate_maps", "evaluation_table"]

Progress = Callable[[str, str], None]  # (method, what is being done)

# (key, column title, higher is better) of the markdown table, in order
COLUMNS = (
    ("pointing_game", "pointing game ↑", True),
    ("energy_pointing", "energy in box ↑", True),
    ("mask_ap", "mask AP ↑", True),
    ("mask_iou", "mask mIoU ↑", True),
    ("deletion_auc", "deletion AUC ↓", False),
    ("insertion_auc", "insertion AUC ↑", True),
)


@dataclass
class MethodEvaluation:
    """The scores of one method: means over the images (``scores``), the sanity checks (``randomization``: mean
    Spearman correlation with the trained model's maps per cascade stage; ``self_rho``: with its own maps under
    another seed; ``class_rho``: between the maps of the predicted and the runner-up class; ``passes``), and the
    cost (``maps_per_second``; ``cost_ratio``: time per batch over one plain forward pass of it)."""

    method: str
    scores: dict[str, float] = field(default_factory=dict)
    randomization: dict[str, float] = field(default_factory=dict)
    self_rho: float | None = None
    class_rho: float | None = None
    passes: bool | None = None
    maps_per_second: float = 0.0
    cost_ratio: float = 0.0
    per_image: dict[str, list[float]] = field(default_factory=dict)


def _first(target: Any, count: int) -> Any:
    """The targets of the first ``count`` images (``target`` as given when it is one class for all)."""
    if isinstance(target, (Sequence, torch.Tensor)) and len(target) > 1:
        return target[:count]
    return target


def _mean(values: torch.Tensor) -> float:
    return float(values.float().mean())


def _check_inputs(inputs: ExplainInputs) -> None:
    count = inputs.images.shape[0]
    size = tuple(inputs.images.shape[-2:])
    for name, values in (("boxes", inputs.boxes), ("masks", inputs.masks), ("labels", inputs.labels)):
        if values is not None and values.shape[0] != count:
            raise ValueError(f"{name} has {values.shape[0]} entries for {count} images; give one per image")
    if inputs.masks is not None and tuple(inputs.masks.shape[-2:]) != size:
        raise ValueError(
            f"masks are {tuple(inputs.masks.shape[-2:])} for images of {size}; give them at the image size"
        )


def evaluate_maps(
    model: nn.Module,
    inputs: ExplainInputs,
    methods: Sequence[str] | None = None,
    target: int | Sequence[int] | torch.Tensor | None = None,
    steps: int = 16,
    batch_size: int = 50,
    sanity_images: int = 32,
    seed: int = 0,
    options: dict[str, dict[str, Any]] | None = None,
    progress: Progress | None = None,
) -> tuple[list[MethodEvaluation], list[dict[str, str]]]:
    """Evaluate ``methods`` (default: every registered method that applies) on ``model`` and ``inputs``; returns
    ``(evaluations, skipped)`` where ``skipped`` lists ``{'method', 'reason'}`` of the methods that do not apply.

    Box scores need ``inputs.boxes``, mask scores ``inputs.masks``; deletion / insertion run with ``steps`` > 0;
    the sanity checks run on the first ``sanity_images`` images (0: none). ``options`` gives per-method options
    (e.g. ``{'gradcam': {'target_layers': ['layer3']}}``). ``progress(method, stage)`` is called as the work goes.
    """
    model = unwrap_model(model).eval()
    _check_inputs(inputs)
    images = inputs.images.to(next(iter(model.parameters()), inputs.images).device)
    device = images.device
    reasons = applicable_methods(model)
    wanted = list(methods) if methods is not None else [m for m in list_methods() if not reasons[m]]
    for method in wanted:
        get_method(method)  # an unknown name is an error, not a skip
    options = dict(options or {})
    report = progress or (lambda method, stage: None)
    predict(model, images[:batch_size], batch_size)  # warm-up: the first call pays for allocations, not the model
    probs, forward_seconds = timed_call(lambda: predict(model, images, batch_size), device)
    for _ in range(2):  # the fastest of three passes: one pass is noisy, and a slow one would flatter every cost
        forward_seconds = min(forward_seconds, timed_call(lambda: predict(model, images, batch_size), device)[1])
    if target is not None:
        targets = torch.as_tensor(target).reshape(-1)
        if int(targets.max()) >= probs.shape[1] or int(targets.min()) < 0:
            raise ValueError(f"target {targets.tolist()[:10]} is out of range: the model has {probs.shape[1]} classes")
    results, skipped = [], []
    sanity = images[: max(0, sanity_images)]
    for method in wanted:
        if reasons.get(method):
            skipped.append({"method": method, "reason": reasons[method]})
            continue
        kwargs = dict(options.get(method, {}))
        report(method, "maps")
        try:
            explain_batches(model, images[:batch_size], method, _first(target, batch_size), batch_size, **kwargs)
            maps, seconds = timed_call(lambda m=method, kw=kwargs: explain_batches(model, images, m, target,
                                                                                 batch_size, **kw), device)  # fmt: skip
        except NotApplicableError as err:
            skipped.append({"method": method, "reason": str(err)})
            continue
        result = MethodEvaluation(method, maps_per_second=images.shape[0] / seconds,
                                  cost_ratio=seconds / forward_seconds)  # fmt: skip
        report(method, "scores")
        per_image = score_maps(model, images, maps, inputs.boxes, target, steps=steps, batch_size=batch_size)
        if inputs.masks is not None:
            masks = inputs.masks.to(maps.device)
            per_image.update(mask_ap=mask_ap(maps, masks), mask_iou=mask_iou(maps, masks),
                             mask_pixel_accuracy=mask_pixel_accuracy(maps, masks))  # fmt: skip
        result.scores = {k: _mean(v) for k, v in per_image.items()}
        result.per_image = {k: v.float().cpu().tolist() for k, v in per_image.items()}
        if len(sanity):
            report(method, "sanity checks")
            _sanity(model, sanity, method, target, seed, batch_size, kwargs, result)
        results.append(result)
    return results, skipped


def _sanity(
    model: nn.Module,
    images: torch.Tensor,
    method: str,
    target: Any,
    seed: int,
    batch_size: int,
    kwargs: dict[str, Any],
    result: MethodEvaluation,
) -> None:
    """Fill in the randomisation and class-sensitivity checks of ``result``."""
    chunk = _first(target, images.shape[0])
    stages = cascading_randomization(model, images, method, chunk, seed, batch_size, **kwargs)
    result.randomization = {name: _mean(rho) for name, rho in stages}
    spec = get_method(method)
    if "seed" in spec.options:  # random by design: compare with itself under another seed
        base = int(kwargs.get("seed", 0))
        first = explain_batches(model, images, method, chunk, batch_size, **{**kwargs, "seed": base})
        second = explain_batches(model, images, method, chunk, batch_size, **{**kwargs, "seed": base + 10_000})
        result.self_rho = _mean(spearman(first, second))
    else:
        result.self_rho = 1.0
    result.passes = passes_randomization(result.randomization["all"], result.self_rho)
    if spec.class_specific:
        result.class_rho = _mean(class_sensitivity(model, images, method, batch_size, **kwargs))


def _cell(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def evaluation_table(results: Sequence[MethodEvaluation], skipped: Sequence[dict[str, str]] = ()) -> str:
    """The evaluation as a markdown table, one row per method; the best value of each score column is bold, a
    method that fails the randomisation check is flagged, and skipped methods are listed below with the reason."""
    present = [(k, title, up) for k, title, up in COLUMNS if any(k in r.scores for r in results)]
    head = [title for _, title, _ in present]
    head += ["ρ randomized ↓", "ρ other class", "maps/s", "cost (× forward)", "sanity"]
    lines = ["| method | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    best = {}
    for key, _, up in present:
        values = [r.scores[key] for r in results if key in r.scores and r.method != "random"]
        if values:
            best[key] = max(values) if up else min(values)
    for r in results:
        cells = []
        for key, _, _ in present:
            text = _cell(r.scores.get(key))
            cells.append(f"**{text}**" if key in best and r.scores.get(key) == best[key] else text)
        verdict = "—" if r.passes is None else "passes" if r.passes else "**fails**: maps barely depend on the weights"
        rho = r.randomization.get("all")
        cells += [_cell(rho, 2), _cell(r.class_rho, 2) if r.class_rho is not None else "class-agnostic",
                  f"{r.maps_per_second:.0f}", f"{r.cost_ratio:.1f}", verdict]  # fmt: skip
        lines.append(f"| {r.method} | " + " | ".join(cells) + " |")
    for skip in skipped:
        lines.append(f"\nSkipped `{skip['method']}`: {skip['reason']}")
    return "\n".join(lines)


def as_json(results: Sequence[MethodEvaluation], skipped: Sequence[dict[str, str]], **meta: Any) -> dict[str, Any]:
    """The evaluation as a JSON-ready dict: ``meta``, ``methods`` (each :class:`MethodEvaluation` as a dict, the
    per-image scores included), ``skipped`` and the randomisation margin used."""
    return {**meta, "randomization_margin": RANDOMIZATION_MARGIN, "methods": [asdict(r) for r in results],
            "skipped": list(skipped)}  # fmt: skip
