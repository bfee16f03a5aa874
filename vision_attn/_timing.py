"""Wall-clock timing that waits for the device: GPU work is asynchronous, so the clock is read only after the
device has finished (CUDA and MPS; nothing to wait for on the CPU). The benchmark scripts and the cost column of
the map evaluation both time with :func:`timed`."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import torch

__all__ = ["synchronize", "timed", "timed_call"]

T = TypeVar("T")


def synchronize(device: torch.device | str | None = None) -> None:
    """Wait until ``device`` (CUDA or MPS) has finished its queued work; nothing on the CPU."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.synchronize(device)
    elif device.type == "mps" and torch.backends.mps.is_available():
        torch.mps.synchronize()


def timed_call(fn: Callable[[], T], device: torch.device | str | None = None) -> tuple[T, float]:
    """``(fn(), seconds it took)``, with ``device`` synchronized before the start and before the stop."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return result, time.perf_counter() - start


def timed(fn: Callable[[], object], device: torch.device | str | None = None) -> float:
    """Seconds that ``fn()`` takes, with ``device`` synchronized before the start and before the stop."""
    return timed_call(fn, device)[1]
