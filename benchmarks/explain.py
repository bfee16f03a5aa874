"""Benchmark attention maps: the targets of the rollout family at high resolution, capture + rollout vs a plain
forward, and batched explain() vs a per-image loop.

**Targets** (issue 28; same process, a batch of 2, vs a plain forward of the same batch with the model's default
attention): DINOv2-S with registers at its native 518 px (1,369 patch tokens): ``explain(rollout)`` <= 1.3x and
``explain(gradient_rollout)`` <= 3x; Swin-T at 224 px: ``explain(rollout)`` <= 1.5x. Each is also measured for its
peak memory above the forward's, in a fresh process (the peak resident size on CPU, ``max_memory_allocated`` on
CUDA). Beside gradient rollout, the row ``gradient only (no map)`` (:func:`gradient_floor`) is what any attention
gradient costs before a map is made: a forward pass with autograd and the backward pass down to the first
attention module's output, fused kernels only.

For each model, on one batch of ``--batch-size`` images (random weights, eval mode, no gradients unless the
method needs them):

* ``forward``: plain ``model(x)`` with the model's default (fused) attention;
* ``capture+rollout``: ``AttentionRecorder`` + ``model(x)`` + ``attention_rollout`` — the overhead ratio
  ``capture+rollout / forward`` should be <= 1.3;
* ``explain(method)`` on ``loop_images`` images at once vs a Python loop of one image at a time — the speed-up.

Times are the best of several runs, interleaved so that load changes hit both sides alike; each target method is
interleaved with the forward alone, and its ratio is the median over 9 rounds of each round's ratio (method / forward
of the same round; the range in brackets). On a shared CPU, ``--threads 1`` gives the steadiest ratios.

After the targets, one attention call of the DINOv2 target is timed alone: its fused backward, ``attention_backward``
(the gradients and gradient rollout's map) and the five matrix products of ``attention_backward`` without its
element-wise passes (:func:`blockwise_matmuls`), each against the fused backward.

Run::

    python benchmarks/explain.py --threads 2 # full: the targets, then batch 64, best of 5; explain on 16 images
    python benchmarks/explain.py --quick    # the targets at 224 px (DINOv2: 256 tokens), 16 images, 3 repeats
    python benchmarks/explain.py --threads 2 --write-docs   # also rewrites the explain_targets and
                                                            # explain_attention_layer blocks of docs/explain.md
"""

from __future__ import annotations

import argparse
import platform
import resource
import statistics
import subprocess
import sys
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from _timing import interleaved_times  # benchmarks/ is on sys.path when run

import vision_attn
from vision_attn.explain import AttentionRecorder, attention_rollout, explain
from vision_attn.explain.tokens import token_layout

MODELS = (("va_vit_tiny_patch4_32", 32), ("va_vit_tiny_patch16_224", 224))
FLOOR = "gradient only (no map)"  # the reference row of gradient_floor
REPO = Path(__file__).resolve().parents[1]
# (timm model, image size, quick image size, {method: target ratio to a plain forward})
TARGETS = {
    "DINOv2-S reg4": ("vit_small_patch14_reg4_dinov2", 518, 224, {"rollout": 1.3, "gradient_rollout": 3.0}),
    "Swin-T": ("swin_tiny_patch4_window7_224", 224, 224, {"rollout": 1.5, "gradient_rollout": None}),
}


def _target_model(key: str, size: int, device: str) -> torch.nn.Module:
    torch.manual_seed(0)
    name = TARGETS[key][0]
    return timm.create_model(name, img_size=size, num_classes=10).eval().to(device)


def gradient_floor(model: torch.nn.Module, x: torch.Tensor) -> None:
    """What any gradient of the attention costs before a map is made: a forward pass with autograd (the model's
    fused attention) and the backward pass of the predicted logits down to the first attention module's output (where
    gradient rollout's backward stops too)."""
    first = next(m for m in model.modules() if hasattr(m, "fused_attn"))
    outputs: list[torch.Tensor] = []
    handle = first.register_forward_hook(lambda module, args, output: outputs.append(output))
    try:
        with torch.enable_grad():
            logits = model(x.detach().requires_grad_(True))
            score = logits.gather(1, logits.argmax(dim=1, keepdim=True)).sum()
            torch.autograd.grad(score, outputs[0])
    finally:
        handle.remove()


# one attention call of the DINOv2 target: batch, heads, tokens (1,369 patches + class + 4 registers), head dim
LAYER = (2, 6, 1374, 64)


