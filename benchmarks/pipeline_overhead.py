"""What the training pipeline costs over a bare training loop of the same model on the same data (issue 10, item 3).

Both train the network of ``configs/default.yaml`` for ``--epochs`` epochs from the same DataModule's train loader:

* bare: forward, the recipe's loss (label-smoothed cross-entropy), backward, gradient clipping, AdamW, per-step
  cosine LR — nothing else;
* pipeline: ``python train.py fit --config configs/default.yaml`` in this process (Lightning loop, metrics, logging,
  validation on the hold-out each epoch, attention overlays, checkpoints every N steps and each epoch, export),
  timed by its ``summary.json`` ``fit_seconds``; the test after fit is left out (it is not part of training).

They alternate (bare, pipeline, bare, pipeline, ...). This VM's speed drifts by +-15 % over minutes, so the number to
read is the median over rounds of each round's pipeline / bare ratio (the two runs of a round are a minute apart and
see the same machine); the ratio of the medians and the training speed of both (which splits the cost into per-step
overhead and the validation passes) are printed too. Target: <= 1.10. Usage::

    python benchmarks/pipeline_overhead.py                 # 2 epochs each, 3 rounds
    python benchmarks/pipeline_overhead.py --epochs 1 --rounds 1
    python benchmarks/pipeline_overhead.py --write-docs    # also rewrite the table in docs/training.md

``--write-docs`` refuses when the machine was not quiet before the first round (``--allow-load`` overrides).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
from pathlib import Path

import torch
import yaml
from _machine import REPO, publish, settle  # benchmarks/ is on sys.path when run
from _timing import timed

from vision_attn.data import ImageDataModule
from vision_attn.training import ImageClassifier
from vision_attn.training.cli import main as train_main
from vision_attn.training.loss import classification_loss

CONFIG = REPO / "configs" / "default.yaml"


def bare_run(epochs: int) -> dict[str, float]:
    """``epochs`` epochs of the bare loop on the default config's model and data: ``{'seconds', 'images'}``."""
    cfg = yaml.safe_load(CONFIG.read_text())
    torch.manual_seed(cfg.get("seed_everything", 0))
    data = ImageDataModule(**cfg["data"])
    data.setup("fit")
    model = cfg["model"]
    module = ImageClassifier(**model, num_classes=data.num_classes, in_chans=data.in_chans, img_size=data.img_size)
    net = module.net.train()
    optimizer = module.configure_optimizers()["optimizer"]  # the recipe's (fused) AdamW and parameter groups
    loader = data.train_dataloader()
    total = epochs * len(loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
    clip = cfg.get("trainer", {}).get("gradient_clip_val") or 0.0
    smoothing = model.get("label_smoothing", 0.1)
    images = 0

    def train() -> None:
        nonlocal images
        for epoch in range(epochs):
            loader.sampler.set_epoch(epoch)
            for batch, targets in loader:
                loss = classification_loss(net(batch), targets, smoothing)  # the recipe's loss (context outliers too)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if clip:
                    torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
                optimizer.step()
                scheduler.step()
                images += batch.shape[0]

    seconds = timed(train, next(net.parameters()).device)
    return {"seconds": seconds, "images": images}


def pipeline_run(epochs: int) -> dict[str, float]:
    """``train.py fit --config configs/default.yaml`` for ``epochs`` epochs (no test after fit), from its
    ``summary.json``: ``{'seconds'`` (``fit_seconds``), ``'images'``, ``'images_per_second'`` (training steps only:
    data, forward, backward, optimizer, logging and step checkpoints, not the validation passes)``}``."""
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "fit", "--config", str(CONFIG), f"--trainer.max_epochs={epochs}", "--test_after_fit=false",
            "--trainer.enable_progress_bar=false", f"--run_dir={tmp}",
        ]  # fmt: skip
        if train_main(args) != 0:
            raise RuntimeError("train.py fit failed")
        summary = json.loads(next(Path(tmp).rglob("summary.json")).read_text())
        return {
            "seconds": float(summary["fit_seconds"]),
            "images": float(summary["train_images"]),
            "images_per_second": float(summary["train_images_per_second"]),
        }


def table(epochs: int, bare: list[dict[str, float]], pipe: list[dict[str, float]]) -> str:
    """Markdown table of alternating rounds: medians, training speed, and the per-round (paired) ratio."""
    b = statistics.median(r["seconds"] for r in bare)
    p = statistics.median(r["seconds"] for r in pipe)
    b_ips = statistics.median(r["images"] / r["seconds"] for r in bare)
    p_ips = statistics.median(r["images_per_second"] for r in pipe)
    paired = [q["seconds"] / r["seconds"] for r, q in zip(bare, pipe, strict=True)]
    spread = f"{min(paired):.2f}–{max(paired):.2f}"
    return "\n".join([
        f"| {epochs} epochs of the default config, {len(bare)} alternating rounds | bare loop "
        "| pipeline (`train.py fit`) | pipeline / bare |",
        "|---|---|---|---|",
        f"| seconds (median) | {b:.1f} | {p:.1f} | {p / b:.2f} |",
        f"| training images/s (median; pipeline: training steps only, no validation) | {b_ips:.0f} | {p_ips:.0f} "
        f"| {b_ips / p_ips:.2f} |",
        f"| seconds, pipeline / bare of the same round (median, range) | | | **{statistics.median(paired):.2f}** "
        f"({spread}) |",
    ])  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Run the comparison and print the medians and the ratios; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-load", type=float, default=1.0, help="1-minute load average that counts as quiet")
    parser.add_argument("--settle", type=float, default=240.0, help="seconds to wait for a quiet machine")
    parser.add_argument("--allow-load", action="store_true", help="write docs even if the machine was busy")
    parser.add_argument("--write-docs", action="store_true", help="rewrite the table in docs/training.md")
    args = parser.parse_args(argv)
    load = settle(args.max_load, args.settle)
    print(f"load before the first round: {load}", flush=True)
    bare, pipe = [], []
    for round_ in range(args.rounds):
        bare.append(bare_run(args.epochs))
        pipe.append(pipeline_run(args.epochs))
        print(
            f"round {round_ + 1}: bare {bare[-1]['seconds']:.1f} s, pipeline {pipe[-1]['seconds']:.1f} s "
            f"({pipe[-1]['seconds'] / bare[-1]['seconds']:.2f})",
            flush=True,
        )
    text = table(args.epochs, bare, pipe)
    print("\n" + text)
    if args.write_docs:
        made_by = (
            f"\n\nMade by `python benchmarks/pipeline_overhead.py --write-docs --rounds {args.rounds}` "
            f"(load before: {load['loadavg'][0]})."
        )
        return publish("pipeline_overhead", text + made_by, [REPO / "docs" / "training.md"], load, args.allow_load)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
