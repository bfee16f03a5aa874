"""``vision-attn explain``: overlays, an image x method grid and a JSON of per-image scores for image files.

Examples::

    vision-attn explain --checkpoint runs/vit/last.ckpt --images img1.png img_dir/ --method rollout gradcam --out out/
    vision-attn explain --model vit_tiny_patch16_224 --weights vit.safetensors --images cat.jpg --out out/
    vision-attn explain --checkpoint last.ckpt --dataset cluttered_fashion_mnist:test --no-overlays --out out/
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from vision_attn._cli import add_plugin_option, check_device, int_at_least, json_object_option, preload_plugins
from vision_attn._data_config import INTERPOLATIONS, channel_stats, resolve_data_config
from vision_attn._io import atomic_write_text, check_writable_dir
from vision_attn.data.images import find_image_files, parse_dataset_spec, read_boxes
from vision_attn.explain._common import NotApplicableError, upsample_maps
from vision_attn.explain.registry import get_method, list_methods
from vision_attn.explain.runner import SCORES, explain_batches, load_inputs, predict, score_maps
from vision_attn.models import load_model

__all__ = ["build_parser", "main", "per_class_means"]


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1], got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of ``vision-attn explain``."""
    parser = argparse.ArgumentParser(
        prog="vision-attn explain",
        description="Write attention-map overlays, an image x method grid (grid.png) and per-image scores "
        "(scores.json) for image files.",
    )
    source = parser.add_argument_group("model (one or more; each --checkpoint/--model adds one)")
    source.add_argument(
        "--checkpoint",
        action="append",
        default=[],
        metavar="PATH",
        help="Lightning checkpoint from train.py (.ckpt) or exported weights (.safetensors + .json)",
    )
    source.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="NAME",
        help="vision_attn or timm model name (random weights unless --weights)",
    )
    source.add_argument(
        "--weights",
        action="append",
        default=[],
        metavar="FILE",
        help="weights file for the --model of the same position",
    )
    source.add_argument(
        "--model-args",
        default="{}",
        metavar="JSON",
        help='keyword arguments for --model, e.g. \'{"num_classes": 10, "in_chans": 1}\'',
    )
    parser.add_argument("--images", nargs="+", default=None, metavar="PATH", help="image files or folders")
    parser.add_argument(
        "--dataset",
        default=None,
        metavar="NAME[:SPLIT]",
        help="instead of --images: the embedded dataset, 'cluttered_fashion_mnist:test' (with boxes)",
    )
    parser.add_argument("--limit", type=int_at_least(1), default=None, help="use only the first N dataset images")
    parser.add_argument(
        "--method",
        nargs="+",
        default=["rollout"],
        metavar="[K:]M",
        help=f"one or more of {', '.join(list_methods())}, or 'all' (default: rollout); with several models, a "
        "method applies to every model it suits, or with a prefix K: only to the K-th model (0-based, checkpoints "
        "first); methods that do not apply to a model are skipped and listed",
    )
    add_plugin_option(parser)
    parser.add_argument(
        "--scores",
        nargs="+",
        default=list(SCORES),
        metavar="S",
        help=f"scores to compute, of {', '.join(SCORES)} (box scores need boxes; default: all)",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder")
    parser.add_argument(
        "--target", type=int_at_least(0), default=None, help="class to explain (default: the predicted one)"
    )
    parser.add_argument(
        "--target-layer",
        default=None,
        metavar="NAME",
        help="submodule for the Grad-CAM methods (default: the last 4-D feature map; a ViT's last norm1)",
    )
    parser.add_argument(
        "--boxes",
        default=None,
        metavar="JSON",
        help="JSON {image path or file name: [x_min, y_min, x_max, y_max]} in the image's own pixels, to add "
        "pointing-game scores (boxes go through the same resize and crop as the image)",
    )
    parser.add_argument(
        "--img-size",
        type=int_at_least(1),
        nargs="+",
        default=None,
        metavar="N",
        help="model input size N (or H W) (default: the one recorded with the weights, else the model's own)",
    )
    parser.add_argument(
        "--crop-pct",
        type=_fraction,
        default=None,
        help="eval centre-crop fraction in (0, 1] (default: the one recorded with the weights)",
    )
    parser.add_argument(
        "--interpolation",
        choices=INTERPOLATIONS,
        default=None,
        help="eval resize interpolation (default: the one recorded with the weights)",
    )
    parser.add_argument(
        "--mean",
        type=float,
        nargs="+",
        default=None,
        help="input normalization mean: 1 value or one per model input channel",
    )
    parser.add_argument(
        "--std",
        type=float,
        nargs="+",
        default=None,
        help="input normalization std: 1 value or one per model input channel",
    )
    parser.add_argument("--steps", type=int_at_least(0), default=16, help="deletion/insertion steps (0: skip them)")
    parser.add_argument("--grid-images", type=int_at_least(1), default=8, help="rows of grid.png (first N images)")
    parser.add_argument("--no-overlays", action="store_true", help="write no per-image overlay PNGs")
    parser.add_argument("--batch-size", type=int_at_least(1), default=32)
    parser.add_argument("--alpha", type=_fraction, default=0.5, help="overlay opacity in [0, 1]")
    parser.add_argument("--cmap", default="jet", help="matplotlib colormap")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps")
    return parser  # fmt: skip


def _parse_method(spec: str) -> tuple[int | None, str]:
    index, _, method = spec.rpartition(":")
    methods = list_methods()
    if (method not in methods and method != "all") or (index and not index.isdigit()):
        raise ValueError(f"--method {spec!r} is not [K:]METHOD with METHOD 'all' or one of {tuple(methods)}")
    return (int(index) if index else None), method


def _methods_for(plan: list[tuple[int | None, str]], index: int) -> list[str]:
    """The methods to run on the ``index``-th model, in order (``all``: every registered method)."""
    names = [m for k, m in plan if k in (None, index)]
    expanded = [n for name in names for n in (list_methods() if name == "all" else [name])]
    return list(dict.fromkeys(expanded))


def _markdown_table(summary: dict[str, dict[str, float]]) -> str:
    metrics = sorted({k for row in summary.values() for k in row})
    lines = ["| method | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for column, row in summary.items():
        lines.append(f"| {column} | " + " | ".join(f"{row[k]:.3f}" if k in row else "" for k in metrics) + " |")
    return "\n".join(lines)


def _check_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """Validate what can be checked before loading a model; returns the parsed pieces (``ValueError`` etc.)."""
    methods = list(dict.fromkeys(_parse_method(m) for m in args.method))  # a repeated method runs once
    unknown_scores = sorted(set(args.scores) - set(SCORES))
    if unknown_scores:
        raise ValueError(f"--scores {unknown_scores} unknown; expected some of {SCORES}")
    if (args.images is None) == (args.dataset is None):
        raise ValueError("give exactly one of --images PATH... or --dataset NAME[:SPLIT]")
    if args.dataset is not None:
        parse_dataset_spec(args.dataset)
    if args.limit is not None and args.dataset is None:
        raise ValueError(f"--limit {args.limit} applies to --dataset only; with --images, list the files you want")
    if args.img_size is not None and len(args.img_size) > 2:
        raise ValueError(f"--img-size takes N or H W, got {len(args.img_size)} values {args.img_size}")
    model_args = json_object_option(args.model_args, "--model-args")
    sources: list[tuple[str | None, str | None, str | None]] = [(c, None, None) for c in args.checkpoint]
    if len(args.weights) > len(args.model):
        raise ValueError(f"{len(args.weights)} --weights for {len(args.model)} --model")
    weights = args.weights + [None] * (len(args.model) - len(args.weights))
    sources += [(None, m, w) for m, w in zip(args.model, weights, strict=True)]
    if not sources:
        raise ValueError("give a --checkpoint PATH or a --model NAME")
    wrong = [f"{k}:{m}" for k, m in methods if k is not None and k >= len(sources)]
    if wrong:
        raise ValueError(f"--method {wrong} names a model index beyond the {len(sources)} models given")
    for option, values in (("--mean", args.mean), ("--std", args.std)):
        if values is not None:
            channel_stats(values, len(values), option)  # finite (and a positive std); the length per model later
    from matplotlib import colormaps

    if args.cmap not in colormaps:
        raise ValueError(f"--cmap {args.cmap!r} is not a matplotlib colormap (e.g. jet, viridis, inferno)")
    device = check_device(args.device)
    paths = find_image_files(args.images) if args.images is not None else []
    boxes = read_boxes(args.boxes, paths) if args.boxes and paths else None
    if args.boxes and args.dataset is not None:
        raise ValueError("--boxes applies to --images; the dataset brings its own boxes")
    out = check_writable_dir(args.out, "--out")
    return dict(methods=methods, model_args=model_args, sources=sources, device=device, paths=paths, boxes=boxes,
                out=out)  # fmt: skip


def _data_config(args: argparse.Namespace, model: nn.Module, info: dict[str, Any]) -> dict[str, Any]:
    """The eval preprocessing for one model: what was recorded with its weights (or its own), with the
    ``--img-size``/``--mean``/``--std``/``--crop-pct``/``--interpolation`` given on the command line."""
    in_chans = int(info["input_size"][0])
    return resolve_data_config(
        model,
        info,
        img_size=args.img_size if args.img_size is None or len(args.img_size) == 2 else args.img_size[0],
        mean=channel_stats(args.mean, in_chans, "--mean"),
        std=channel_stats(args.std, in_chans, "--std"),
        crop_pct=args.crop_pct,
        interpolation=args.interpolation,
    )


def _method_options(args: argparse.Namespace, method: str) -> dict[str, Any]:
    """``--target-layer`` for the methods that take ``target_layers``."""
    if args.target_layer is not None and "target_layers" in get_method(method).options:
        return {"target_layers": [args.target_layer]}
    return {}


def per_class_means(
    scores: dict[str, torch.Tensor], labels: torch.Tensor, class_names: Sequence[str] = ()
) -> dict[str, dict[str, float]]:
    """Mean of each per-image score over the images of each true class: ``{class: {'images': n, score: mean}}``.

    Classes are keyed by name where ``class_names`` has one, else by index, in label order; classes without
    images are left out.
    """
    labels = torch.as_tensor(labels).reshape(-1)
    out: dict[str, dict[str, float]] = {}
    for label in sorted(set(labels.tolist())):
        mask = labels == label
        key = class_names[label] if label < len(class_names) else str(label)
        out[key] = {"images": int(mask.sum())}
        out[key].update({name: float(v[mask.to(v.device)].float().mean()) for name, v in scores.items()})
    return out


def _row_title(record: dict[str, Any]) -> str:
    """A grid row's title: the image name, its true class (``--dataset``) and each model's predicted class."""
    lines = [record["image"]]
    if "label" in record:
        lines.append(f"true: {record.get('class_name') or record['label']}")
    for label, result in record["models"].items():
        who = "pred" if len(record["models"]) == 1 else label.split(":", 1)[0]
        lines.append(f"{who}: {result.get('class_name') or result['prediction']}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``vision-attn explain``; returns the exit code (0 on success, 2 on bad arguments).

    Writes ``<out>/grid.png`` (image x method), ``<out>/scores.json`` (per image, ``summary`` per method and, for
    ``--dataset``, ``summary_per_class``) and, unless ``--no-overlays``, one overlay ``<image>_<method>.png`` per
    image and map. A method that does not apply to a model (e.g. rollout on a CNN)
    is skipped and reported; the run fails only when no method applies to any model.
    """
    from vision_attn.explain.plot import method_grid, save_overlay

    preload_plugins(argv, "vision-attn explain")  # before the parser: --method and its help name their methods
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        plan = _check_arguments(args)
    except (ValueError, TypeError, FileNotFoundError) as err:
        parser.error(str(err))

    out, device, sources = plan["out"], plan["device"], plan["sources"]
    records: list[dict[str, Any]] = []
    grid_maps: dict[str, torch.Tensor] = {}
    summary: dict[str, dict[str, float]] = {}
    per_class: dict[str, dict[str, dict[str, float]]] = {}
    skipped: list[dict[str, str]] = []
    shown: dict[str, Any] = {}
    for index, (checkpoint, model_name, weight_file) in enumerate(sources):
        model, info = load_model(checkpoint, model_name, weight_file, plan["model_args"])
        model.to(device)
        config = _data_config(args, model, info)
        inputs = load_inputs(config, plan["paths"] or None, args.dataset, args.limit, plan["boxes"])
        images, boxes, labels = inputs.images.to(device), inputs.boxes, inputs.labels
        class_names = list(info.get("class_names") or [])
        if not records:
            records = [{"image": name, "models": {}} for name in inputs.names]
            for record, path in zip(records, inputs.paths or [], strict=False):
                record["path"] = str(path)
            for record, true in zip(records, [] if labels is None else labels.tolist(), strict=False):
                record["label"] = int(true)
                record["class_name"] = class_names[true] if true < len(class_names) else None
            shown = dict(images=images[: args.grid_images].cpu(), mean=config["mean"], std=config["std"],
                         boxes=None if boxes is None else boxes[: args.grid_images])  # fmt: skip
        label = info["model_name"] if len(sources) == 1 else f"{index}:{info['model_name']}"
        probs = predict(model, images, args.batch_size)
        if args.target is not None and args.target >= probs.shape[1]:
            raise ValueError(
                f"--target {args.target} is out of range: model {info['model_name']} has {probs.shape[1]} classes "
                f"(0 to {probs.shape[1] - 1})"
            )
        for i, rec in enumerate(records):
            pred = int(probs[i].argmax())
            rec["models"][label] = {
                "prediction": pred,
                "class_name": class_names[pred] if pred < len(class_names) else None,
                "probability": float(probs[i, pred]),
                "scores": {},
            }
        for method in _methods_for(plan["methods"], index):
            column = method if len(sources) == 1 else f"{label}:{method}"
            try:
                options = _method_options(args, method)
                maps = explain_batches(model, images, method, args.target, args.batch_size, **options)
            except NotApplicableError as err:
                skipped.append({"model": label, "method": method, "reason": str(err)})
                continue
            grid_maps[column] = upsample_maps(maps[: args.grid_images].cpu(), tuple(shown["images"].shape[-2:]))
            scores = score_maps(model, images, maps, boxes, args.target, args.scores, args.steps, args.batch_size)
            summary[column] = {k: float(v.float().mean()) for k, v in scores.items()}
            if labels is not None and scores:
                per_class[column] = per_class_means(scores, labels, class_names)
            for i, rec in enumerate(records):
                rec["models"][label]["scores"][method] = {k: float(v[i]) for k, v in scores.items()}
                if not args.no_overlays:
                    save_overlay(
                        out / f"{inputs.names[i]}_{column.replace(':', '_').replace('/', '_')}.png", images[i].cpu(),
                        maps[i].cpu(), cmap=args.cmap, alpha=args.alpha, mean=config["mean"], std=config["std"],
                    )  # fmt: skip
    for skip in skipped:
        print(f"skipped {skip['model']}:{skip['method']}: {skip['reason']}")
    if not grid_maps:
        reasons = "; ".join(f"{s['model']}:{s['method']}: {s['reason']}" for s in skipped)
        raise NotApplicableError(f"no method applies to any model: {reasons}")
    titles = [_row_title(r) for r in records[: len(shown["images"])]]
    method_grid(
        shown["images"], grid_maps, out / "grid.png", row_titles=titles, boxes=shown["boxes"], cmap=args.cmap,
        alpha=args.alpha, mean=shown["mean"], std=shown["std"],
    )  # fmt: skip
    result = {"methods": list(args.method), "summary": summary, "skipped": skipped, "images": records}
    if per_class:  # --dataset: the true classes are known, so a method's weak classes show
        result["summary_per_class"] = per_class
    atomic_write_text(out / "scores.json", json.dumps(result, indent=2) + "\n")
    print(_markdown_table(summary))
    note = f", {len(skipped)} model/method pairs skipped" if skipped else ""
    print(f"wrote {len(records)} images x {len(summary)} maps to {out}/ (grid.png, scores.json){note}")
    return 0
