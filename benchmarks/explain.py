"""Benchmark attention maps: capture + rollout vs a plain forward, and batched explain() vs a per-image loop.

For each model, on one batch of ``--batch-size`` images (random weights, eval mode, no gradients unless the
method needs them):

* ``forward``: plain ``model(x)`` with the model's default (fused) attention;
* ``capture+rollout``: ``AttentionRecorder`` + ``model(x)`` + ``attention_rollout`` — the overhead ratio
  ``capture+rollout / forward`` should be <= 1.3;
* ``explain(method)`` on ``loop_images`` images at once vs a Python loop of one image at a time — the speed-up.

Times are the best of several runs, interleaved so that load changes hit both sides alike. On a shared CPU,
``--threads 1`` gives the steadiest ratios.

Run::

    python benchmarks/explain.py --threads 1 # full: batch 64, best of 5; explain on 16 images
    python benchmarks/explain.py --quick    # 16 images, 3 repeats, loop over 8 images
"""

from __future__ import annotations

import argparse
import platform

import torch
from _timing import interleaved_times  # benchmarks/ is on sys.path when run

import vision_attn
from vision_attn.explain import AttentionRecorder, attention_rollout, explain
from vision_attn.explain.tokens import token_layout

MODELS = (("va_vit_tiny_patch4_32", 32), ("va_vit_tiny_patch16_224", 224))


def bench_model(name: str, size: int, batch_size: int, loop_images: int, repeats: int, device: str) -> list[str]:
    """Return the markdown table rows for one model."""
    torch.manual_seed(0)
    model = vision_attn.create_model(name, num_classes=10).eval().to(device)
    x = torch.randn(batch_size, 3, size, size, device=device)
    num_prefix, grid = token_layout(model, (size, size))

    def forward() -> None:
        with torch.no_grad():
            model(x)

    def capture_rollout() -> None:
        with torch.no_grad(), AttentionRecorder(model) as rec:
            model(x)
        attention_rollout(rec.attentions, num_prefix_tokens=num_prefix, grid_size=grid)

    t_fwd, t_cap = interleaved_times([forward, capture_rollout], repeats, device, reduce=min)
    rows = [
        f"| {name} | {size} | forward / capture+rollout | {batch_size} | {t_fwd * 1e3:.1f} ms | "
        f"{t_cap * 1e3:.1f} ms | overhead x{t_cap / t_fwd:.2f} |"
    ]
    sub = x[:loop_images]
    for method in ("rollout", "gradient_rollout"):
        t_batch, t_loop = interleaved_times(
            [
                lambda m=method: explain(model, sub, method=m),
                lambda m=method: [explain(model, sub[i : i + 1], method=m) for i in range(len(sub))],
            ],
            2,
            device,
            reduce=min,
        )
        rows.append(
            f"| {name} | {size} | explain({method}) batched / loop | {len(sub)} | {t_batch * 1e3:.1f} ms | "
            f"{t_loop * 1e3:.1f} ms | speed-up x{t_loop / t_batch:.1f} |"
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    """Print the benchmark table (markdown); returns 0."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="16 images, 3 repeats, loop over 8 images")
    parser.add_argument("--batch-size", type=int, default=None, help="images per batch (default 64, quick 16)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    batch_size = args.batch_size or (16 if args.quick else 64)
    loop_images = min(batch_size, 8 if args.quick else 16)
    repeats = 3 if args.quick else 5
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    print(f"device: {args.device} ({device_name}), torch {torch.__version__}, threads {torch.get_num_threads()}")
    print("| model | img | measure | images | first | second | ratio |")
    print("|---|---|---|---|---|---|---|")
    for name, size in MODELS:
        for row in bench_model(name, size, batch_size, loop_images, repeats, args.device):
            print(row, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
