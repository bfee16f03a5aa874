"""Images/s that each dataset reader delivers to the training step, for the same CIFAR-10 images and augmentation
(issue 24, item 5).

The CIFAR-10 JPEGs of ``../shared/data/cifar10-jpeg`` (train and test) are read four ways, each through
``ImageDataModule.train_dataloader()`` with the data section of ``--config`` (augmentation, batch size; workers
from ``--num-workers``), one whole epoch of the train split per timing:

* ``in-memory``: the decoded images as one ``uint8`` array (how the embedded dataset is read);
* ``image_folder``: the JPEG files (``data.name: image_folder``);
* ``hf``: a Hugging Face dataset holding the JPEG bytes, from ``save_to_disk`` (``data.name: hf``);
* ``litdata``: LitData shards written by ``vision-attn shard`` (``data.name: litdata``).

Readers alternate for ``--rounds`` rounds; the table gives each one's median images/s and its ratio to the fastest.
Target: the shards within 10 % of the image folder. Usage::

    python benchmarks/data_throughput.py                       # 50,000 train images, 3 rounds
    python benchmarks/data_throughput.py --limit 2000 --rounds 1   # a quick check that it runs
    python benchmarks/data_throughput.py --write-docs          # also rewrite the table in docs/data.md

``--write-docs`` refuses when the machine was not quiet before the first round (``--allow-load`` overrides).
"""

from __future__ import annotations

import argparse
import statistics
import tarfile
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from _machine import REPO, publish, settle  # benchmarks/ is on sys.path when run
from PIL import Image

from vision_attn.data import ImageDataModule
from vision_attn.data.shards import write_shards

CONFIG = REPO / "configs" / "resnet_attn_cifar10.yaml"
SHARED = REPO.parent / "shared" / "data" / "cifar10-jpeg"
READERS = ("in-memory", "image_folder", "hf", "litdata")


def extract(root: Path, limit: int | None) -> Path:
    """``root/{train,test}/<class>/*.jpg`` from the shared archives, the first ``limit`` of each split (per class
    in turn, so every class is there); returns ``root``."""
    for split in ("train", "test"):
        archive = SHARED / f"{split}.tar.gz"
        if not archive.is_file():
            raise FileNotFoundError(f"{archive} not found: the CIFAR-10 JPEGs of ../shared/data are needed")
        per_class = None if limit is None else max(1, limit // 10)
        counts: dict[str, int] = defaultdict(int)
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                parts = Path(member.name).parts
                if not member.isfile() or len(parts) < 3 or (per_class and counts[parts[-2]] >= per_class):
                    continue
                out = root / split / parts[-2] / parts[-1]
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(tar.extractfile(member).read())
                counts[parts[-2]] += 1
    return root


class InMemory:
    """Decoded images ``uint8 [N, H, W, 3]`` and labels, read like the embedded dataset."""

    def __init__(self, base: Any) -> None:
        self.images = np.stack([np.asarray(Image.open(path).convert("RGB")) for path, _ in base.samples])
        self.targets = np.asarray(base.targets)
        self.classes = list(base.classes)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        return self.images[index], int(self.targets[index])


def hf_copy(folder: Path, out: Path) -> Path:
    """A ``save_to_disk`` copy of the image folder's train and test splits with the JPEG bytes inside."""
    import datasets

    splits = {}
    for split in ("train", "test"):
        classes = sorted(p.name for p in (folder / split).iterdir())
        files = [(p, c) for c, name in enumerate(classes) for p in sorted((folder / split / name).iterdir())]
        features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=classes)})
        splits[split] = datasets.Dataset.from_dict(
            {"image": [{"bytes": p.read_bytes(), "path": None} for p, _ in files], "label": [c for _, c in files]},
            features=features,
        )
    datasets.DatasetDict(splits).save_to_disk(str(out))
    return out