def blockwise_matmuls(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad_out: torch.Tensor, block: int = 128
) -> None:
    """Only the five matrix products per block of query rows that ``attention_backward`` makes (scores, ∇A, ∇v, ∇q,
    ∇k), in its layout and buffers, without any of its element-wise passes (the values are meaningless): the least a
    backward pass built from separate PyTorch operations in this layout can cost."""
    x, length = q.shape[0] * q.shape[1], q.shape[2]
    queries, keys, values, grads = (t.reshape(x, t.shape[2], t.shape[3]) for t in (q, k, v, grad_out))
    grad_q, grad_k, grad_v = torch.empty_like(queries), torch.empty_like(keys), torch.empty_like(values)
    scores = weighted = q.new_empty(0, 0, 0)
    for start in range(0, length, block):
        rows = slice(start, min(start + block, length))
        if scores.shape[1] != rows.stop - start:
            scores, weighted = (q.new_empty(x, rows.stop - start, keys.shape[1]) for _ in range(2))
        torch.bmm(queries[:, rows], keys.transpose(1, 2), out=scores)
        torch.bmm(grads[:, rows], values.transpose(1, 2), out=weighted)
        accumulate = torch.bmm if start == 0 else lambda a, b, out: out.baddbmm_(a, b)
        accumulate(scores.transpose(1, 2), grads[:, rows], out=grad_v)
        torch.bmm(weighted, keys, out=grad_q[:, rows])
        accumulate(weighted.transpose(1, 2), queries[:, rows], out=grad_k)


def bench_attention_layer(device: str, repeats: int, shape: tuple[int, int, int, int] = LAYER) -> list[str]:
    """Rows of the one-layer table: the backward pass of one attention call (after its fused forward) done by the
    fused kernel, by ``attention_backward`` (which also gives gradient rollout's map) and by its matrix products
    alone, each against the fused backward (best of ``repeats``, interleaved)."""
    from vision_attn.explain.capture import attention_backward

    torch.manual_seed(0)
    q, k, v, grad_out = (torch.randn(shape, device=device) for _ in range(4))
    out = F.scaled_dot_product_attention(q, k, v)

    def forward() -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v)

    def fused() -> None:
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
            torch.autograd.grad(F.scaled_dot_product_attention(*leaves), leaves, grad_out)

    runs = {
        "fused forward": forward,
        "fused forward + its backward (∇q, ∇k, ∇v)": fused,
        "fused forward + `attention_backward` (∇q, ∇k, ∇v and the map)": lambda: (
            forward(),
            attention_backward(q, k, v, out, grad_out),
        ),
        "fused forward + the five matrix products of `attention_backward` alone": lambda: (
            forward(),
            blockwise_matmuls(q, k, v, grad_out),
        ),
    }
    times = dict(zip(runs, interleaved_times(list(runs.values()), repeats, device, reduce=min), strict=True))
    first = times.pop("fused forward")
    fused_backward = times["fused forward + its backward (∇q, ∇k, ∇v)"] - first
    rows = [f"| fused forward | {first * 1e3:.1f} ms | — | — |"]
    for name, seconds in times.items():
        backward = seconds - first
        rows.append(f"| {name} | {seconds * 1e3:.1f} ms | {backward * 1e3:.1f} ms | x{backward / fused_backward:.2f} |")
    return rows


