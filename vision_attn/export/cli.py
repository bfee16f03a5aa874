"""``vision-attn export``: write a trained model as a timm/Hugging Face folder, ONNX, TorchScript or ``.pt2``.

Examples::

    vision-attn export --checkpoint runs/default/checkpoints/last.ckpt --out exported/ --formats hub onnx
    vision-attn export --checkpoint runs/default/export/ --out exported/ --formats torchscript pt2
    vision-attn export --model va_vit_tiny_patch4_32 --weights vit.safetensors --model-args '{"num_classes": 10}' \\
        --out exported/
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from vision_attn._cli import json_object_option
from vision_attn._io import check_writable_dir
from vision_attn.export.api import FORMATS, export_trained

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of ``vision-attn export``."""
    parser = argparse.ArgumentParser(
        prog="vision-attn export",
        description="Export trained weights (a train.py checkpoint, an export folder or a model name + weights) as "
        "a timm / Hugging Face Hub folder (config.json + model.safetensors), ONNX, TorchScript or a torch.export "
        "program, into one output folder written in one atomic step.",
    )
    source = parser.add_argument_group("source (one of)")
    source.add_argument(
        "--checkpoint",
        metavar="PATH",
        help="train.py checkpoint (.ckpt), export folder, or .safetensors with vision_attn metadata",
    )
    source.add_argument("--model", metavar="NAME", help="vision_attn or timm model name, with --weights")
    source.add_argument("--weights", metavar="FILE", help="weights file (.safetensors/.pth) for --model")
    parser.add_argument(
        "--model-args",
        default="{}",
        metavar="JSON",
        help="model keyword arguments for bare --weights (checked against stored metadata otherwise)",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (replaced as a whole)")
    parser.add_argument(
        "--formats", nargs="+", default=["hub"], metavar="F", help=f"one or more of {', '.join(FORMATS)} (default: hub)"
    )
    parser.add_argument("--no-ema", action="store_true", help="export a checkpoint's raw weights, not its EMA copy")
    parser.add_argument(
        "--resample-weights",
        action="store_true",
        help="allow --model-args img_size to resample position/patch embeddings",
    )
    return parser  # fmt: skip


def _parse(argv: Sequence[str] | None) -> tuple[argparse.Namespace, dict]:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if (args.checkpoint is None) == (args.weights is None):
            raise ValueError("give exactly one of --checkpoint PATH or --weights FILE (with --model NAME)")
        if args.model is not None and args.checkpoint is not None:
            raise ValueError("--model goes with --weights; a --checkpoint names its own model")
        model_args = json_object_option(args.model_args, "--model-args")
        unknown = [f for f in args.formats if f not in FORMATS]
        if unknown:
            raise ValueError(f"--formats {unknown} unknown; expected one or more of {', '.join(FORMATS)}")
        for option, path in (("--checkpoint", args.checkpoint), ("--weights", args.weights)):
            if path is not None and not Path(path).exists():
                raise ValueError(f"{option} {path!r} does not exist")
        try:  # the export replaces --out as a whole, so its parent folder must be writable
            check_writable_dir(Path(args.out).absolute().parent, "its folder")
        except ValueError as err:
            raise ValueError(f"--out {args.out!r} cannot be written: {err}") from err
    except ValueError as err:
        parser.error(str(err))
    return args, model_args


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``vision-attn export``; returns the exit code (0 on success, 2 on bad arguments)."""
    args, model_args = _parse(argv)
    try:
        result = export_trained(
            args.checkpoint or args.weights, args.out, args.formats, model_name=args.model, model_args=model_args,
            use_ema=not args.no_ema, resample_weights=args.resample_weights,
        )  # fmt: skip
    except ImportError as err:  # an optional dependency (the export extra) is missing
        print(f"vision-attn export: error: {err}", file=sys.stderr)
        return 2
    for fmt, path in result.files.items():
        diff = result.max_abs_diff.get(fmt, "n/a")
        check = (
            "" if fmt == "hub"
            else " (not run: onnxruntime is not installed)" if diff is None
            else f" (matches eager PyTorch, max |diff| {diff:.2g})"
        )  # fmt: skip
        print(f"{fmt}: {path}{check}")
    return 0
