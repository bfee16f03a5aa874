"""``vision-attn app``: start the attention explorer in the browser for one model.

Examples::

    vision-attn app --checkpoint runs/default/version_0/export           # an export folder, .ckpt or .safetensors
    vision-attn app --model vit_tiny_patch16_224 --weights vit.safetensors --port 7861
    vision-attn app --checkpoint last.ckpt --host 0.0.0.0 --auth-file users.txt   # reachable from other machines
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vision_attn._cli import (
    add_model_source,
    add_plugin_option,
    check_device,
    check_model_source,
    int_at_least,
    preload_plugins,
)

__all__ = ["build_parser", "main", "read_auth_file"]


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port, an int in 1..65535, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of ``vision-attn app``."""
    parser = argparse.ArgumentParser(
        prog="vision-attn app",
        description="Start the attention explorer (a Gradio app) for one model: upload an image, see the top-5 "
        "classes and the map of any explain method that applies, per layer and head for token models. Needs the "
        "'app' extra (pip install 'vision_attn[app]').",
    )
    add_model_source(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine "
                        "only; 0.0.0.0 exposes the app to the network, with no login unless --auth-file)")  # fmt: skip
    parser.add_argument("--port", type=_port, default=None, help="TCP port (default: 7860 or the next free one)")
    parser.add_argument("--auth-file", metavar="FILE", help="require a login: a text file of 'user:password' lines "
                        "(blank lines and lines starting with # are ignored), passed to Gradio's auth=")  # fmt: skip
    parser.add_argument("--dataset", default="cluttered_fashion_mnist:test", metavar="NAME[:SPLIT]",
                        help="where the examples come from, with their object boxes (default: the embedded "
                        "'cluttered_fashion_mnist:test')")  # fmt: skip
    parser.add_argument("--examples", type=int_at_least(0), default=24, metavar="N", help="how many examples to offer "
                        "(default 24; 0: none)")  # fmt: skip
    add_plugin_option(parser)
    parser.add_argument("--cmap", default="jet", help="matplotlib colormap of the maps (default jet)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps")
    return parser


def read_auth_file(path: str | os.PathLike, name: str = "--auth-file") -> list[tuple[str, str]]:
    """The ``(user, password)`` pairs of a text file of ``user:password`` lines (the password is the rest of the line;
    blank lines and ``#`` comments are ignored); a ``ValueError`` names the file and the line (never the password)
    when a line is malformed."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{name} {str(path)!r} does not exist") from err
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{name} {str(path)!r} is not a readable UTF-8 text file: {err}") from err
    pairs = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        user, colon, password = line.partition(":")  # the password is the rest of the line, spaces included
        if not colon or not user.strip() or not password:
            raise ValueError(f"{name} {str(path)!r} line {number} is not 'user:password' (a user name, a colon and "
                             "a non-empty password)")  # fmt: skip
        pairs.append((user.strip(), password))
    if not pairs:
        raise ValueError(f"{name} {str(path)!r} holds no 'user:password' line")
    return pairs


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _stop(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``vision-attn app``: load the model, start the server, print its address and serve until Ctrl+C.

    Bad arguments exit with code 2 and a one-line message (a model file that cannot be loaded, a malformed
    ``--auth-file``, a taken ``--port``, gradio missing)."""
    preload_plugins(argv, "vision-attn app")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        from vision_attn.data.images import parse_dataset_spec

        model_args = check_model_source(args)
        device = check_device(args.device)
        auth = read_auth_file(args.auth_file) if args.auth_file else None
        if args.examples:
            parse_dataset_spec(args.dataset)
        from matplotlib import colormaps

        if args.cmap not in colormaps:
            raise ValueError(f"--cmap {args.cmap!r} is not a matplotlib colormap (e.g. jet, viridis, inferno)")
    except (ValueError, TypeError, FileNotFoundError) as err:
        parser.error(str(err))
    try:
        from vision_attn.app.server import launch_app
    except ImportError as err:
        print(f"vision-attn app: error: {err}; install the app extra: pip install 'vision_attn[app]'", file=sys.stderr)
        return 2
    from vision_attn.app.explorer import Explorer

    explorer = Explorer.open(
        args.checkpoint, args.model, args.weights, model_args, device=device,
        dataset=args.dataset if args.examples else None, num_examples=args.examples, cmap=args.cmap,
    )  # fmt: skip
    try:
        demo, url = launch_app(explorer, host=args.host, port=args.port, auth=auth)
    except OSError as err:  # the port is taken, or the address is not this machine's
        print(f"vision-attn app: error: cannot listen on {args.host}:{args.port or 7860}: {err}", file=sys.stderr)
        return 2
    info = explorer.info
    print(f"vision-attn app: {info.get('model_name')} ({info.get('source')}) at {url}", flush=True)
    if not _is_loopback(args.host):
        login = "a login (--auth-file)" if auth else "NO login: anyone who can reach it can use it"
        print(f"vision-attn app: listening on {args.host}, reachable from other machines, with {login}; see "
              "docs/app.md", flush=True)  # fmt: skip
    print("vision-attn app: Ctrl+C stops it", flush=True)
    signal.signal(signal.SIGTERM, _stop)  # a service manager's stop closes the server as Ctrl+C does
    try:
        demo.block_thread()
    finally:
        demo.close()
    return 0
