"""The main job as a user runs it, timed whole, and the attention maps of the model it trains.

1. ``python train.py fit --config configs/default.yaml`` in a fresh process on a quiet machine: wall time (start-up,
   training, validation, the final test and the export included), training images/s, epochs, test top-1/top-5 (the
   checkpoint selected on the validation hold-out, evaluated once on the test split).
2. ``vision-attn explain`` on the exported model over the 1,000 embedded test images: pointing game, energy in box and
   deletion AUC of rollout, gradient rollout, the relevance methods (transformer attribution, AttnLRP), last-layer
   attention and a random baseline, overall and per true class.
3. The figure (six test images, true and predicted class, the maps) with ``vision-attn explain --limit 6``.

Usage::

    python benchmarks/main_job.py                 # ~6 minutes; prints the tables
    python benchmarks/main_job.py --write-docs    # also rewrites README.md / docs and assets/explain_grid.png
    python benchmarks/main_job.py --budget 4 --write-docs   # the same job with 4x the epochs and time cap: how far
                                                            # accuracy goes with more CPU (docs/training.md only)

``--write-docs`` refuses to write when the machine was not quiet before the run (see ``_machine.settle``);
``--allow-load`` overrides, for experiments only. It also refuses extra ``train.py`` overrides: the docs describe the
default config (``--budget`` scales only its ``trainer.max_epochs`` and ``trainer.max_time``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from _machine import REPO, docs_allowed, publish, settle, write_block  # benchmarks/ is on sys.path when run
from _timing import timed

from vision_attn._io import atomic_write_bytes, atomic_write_text

RUN_DIR = REPO / "runs" / "bench_main_job"  # the default job only: context_probe.py reads its newest export
OTHER_RUN_DIR = REPO / "runs" / "bench_main_job_other"  # runs with --budget or overrides
CONFIG = REPO / "configs" / "default.yaml"
METHODS = ("rollout", "gradient_rollout", "transformer_attribution", "attnlrp", "attention", "random")


def run(cmd: list[str]) -> float:
    """Run ``cmd`` in the repository with albumentations kept offline; returns its wall time in seconds."""
    print("$", " ".join(cmd), flush=True)
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    return timed(lambda: subprocess.run(cmd, cwd=REPO, check=True, env=env))


def main_job(extra: list[str], run_dir: Path = RUN_DIR) -> dict[str, Any]:
    """Train the default config once; returns its ``summary.json`` plus the process wall time and run folder."""
    started = time.time()
    wall = run([sys.executable, "train.py", "fit", "--config", "configs/default.yaml", f"--run_dir={run_dir}", *extra])
    summaries = [p for p in run_dir.glob("version_*/summary.json") if p.stat().st_mtime >= started]
    if not summaries:
        raise RuntimeError(f"the main job wrote no summary.json under {run_dir}")
    path = max(summaries, key=lambda p: p.stat().st_mtime)
    return {**json.loads(path.read_text()), "process_seconds": round(wall, 1), "run_folder": str(path.parent)}


def budget_overrides(budget: float, config: Path = CONFIG) -> list[str]:
    """``train.py`` overrides that scale ``config``'s ``trainer.max_epochs`` and ``trainer.max_time`` by ``budget``."""
    if not budget > 0:
        raise ValueError(f"--budget must be > 0, got {budget}")
    trainer = (yaml.safe_load(config.read_text()) or {}).get("trainer") or {}
    max_time = str(trainer.get("max_time"))
    if not isinstance(trainer.get("max_epochs"), int) or not re.fullmatch(r"\d+:\d+:\d+:\d+", max_time):
        raise ValueError(
            f"{config} needs trainer.max_epochs (an int) and trainer.max_time ('DD:HH:MM:SS') to scale; "
            f"got {trainer.get('max_epochs')!r} and {trainer.get('max_time')!r}"
        )
    days, hours, minutes, seconds = (int(v) for v in max_time.split(":"))
    total = round(budget * (((days * 24 + hours) * 60 + minutes) * 60 + seconds))
    minutes, seconds = divmod(total, 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    return [
        f"--trainer.max_epochs={max(1, round(budget * trainer['max_epochs']))}",
        f"--trainer.max_time={days:02d}:{hours:02d}:{minutes:02d}:{seconds:02d}",
    ]


def explain_scores(export: Path, out: Path) -> dict[str, Any]:
    """Scores of ``vision-attn explain`` on the whole test split: its ``scores.json`` without the per-image records
    (``summary``: ``{method: {score: mean}}``; ``summary_per_class``: ``{method: {class: {score: mean}}}``)."""
    run([sys.executable, "-m", "vision_attn.cli", "explain", "--checkpoint", str(export), "--dataset",
         "cluttered_fashion_mnist:test", "--method", *METHODS, "--scores", "pointing_game", "energy_pointing",
         "deletion_auc", "--no-overlays", "--batch-size", "250", "--out", str(out)])  # fmt: skip
    result = json.loads((out / "scores.json").read_text())
    return {"summary": result["summary"], "summary_per_class": result.get("summary_per_class", {})}


def figure(export: Path, out: Path) -> Path:
    """The image x method grid of six test images; returns the path of ``grid.png``."""
    run([sys.executable, "-m", "vision_attn.cli", "explain", "--checkpoint", str(export), "--dataset",
         "cluttered_fashion_mnist:test", "--limit", "6", "--method", *METHODS[:-1], "--scores", "energy_pointing",
         "--steps", "0", "--no-overlays", "--out", str(out)])  # fmt: skip
    return out / "grid.png"


def job_table(summary: dict[str, Any], load: dict[str, Any], title: str = "main job (`configs/default.yaml`)") -> str:
    """Markdown table of the main job's figures."""
    test = summary.get("test", {}).get("metrics", {})
    minutes, seconds = divmod(round(summary["process_seconds"]), 60)
    rows = [
        ("wall time, whole process (start-up, training, validation, test, export)", f"**{minutes} min {seconds} s**"),
        ("fit time (training + validation)", f"{summary['fit_seconds']:.0f} s"),
        ("epochs / optimizer steps", f"{summary['epochs']} / {summary['global_step']}"),
        ("training images/s", f"{summary['train_images_per_second']:.0f}"),
        ("parameters", f"{summary['num_parameters'] / 1e6:.2f}M"),
        ("best val/acc1 (400 hold-out images of the train split: selects the checkpoint)",
         f"{100 * summary.get('best_model_score', float('nan')):.1f} %"),
        ("test top-1 / top-5 (1,000 images, once, best checkpoint by val/acc1)",
         f"**{100 * test.get('test/acc1', float('nan')):.1f} %** / {100 * test.get('test/acc5', float('nan')):.1f} %"),
        ("1-minute load average before the run (2 cores)", f"{load['loadavg'][0]}"),
    ]  # fmt: skip
    return "\n".join([f"| {title} | |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows]])


def scores_table(scores: dict[str, dict[str, float]]) -> str:
    """Markdown table of the attention-map scores."""
    lines = ["| method | pointing game ↑ | energy in box ↑ | deletion AUC ↓ |", "|---|---|---|---|"]
    for method in METHODS:
        s = scores.get(method, {})
        lines.append(
            f"| {method} | {s.get('pointing_game', float('nan')):.3f} | {s.get('energy_pointing', float('nan')):.3f} "
            f"| {s.get('deletion_auc', float('nan')):.3f} |"
        )
    return "\n".join(lines)


def per_class_table(per_class: dict[str, dict[str, dict[str, float]]], score: str = "pointing_game") -> str:
    """Markdown table of one score per true class (columns) for the attention methods (rows)."""
    methods = [m for m in METHODS if m in per_class and m != "random"]
    classes = list(per_class[methods[0]]) if methods else []
    lines = [f"| {score.replace('_', ' ')} per true class | " + " | ".join(classes) + " |",
             "|---" * (len(classes) + 1) + "|"]  # fmt: skip
    for method in methods:
        row = per_class[method]
        lines.append(f"| {method} | " + " | ".join(f"{row[c].get(score, float('nan')):.2f}" for c in classes) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the main job, score its maps, draw the figure; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-load", type=float, default=1.0, help="1-minute load average that counts as quiet")
    parser.add_argument("--settle", type=float, default=240.0, help="seconds to wait for a quiet machine")
    parser.add_argument("--allow-load", action="store_true", help="write docs even if the machine was busy")
    parser.add_argument("--write-docs", action="store_true", help="rewrite README/docs tables and the figure")
    parser.add_argument("--budget", type=float, default=1.0, help="scale trainer.max_epochs and max_time by this")
    parser.add_argument("extra", nargs="*", help="more train.py overrides, after --")
    args = parser.parse_args(argv)
    if args.write_docs and args.extra:
        parser.error(f"--write-docs documents the default config; drop the train.py overrides {args.extra}")
    try:
        budget = budget_overrides(args.budget) if args.budget != 1 else []
    except ValueError as error:
        parser.error(str(error))

    load = settle(args.max_load, args.settle)
    print(f"load before the run: {load}", flush=True)
    default_job = not (budget or args.extra)
    summary = main_job(budget + args.extra, RUN_DIR if default_job else OTHER_RUN_DIR)
    export = Path(summary["run_folder"]) / "export"
    scores = explain_scores(export, Path(summary["run_folder"]) / "explain")
    if not default_job:
        what = f"{args.budget:g}x the budget" if budget else "overrides"
        title = f"main job with {what} (`configs/default.yaml {' '.join(budget + args.extra)}`)"
        maps = scores_table(scores["summary"])
        text = f"{job_table(summary, load, title)}\n\nIts maps on the 1,000 test images:\n\n{maps}"
        print(text)
        if not args.write_docs:
            return 0
        made_by = f"\n\nMade by `python benchmarks/main_job.py --budget {args.budget:g} --write-docs`."
        return publish("main_job_budget", text + made_by, [REPO / "docs" / "training.md"], load, args.allow_load)
    grid = figure(export, Path(summary["run_folder"]) / "explain_figure")
    texts = {
        "main_job": job_table(summary, load),
        "explain_scores": scores_table(scores["summary"]),
        "explain_per_class": per_class_table(scores["summary_per_class"]),
    }
    atomic_write_text(RUN_DIR / "bench_main_job.json", json.dumps({"load": load, "summary": summary, "scores": scores}))
    print("\n\n".join(texts.values()))
    if args.write_docs:
        if not docs_allowed(load["quiet"], args.allow_load, f"before the run ({load})"):
            return 1
        made_by = "\n\nMade by `python benchmarks/main_job.py --write-docs`."
        write_block("main_job", texts["main_job"] + made_by, [REPO / "README.md", REPO / "docs" / "training.md"])
        write_block(
            "explain_scores", texts["explain_scores"] + made_by, [REPO / "README.md", REPO / "docs" / "explain.md"]
        )
        write_block("explain_per_class", texts["explain_per_class"] + made_by, [REPO / "docs" / "explain.md"])
        atomic_write_bytes(REPO / "assets" / "explain_grid.png", grid.read_bytes())
        print("updated assets/explain_grid.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
