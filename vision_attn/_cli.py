"""Argument parsing shared by the command-line tools (``vision-attn explain``, ``evaluate-maps``, ``app``,
``export``)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from typing import Any

import torch


def json_object_option(text: str, option: str) -> dict[str, Any]:
    """The JSON object given to ``option`` (e.g. ``--model-args``) as a dict; a ``ValueError`` naming the option and
    the value otherwise."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{option} {text!r} is not JSON: {err}") from err
    if not isinstance(value, dict):
        raise ValueError(
            f"{option} must be a JSON object of keyword arguments such as '{{\"num_classes\": 10}}', got {text}"
        )
    return value


def check_device(spec: str) -> torch.device:
    """``--device`` as a ``torch.device``; ``ValueError`` for a malformed one or one this machine lacks."""
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError) as err:
        raise ValueError(f"--device {spec!r} is not a device; expected cpu, cuda, cuda:N or mps") from err
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"--device {spec!r} needs a CUDA GPU, but none is available here; use --device cpu")
        if device.index is not None and device.index >= count:
            raise ValueError(f"--device {spec!r}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"--device {spec!r} needs Apple's MPS backend, which is not available; use --device cpu")
    elif device.type != "cpu":
        raise ValueError(f"--device {spec!r} is not supported; expected cpu, cuda, cuda:N or mps")
    return device


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type`` for an int option ``>= minimum``; anything else is a one-line usage error."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"must be an int >= {minimum}, got {text!r}")
        return value

    return parse


def add_model_source(parser: argparse.ArgumentParser, checkpoint_help: str | None = None) -> None:
    """The options that name one model: ``--checkpoint PATH``, or ``--model NAME`` with ``--weights FILE`` and
    ``--model-args JSON`` (check them with :func:`check_model_source`)."""
    source = parser.add_argument_group("model (one of)")
    source.add_argument("--checkpoint", metavar="PATH", help=checkpoint_help or "train.py checkpoint (.ckpt), export "
                        "folder, or .safetensors with its metadata")  # fmt: skip
    source.add_argument("--model", metavar="NAME", help="vision_attn or timm model name (random weights unless "
                        "--weights)")  # fmt: skip
    source.add_argument("--weights", metavar="FILE", help="weights file (.safetensors/.pth) for --model")
    source.add_argument("--model-args", default="{}", metavar="JSON",
                        help='keyword arguments for --model, e.g. \'{"num_classes": 10, "in_chans": 1}\'')  # fmt: skip


def check_model_source(args: argparse.Namespace) -> dict[str, Any]:
    """Check the options of :func:`add_model_source`; returns ``--model-args`` as a dict (``ValueError`` otherwise)."""
    if (args.checkpoint is None) == (args.model is None):
        raise ValueError("give exactly one of --checkpoint PATH or --model NAME (with --weights FILE)")
    if args.weights is not None and args.model is None:
        raise ValueError("--weights goes with --model NAME; a --checkpoint brings its own weights")
    return json_object_option(args.model_args, "--model-args")


def add_plugin_option(parser: argparse.ArgumentParser) -> None:
    """``--plugin MODULE`` (repeatable): a module that registers explain methods (:func:`preload_plugins`)."""
    parser.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                        help="import MODULE (a module name or a .py file) first, so the explain methods it registers "
                        "with vision_attn.explain.register_method can be named; may be repeated")  # fmt: skip


def preload_plugins(argv: Sequence[str] | None, prog: str) -> None:
    """Import the ``--plugin`` modules of ``argv`` before the command's parser is built, so its method names and help
    include what they register; a plugin that cannot be loaded is a usage error of ``prog`` (exit code 2)."""
    from vision_attn.explain.runner import load_plugins

    pre = argparse.ArgumentParser(prog=prog, add_help=False)
    pre.add_argument("--plugin", action="append", default=[])
    known, _ = pre.parse_known_args(argv)
    try:
        load_plugins(known.plugin)
    except (ValueError, FileNotFoundError) as err:
        pre.error(str(err))