def build_readers(work: Path, data: dict[str, Any]) -> dict[str, ImageDataModule]:
    """One set-up DataModule per reader, all with the config's data options (``val_fraction`` 0: whole train split)."""
    folder = extract(work / "folder", data.pop("limit"))
    options = {**data, "val_fraction": 0.0}
    modules = {"image_folder": ImageDataModule("image_folder", str(folder), **options)}
    modules["in-memory"] = ImageDataModule("image_folder", str(folder), **options)
    modules["hf"] = ImageDataModule("hf", hf_name=str(hf_copy(folder, work / "hf")), data_dir=str(work / "cache"),
                                    **options)  # fmt: skip
    write_shards(ImageDataModule("image_folder", str(folder), **options), work / "shards", num_workers=2)
    modules["litdata"] = ImageDataModule("litdata", str(work / "shards"), **options)
    for module in modules.values():
        module.setup("fit")
    memory = modules["in-memory"].train_set
    memory.base = InMemory(memory.base)
    return {name: modules[name] for name in READERS}


def epoch_rate(module: ImageDataModule) -> tuple[float, int]:
    """``(images/s, images)`` of one pass over ``module``'s train loader (worker start-up included, as in training)."""
    loader = module.train_dataloader()
    images, start = 0, time.perf_counter()
    for batch, _ in loader:
        images += len(batch)
    return images / (time.perf_counter() - start), images


def table(rates: dict[str, list[float]], counts: dict[str, int], data: dict[str, Any], load: dict[str, Any]) -> str:
    """The markdown table of median images/s per reader and the ratio to the fastest."""
    medians = {name: statistics.median(values) for name, values in rates.items()}
    fastest = max(medians.values())
    rows = [
        "| reader (`data.name`) | train images/s | / fastest | images per epoch |",
        "|---|---|---|---|",
        *(f"| {name} | {medians[name]:,.0f} | {medians[name] / fastest:.2f} | {counts[name]:,} |" for name in rates),
    ]
    rounds = len(next(iter(rates.values())))
    rows.append(
        f"\nCIFAR-10 JPEGs, batch {data['batch_size']}, {data['num_workers']} loader workers, the augmentation of "
        f"`configs/resnet_attn_cifar10.yaml`; median of {rounds} round(s); 1-minute load average before: "
        f"{load['loadavg'][0]}. Made by `python benchmarks/data_throughput.py --write-docs`."
    )
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(CONFIG), help="config whose data section is used")
    parser.add_argument("--limit", type=int, default=None, help="images per split (default: all)")
    parser.add_argument("--num-workers", type=int, default=2, help="loader workers (default 2: this machine's cores)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-load", type=float, default=1.0, help="1-minute load average that counts as quiet")
    parser.add_argument("--settle", type=float, default=240.0, help="seconds to wait for a quiet machine")
    parser.add_argument("--allow-load", action="store_true", help="write docs even if the machine was busy")
    parser.add_argument("--write-docs", action="store_true", help="rewrite the table in docs/data.md")
    args = parser.parse_args()
    data = yaml.safe_load(Path(args.config).read_text())["data"]
    for key in ("name", "data_dir", "download", "val_fraction"):
        data.pop(key, None)
    data.update(num_workers=args.num_workers, limit=args.limit)
    with tempfile.TemporaryDirectory(prefix="data_throughput_") as tmp:
        modules = build_readers(Path(tmp), dict(data))
        load = settle(args.max_load, args.settle)
        rates: dict[str, list[float]] = {name: [] for name in READERS}
        counts: dict[str, int] = {}
        for round_index in range(args.rounds):
            for name in READERS if round_index % 2 == 0 else reversed(READERS):
                rate, counts[name] = epoch_rate(modules[name])
                rates[name].append(rate)
                print(f"round {round_index + 1} {name}: {rate:,.0f} images/s ({counts[name]} images)", flush=True)
    text = table(rates, counts, data, load)
    print(text)
    if args.write_docs:
        return publish("data_throughput", text, [REPO / "docs" / "data.md"], load, args.allow_load)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
