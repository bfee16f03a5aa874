"""Resuming with other options: which hyper-parameters differ from the checkpoint's, and whether its weights still
fit the network built from the config."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["NETWORK_HPARAMS", "changed_hparams", "check_weights_fit"]

# hyper-parameters that decide the network's weights: a resumed or evaluated checkpoint must agree on them
NETWORK_HPARAMS = ("model", "model_args", "ema_decay")


def _plain(value: Any) -> Any:
    """``value`` with tuples as lists (YAML and checkpoints store ``betas`` either way)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def changed_hparams(saved: Mapping[str, Any], current: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{name: (checkpoint's value, current value)}`` for the hyper-parameters both have and that differ."""
    return {k: (saved[k], v) for k, v in current.items() if k in saved and _plain(saved[k]) != _plain(v)}


def check_weights_fit(
    own: Mapping[str, torch.Tensor], saved: Mapping[str, torch.Tensor], changed: Mapping[str, tuple[Any, Any]]
) -> None:
    """Raise a ``ValueError`` unless the checkpoint's ``saved`` state dict has the keys and shapes of ``own``,
    naming the differing keys and the ``changed`` network options that explain them."""
    missing, unexpected = sorted(own.keys() - saved.keys()), sorted(saved.keys() - own.keys())
    resized = [k for k in own.keys() & saved.keys() if tuple(own[k].shape) != tuple(saved[k].shape)]
    if not (missing or unexpected or resized):
        return
    details = "; ".join(
        f"{what} ({len(keys)}): {', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''}"
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("other shape", sorted(resized)))
        if keys
    )
    network = {k: v for k, v in changed.items() if k in NETWORK_HPARAMS}
    given = "; ".join(f"model.{k} {new!r} given, the checkpoint has {old!r}" for k, (old, new) in network.items())
    raise ValueError(
        f"the checkpoint's weights do not fit the network built from the config/command line "
        f"({given or 'same model options; the checkpoint is from another network'}): {details}. Drop the "
        "contradicting --model.* options (or use the checkpoint's config) to load this checkpoint"
    )
