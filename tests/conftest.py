"""Shared fixtures: small local copies of the real datasets in ../shared/data (never the network)."""

from __future__ import annotations

import gzip
import os
import shutil
import tarfile
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations checks PyPI for updates on import

import pytest

SHARED_DATA = Path(os.environ.get("VISION_ATTN_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
CIFAR_CLASSES = ("airplane", "cat", "ship")


def _shared(*parts: str) -> Path:
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"local dataset copy {path} not present (set VISION_ATTN_SHARED_DATA)")
    return path


@pytest.fixture(scope="session")
def cifar_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ImageFolder with ``train/`` (12 per class) and ``val/`` (4 per class) of 3 CIFAR-10 JPEG classes."""
    archive = _shared("cifar10-jpeg", "test.tar.gz")
    root = tmp_path_factory.mktemp("cifar10_jpeg")
    counts = dict.fromkeys(CIFAR_CLASSES, 0)
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            parts = Path(member.name).parts
            if not member.isfile() or len(parts) < 3 or parts[-2] not in counts or counts[parts[-2]] >= 16:
                continue
            split = "train" if counts[parts[-2]] < 12 else "val"
            out = root / split / parts[-2] / parts[-1]
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(tar.extractfile(member).read())
            counts[parts[-2]] += 1
            if all(c >= 16 for c in counts.values()):
                break
    return root


@pytest.fixture(scope="session")
def fashion_mnist_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A torchvision ``FashionMNIST`` root (``FashionMNIST/raw/`` with the un-gzipped idx files)."""
    src = _shared("fashion-mnist")
    root = tmp_path_factory.mktemp("fashion_mnist")
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for gz in src.glob("*-ubyte.gz"):
        with gzip.open(gz, "rb") as f_in, open(raw / gz.stem, "wb") as f_out:
            shutil.copyfileobj(f_in, f_out)
    return root
