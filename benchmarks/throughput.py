"""Training and inference images/s of vision_attn's ViT against timm's VisionTransformer (same config, same process).

Runs alternate between the two models and report medians, so machine noise hits both alike; the ratio
(ours / timm) is the number to read. Usage::

    python benchmarks/throughput.py            # full settings
    python benchmarks/throughput.py --quick    # fewer repeats
    python benchmarks/throughput.py --write-docs   # also rewrite the table in docs/benchmarks.md (quiet machine only)
"""

from __future__ import annotations

import argparse
import statistics

import torch
from _machine import REPO, publish, settle  # benchmarks/ is on sys.path when run
from _timing import time_inference, time_training  # benchmarks/ is on sys.path when run
from timm.models.vision_transformer import VisionTransformer as TimmViT

from vision_attn.models import VisionTransformer

CONFIGS = {
    "32px/patch4/dim192/depth6": dict(
        img_size=32, patch_size=4, embed_dim=192, depth=6, num_heads=3, mlp_ratio=2.0, num_classes=10
    ),
    "224px/patch16 tiny": dict(img_size=224, patch_size=16, embed_dim=192, depth=12, num_heads=3, num_classes=1000),
}
BATCH = {"32px/patch4/dim192/depth6": (256, 64), "224px/patch16 tiny": (32, 16)}  # (inference, training)


def bench(name: str, cfg: dict, repeats: int) -> dict[str, float]:
    torch.manual_seed(0)
    timm_model, ours = TimmViT(**cfg), VisionTransformer(**cfg)
    ours.load_state_dict(timm_model.state_dict())
    infer_bs, train_bs = BATCH[name]
    size = cfg["img_size"]
    results = {}
    for mode, bs in (("inference", infer_bs), ("training", train_bs)):
        x = torch.randn(bs, 3, size, size)
        opts = {id(m): torch.optim.SGD(m.parameters(), lr=1e-4) for m in (timm_model, ours)}
        times: dict[str, list[float]] = {"timm": [], "ours": []}
        for i in range(repeats + 2):  # the first two rounds warm up
            for label, model in (
                (("timm", timm_model), ("ours", ours)) if i % 2 else (("ours", ours), ("timm", timm_model))
            ):
                t = time_inference(model, x) if mode == "inference" else time_training(model, x, opts[id(model)])
                if i >= 2:
                    times[label].append(t)
        timm_ips = bs / statistics.median(times["timm"])
        ours_ips = bs / statistics.median(times["ours"])
        results[mode] = (timm_ips, ours_ips)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (noisier)")
    parser.add_argument("--max-load", type=float, default=1.0, help="1-minute load average that counts as quiet")
    parser.add_argument("--settle", type=float, default=120.0, help="seconds to wait for a quiet machine")
    parser.add_argument("--write-docs", action="store_true", help="rewrite the table in docs/benchmarks.md")
    args = parser.parse_args()
    repeats = 5 if args.quick else 15
    load = settle(args.max_load, args.settle)
    lines = [
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {repeats} alternating runs, "
        f"same weights in both models; 1-minute load average before: {load['loadavg'][0]}",
        "",
        "| config | mode | timm img/s | vision_attn img/s | ratio (ours/timm) |",
        "|---|---|---:|---:|---:|",
    ]
    print("\n".join(lines), flush=True)
    for name, cfg in CONFIGS.items():
        for mode, (timm_ips, ours_ips) in bench(name, cfg, repeats).items():
            lines.append(f"| {name} | {mode} | {timm_ips:.1f} | {ours_ips:.1f} | {ours_ips / timm_ips:.3f} |")
            print(lines[-1], flush=True)
    if args.write_docs:
        command = "python benchmarks/throughput.py --write-docs" + (" --quick" if args.quick else "")
        return publish(
            "throughput", "\n".join(lines) + f"\n\nMade by `{command}`.", [REPO / "docs" / "benchmarks.md"], load
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
