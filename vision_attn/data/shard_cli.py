"""``vision-attn shard``: write the dataset of a training config as LitData shards (``data.name: litdata``).

Examples::

    vision-attn shard --config configs/default.yaml --out shards/cluttered
    vision-attn shard --config configs/vit_spt_lsa_cifar10.yaml --data.name image_folder \\
        --data.data_dir data/cifar10-jpeg --out shards/cifar10
    vision-attn shard --config configs/default.yaml --data.name hf --data.hf_name beans --out shards/beans
"""

from __future__ import annotations

import argparse
import inspect
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from vision_attn.data.datamodule import ImageDataModule

__all__ = ["build_parser", "data_options", "main"]


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of ``vision-attn shard`` (``--data.KEY VALUE`` options are read apart)."""
    parser = argparse.ArgumentParser(
        prog="vision-attn shard",
        description="Write the train / validation / test splits of a config's dataset (hold-outs made as in "
        "training) as LitData shards into a new folder, to train from with --data.name litdata --data.data_dir DIR "
        "on one machine or many. Any --data.KEY VALUE overrides the config's data section.",
    )
    parser.add_argument("--config", metavar="YAML", help="a training config; its data: section is read")
    parser.add_argument("--out", required=True, metavar="DIR", help="new local folder for the shards")
    parser.add_argument("--num-workers", type=int, default=min(4, os.cpu_count() or 1), metavar="N",
                        help="processes encoding and writing (default: up to 4)")  # fmt: skip
    parser.add_argument("--chunk-bytes", default="64MB", metavar="SIZE", help="size of one chunk file (default 64MB)")
    return parser


def data_options(config: str | None, overrides: Sequence[str]) -> dict[str, Any]:
    """The ``ImageDataModule`` keyword arguments of ``config``'s ``data:`` section with ``--data.KEY VALUE`` (or
    ``--data.KEY=VALUE``) ``overrides`` (values read as YAML); a ``ValueError`` names an unknown option."""
    options: dict[str, Any] = {}
    if config is not None:
        path = Path(config)
        if not path.is_file():
            raise FileNotFoundError(f"--config {config!r} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"--config {config!r} is not valid YAML: {err}") from err
        data = loaded.get("data") if isinstance(loaded, dict) else None
        if isinstance(data, dict) and "init_args" in data:  # LightningCLI's class_path / init_args form
            data = data["init_args"]
        if data is not None and not isinstance(data, dict):
            raise ValueError(f"--config {config!r}: data must be a mapping of ImageDataModule options, got {data!r}")
        options.update(data or {})
    rest = list(overrides)
    while rest:
        arg = rest.pop(0)
        if not arg.startswith("--data."):
            raise ValueError(f"unknown option {arg!r}; expected --config, --out, --num-workers, --chunk-bytes or "
                             "--data.KEY VALUE")  # fmt: skip
        key, has_value, value = arg.removeprefix("--data.").partition("=")
        if not has_value:
            if not rest:
                raise ValueError(f"option {arg!r} needs a value")
            value = rest.pop(0)
        options[key] = yaml.safe_load(value)
    known = set(inspect.signature(ImageDataModule).parameters)
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"unknown data option(s) {unknown}; ImageDataModule takes {', '.join(sorted(known))}")
    return options


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``vision-attn shard``; returns the exit code."""
    args, overrides = build_parser().parse_known_args(argv)
    options = data_options(args.config, overrides)
    from vision_attn.data.shards import write_shards

    meta = write_shards(ImageDataModule(**options), args.out, num_workers=args.num_workers,
                        chunk_bytes=args.chunk_bytes)  # fmt: skip
    counts = ", ".join(f"{split} {count}" for split, count in meta["splits"].items())
    print(f"shard: wrote {args.out}: {counts} images, {len(meta['classes'])} classes; train from it with "
          f"--data.name litdata --data.data_dir {args.out}")  # fmt: skip
    return 0
