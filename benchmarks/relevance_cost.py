"""Benchmark the relevance methods against a plain forward of the same batch, in one process.

For each model (random weights, eval mode): a plain ``model(x)`` under ``torch.no_grad()`` with the model's default
(fused) attention, and ``attnlrp`` / ``transformer_attribution`` (its default alpha=1, beta=0 linear rule, and
``linear_rule='gradient'``) on the same batch. Runs are interleaved (forward, method, forward, method, ...) so that
load changes hit both sides alike; each figure is the median of ``--repeats`` runs, and the ratio is method / forward
(issue 22's target: at most 3 plain forwards per method).

Models: the default ``va_vitc2_seq_tiny_patch8_64`` (1 channel, 64 px, batch 64) and timm's ViT-S/16 at 224 px
(batch 8). On a shared CPU, ``--threads 1`` gives the steadiest ratios.

Run::

    python benchmarks/relevance_cost.py --threads 1   # 7 repeats
    python benchmarks/relevance_cost.py --quick       # 3 repeats, smaller batches
    python benchmarks/relevance_cost.py --write-docs  # on a quiet machine: also the block in docs/explain.md
"""

from __future__ import annotations

import argparse
import platform
from collections.abc import Callable
from functools import partial

import timm
import torch
from _machine import REPO, publish, settle  # benchmarks/ is on sys.path when run
from _timing import interleaved_times
from torch import nn

import vision_attn
from vision_attn.explain.relevance import attnlrp, transformer_attribution

METHODS: dict[str, Callable[..., torch.Tensor]] = {
    "attnlrp": attnlrp,
    "transformer_attribution": transformer_attribution,
    "transformer_attribution (linear_rule='gradient')": partial(transformer_attribution, linear_rule="gradient"),
}


def _models(quick: bool) -> list[tuple[str, Callable[[], nn.Module], tuple[int, int, int], int]]:
    """``(label, factory, input shape, batch size)`` per benchmarked model."""
    return [
        (
            "va_vitc2_seq_tiny_patch8_64",
            lambda: vision_attn.create_model("va_vitc2_seq_tiny_patch8_64", in_chans=1),
            (1, 64, 64),
            16 if quick else 64,
        ),
        (
            "timm vit_small_patch16_224",
            lambda: timm.create_model("vit_small_patch16_224"),
            (3, 224, 224),
            2 if quick else 8,
        ),
    ]


def bench(label: str, model: nn.Module, x: torch.Tensor, repeats: int) -> list[str]:
    """Markdown rows ``| model | images | method | forward | method | ratio |`` for one model."""
    targets = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)

    def forward() -> None:
        with torch.no_grad():
            model(x)

    rows = []
    for name, method in METHODS.items():
        t_forward, t_method = interleaved_times([forward, lambda m=method: m(model, x, targets)], repeats, x.device)
        rows.append(
            f"| {label} | {x.shape[0]} x {'x'.join(map(str, x.shape[1:]))} | {name} | {t_forward * 1e3:.1f} ms | "
            f"{t_method * 1e3:.1f} ms | x{t_method / t_forward:.2f} |"
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    """Print the benchmark table (markdown); returns 0."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 repeats, batches of 16 and 2")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 7, quick 3)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--write-docs", action="store_true", help="rewrite the relevance_cost block (quiet machine)")
    parser.add_argument("--allow-load", action="store_true", help="write docs even if the machine was busy")
    args = parser.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (3 if args.quick else 7)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    load = settle(1.0, 120.0 if args.write_docs else 0.0)
    header = (f"device: {args.device} ({device_name}), torch {torch.__version__}, threads {torch.get_num_threads()}; "
              f"medians of {repeats} interleaved runs, random weights, eval mode; ratio = method / plain forward; "
              f"1-minute load average before: {load['loadavg'][0]}")  # fmt: skip
    lines = ["| model | batch | method | forward | method | ratio |", "|---|---|---|---|---|---|"]
    print(header + "\n")
    print("\n".join(lines))
    for label, factory, shape, batch_size in _models(args.quick):
        torch.manual_seed(0)
        model = factory().eval().to(args.device)
        x = torch.randn(batch_size, *shape, device=args.device)
        for row in bench(label, model, x, repeats):
            print(row, flush=True)
            lines.append(row)
    if args.write_docs:
        made_by = f"\n\n{header}. Made by `python benchmarks/relevance_cost.py --write-docs`."
        return publish("relevance_cost", "\n".join(lines) + made_by, [REPO / "docs" / "explain.md"], load,
                       args.allow_load)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