def peak_memory(key: str, size: int, method: str, device: str) -> float:
    """MiB that ``method`` (``'forward'`` or an explain method) needs above the process before it, measured in this
    (fresh) process: CUDA's ``max_memory_allocated``, or the growth of the CPU process's peak resident size."""
    model = _target_model(key, size, device)
    x = torch.randn(2, 3, size, size, device=device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _reset_peak_rss()
    if method == "forward":
        with torch.no_grad():
            model(x)
    elif method == FLOOR:
        gradient_floor(model, x)
    else:
        explain(model, x, method)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    return _peak_rss() - base


def _status(field: str) -> float:
    """A ``kB`` field of ``/proc/self/status`` in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak_rss() -> float:
    """Reset the process's peak resident size (Linux ``clear_refs``) and return the current one (MiB); elsewhere
    return the peak so far (then only growth beyond it is seen)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _status("VmRSS")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _peak_rss() -> float:
    try:
        return _status("VmHWM")
    except (OSError, RuntimeError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _peak_in_fresh_process(key: str, size: int, method: str, device: str, threads: int) -> float:
    code = (
        f"import sys, torch; sys.path.insert(0, 'benchmarks'); torch.set_num_threads({threads}); import explain as b; "
        f"print(b.peak_memory({key!r}, {size}, {method!r}, {device!r}))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])


def bench_targets(quick: bool, device: str, repeats: int) -> list[str]:
    """Rows of the targets table: each method's time against a plain forward (best of ``repeats``, interleaved) and
    its peak memory above the forward's."""
    rows = []
    for key, (_, size, quick_size, targets) in TARGETS.items():
        size = quick_size if quick else size
        model = _target_model(key, size, device)
        x = torch.randn(2, 3, size, size, device=device)
        tokens = model.patch_embed.grid_size
        methods = [m for m in targets if targets[m] is not None or not quick]

        def forward(model: torch.nn.Module = model, x: torch.Tensor = x) -> None:
            with torch.no_grad():
                model(x)

        if "gradient_rollout" in methods:  # the floor of any attention gradient, next to gradient rollout
            methods.insert(methods.index("gradient_rollout"), FLOOR)
        runs = [
            (lambda model=model, x=x: gradient_floor(model, x)) if m == FLOOR
            else (lambda m=m, model=model, x=x: explain(model, x, m))
            for m in methods
        ]  # fmt: skip
        # each method interleaved with the forward alone: no method runs in the wake of another's memory traffic
        pairs = [interleaved_times([forward, run], repeats, device, reduce=list) for run in runs]
        threads = torch.get_num_threads()
        memory = {m: _peak_in_fresh_process(key, size, m, device, threads) for m in ["forward", *methods]}
        for method, (forwards, seconds) in zip(methods, pairs, strict=True):
            ratio, low, high = paired_ratio(forwards, seconds)
            target = targets.get(method)
            verdict = "—" if target is None else ("met" if ratio <= target else "MISSED") + f" (<= {target})"
            rows.append(
                f"| {key} | {size} | {tokens[0] * tokens[1]} | {method} | {min(forwards) * 1e3:.0f} ms | "
                f"{min(seconds) * 1e3:.0f} ms | x{ratio:.2f} ({low:.2f}–{high:.2f}) | {verdict} | "
                f"{memory['forward']:.0f} MiB | {memory[method]:.0f} MiB |"
            )
    return rows


def paired_ratio(reference: list[float], other: list[float]) -> tuple[float, float, float]:
    """``(median, lowest, highest)`` of the per-round ratios ``other / reference`` of interleaved runs (both ran in
    each round, so a change of load between rounds cancels out)."""
    ratios = [b / a for a, b in zip(reference, other, strict=True)]
    return statistics.median(ratios), min(ratios), max(ratios)


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
    """Print the benchmark tables (markdown); returns 0."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="targets at 224 px, 16 images, 3 repeats, loop over 8")
    parser.add_argument("--write-docs", action="store_true", help="write the targets table into docs/explain.md")
    parser.add_argument("--skip-targets", action="store_true", help="only the capture and batching tables")
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
    header = f"device: {args.device} ({device_name}), torch {torch.__version__}, threads {torch.get_num_threads()}"
    print(header)
    if not args.skip_targets:
        lines = [
            "| model | img | tokens | method | forward (best) | method (best) | ratio (median of rounds, range) "
            "| target | peak memory: forward | method |",
            "|---|---|---|---|---|---|---|---|---|---|",
            *bench_targets(args.quick, args.device, repeats if args.quick else 9),
        ]
        print("\n".join(lines), flush=True)
        if args.write_docs and not args.quick:
            from _machine import write_block

            threads = torch.get_num_threads()
            footer = f"\n\n{header}; made by `python benchmarks/explain.py --threads {threads} --write-docs`."
            write_block("explain_targets", "\n".join(lines) + footer, [REPO / "docs" / "explain.md"])
        batch, heads, tokens, dim = LAYER
        lines = [
            f"| one attention call: {batch} images, {heads} heads, {tokens:,} tokens, head dim {dim} | time | backward "
            "| backward / fused backward |",
            "|---|---|---|---|",
            *bench_attention_layer(args.device, 3 * repeats),
        ]
        print("\n" + "\n".join(lines), flush=True)
        if args.write_docs and not args.quick:
            footer = (
                f"\n\n{header}; best of {3 * repeats}, interleaved; made by `python benchmarks/explain.py --threads "
            )
            footer += f"{torch.get_num_threads()} --write-docs`."
            write_block("explain_attention_layer", "\n".join(lines) + footer, [REPO / "docs" / "explain.md"])
    print()
    print("| model | img | measure | images | first | second | ratio |")
    print("|---|---|---|---|---|---|---|")
    for name, size in MODELS:
        for row in bench_model(name, size, batch_size, loop_images, repeats, args.device):
            print(row, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
