"""``vision-attn evaluate-maps``: every explain method that applies to a model, scored on one set of images
(localisation against boxes and masks, deletion / insertion, the sanity checks, the cost), as ``scores.json`` and
a markdown table.

Examples::

    vision-attn evaluate-maps --checkpoint runs/default/version_0/export --out eval/
    vision-attn evaluate-maps --model vit_tiny_patch16_224 --weights vit.safetensors --images photos/ \\
        --boxes boxes.json --method rollout attnlrp gradcam --out eval/
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any

from vision_attn._cli import (
    add_model_source,
    add_plugin_option,
    check_device,
    check_model_source,
    int_at_least,
    preload_plugins,
)
from vision_attn._data_config import resolve_data_config
from vision_attn._io import atomic_write_text, check_writable_dir
from vision_attn.data.images import find_image_files, parse_dataset_spec, read_boxes
from vision_attn.explain.evaluation import as_json, evaluate_maps, evaluation_table
from vision_attn.explain.registry import list_methods
from vision_attn.explain.runner import load_inputs
from vision_attn.models import load_model

__all__ = ["build_parser", "main"]

DEFAULT_DATASET = "cluttered_fashion_mnist:test"


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of ``vision-attn evaluate-maps``."""
    parser = argparse.ArgumentParser(
        prog="vision-attn evaluate-maps",
        description="Score every explain method that applies to a model on images with object boxes / masks: "
        "pointing game, energy in box, mask AP and mIoU, deletion and insertion AUC, the randomisation and "
        "class-sensitivity checks, and the cost; writes scores.json and table.md.",
    )
    add_model_source(parser)
    parser.add_argument("--dataset", default=None, metavar="NAME[:SPLIT]",
                        help=f"images with boxes and masks (default: {DEFAULT_DATASET})")  # fmt: skip
    parser.add_argument("--images", nargs="+", default=None, metavar="PATH", help="instead: image files or folders")
    parser.add_argument("--boxes", default=None, metavar="JSON", help="boxes of --images (see vision-attn explain)")
    parser.add_argument("--limit", type=int_at_least(1), default=None, help="use only the first N dataset images")
    parser.add_argument(
        "--method", nargs="+", default=None, metavar="M",
        help=f"methods to score (default: every one that applies), of {', '.join(list_methods())}",
    )  # fmt: skip
    add_plugin_option(parser)
    parser.add_argument("--target", type=int_at_least(0), default=None, help="class to explain (default: predicted)")
    parser.add_argument("--steps", type=int_at_least(0), default=16, help="deletion / insertion steps (0: skip them)")
    parser.add_argument("--batch-size", type=int_at_least(1), default=50)
    parser.add_argument("--sanity-images", type=int_at_least(0), default=32,
                        help="images for the randomisation and class-sensitivity checks (0: skip them)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="seed of the randomised models")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (scores.json, table.md)")
    return parser


def _check(args: argparse.Namespace) -> dict[str, Any]:
    model_args = check_model_source(args)
    if args.images is not None and args.dataset is not None:
        raise ValueError("give --images or --dataset, not both")
    dataset = None if args.images is not None else (args.dataset or DEFAULT_DATASET)
    if dataset is not None:
        parse_dataset_spec(dataset)
    if args.boxes is not None and args.images is None:
        raise ValueError("--boxes applies to --images; the dataset brings its own boxes and masks")
    methods = None
    if args.method is not None:
        known = list_methods()
        wrong = [m for m in args.method if m not in known]
        if wrong:
            raise ValueError(f"--method {wrong} unknown; expected some of {tuple(known)}")
        methods = list(dict.fromkeys(args.method))
    paths = find_image_files(args.images) if args.images is not None else None
    boxes = read_boxes(args.boxes, paths) if args.boxes else None
    return dict(model_args=model_args, device=check_device(args.device),
                dataset=dataset, methods=methods, paths=paths, boxes=boxes,
                out=check_writable_dir(args.out, "--out"))  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``vision-attn evaluate-maps``; returns the exit code (0 on success, 2 on bad arguments)."""
    preload_plugins(argv, "vision-attn evaluate-maps")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        plan = _check(args)
    except (ValueError, TypeError, FileNotFoundError) as err:
        parser.error(str(err))
    model, info = load_model(args.checkpoint, args.model, args.weights, plan["model_args"])
    model.to(plan["device"])
    config = resolve_data_config(model, info)
    inputs = load_inputs(config, plan["paths"], plan["dataset"], args.limit, plan["boxes"])
    if args.target is not None and info.get("num_classes") and args.target >= info["num_classes"]:
        raise ValueError(f"--target {args.target} is out of range: the model has {info['num_classes']} classes")
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  disable=args.no_progress, transient=True) as bar:  # fmt: skip
        task = bar.add_task("evaluating", total=None)
        results, skipped = evaluate_maps(
            model, inputs, plan["methods"], args.target, args.steps, args.batch_size, args.sanity_images, args.seed,
            progress=lambda method, stage: bar.update(task, description=f"{method}: {stage}"),
        )  # fmt: skip
    table = evaluation_table(results, skipped)
    meta = {"model": info.get("model_name"), "source": args.checkpoint or args.weights, "images": len(inputs.names),
            "dataset": plan["dataset"], "steps": args.steps, "sanity_images": args.sanity_images,
            "data_config": {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}}  # fmt: skip
    atomic_write_text(plan["out"] / "scores.json", json.dumps(as_json(results, skipped, **meta), indent=2) + "\n")
    atomic_write_text(plan["out"] / "table.md", table + "\n")
    print(table)
    print(f"wrote {plan['out']}/scores.json and table.md ({len(results)} methods, {len(skipped)} skipped)")
    return 0
