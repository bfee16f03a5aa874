"""Scores for saliency maps, batched: localisation against boxes and object masks, faithfulness by deletion /
insertion.

Maps are ``[B, H, W]`` at image resolution (as :func:`vision_attn.explain.explain` returns); boxes are
``[B, 4]`` ``(x_min, y_min, x_max, y_max)`` in pixels with the max exclusive (the embedded dataset's format); masks
are ``[B, H, W]`` booleans, True on the object's own pixels. Every function returns one score per image, ``[B]``;
:func:`random_maps` is the random-map baseline.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vision_attn.explain._common import (
    check_logits,
    check_target,
    eval_mode,
    require_classes,
    resolve_targets,
    to_model_inputs,
    unwrap_model,
)

__all__ = [
    "SUBSTRATES",
    "average_precision",
    "box_masks",
    "deletion_auc",
    "energy_pointing",
    "insertion_auc",
    "mask_ap",
    "mask_iou",
    "mask_pixel_accuracy",
    "pointing_game",
    "random_maps",
]

SUBSTRATES = ("zero", "blur", "mean")
_TIE_RTOL = 1e-6  # pixels this close to a map's maximum tie with it (a few float32 rounding steps)


def _check_maps(maps: torch.Tensor, name: str = "maps") -> None:
    if not isinstance(maps, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor [B, H, W], got {type(maps).__name__}")
    if maps.ndim != 3:
        raise ValueError(f"{name} must be 3-D [B, H, W], got shape {tuple(maps.shape)}")


def box_masks(boxes: torch.Tensor | Sequence[Sequence[float]], size: tuple[int, int]) -> torch.Tensor:
    """Return boolean masks ``[B, H, W]``, True inside each box ``(x_min, y_min, x_max, y_max)`` (max exclusive)."""
    boxes = torch.as_tensor(boxes, dtype=torch.float32)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must be [B, 4] (x_min, y_min, x_max, y_max), got shape {tuple(boxes.shape)}")
    if bool((boxes[:, 2] <= boxes[:, 0]).any() | (boxes[:, 3] <= boxes[:, 1]).any()):
        raise ValueError(f"boxes need x_max > x_min and y_max > y_min, got {boxes.tolist()}")
    height, width = size
    ys = torch.arange(height, dtype=torch.float32)[None, :, None]
    xs = torch.arange(width, dtype=torch.float32)[None, None, :]
    x0, y0, x1, y1 = (boxes[:, i, None, None] for i in range(4))
    return (xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)


def _masks_for(maps: torch.Tensor, boxes: torch.Tensor | Sequence[Sequence[float]]) -> torch.Tensor:
    _check_maps(maps)
    masks = box_masks(boxes, tuple(maps.shape[-2:])).to(maps.device)
    if masks.shape[0] != maps.shape[0]:
        raise ValueError(f"boxes has {masks.shape[0]} rows for {maps.shape[0]} maps; give one box per map")
    return masks


def pointing_game(
    maps: torch.Tensor, boxes: torch.Tensor | Sequence[Sequence[float]], tolerance: int = 0
) -> torch.Tensor:
    """Pointing game (Zhang et al. 2016, "Top-down Neural Attention by Excitation Backprop"): ``[B]`` in [0, 1].

    1 where the map's maximum lies inside the box grown by ``tolerance`` pixels on each side, 0 where it lies
    outside. Where several pixels tie for the maximum (within a relative ``1e-6``), the score is the share of
    them inside the grown box: the expected hit when one of them is picked at random. A coarse map upsampled
    bilinearly has such ties (an edge cell's value stays flat out to the image border), and taking the first
    maximum in row-major order would put its peak on the border whatever the map shows; a uniform map scores
    the box's area share.
    """
    if not isinstance(tolerance, int) or tolerance < 0:
        raise ValueError(f"tolerance must be an int >= 0 (pixels), got {tolerance!r}")
    boxes = torch.as_tensor(boxes, dtype=torch.float32)
    grown = boxes + torch.tensor([-tolerance, -tolerance, tolerance, tolerance], dtype=torch.float32)
    masks = _masks_for(maps, grown).flatten(1)
    flat = maps.detach().float().flatten(1)
    peak = flat.amax(dim=1, keepdim=True)
    tied = flat >= peak - _TIE_RTOL * peak.abs()
    return (tied & masks).sum(dim=1).float() / tied.sum(dim=1).float()


def energy_pointing(maps: torch.Tensor, boxes: torch.Tensor | Sequence[Sequence[float]]) -> torch.Tensor:
    """Energy-based pointing game (Wang et al. 2020, "Score-CAM"): share of map mass inside the box, ``[B]``.

    Negative values are clipped to 0; an all-zero map counts as uniform (its score is the box's area share).
    """
    masks = _masks_for(maps, boxes)
    mass = maps.float().clamp(min=0).flatten(1)
    total = mass.sum(dim=1)
    mass = torch.where(total[:, None] > 0, mass, torch.ones_like(mass))
    return (mass * masks.flatten(1)).sum(dim=1) / mass.sum(dim=1)


def _check_masks(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    _check_maps(maps)
    if not isinstance(masks, torch.Tensor):
        raise TypeError(f"masks must be a torch.Tensor [B, H, W], got {type(masks).__name__}")
    if masks.shape != maps.shape:
        raise ValueError(
            f"masks have shape {tuple(masks.shape)} for maps {tuple(maps.shape)}; give one [H, W] mask per map, at "
            "the map's size"
        )
    return masks.to(device=maps.device, dtype=torch.bool)


def _segment(maps: torch.Tensor) -> torch.Tensor:
    """The foreground of each map as Chefer et al. threshold it: min-max scaled, above its own mean."""
    flat = maps.detach().float().flatten(1)
    low, high = flat.amin(dim=1, keepdim=True), flat.amax(dim=1, keepdim=True)
    scaled = (flat - low) / (high - low).clamp(min=torch.finfo(torch.float32).tiny)
    return (scaled > scaled.mean(dim=1, keepdim=True)).view_as(maps)


def mask_pixel_accuracy(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Share of pixels the thresholded map labels right (object vs background), ``[B]`` in [0, 1].

    The ImageNet-segmentation protocol of Chefer et al. 2021 ("Transformer Interpretability Beyond Attention
    Visualization", their ``imagenet_seg_eval.py``): each map is min-max scaled and thresholded at its mean.
    """
    masks = _check_masks(maps, masks)
    return (_segment(maps) == masks).flatten(1).float().mean(dim=1)


def mask_iou(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Mean IoU of the thresholded map (as in :func:`mask_pixel_accuracy`) over the two classes, object and
    background, ``[B]`` in [0, 1] (Chefer et al. 2021 pool intersections and unions over the dataset; this is
    per image). A class absent from both mask and prediction counts as IoU 1."""
    masks = _check_masks(maps, masks).flatten(1)
    predicted = _segment(maps).flatten(1)
    ious = []
    for pred, true in ((predicted, masks), (~predicted, ~masks)):
        inter, union = (pred & true).sum(dim=1).float(), (pred | true).sum(dim=1).float()
        ious.append(torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union)))
    return torch.stack(ious).mean(dim=0)


def average_precision(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Average precision of ``scores`` ``[B, N]`` against boolean ``labels`` ``[B, N]``, per row, ``[B]``: the area
    under the precision-recall curve as a step sum over the distinct score thresholds, ``sum_k (R_k - R_{k-1}) P_k``
    (scikit-learn's ``average_precision_score``, tied scores taken together). A row without positives gives 0."""
    scores, labels = scores.detach().float(), labels.bool()
    if scores.shape != labels.shape or scores.ndim != 2:
        raise ValueError(f"scores {tuple(scores.shape)} and labels {tuple(labels.shape)} must both be [B, N]")
    order = scores.argsort(dim=1, descending=True, stable=True)
    ranked, hits = scores.gather(1, order), labels.gather(1, order).float()
    true_pos, seen = hits.cumsum(dim=1), torch.arange(1, scores.shape[1] + 1, device=scores.device).float()
    last_of_tie = torch.ones_like(ranked, dtype=torch.bool)
    last_of_tie[:, :-1] = ranked[:, 1:] != ranked[:, :-1]  # thresholds sit at the last of each run of equal scores
    positives = hits.sum(dim=1, keepdim=True)
    recall = true_pos / positives.clamp(min=1)
    precision = true_pos / seen
    recall_at = torch.where(last_of_tie, recall, torch.zeros_like(recall))
    # step sum over the thresholds: the recall gained since the previous threshold, times the precision there
    previous = torch.cummax(torch.cat([torch.zeros_like(recall[:, :1]), recall_at[:, :-1]], dim=1), dim=1).values
    gained = torch.where(last_of_tie, recall - previous, torch.zeros_like(recall))
    return torch.where(positives[:, 0] > 0, (gained * precision).sum(dim=1), torch.zeros_like(positives[:, 0]))


def mask_ap(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Average precision of the map against the object mask, ``[B]`` in [0, 1], as in the ImageNet-segmentation
    protocol of Chefer et al. 2021: the min-max scaled map scores the object pixels and ``1 - map`` the background
    pixels, and one AP is taken over both (their ``get_ap_scores`` on the two-class one-hot)."""
    masks = _check_masks(maps, masks).flatten(1)
    flat = maps.detach().float().flatten(1)
    low, high = flat.amin(dim=1, keepdim=True), flat.amax(dim=1, keepdim=True)
    scaled = (flat - low) / (high - low).clamp(min=torch.finfo(torch.float32).tiny)
    return average_precision(torch.cat([1 - scaled, scaled], dim=1), torch.cat([~masks, masks], dim=1))


def random_maps(
    batch_size: int, size: tuple[int, int], grid_size: tuple[int, int] | None = None, seed: int = 0
) -> torch.Tensor:
    """Random-map baseline ``[B, H, W]`` in [0, 1]: uniform noise per pixel, or per cell of ``grid_size``."""
    generator = torch.Generator().manual_seed(seed)
    cells = tuple(size) if grid_size is None else tuple(grid_size)
    maps = torch.rand((batch_size, *cells), generator=generator)
    if cells != tuple(size):
        maps = F.interpolate(maps[:, None], size=tuple(size), mode="nearest")[:, 0]
    return maps


def _substrate(images: torch.Tensor, substrate: str) -> torch.Tensor:
    if substrate == "zero":
        return torch.zeros_like(images)
    if substrate == "mean":
        return images.mean(dim=(2, 3), keepdim=True).expand_as(images)
    if substrate == "blur":  # RISE's insertion substrate: a strong Gaussian blur (sigma = 1/8 of each image side)
        from torchvision.transforms.functional import gaussian_blur

        # per axis, so the kernel's reflect padding (3 sigma) stays inside a non-square image's short side
        sigma_y, sigma_x = images.shape[-2] / 8, images.shape[-1] / 8
        kernel = [int(2 * round(3 * sigma_x) + 1), int(2 * round(3 * sigma_y) + 1)]  # torchvision: (kx, ky)
        return gaussian_blur(images, kernel, [sigma_x, sigma_y])
    raise ValueError(f"substrate {substrate!r} is unknown; expected one of {SUBSTRATES}")


def _causal_auc(
    model: nn.Module,
    images: torch.Tensor,
    maps: torch.Tensor,
    target: int | Sequence[int] | torch.Tensor | None,
    steps: int,
    start: torch.Tensor,
    finish: torch.Tensor,
    batch_size: int,
) -> torch.Tensor:
    _check_maps(maps)
    if images.ndim != 4 or maps.shape[0] != images.shape[0] or maps.shape[-2:] != images.shape[-2:]:
        raise ValueError(
            f"maps {tuple(maps.shape)} must be [B, H, W] for images {tuple(images.shape)} of the same B, H, W"
        )
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    check_target(target)
    model = unwrap_model(model)
    require_classes(model, "deletion/insertion AUC")
    start, finish = to_model_inputs(model, start), to_model_inputs(model, finish)
    batch, num_pixels = images.shape[0], maps.shape[-1] * maps.shape[-2]
    # rank 0 = most salient pixel; at step k the pixels with rank < k * num_pixels / steps are switched
    order = maps.flatten(1).argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(num_pixels, device=order.device).expand_as(order))
    rank = rank.view(batch, 1, *maps.shape[-2:]).to(start.device)

    def logits_of(batch_images: torch.Tensor) -> torch.Tensor:
        logits = torch.cat([model(chunk) for chunk in batch_images.split(batch_size)])
        check_logits(logits, model, need_classes=True)
        return logits.float()

    with torch.no_grad(), eval_mode(model, "deletion/insertion AUC", stacklevel=5):
        targets = resolve_targets(target, logits_of(to_model_inputs(model, images)))
        curve = []
        for k in range(steps + 1):
            perturbed = torch.where(rank < round(k * num_pixels / steps), finish, start)
            probs = logits_of(perturbed).softmax(dim=-1)
            curve.append(probs.gather(1, targets[:, None])[:, 0])
    return torch.trapezoid(torch.stack(curve, dim=1), dx=1.0 / steps, dim=1).to(images.device)


def deletion_auc(
    model: nn.Module,
    images: torch.Tensor,
    maps: torch.Tensor,
    target: int | Sequence[int] | torch.Tensor | None = None,
    steps: int = 16,
    substrate: str = "zero",
    batch_size: int = 256,
) -> torch.Tensor:
    """Deletion AUC (Petsiuk et al. 2018, "RISE"), ``[B]``; lower is better.

    Pixels are replaced by ``substrate`` (``'zero'``, ``'mean'``, ``'blur'``) in order of decreasing saliency in
    ``steps`` equal steps; the score is the area under the target-class softmax probability curve over the
    deleted fraction [0, 1] (trapezoidal). ``target``: ``None`` = the class predicted on the intact image.
    Runs the model on ``B * (steps + 1)`` images, ``batch_size`` at a time, without gradients, in eval mode (as
    :func:`~vision_attn.explain.explain`: wrappers unwrapped, images cast to the model, NaN/Inf logits refused).
    ``'blur'`` uses a Gaussian of sigma 1/8 of each image side (so it works on non-square images).
    """
    return _causal_auc(model, images, maps, target, steps, images, _substrate(images, substrate), batch_size)


def insertion_auc(
    model: nn.Module,
    images: torch.Tensor,
    maps: torch.Tensor,
    target: int | Sequence[int] | torch.Tensor | None = None,
    steps: int = 16,
    substrate: str = "blur",
    batch_size: int = 256,
) -> torch.Tensor:
    """Insertion AUC (Petsiuk et al. 2018, "RISE"), ``[B]``; higher is better.

    Starts from ``substrate`` (default a blurred copy) and inserts the image's pixels in order of decreasing
    saliency; otherwise as :func:`deletion_auc`.
    """
    return _causal_auc(model, images, maps, target, steps, _substrate(images, substrate), images, batch_size)
