"""The screenshot of ``vision-attn app`` in docs/app.png and the README: the app for a model, one example of the
embedded test split picked, a method chosen, taken in headless chromium (Debian's, driven by Playwright).

Run (after the main job, for its model)::

    python benchmarks/app_screenshot.py --checkpoint runs/default/version_0/export --out docs/app.png
"""

from __future__ import annotations

import argparse
import io
import os
import socket
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from PIL import Image

from vision_attn._io import atomic_write_bytes
from vision_attn.app import Explorer, launch_app

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Take the screenshot; returns 0."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="the model to show (export folder, .ckpt, .safetensors)")
    parser.add_argument("--out", default="docs/app.png", help="where to write the PNG (default docs/app.png)")
    parser.add_argument("--example", type=int, default=3, help="which example to pick (default 3)")
    parser.add_argument("--method", default="gradient_rollout", help="the method to show (default gradient_rollout)")
    parser.add_argument("--chromium", default="/usr/bin/chromium", help="the browser (default Debian's chromium)")
    parser.add_argument("--height", type=int, default=1000, help="pixels of the page to keep from the top")
    args = parser.parse_args(argv)
    from playwright.sync_api import sync_playwright

    explorer = Explorer.open(args.checkpoint, num_examples=12)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    demo, url = launch_app(explorer, port=port)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": args.height})
            page.goto(url)
            page.locator("#va-method input").click()
            page.locator("ul[role=listbox] li", has_text=args.method).first.click()
            page.locator("#va-examples button.thumbnail-item").nth(args.example).click()
            page.wait_for_function("() => document.querySelector('#va-details').innerText.includes('true class')",
                                   timeout=60_000)  # fmt: skip
            page.wait_for_timeout(1500)  # the layer and comparison views follow
            shot = page.screenshot(full_page=False)
            browser.close()
    finally:
        demo.close()
    picture = Image.open(io.BytesIO(shot)).convert("RGB").quantize(colors=128)  # a small PNG for the docs
    buffer = io.BytesIO()
    picture.save(buffer, format="png", optimize=True)
    atomic_write_bytes(Path(args.out), buffer.getvalue())
    print(f"wrote {args.out} ({len(buffer.getvalue()) // 1024} kB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
