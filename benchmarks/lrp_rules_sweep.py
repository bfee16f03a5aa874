"""Which LRP rules ``attnlrp`` should use on the main job's model, chosen on the validation hold-out (issue 22).

The AttnLRP authors tune LRP-gamma on linear layers and convolutions for ViTs (lxt's ViT example with zennit's
``Gamma``; CP-LRP inside the attention "is easier to tune for gamma"). This sweeps ``attnlrp``'s options on the
main job's validation images — the ``val_fraction`` of the train split its run held out (seeded as its
``config.yaml`` says, through :class:`~vision_attn.data.ImageDataModule` itself), never the test split:

* ``level``: ``tokens`` and ``pixels``;
* ``attention_rule``: ``attnlrp`` (uniform rule on ``q @ kᵀ`` and ``A @ v``, softmax by its gradient) and ``cp``;
* ``linear_gamma``: none (epsilon-LRP, the default; gamma 0 up to a 1e-6 stabiliser) and 0.01 ... 1;
* ``conv_gamma`` (pixels only: the convolutional stem, each batch norm merged into its conv): none and 0.1 ... 100.

Each setting is scored by :func:`~vision_attn.explain.evaluation.evaluate_maps` (pointing game, energy in box,
deletion / insertion AUC, mask AP; positive part of the relevance, as the ``attnlrp`` method shows it). Per level,
the setting with the best mean rank over pointing game, energy in box and deletion AUC is marked (and the best
setting for each of the three is printed): those are the ones to score once on the test split. Usage::

    python benchmarks/lrp_rules_sweep.py                        # ~20 minutes on 2 cores; prints the table
    python benchmarks/lrp_rules_sweep.py --limit 100 --levels tokens --linear-gammas none 0.1   # a quick look
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import sys
from pathlib import Path
from typing import Any

import torch
import yaml
from explain_quality import newest_export  # benchmarks/ is on sys.path when run

import vision_attn
from vision_attn.data.datamodule import ImageDataModule
from vision_attn.explain.evaluation import evaluate_maps
from vision_attn.explain.runner import ExplainInputs, load_inputs

METRICS = ("pointing_game", "energy_pointing", "deletion_auc", "insertion_auc", "mask_ap")
RANKED = {"pointing_game": True, "energy_pointing": True, "deletion_auc": False}  # higher is better?


def validation_inputs(model: Any, info: dict[str, Any], export: Path, limit: int | None) -> ExplainInputs:
    """The images (with boxes, masks, labels) that the run of ``export`` held out of its train split."""
    data = yaml.safe_load((export.parent / "config.yaml").read_text())["data"]
    module = ImageDataModule(name=data["name"], data_dir=data.get("data_dir"), seed=data["seed"],
                             val_fraction=data["val_fraction"], num_workers=0)  # fmt: skip
    module.setup("validate")
    indices = torch.as_tensor(module.val_set.indices)[:limit]
    inputs = load_inputs(vision_attn.resolve_data_config(model, info), dataset=f"{data['name']}:train")
    return dataclasses.replace(
        inputs, images=inputs.images[indices], names=[inputs.names[i] for i in indices.tolist()],
        boxes=inputs.boxes[indices], masks=inputs.masks[indices], labels=inputs.labels[indices],
    )  # fmt: skip


def settings(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The ``attnlrp`` options to score, in table order."""
    out = []
    for level, rule, linear in itertools.product(args.levels, args.attention_rules, args.linear_gammas):
        for conv in args.conv_gammas if level == "pixels" else [None]:
            out.append(dict(level=level, attention_rule=rule, linear_gamma=linear, conv_gamma=conv))
    return out


def best_by_rank(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The row with the best mean rank over :data:`RANKED` (ties: the earlier row)."""
    ranks = [0.0] * len(rows)
    for key, higher in RANKED.items():
        order = sorted(range(len(rows)), key=lambda i: -rows[i][key] if higher else rows[i][key])
        for rank, i in enumerate(order):
            ranks[i] += rank / len(RANKED)
    return rows[min(range(len(rows)), key=lambda i: ranks[i])]


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown: one row per setting; ``*`` marks the best mean rank of each level."""
    best = {id(best_by_rank([r for r in rows if r["level"] == level])) for level in {r["level"] for r in rows}}
    lines = ["| level | attention | linear γ | conv γ | pointing | energy in box | deletion AUC ↓ | insertion AUC | "
             "mask AP | cost × forward |", "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in rows:
        gammas = ["—" if row[k] is None else f"{row[k]:g}" for k in ("linear_gamma", "conv_gamma")]
        scores = " | ".join(f"{row[k]:.3f}" for k in METRICS)
        mark = " *" if id(row) in best else ""
        lines.append(f"| {row['level']}{mark} | {row['attention_rule']} | {gammas[0]} | {gammas[1]} | {scores} | "
                     f"{row['cost_ratio']:.1f} |")  # fmt: skip
    return "\n".join(lines)


def _gamma(text: str) -> float | None:
    return None if text == "none" else float(text)


def main(argv: list[str] | None = None) -> int:
    """Score every setting on the validation images and print the table; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=None, help="default: the newest main-job export")
    parser.add_argument("--limit", type=int, default=None, help="first N validation images (default: all)")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--levels", nargs="+", default=["tokens", "pixels"], choices=["tokens", "pixels"])
    parser.add_argument("--attention-rules", nargs="+", default=["attnlrp", "cp"], choices=["attnlrp", "cp"])
    parser.add_argument("--linear-gammas", nargs="+", type=_gamma, default=[None, 0.01, 0.05, 0.1, 0.25, 1.0])
    parser.add_argument("--conv-gammas", nargs="+", type=_gamma, default=[None, 0.1, 0.25, 1.0, 100.0])
    args = parser.parse_args(argv)
    export = args.checkpoint or newest_export()
    model, info = vision_attn.load_model(checkpoint=export)
    inputs = validation_inputs(model, info, Path(export), args.limit)
    print(f"model {info['model_name']} from {export}; {len(inputs.names)} validation images", flush=True)
    rows = []
    for options in settings(args):
        (result,), _ = evaluate_maps(model, inputs, ["attnlrp"], options={"attnlrp": options}, steps=args.steps,
                                     batch_size=args.batch_size, sanity_images=0)  # fmt: skip
        rows.append({**options, **{k: result.scores[k] for k in METRICS}, "cost_ratio": result.cost_ratio})
        print(f"  {options}: " + ", ".join(f"{k} {rows[-1][k]:.3f}" for k in METRICS), flush=True)
    print(table(rows))
    for level in dict.fromkeys(r["level"] for r in rows):
        mine = [r for r in rows if r["level"] == level]
        print(f"{level}: best mean rank {_label(best_by_rank(mine))}")
        for key, higher in RANKED.items():
            best = max(mine, key=lambda r, k=key, h=higher: r[k] if h else -r[k])
            print(f"{level}: best {key} {best[key]:.3f}: {_label(best)}")
    return 0


def _label(row: dict[str, Any]) -> str:
    return ", ".join(f"{k}={row[k]}" for k in ("attention_rule", "linear_gamma", "conv_gamma"))


if __name__ == "__main__":
    sys.exit(main())
