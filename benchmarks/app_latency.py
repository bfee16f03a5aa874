"""Latency of one explanation request through ``vision-attn app``'s API against the ``explain()`` call it wraps.

Starts the app in this process on a free loopback port (``vision_attn.app.launch_app``) and, for each model,
alternates ``--repeats`` times (medians reported; the first round is a warm-up):

* ``explain()``: ``explain(model, images, method)`` on the image already through the eval pipeline — the call the
  app wraps;
* ``API over HTTP``: one ``/explain`` request as ``curl`` or a browser makes it (upload the image, call, read the
  prediction, download the ``.npy`` map), on a kept-alive connection;
* ``gradio_client``: ``Client.predict(handle_file(image), method, ..., api_name="/explain")``, the documented client
  (it polls for the answer every 50 ms, which adds its own wait).

Models: the default model (``configs/default.yaml``'s ``va_vitc2_seq_tiny_patch8_64``, 64 x 64 input, random
weights) and a 224 x 224 timm ViT (``--timm-model``, random weights), each sent the same 64 x 64 PNG
(``--image-size``), which the app resizes to the model's input. The target is a ratio API / ``explain()`` <= 1.5.
CPU, ``torch.get_num_threads()`` threads; server and client share the machine.

Run::

    python benchmarks/app_latency.py --quick          # 5 rounds per model
    python benchmarks/app_latency.py --write-docs     # 20 rounds; the table into docs/app.md (quiet machine only)
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import httpx
import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _machine

from vision_attn.app import Explorer, launch_app
from vision_attn.explain import explain

DEFAULT_MODEL = ("va_vitc2_seq_tiny_patch8_64", {"num_classes": 10, "in_chans": 1})


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_explain(http: httpx.Client, url: str, image: Path, method: str) -> np.ndarray:
    """One ``/explain`` request through Gradio's HTTP API (upload, call, result, the map's file); returns the map."""
    with open(image, "rb") as f:
        path = http.post(f"{url}gradio_api/upload", files={"files": (image.name, f, "image/png")}).json()[0]
    payload = {"data": [{"path": path, "meta": {"_type": "gradio.FileData"}}, method, None, "", None]}
    event = http.post(f"{url}gradio_api/call/explain", json=payload).json()["event_id"]
    stream = http.get(f"{url}gradio_api/call/explain/{event}").text
    if "event: complete" not in stream:
        raise RuntimeError(f"/explain did not complete: {stream[-500:]}")
    _, npy, _ = json.loads(stream.split("event: complete\ndata: ", 1)[1].split("\n", 1)[0])
    return np.load(io.BytesIO(http.get(npy["url"]).content))


def _median_ms(times: list[float]) -> float:
    return statistics.median(times[1:] if len(times) > 1 else times) * 1e3  # the first round warms up


def bench(
    name: str, model_args: dict, size: int, method: str, repeats: int, folder: Path
) -> tuple[list[str], list[float]]:
    """Time one model; returns its table row and the ratios (HTTP, gradio_client) to ``explain()``."""
    from gradio_client import Client, handle_file

    torch.manual_seed(0)
    explorer = Explorer.open(model_name=name, model_args=model_args, num_examples=0)
    channels = explorer.data_config["input_size"][0]
    image = folder / f"{name}_{size}px.png"
    pixels = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).convert("L" if channels == 1 else "RGB").save(image)
    subject = explorer.prepare(image)
    demo, url = launch_app(explorer, port=_free_port())
    try:
        client = Client(url, verbose=False, download_files=str(folder / "client"))
        with httpx.Client(timeout=120) as http:
            expected = explain(explorer.model, subject.images, method)[0].numpy()
            np.testing.assert_allclose(http_explain(http, url, image, method), expected, atol=1e-5)
            calls: dict[str, Callable[[], object]] = {
                "explain": lambda: explain(explorer.model, subject.images, method),
                "http": lambda: http_explain(http, url, image, method),
                "client": lambda: client.predict(handle_file(str(image)), method, None, "", None, api_name="/explain"),
            }
            times: dict[str, list[float]] = {key: [] for key in calls}
            for _ in range(repeats + 1):
                for key, call in calls.items():
                    start = time.perf_counter()
                    call()
                    times[key].append(time.perf_counter() - start)
    finally:
        demo.close()
    ms = {key: _median_ms(values) for key, values in times.items()}
    ratios = [ms["http"] / ms["explain"], ms["client"] / ms["explain"]]
    side = "x".join(map(str, explorer.data_config["input_size"][1:]))
    row = (
        f"| `{name}` | {side} | {size} x {size} | `{method}` | {ms['explain']:.1f} ms | {ms['http']:.1f} ms | "
        f"**{ratios[0]:.2f}** | {ms['client']:.1f} ms | {ratios[1]:.2f} |"
    )
    return [row], ratios


def main(argv: list[str] | None = None) -> int:
    """Print the latency table (markdown); with ``--write-docs``, also write it into docs/app.md. Returns 0 when every
    HTTP ratio meets ``--target`` (1 otherwise, or when the docs were not written)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="5 rounds per model (default 20)")
    parser.add_argument("--repeats", type=int, default=None, help="rounds per model")
    parser.add_argument("--method", default="rollout", help="explain method (default rollout, the app's default)")
    parser.add_argument("--timm-model", default="vit_small_patch16_224", help="the 224 x 224 timm ViT")
    parser.add_argument("--image-size", type=int, default=64, help="side of the PNG sent (default 64)")
    parser.add_argument("--target", type=float, default=1.5, help="the largest acceptable API / explain() ratio")
    parser.add_argument("--write-docs", action="store_true", help="write the table into docs/app.md")
    parser.add_argument("--allow-load", action="store_true", help="write the docs even if the machine was busy")
    args = parser.parse_args(argv)
    repeats = args.repeats or (5 if args.quick else 20)
    load = _machine.settle(max_load=0.5, timeout=60) if args.write_docs else {"loadavg": list(os.getloadavg())}
    lines = [
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU; median of {repeats} alternating rounds "
        f"in one process; 1-minute load average before: {load['loadavg'][0]}",
        "",
        "| model | input | image sent | method | `explain()` | API over HTTP | ratio | `gradio_client` | ratio |",
        "|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    ratios: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, model_args in (DEFAULT_MODEL, (args.timm_model, {})):
            rows, model_ratios = bench(name, model_args, args.image_size, args.method, repeats, Path(tmp))
            lines += rows
            ratios.append(model_ratios[0])
            print(rows[0], flush=True)
    lines += ["", f"Made by `python benchmarks/app_latency.py --write-docs`; target ratio <= {args.target}."]
    table = "\n".join(lines)
    print(table)
    met = all(r <= args.target for r in ratios)
    print(f"target API over HTTP / explain() <= {args.target}: {'met' if met else 'NOT met'} ({ratios})")
    if args.write_docs and _machine.publish("app_latency", table, [_machine.REPO / "docs" / "app.md"], load,
                                            args.allow_load):  # fmt: skip
        return 1
    return 0 if met else 1


if __name__ == "__main__":
    raise SystemExit(main())
