"""``integrated_gradients`` and ``saliency``: pixel attributions from captum (Sundararajan et al. 2017; Simonyan et
al. 2014), the gradient baselines users already know, run through our registry and evaluation. captum is an
optional dependency (``pip install 'vision_attn[references]'``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from vision_attn.explain._common import apply_sign, check_logits, resolve_targets
from vision_attn.explain.registry import register_method


def _targets(model: nn.Module, images: torch.Tensor, target: int | Sequence[int] | torch.Tensor | None) -> torch.Tensor:
    with torch.no_grad():
        logits = model(images)
    check_logits(logits, model, need_classes=True)
    return resolve_targets(target, logits)


@register_method(
    "integrated_gradients",
    needs=("class_target", "captum"),
    description="captum's Integrated Gradients from a zero (mean-image) baseline, summed over channels; its "
    "positive part by default",
    reference="Sundararajan et al. 2017 (captum)",
)
def integrated_gradients(
    model: nn.Module,
    images: torch.Tensor,
    target: int | Sequence[int] | torch.Tensor | None = None,
    n_steps: int = 32,
    internal_batch_size: int | None = None,
    sign: str = "positive",
) -> torch.Tensor:
    """Integrated Gradients of the ``target`` logits along ``n_steps`` points from a zero input (the mean image,
    since inputs are normalized) to the image, summed over channels, its ``sign`` part: ``[B, H, W]``."""
    from captum.attr import IntegratedGradients

    if not isinstance(n_steps, int) or n_steps < 1:
        raise ValueError(f"n_steps must be an int >= 1, got {n_steps!r}")
    targets = _targets(model, images, target)
    with torch.enable_grad():
        attributions = IntegratedGradients(model).attribute(
            images.detach().requires_grad_(True),
            target=targets,
            n_steps=n_steps,
            internal_batch_size=internal_batch_size,
        )
    return apply_sign(attributions.detach().sum(dim=1), sign)


@register_method(
    "saliency",
    needs=("class_target", "captum"),
    description="captum's Saliency: the largest absolute input gradient over the channels",
    reference="Simonyan et al. 2014 (captum)",
)
def saliency(
    model: nn.Module, images: torch.Tensor, target: int | Sequence[int] | torch.Tensor | None = None
) -> torch.Tensor:
    """The absolute gradient of the ``target`` logits with respect to the input, maximum over channels:
    ``[B, H, W]``."""
    from captum.attr import Saliency

    targets = _targets(model, images, target)
    with torch.enable_grad():
        gradients = Saliency(model).attribute(images.detach().requires_grad_(True), target=targets, abs=True)
    return gradients.detach().amax(dim=1)
