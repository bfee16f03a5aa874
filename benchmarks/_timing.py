"""The timing helpers of the benchmark scripts (run them as scripts; benchmarks/ is then on ``sys.path``).

GPU work is asynchronous: a clock read right after a kernel launch measures the launch, not the work. Every timing
here goes through :func:`vision_attn._timing.timed`, which synchronizes the device before starting and before
stopping the clock (CUDA and MPS; nothing to wait for on the CPU).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence

import torch

from vision_attn._timing import synchronize, timed

__all__ = ["interleaved_times", "synchronize", "time_inference", "time_training", "timed"]


def interleaved_times(
    fns: Sequence[Callable[[], object]],
    repeats: int,
    device: torch.device | str | None = None,
    warmup: int = 1,
    reduce: Callable[[list[float]], float] = statistics.median,
) -> list[float]:
    """Per function, ``reduce`` (default the median) of ``repeats`` timings, after ``warmup`` untimed rounds; the
    functions run in turns, in alternating order, so a change of load hits all of them alike."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    runs: list[list[float]] = [[] for _ in fns]
    for round_ in range(repeats):
        order = list(range(len(fns))) if round_ % 2 == 0 else list(reversed(range(len(fns))))
        for i in order:
            runs[i].append(timed(fns[i], device))
    return [reduce(r) for r in runs]


def time_inference(model: torch.nn.Module, x: torch.Tensor) -> float:
    """Seconds for one eval-mode forward of ``x`` under ``inference_mode``."""
    model.eval()
    with torch.inference_mode():
        return timed(lambda: model(x), x.device)


def time_training(model: torch.nn.Module, x: torch.Tensor, opt: torch.optim.Optimizer) -> float:
    """Seconds for one train-mode forward, backward and optimizer step on ``x``."""
    model.train()

    def step() -> None:
        loss = model(x).logsumexp(dim=1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return timed(step, x.device)
