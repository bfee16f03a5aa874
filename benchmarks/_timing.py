"""Timing of one inference or training step, shared by the benchmark scripts (run them as scripts)."""

from __future__ import annotations

import time

import torch


def time_inference(model: torch.nn.Module, x: torch.Tensor) -> float:
    """Seconds for one eval-mode forward of ``x`` under ``inference_mode``."""
    model.eval()
    with torch.inference_mode():
        start = time.perf_counter()
        model(x)
        return time.perf_counter() - start


def time_training(model: torch.nn.Module, x: torch.Tensor, opt: torch.optim.Optimizer) -> float:
    """Seconds for one train-mode forward, backward and optimizer step on ``x``."""
    model.train()
    start = time.perf_counter()
    loss = model(x).logsumexp(dim=1).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return time.perf_counter() - start
