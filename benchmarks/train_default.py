"""The default job vs timm's ResNet-18 in the same time budget on the same data (docs/training.md).

Runs ``python train.py fit --config configs/default.yaml`` once per model, changing only the network (and the
run folder), one after the other, and prints a table of final validation accuracy, wall time and images/s::

    python benchmarks/train_default.py                      # the default ViT, then resnet18 (~20 minutes)
    python benchmarks/train_default.py --models resnet18    # one of them
    python benchmarks/train_default.py --max-time 00:00:01:00   # a quicker look

Both runs are time-boxed: ``--trainer.max_time 00:00:09:00`` with the cosine schedule running over that time
(``--model.schedule time``, ``--trainer.max_epochs 100`` as an upper bound), so both networks get the same
wall-clock budget and both anneal fully (the committed default config itself runs 30 epochs on the step
schedule). timm's ``resnet18`` is trained from random init, adapted to the input only through
``in_chans=1, num_classes=10`` (standard stem: 64x64 inputs end as a 2x2 feature map). Results go to
``runs/bench_<model>/version_K/`` and ``runs/bench_train_default.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The comparison is a time box: the same wall-clock budget for both, the cosine run over that time
TIME_BOX = ["--model.schedule=time", "--trainer.max_time=00:00:09:00", "--trainer.max_epochs=100"]
MODELS = {
    "default": [],  # the config's own small ViT
    "resnet18": ["--model.model=resnet18", "--model.model_args={}"],
}


def run(model: str, max_time: str | None, extra: list[str]) -> dict:
    """Train ``model`` with the default config in a fresh process; returns its summary plus the process wall time."""
    name = f"bench_{model}"
    cmd = [sys.executable, "train.py", "fit", "--config", "configs/default.yaml", f"--run_dir=runs/{name}", *TIME_BOX]
    cmd += MODELS[model]
    if max_time:
        cmd.append(f"--trainer.max_time={max_time}")
    cmd += extra
    print("$", " ".join(cmd), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, check=True, env={**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"})
    wall = time.perf_counter() - start
    log_dirs = sorted((REPO / "runs" / name).glob("version_*"), key=lambda p: p.stat().st_mtime)
    summary = json.loads((log_dirs[-1] / "summary.json").read_text())
    summary["process_seconds"] = round(wall, 1)
    summary["model"] = model
    return summary


def main(argv: list[str] | None = None) -> int:
    """Run the comparison; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--max-time", default=None, help="override trainer.max_time (DD:HH:MM:SS)")
    parser.add_argument("extra", nargs="*", help="more train.py overrides, after --")
    args = parser.parse_args(argv)
    results = [run(model, args.max_time, args.extra) for model in args.models]
    out = REPO / "runs" / "bench_train_default.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(
        "\n| model | val acc@1 | epochs | steps | train images/s | fit s | process s |\n|---|---|---|---|---|---|---|"
    )
    for r in results:
        print(f"| {r['model']} | {r['metrics'].get('val/acc1', float('nan')):.4f} | {r['epochs']} | {r['global_step']} "
              f"| {r['train_images_per_second']} | {r['fit_seconds']} | {r['process_seconds']} |")  # fmt: skip
    print(f"(written to {out})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
