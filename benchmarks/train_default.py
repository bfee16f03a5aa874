"""The default model against a plain ViT, timm's ResNet-18 and our attention ResNet-18s, same data, same time box.

Every model is trained by the same pipeline (``python train.py fit --config configs/default.yaml``, only the network
and the run folder changed), one after the other in one invocation, each for the same wall-clock box with the cosine
run over that time (``--model.schedule time``). Each run ends with the test-split evaluation of its best checkpoint
(selected on the validation hold-out of the train split). For the attention models the script then scores attention
maps on the embedded test boxes: attention rollout and gradient rollout for the token models, the modules' own
spatial maps (``spatial``) for the attention ResNets that have them (SE and ECA have channel gates only). Usage::

    python benchmarks/train_default.py                              # every model, 4-minute box each (~50 minutes)
    python benchmarks/train_default.py --models default resnet18    # a subset
    python benchmarks/train_default.py --max-time 00:00:00:30 --allow-load   # a quick look (numbers not for docs)
    python benchmarks/train_default.py --write-docs                 # also rewrite the tables in README/docs

Honest timing needs an idle machine: before each run the script waits (up to ``--settle`` seconds) for the machine to
be quiet — the 1-minute load average below ``--max-load`` and under 15 % CPU use over 5 seconds — and records
``os.getloadavg()``. If any run started on a busy machine, ``--write-docs`` refuses to write (``--allow-load``
overrides, for experiments only). Results: ``runs/bench_train_default.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _machine import REPO, docs_allowed, settle, write_block  # benchmarks/ is on sys.path when run
from _timing import timed

from vision_attn._io import atomic_write_text

DOC_FILES = [REPO / "README.md", REPO / "docs" / "training.md"]
RESNET_ATTN = ("se", "eca", "cbam", "coord", "nonlocal", "aa", "bot")
TOKEN_MAPS = ("rollout", "gradient_rollout")
# name -> (train.py overrides, attention-map methods scored on the test boxes)
MODELS: dict[str, tuple[list[str], tuple[str, ...]]] = {
    "default": ([], TOKEN_MAPS),
    "vit_plain": (["--model.model=va_vit_tiny_patch8_64",
                   "--model.model_args={embed_dim: 128, depth: 4, num_heads: 4}"], TOKEN_MAPS),
    "resnet18": (["--model.model=resnet18", "--model.model_args={}"], ()),
    "va_resnet18": (["--model.model=va_resnet18_224", "--model.model_args={}"], ()),
    **{
        f"va_resnet18_{attn}": (
            [f"--model.model=va_resnet18_{attn}_224", "--model.model_args={}"],
            () if attn in ("se", "eca") else ("spatial",),
        )
        for attn in RESNET_ATTN
    },
}  # fmt: skip
DESCRIPTIONS = {
    "default": "default model (configs/default.yaml)",
    "vit_plain": "plain ViT (`va_vit_tiny_patch8_64`, dim 128, depth 4)",
    "resnet18": "timm `resnet18`",
    "va_resnet18": "`va_resnet18_224` (plain, our baseline)",
    **{f"va_resnet18_{a}": f"`va_resnet18_{a}_224`" for a in RESNET_ATTN},
}


def _summary_for(run_root: Path, since: float) -> dict[str, Any]:
    found = [p for p in run_root.rglob("summary.json") if p.stat().st_mtime >= since]
    if not found:
        raise RuntimeError(f"no summary.json written under {run_root}")
    return json.loads(max(found, key=lambda p: p.stat().st_mtime).read_text())


def train(model: str, max_time: str, extra: list[str], runs: Path) -> dict[str, Any]:
    """Train ``model`` with the default config in a fresh process, in a new run folder under ``runs/bench_MODEL``;
    returns its summary plus the process wall time."""
    run_root = runs / f"bench_{model}"
    overrides, _ = MODELS[model]
    cmd = [
        sys.executable, "train.py", "fit", "--config", "configs/default.yaml", *overrides,
        "--model.schedule=time", f"--trainer.max_time={max_time}", "--trainer.max_epochs=1000",
        f"--run_dir={run_root}", "--trainer.enable_progress_bar=false", "--trainer.logger=false",  # version_K/
        *extra,
    ]  # fmt: skip
    print("$", " ".join(cmd), flush=True)
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    start_wall = time.time()
    seconds = timed(lambda: subprocess.run(cmd, cwd=REPO, check=True, env=env))
    summary = _summary_for(run_root, start_wall)
    summary["process_seconds"] = round(seconds, 1)
    return summary


def map_scores(checkpoint: str, methods: tuple[str, ...]) -> dict[str, dict[str, float]]:
    """Pointing game and energy in box of each method's maps on the 1,000 embedded test images, for the network of a
    training checkpoint (gradient methods explain the predicted class); ``{method: scores}``. The network and the
    test split are loaded once for all methods."""
    import torch

    from vision_attn import load_trained
    from vision_attn.data import ClutteredFashionMNIST, ImageDataModule
    from vision_attn.explain import explain
    from vision_attn.explain.metrics import energy_pointing, pointing_game

    if not methods:
        return {}
    net, _ = load_trained(checkpoint)  # the EMA weights when the run kept them, as the export
    data = ImageDataModule(num_workers=0, eval_batch_size=100)
    data.setup("test")
    boxes = torch.as_tensor(ClutteredFashionMNIST("test").boxes)
    pointing: dict[str, list[torch.Tensor]] = {m: [] for m in methods}
    energy: dict[str, list[torch.Tensor]] = {m: [] for m in methods}
    for i, (images, _) in enumerate(data.test_dataloader()):
        rows = boxes[i * 100 : i * 100 + len(images)]
        for method in methods:
            maps = explain(net, images, method)
            pointing[method].append(pointing_game(maps, rows))
            energy[method].append(energy_pointing(maps, rows))
    return {m: {"pointing_game": round(torch.cat(pointing[m]).mean().item(), 3),
                "energy_in_box": round(torch.cat(energy[m]).mean().item(), 3)} for m in methods}  # fmt: skip


def table(results: list[dict[str, Any]], max_time: str) -> str:
    """The markdown table of ``results`` (one row per model)."""
    lines = [
        f"| model (time box {max_time}, one after the other) | params | test top-1 | train images/s | epochs "
        "| map method | pointing game | energy in box | load before |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        test = r["test_acc1"]
        maps = r.get("maps") or {}
        cells = [" / ".join(str(v) for v in column) or "—" for column in (
            list(maps), [m["pointing_game"] for m in maps.values()], [m["energy_in_box"] for m in maps.values()]
        )]  # fmt: skip
        lines.append(
            f"| {DESCRIPTIONS[r['model']]} | {r['params'] / 1e6:.2f}M | **{100 * test:.1f} %** "
            f"| {r['train_images_per_second']:.0f} | {r['epochs']} | {' | '.join(cells)} | {r['load']['loadavg'][0]} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the comparison; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--max-time", default="00:00:04:00", help="time box per model (DD:HH:MM:SS)")
    parser.add_argument("--max-load", type=float, default=1.0, help="1-minute load average that counts as quiet")
    parser.add_argument("--settle", type=float, default=240.0, help="seconds to wait for a quiet machine")
    parser.add_argument("--allow-load", action="store_true", help="write docs even if a run started on a busy machine")
    parser.add_argument("--write-docs", action="store_true", help="rewrite the table in README.md and docs/training.md")
    parser.add_argument("--runs", type=Path, default=REPO / "runs", help="where the run folders and the JSON go")
    parser.add_argument("extra", nargs="*", help="more train.py overrides, after --")
    args = parser.parse_args(argv)

    results = []
    for model in args.models:
        load = settle(args.max_load, args.settle)
        print(f"[{model}] load before the run: {load}", flush=True)
        summary = train(model, args.max_time, args.extra, args.runs.resolve())
        methods = MODELS[model][1]
        test = summary.get("test") or {}
        result = {
            "model": model,
            "load": load,
            "test_acc1": test.get("metrics", {}).get("test/acc1", float("nan")),
            "tested_checkpoint": test.get("checkpoint"),
            "params": summary.get("num_parameters", 0),
            **{k: summary[k] for k in ("epochs", "global_step", "train_images_per_second", "fit_seconds")},
            "process_seconds": summary["process_seconds"],
        }
        if summary.get("best_model_path"):
            result["maps"] = map_scores(summary["best_model_path"], methods)
        results.append(result)
        print(json.dumps(result), flush=True)

    out = args.runs / "bench_train_default.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(results, indent=2) + "\n")
    text = table(results, args.max_time)
    print("\n" + text + f"\n\n(written to {out})")
    if args.write_docs:
        busy = [r["model"] for r in results if not r["load"]["quiet"]]
        if not docs_allowed(not busy, args.allow_load, f"before {busy} (see 'load')"):
            return 1
        command = "python benchmarks/train_default.py --write-docs" + (
            f" --max-time {args.max_time}" if args.max_time != "00:00:04:00" else ""
        )
        note = "test split: 1,000 images, evaluated once per run, on the checkpoint selected on the validation hold-out"
        write_block("train_default", f"{text}\n\nMade by `{command}` ({note}).", DOC_FILES)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
