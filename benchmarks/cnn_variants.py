"""Params, MACs and images/s of every ``va_resnet*`` attention variant relative to plain ResNet of the same depth.

For each input size (32px: small stem; 224px: ImageNet stem) and depth (18, 50), every attention variant is
timed alternately with the plain ResNet of that size and depth in this process (median of the repeats), so
machine noise hits both alike; the ratios (variant / plain) are the numbers to read. MACs are those of convs and
matmuls (``torch.utils.flop_counter``, FLOPs / 2) for one image. Usage::

    python benchmarks/cnn_variants.py            # full settings
    python benchmarks/cnn_variants.py --quick    # small batches, few repeats (noisier)
    python benchmarks/cnn_variants.py --quick --threads 1    # steadier on a shared CPU
"""

from __future__ import annotations

import argparse
import statistics

import torch
from _timing import time_inference, time_training  # benchmarks/ is on sys.path when run
from torch.utils.flop_counter import FlopCounterMode

import vision_attn
from vision_attn.models.resnet_attn import ATTN_LAYERS

SIZES = (32, 224)
DEPTHS = (18, 50)
BATCH = {False: {32: (64, 32), 224: (16, 8)}, True: {32: (8, 8), 224: (2, 2)}}  # quick -> size -> (infer, train)


def model_name(depth: int, attn_layer: str, size: int) -> str:
    return f"va_resnet{depth}{'' if attn_layer == 'none' else '_' + attn_layer}_{size}"


def count_macs(model: torch.nn.Module, size: int) -> float:
    """Multiply-accumulates of one ``size`` x ``size`` image (convs and matmuls)."""
    model.eval()
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model(torch.randn(1, 3, size, size))
    return counter.get_total_flops() / 2


def images_per_second(
    models: dict[str, torch.nn.Module], size: int, batch: tuple[int, int], repeats: int
) -> dict[str, dict[str, float]]:
    """Return ``{mode: {label: images/s}}`` for ``models`` timed alternately (the first two rounds warm up)."""
    results: dict[str, dict[str, float]] = {}
    for mode, bs in zip(("inference", "training"), batch, strict=True):
        x = torch.randn(bs, 3, size, size)
        opts = {label: torch.optim.SGD(m.parameters(), lr=1e-4) for label, m in models.items()}
        times: dict[str, list[float]] = {label: [] for label in models}
        for i in range(repeats + 2):
            order = list(models.items()) if i % 2 else list(models.items())[::-1]
            for label, model in order:
                t = time_inference(model, x) if mode == "inference" else time_training(model, x, opts[label])
                if i >= 2:
                    times[label].append(t)
        results[mode] = {label: bs / statistics.median(ts) for label, ts in times.items()}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small batches and 5 repeats (noisier)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    repeats = 5 if args.quick else 10
    print(
        f"torch {torch.__version__}, CPU, {torch.get_num_threads()} threads; median of {repeats} alternating runs; "
        f"batch (inference, training): {BATCH[args.quick]}"
    )
    print("| input | model | params (M) | GMACs | infer img/s | infer ratio | train img/s | train ratio |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for size in SIZES:
        for depth in DEPTHS:
            torch.manual_seed(0)
            plain = vision_attn.create_model(model_name(depth, "none", size))
            for attn_layer in ATTN_LAYERS:
                name = model_name(depth, attn_layer, size)
                model = plain if attn_layer == "none" else vision_attn.create_model(name)
                params = sum(p.numel() for p in model.parameters()) / 1e6
                gmacs = count_macs(model, size) / 1e9
                ips = images_per_second({"plain": plain, "variant": model}, size, BATCH[args.quick][size], repeats)
                inf, train = ips["inference"], ips["training"]
                print(
                    f"| {size} | {name} | {params:.2f} | {gmacs:.3f} | {inf['variant']:.1f} | "
                    f"{inf['variant'] / inf['plain']:.2f} | {train['variant']:.1f} | "
                    f"{train['variant'] / train['plain']:.2f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
