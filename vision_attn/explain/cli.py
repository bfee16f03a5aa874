"""``vision-attn explain``: overlays, an image x method grid and a JSON of per-image scores for image files.

Examples::

    vision-attn explain --checkpoint runs/vit/last.ckpt --images img1.png img_dir/ --method rollout gradcam --out out/
    vision-attn explain --model vit_tiny_patch16_224 --weights vit.safetensors --images cat.jpg --out out/
    vision-attn explain --checkpoint last.ckpt --dataset cluttered_fashion_mnist:test --no-overlays --out out/
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vision_attn.explain._common import upsample_maps
from vision_attn.explain.api import METHODS, TOKEN_METHODS, explain
from vision_attn.explain.cam import CAM_METHODS
from vision_attn.explain.capture import AttentionRecorder

__all__ = ["build_parser", "load_images", "load_model", "main"]

SCORES = ("pointing_game", "energy_pointing", "deletion_auc", "insertion_auc")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


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
    parser.add_argument("--limit", type=int, default=None, help="use only the first N dataset images")
    parser.add_argument(
        "--method",
        nargs="+",
        default=["rollout"],
        metavar="[K:]M",
        help=f"one or more of {', '.join(METHODS)} (default: rollout); with several models, a method applies to "
        "every model it suits, or with a prefix K: only to the K-th model (0-based, checkpoints first)",
    )
    parser.add_argument(
        "--scores",
        nargs="+",
        default=list(SCORES),
        metavar="S",
        help=f"scores to compute, of {', '.join(SCORES)} (box scores need boxes; default: all)",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder")
    parser.add_argument("--target", type=int, default=None, help="class to explain (default: the predicted one)")
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
        help="JSON {image file name: [x_min, y_min, x_max, y_max]} to add pointing-game scores",
    )
    parser.add_argument("--mean", type=float, nargs="+", default=None, help="input normalization mean")
    parser.add_argument("--std", type=float, nargs="+", default=None, help="input normalization std")
    parser.add_argument("--steps", type=int, default=16, help="deletion/insertion steps (0: skip them)")
    parser.add_argument("--grid-images", type=int, default=8, help="rows of grid.png (first N images)")
    parser.add_argument("--no-overlays", action="store_true", help="write no per-image overlay PNGs")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--alpha", type=float, default=0.5, help="overlay opacity")
    parser.add_argument("--cmap", default="jet", help="matplotlib colormap")
    parser.add_argument("--device", default="cpu")
    return parser  # fmt: skip


def load_model(
    checkpoint: str | os.PathLike | None = None,
    model_name: str | None = None,
    weights: str | os.PathLike | None = None,
    model_args: dict[str, Any] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Build a model in eval mode from trained weights or a model name; returns ``(model, info)``.

    ``checkpoint`` (a train.py checkpoint, an export folder, a ``.safetensors`` with metadata) or ``weights`` (for
    ``model_name``) are read by :func:`vision_attn.load_trained`, which uses a checkpoint's EMA weights when it
    has them. ``info`` holds ``name``, ``mean``, ``std``, ``input_size`` ``(H, W)`` and, where known,
    ``class_names``.
    """
    from vision_attn.models._loading import build_model, load_trained, model_input_size

    if checkpoint is not None or weights is not None:
        source = checkpoint if checkpoint is not None else weights
        name = None if checkpoint is not None else model_name
        model, loaded = load_trained(source, model_name=name, model_args=model_args)
        info = {k: loaded[k] for k in ("mean", "std", "class_names") if loaded.get(k) is not None}
        return model, {**info, "name": loaded["model_name"], "input_size": tuple(loaded["input_size"][1:])}
    if model_name is None:
        raise ValueError("give a --checkpoint PATH or a --model NAME")
    model = build_model(model_name, **dict(model_args or {})).eval()
    cfg = getattr(model, "pretrained_cfg", None) or {}
    info = {"name": model_name, "mean": cfg.get("mean"), "std": cfg.get("std")}
    return model, {**info, "input_size": model_input_size(model)[1:]}


