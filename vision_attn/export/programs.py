"""Deployable programs of a model: TorchScript, ``torch.export`` (``.pt2``) and ONNX, each checked against eager.

Every program takes a batch axis of any size (ONNX and ``.pt2`` export it as a dynamic dimension ``batch``) and is
verified on a batch of another size than the one traced: its outputs must match eager PyTorch within
``|diff| <= 1e-4 + 1e-4 * |eager|``. Files are written atomically (``vision_attn._io``).
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from vision_attn._io import atomic_open, atomic_write_bytes

__all__ = [
    "check_close",
    "example_input",
    "onnx_available",
    "write_exported_program",
    "write_onnx",
    "write_torchscript",
]

ATOL = RTOL = 1e-4
ONNX_EXTRA = "pip install 'vision_attn[export]' (onnx, onnxscript, onnxruntime)"


def example_input(input_size: tuple[int, int, int], batch: int = 2, seed: int = 0) -> torch.Tensor:
    """A reproducible random batch ``[batch, C, H, W]`` for tracing and checking."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *input_size, generator=generator)


def check_close(got: torch.Tensor, expected: torch.Tensor, what: str) -> float:
    """Return ``max |got - expected|``; raise a ``RuntimeError`` naming ``what`` when beyond the tolerance."""
    diff = (got.float() - expected.float()).abs()
    if got.shape != expected.shape or bool((diff > ATOL + RTOL * expected.float().abs()).any()):
        raise RuntimeError(
            f"{what} does not reproduce eager PyTorch: shapes {tuple(got.shape)} vs {tuple(expected.shape)}, "
            f"max |diff| {diff.max().item() if diff.numel() else float('nan'):.3g} (tolerance {ATOL} + {RTOL}*|eager|)"
        )
    return float(diff.max()) if diff.numel() else 0.0


def _eager(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def write_torchscript(model: nn.Module, path: str | os.PathLike, check: torch.Tensor) -> float:
    """Script ``model`` (eval mode) to ``path`` (``torch.jit.save``); reload it and return max |diff| on ``check``."""
    with warnings.catch_warnings():  # torch marks TorchScript deprecated in favour of torch.export; users ask for it
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.script(model.eval())
        with atomic_open(path) as f:
            torch.jit.save(scripted, f)
        loaded = torch.jit.load(str(path))
    return check_close(_eager(loaded, check), _eager(model, check), f"TorchScript {path}")


def _batch_dim() -> dict[int, torch.export.Dim]:
    return {0: torch.export.Dim("batch")}


def write_exported_program(
    model: nn.Module, path: str | os.PathLike, example: torch.Tensor, check: torch.Tensor
) -> tuple[torch.export.ExportedProgram, float]:
    """``torch.export`` ``model`` with a dynamic batch axis to ``path`` (``.pt2``); reload it and return
    ``(program, max |diff| on check)``."""
    program = torch.export.export(model.eval(), (example,), dynamic_shapes=(_batch_dim(),))
    with atomic_open(path) as f:
        torch.export.save(program, f)
    loaded = torch.export.load(str(path)).module()
    return program, check_close(_eager(loaded, check), _eager(model, check), f"torch.export program {path}")


def onnx_available() -> tuple[bool, bool]:
    """Return ``(can_export, can_run)``: onnx + onnxscript importable, onnxruntime importable."""
    import importlib.util

    export = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxscript"))
    return export, importlib.util.find_spec("onnxruntime") is not None


def write_onnx(
    model: nn.Module | torch.export.ExportedProgram,
    path: str | os.PathLike,
    example: torch.Tensor,
    check: torch.Tensor,
    eager: nn.Module | None = None,
) -> float | None:
    """Export to ONNX (``torch.onnx.export(dynamo=True)``; input ``images`` with a dynamic ``batch`` axis, output
    ``logits``) at ``path``. Returns max |diff| against eager on ``check`` run in onnxruntime, or None when
    onnxruntime is not installed. ``model`` may be an already exported program (``eager`` is then the module)."""
    can_export, can_run = onnx_available()
    if not can_export:
        raise ImportError(f"ONNX export needs onnx and onnxscript: {ONNX_EXTRA}")
    eager = eager if eager is not None else model
    with contextlib.redirect_stdout(io.StringIO()):  # the exporter prints its progress
        program = torch.onnx.export(
            model if isinstance(model, torch.export.ExportedProgram) else model.eval(),
            (example,),
            dynamo=True,
            dynamic_shapes=None if isinstance(model, torch.export.ExportedProgram) else (_batch_dim(),),
            input_names=["images"],
            output_names=["logits"],
            external_data=False,
            verbose=False,
        )
    data = program.model_proto.SerializeToString()
    atomic_write_bytes(path, data)
    if not can_run:
        return None
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (output,) = session.run(["logits"], {"images": check.numpy()})
    return check_close(torch.from_numpy(output), _eager(eager, check), f"ONNX model {Path(path)} in onnxruntime")
