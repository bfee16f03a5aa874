"""Argument parsing shared by the command-line tools (``vision-attn explain``, ``export``, ...)."""

from __future__ import annotations

import json
from typing import Any

import torch


def json_object_option(text: str, option: str) -> dict[str, Any]:
    """The JSON object given to ``option`` (e.g. ``--model-args``) as a dict; a ``ValueError`` naming the option and
    the value otherwise."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{option} {text!r} is not JSON: {err}") from err
    if not isinstance(value, dict):
        raise ValueError(
            f"{option} must be a JSON object of keyword arguments such as '{{\"num_classes\": 10}}', got {text}"
        )
    return value


def check_device(spec: str) -> torch.device:
    """``--device`` as a ``torch.device``; ``ValueError`` for a malformed one or one this machine lacks."""
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError) as err:
        raise ValueError(f"--device {spec!r} is not a device; expected cpu, cuda, cuda:N or mps") from err
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"--device {spec!r} needs a CUDA GPU, but none is available here; use --device cpu")
        if device.index is not None and device.index >= count:
            raise ValueError(f"--device {spec!r}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"--device {spec!r} needs Apple's MPS backend, which is not available; use --device cpu")
    elif device.type != "cpu":
        raise ValueError(f"--device {spec!r} is not supported; expected cpu, cuda, cuda:N or mps")
    return device