def _image_paths(paths: Sequence[str]) -> list[Path]:
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found += sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        elif p.is_file():
            found.append(p)
        else:
            raise FileNotFoundError(f"--images entry {str(p)!r} is neither a file nor a folder")
    if not found:
        raise ValueError(f"--images {list(paths)} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
    return found


def load_images(
    paths: Sequence[Path],
    in_chans: int,
    size: tuple[int, int] | None,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
) -> torch.Tensor:
    """Read image files as a normalized float batch ``[B, in_chans, H, W]`` resized (bilinear) to ``size``."""
    import numpy as np
    from PIL import Image

    if in_chans not in (1, 3):
        raise ValueError(f"in_chans must be 1 or 3 to read image files, got {in_chans}")
    tensors = []
    for path in paths:
        with Image.open(path) as img:
            img = img.convert("L" if in_chans == 1 else "RGB")
            if size is not None and img.size != (size[1], size[0]):
                img = img.resize((size[1], size[0]), Image.BILINEAR)
            arr = np.asarray(img, dtype=np.float32) / 255.0
        tensors.append(torch.from_numpy(arr).reshape(*arr.shape[:2], -1).permute(2, 0, 1))
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) > 1:
        raise ValueError(f"images have different sizes {sorted(shapes)}; the model needs one size (give --img-size)")
    batch = torch.stack(tensors)
    if mean is not None and std is not None:
        mean_t = torch.as_tensor(mean, dtype=torch.float32).reshape(-1)[:in_chans]
        std_t = torch.as_tensor(std, dtype=torch.float32).reshape(-1)[:in_chans]
        batch = (batch - mean_t[:, None, None]) / std_t[:, None, None]
    return batch


def load_dataset_images(
    spec: str, limit: int | None, in_chans: int, mean: Sequence[float] | None, std: Sequence[float] | None
) -> tuple[torch.Tensor, list[str], torch.Tensor, torch.Tensor]:
    """Load ``spec`` = ``'cluttered_fashion_mnist[:test|train]'`` as ``(images, names, boxes [B, 4], labels)``.

    Images are normalized by ``mean``/``std`` (default: the dataset's) and repeated to ``in_chans``.
    """
    from vision_attn.data.cluttered import ClutteredFashionMNIST

    name, _, split = spec.partition(":")
    if name != "cluttered_fashion_mnist":
        raise ValueError(f"--dataset {spec!r} is unknown; expected 'cluttered_fashion_mnist[:test|train]'")
    data = ClutteredFashionMNIST(split or "test")
    count = len(data) if limit is None else min(limit, len(data))
    images = torch.from_numpy(data.images[:count]).float().div(255)[:, None]
    mean = mean if mean is not None else [data.meta["mean"]]
    std = std if std is not None else [data.meta["std"]]
    images = (images - mean[0]) / std[0]
    images = images.expand(-1, in_chans, -1, -1).contiguous()
    names = [f"{split or 'test'}_{i:04d}" for i in range(count)]
    boxes = torch.as_tensor(data.boxes[:count], dtype=torch.float32)
    return images, names, boxes, torch.as_tensor(data.targets[:count])


def _in_chans(model: nn.Module) -> int:
    from vision_attn.explain._common import _in_chans as find

    return find(model) or 3


def _applies(model: nn.Module, method: str) -> bool:
    recorder = AttentionRecorder(model)
    if method in TOKEN_METHODS:
        return recorder.has_token_attention
    if method == "spatial":
        return "spatial" in recorder.kinds.values()
    return True


def _method_options(method: str, chunk_index: int, target_layer: str | None) -> dict[str, Any]:
    if method == "random":
        return {"seed": chunk_index}
    if method in CAM_METHODS and target_layer is not None:
        return {"target_layers": [target_layer]}
    return {}


def _parse_method(spec: str) -> tuple[int | None, str]:
    index, _, method = spec.rpartition(":")
    if method not in METHODS or (index and not index.isdigit()):
        raise ValueError(f"--method {spec!r} is not [K:]METHOD with METHOD one of {METHODS}")
    return (int(index) if index else None), method


