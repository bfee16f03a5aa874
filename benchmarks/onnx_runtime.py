"""Inference images/s of ONNX Runtime against eager PyTorch for the default model on CPU (same process).

The model and input come from ``configs/default.yaml`` (its ``model`` and ``model_args``; channels and size from
its dataset) unless ``--model`` is given. The model is exported with ``vision_attn.export.write_export`` (which
first checks that ONNX Runtime reproduces the eager logits), then runs alternate between eager PyTorch
(``inference_mode``) and an ONNX Runtime session with the same number of threads, and medians are reported; the
ratio (onnxruntime / eager) is the number to read. Usage::

    python benchmarks/onnx_runtime.py              # full settings
    python benchmarks/onnx_runtime.py --quick      # fewer repeats
    python benchmarks/onnx_runtime.py --model va_resnet18_se_32 --batch 1 32
    python benchmarks/onnx_runtime.py --write-docs   # rewrites docs/benchmarks.md (quiet machine only)
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch
import yaml
from _machine import REPO, publish, settle  # benchmarks/ is on sys.path when run
from _timing import time_inference, timed

import vision_attn
from vision_attn.data.datasets import DATASETS
from vision_attn.export import write_export
from vision_attn.models import model_input_size

ROOT = REPO


def default_model() -> tuple[str, dict, tuple[int, int, int]]:
    """``(model name, model_args, (C, H, W))`` of the main job's config."""
    config = yaml.safe_load((ROOT / "configs" / "default.yaml").read_text())
    data = config.get("data", {})
    info = DATASETS[data.get("name", "cluttered_fashion_mnist")]
    in_chans, img_size = data.get("in_chans") or info.in_chans, data.get("img_size") or info.img_size
    args = {**config["model"].get("model_args", {}), "num_classes": info.num_classes, "in_chans": in_chans}
    return config["model"]["model"], {**args, "img_size": img_size}, (in_chans, img_size, img_size)


def bench(model: torch.nn.Module, session, x: torch.Tensor, repeats: int) -> tuple[float, float]:
    """Median images/s of eager PyTorch and of the ONNX Runtime ``session`` on ``x`` (alternating runs)."""
    feed = {"images": x.numpy()}

    def run_ort() -> float:
        return timed(lambda: session.run(["logits"], feed))

    times: dict[str, list[float]] = {"eager": [], "onnxruntime": []}
    for i in range(repeats + 2):  # the first two rounds warm up
        order = (("eager", lambda: time_inference(model, x)), ("onnxruntime", run_ort))
        for label, run in order if i % 2 else order[::-1]:
            elapsed = run()
            if i >= 2:
                times[label].append(elapsed)
    return x.shape[0] / statistics.median(times["eager"]), x.shape[0] / statistics.median(times["onnxruntime"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model name (default: the one in configs/default.yaml)")
    parser.add_argument("--model-args", default="{}", help="JSON model arguments for --model")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 64], help="batch sizes")
    parser.add_argument("--quick", action="store_true", help="fewer repeats (noisier)")
    parser.add_argument("--max-load", type=float, default=1.0, help="1-minute load average that counts as quiet")
    parser.add_argument("--settle", type=float, default=120.0, help="seconds to wait for a quiet machine")
    parser.add_argument("--write-docs", action="store_true", help="rewrite the table in docs/benchmarks.md")
    args = parser.parse_args()
    if args.write_docs and args.model is not None:
        parser.error("--write-docs writes the default model's numbers; leave out --model")
    import onnxruntime  # the export extra: pip install -e ".[export]"

    torch.manual_seed(0)
    if args.model is None:
        name, model_args, input_size = default_model()
    else:
        name, model_args = args.model, json.loads(args.model_args)
    model = vision_attn.create_model(name, **model_args).eval()
    if args.model is not None:
        input_size = model_input_size(model)
    threads = torch.get_num_threads()
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    repeats = 5 if args.quick else 20
    with tempfile.TemporaryDirectory() as tmp:
        result = write_export(model, Path(tmp) / "export", ("onnx",))
        session = onnxruntime.InferenceSession(str(result.files["onnx"]), options, providers=["CPUExecutionProvider"])
        load = settle(args.max_load, args.settle)
        lines = [
            f"`{name}` {model_args}, input {input_size}; torch {torch.__version__}, onnxruntime "
            f"{onnxruntime.__version__}, {threads} threads each, median of {repeats} alternating runs; ONNX logits "
            f"match eager within {result.max_abs_diff['onnx']:.1g}; 1-minute load average before: {load['loadavg'][0]}",
            "",
            "| batch | eager PyTorch img/s | ONNX Runtime img/s | ratio (onnxruntime/eager) |",
            "|---:|---:|---:|---:|",
        ]  # fmt: skip
        print("\n".join(lines), flush=True)
        for batch in args.batch:
            x = torch.randn(batch, *input_size)
            eager_ips, ort_ips = bench(model, session, x, repeats)
            lines.append(f"| {batch} | {eager_ips:.1f} | {ort_ips:.1f} | {ort_ips / eager_ips:.2f} |")
            print(lines[-1], flush=True)
    if args.write_docs:
        command = "python benchmarks/onnx_runtime.py --write-docs" + (" --quick" if args.quick else "")
        return publish(
            "onnx_runtime", "\n".join(lines) + f"\n\nMade by `{command}`.", [REPO / "docs" / "benchmarks.md"], load
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
