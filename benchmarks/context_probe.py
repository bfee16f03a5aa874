"""What the main job's model reads, object or context: its predictions with the object or the clutter removed.

The cluttered Fashion-MNIST images are an object on a black canvas among pieces of clutter cut from other images; the
data ship the object's box. For every test image the model sees three versions, each on the same black canvas:

* the full image;
* the object only (everything outside the box set to the background, 0): does the object alone suffice?
* the context only (the box set to 0): what does the model predict when the object is not there at all?

Per true class: a class whose context-only images are still predicted as that class is one the model can name
without seeing the object, and its attention maps may rightly point off the object (the per-class pointing game in
``docs/explain.md``). Usage::

    python benchmarks/context_probe.py                       # the latest main job's export (benchmarks/main_job.py)
    python benchmarks/context_probe.py --checkpoint EXPORT   # any train.py checkpoint or export of this dataset
    python benchmarks/context_probe.py --write-docs          # also rewrite the table in docs/explain.md

Timings play no part here, so it does not wait for a quiet machine.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from _machine import REPO, write_block  # benchmarks/ is on sys.path when run
from main_job import RUN_DIR as MAIN_JOB_RUNS

from vision_attn import load_trained
from vision_attn.data.cluttered import load_cluttered
from vision_attn.data.datasets import dataset_info
from vision_attn.data.outliers import blank


def latest_export(runs: Path = MAIN_JOB_RUNS) -> Path:
    """The export folder of the newest ``version_K`` under ``runs`` (what ``benchmarks/main_job.py`` trained)."""
    versions = sorted(runs.glob("version_*/export"), key=lambda p: int(p.parent.name.split("_")[-1]))
    if not versions:
        raise FileNotFoundError(f"no version_*/export under {str(runs)!r}: run benchmarks/main_job.py first")
    return versions[-1]


@torch.no_grad()
def predict(
    model: torch.nn.Module, images: np.ndarray, mean: float, std: float, batch_size: int = 250
) -> tuple[np.ndarray, np.ndarray]:
    """Predicted classes ``[N]`` of uint8 grey ``images`` ``[N, H, W]`` (normalized with ``mean``/``std`` as in
    training) and their probabilities ``[N]``."""
    x = (torch.from_numpy(images).float().div(255.0)[:, None] - mean) / std
    top, classes = torch.cat([model(chunk).softmax(dim=-1) for chunk in x.split(batch_size)]).max(dim=-1)
    return classes.numpy(), top.numpy()


def probe(model: torch.nn.Module, images: np.ndarray, labels: np.ndarray, boxes: np.ndarray, mean: float,
          std: float) -> dict[str, np.ndarray]:  # fmt: skip
    """Predictions on the full, object-only and context-only images (``'full'``, ``'object'``, ``'context'``, each
    ``[N]``) and the probability of the prediction on the context-only images (``'context_confidence'``)."""
    context, confidence = predict(model, blank(images, boxes, "context"), mean, std)
    return {
        "full": predict(model, images, mean, std)[0],
        "object": predict(model, blank(images, boxes, "object"), mean, std)[0],
        "context": context,
        "context_confidence": confidence,
    }


def table(preds: dict[str, np.ndarray], labels: np.ndarray, class_names: list[str]) -> str:
    """Markdown table per true class: accuracy on full and object-only images, and what context-only images are
    predicted as (the share still predicted as the true class; the most common prediction and its share; the mean
    probability of the prediction: 1 / classes for a model that sees no class in them)."""
    lines = [
        "| true class | images | top-1, full image | top-1, object only | context only: still the true class "
        "| context only: most common prediction | context only: mean top probability |",
        "|---|---|---|---|---|---|---|",
    ]
    for c, name in enumerate(class_names):
        mask = labels == c
        if not mask.any():
            continue
        context = preds["context"][mask]
        top = np.bincount(context, minlength=len(class_names)).argmax()
        lines.append(
            f"| {name} | {int(mask.sum())} | {np.mean(preds['full'][mask] == c):.2f} "
            f"| {np.mean(preds['object'][mask] == c):.2f} | {np.mean(context == c):.2f} "
            f"| {class_names[top]} ({np.mean(context == top):.2f}) | {np.mean(preds['context_confidence'][mask]):.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the probe on the embedded test split and print (and optionally write) the table; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=None, help="default: the latest main job's export")
    parser.add_argument("--write-docs", action="store_true", help="rewrite the table in docs/explain.md")
    args = parser.parse_args(argv)
    if args.write_docs and args.checkpoint is not None:
        parser.error("--write-docs documents the main job's model: leave out --checkpoint")
    checkpoint = args.checkpoint if args.checkpoint is not None else latest_export()
    model, info = load_trained(checkpoint)
    if tuple(info["input_size"]) != (1, 64, 64):
        raise ValueError(
            f"--checkpoint {str(checkpoint)!r} takes input_size {tuple(info['input_size'])}; expected (1, 64, 64), "
            "a model trained on cluttered_fashion_mnist"
        )
    data = load_cluttered()
    images, labels, boxes = data["test_images"], data["test_labels"].astype(np.int64), data["test_boxes"]
    names = list(info.get("class_names") or data["classes"].tolist())
    stats = dataset_info("cluttered_fashion_mnist")  # for weights saved without their normalization
    mean, std = info.get("mean") or stats.mean, info.get("std") or stats.std
    preds = probe(model, images, labels, boxes, float(mean[0]), float(std[0]))
    text = table(preds, labels, names)
    print(f"{checkpoint} ({info['model_name']}), {len(labels)} test images\n\n{text}")
    if args.write_docs:
        made_by = f"\n\nMade by `python benchmarks/context_probe.py --write-docs` ({info['model_name']}, main job)."
        write_block("context_probe", text + made_by, [REPO / "docs" / "explain.md"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