def _markdown_table(summary: dict[str, dict[str, float]]) -> str:
    metrics = sorted({k for row in summary.values() for k in row})
    lines = ["| method | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for column, row in summary.items():
        lines.append(f"| {column} | " + " | ".join(f"{row[k]:.3f}" if k in row else "" for k in metrics) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``vision-attn explain``; returns the exit code (0 on success, 2 on bad arguments)."""
    from vision_attn.explain.metrics import deletion_auc, energy_pointing, insertion_auc, pointing_game
    from vision_attn.explain.plot import method_grid, save_overlay

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        methods = [_parse_method(m) for m in args.method]
        unknown_scores = sorted(set(args.scores) - set(SCORES))
        if unknown_scores:
            raise ValueError(f"--scores {unknown_scores} unknown; expected some of {SCORES}")
        if (args.images is None) == (args.dataset is None):
            raise ValueError("give exactly one of --images PATH... or --dataset NAME[:SPLIT]")
        model_args = json.loads(args.model_args)
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
        paths = _image_paths(args.images) if args.images is not None else []
        boxes_by_name = json.loads(Path(args.boxes).read_text()) if args.boxes else {}
        missing = [p.name for p in paths if boxes_by_name and p.name not in boxes_by_name]
        if missing:
            raise ValueError(f"--boxes has no box for {missing}")
        if args.mean is not None and args.std is not None and len(args.mean) != len(args.std):
            raise ValueError(f"--mean {args.mean} and --std {args.std} need the same length")
    except (ValueError, FileNotFoundError, json.JSONDecodeError) as err:
        parser.error(str(err))

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    records: list[dict[str, Any]] = []
    grid_maps: dict[str, torch.Tensor] = {}
    summary: dict[str, dict[str, float]] = {}
    shown: torch.Tensor | None = None
    display: tuple[Any, Any] = (None, None)
    boxes = torch.tensor([boxes_by_name[p.name] for p in paths], dtype=torch.float32) if boxes_by_name else None
    for index, (checkpoint, model_name, weight_file) in enumerate(sources):
        model, info = load_model(checkpoint, model_name, weight_file, model_args)
        model.to(device)
        mean = args.mean if args.mean is not None else info.get("mean")
        std = args.std if args.std is not None else info.get("std")
        if args.dataset is not None:
            images, names, boxes, _ = load_dataset_images(args.dataset, args.limit, _in_chans(model), mean, std)
        else:
            images = load_images(paths, _in_chans(model), info.get("input_size"), mean, std)
            names = [p.stem for p in paths]
        images = images.to(device)
        if not records:
            records = [{"image": name, "models": {}} for name in names]
        if shown is None:
            shown, display = images[: args.grid_images].cpu(), (mean, std)
        label = info["name"] if len(sources) == 1 else f"{index}:{info['name']}"
        with torch.no_grad():
            logits = torch.cat([model(chunk) for chunk in images.split(args.batch_size)])
        probs = logits.softmax(dim=-1)
        class_names = list(info.get("class_names") or [])
        for i, rec in enumerate(records):
            pred = int(probs[i].argmax())
            rec["models"][label] = {
                "prediction": pred,
                "class_name": class_names[pred] if pred < len(class_names) else None,
                "probability": float(probs[i, pred]),
                "scores": {},
            }
        chosen = [m for k, m in methods if k == index or (k is None and (len(sources) == 1 or _applies(model, m)))]
        for method in chosen:
            maps = torch.cat(
                [
                    explain(model, chunk, method, args.target, **_method_options(method, k, args.target_layer))
                    for k, chunk in enumerate(images.split(args.batch_size))
                ]
            )
            column = method if len(sources) == 1 else f"{label}:{method}"
            grid_maps[column] = upsample_maps(maps[: args.grid_images].cpu(), tuple(shown.shape[-2:]))
            scores: dict[str, torch.Tensor] = {}
            kw = {"steps": args.steps, "batch_size": args.batch_size}
            if boxes is not None and "pointing_game" in args.scores:
                scores["pointing_game"] = pointing_game(maps.cpu(), boxes)
            if boxes is not None and "energy_pointing" in args.scores:
                scores["energy_pointing"] = energy_pointing(maps.cpu(), boxes)
            if args.steps > 0 and "deletion_auc" in args.scores:
                scores["deletion_auc"] = deletion_auc(model, images, maps, args.target, **kw)
            if args.steps > 0 and "insertion_auc" in args.scores:
                scores["insertion_auc"] = insertion_auc(model, images, maps, args.target, **kw)
            summary[column] = {k: float(v.float().mean()) for k, v in scores.items()}
            for i, rec in enumerate(records):
                rec["models"][label]["scores"][method] = {k: float(v[i]) for k, v in scores.items()}
                if not args.no_overlays:
                    save_overlay(
                        out / f"{names[i]}_{column.replace(':', '_')}.png", images[i].cpu(), maps[i].cpu(),
                        cmap=args.cmap, alpha=args.alpha, mean=mean, std=std,
                    )  # fmt: skip
    if shown is not None and grid_maps:
        method_grid(
            shown, grid_maps, out / "grid.png", row_titles=[r["image"] for r in records[: len(shown)]],
            boxes=None if boxes is None else boxes[: len(shown)], cmap=args.cmap, alpha=args.alpha,
            mean=display[0], std=display[1],
        )  # fmt: skip
    result = {"methods": list(args.method), "summary": summary, "images": records}
    (out / "scores.json").write_text(json.dumps(result, indent=2))
    print(_markdown_table(summary))
    print(f"wrote {len(records)} images x {len(summary)} maps to {out}/ (grid.png, scores.json)")
    return 0
