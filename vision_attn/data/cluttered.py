"""Cluttered Fashion-MNIST: the embedded default dataset, and the script that builds it.

Each sample is one Fashion-MNIST image (28x28) placed at a random position on a larger black canvas among
pieces of clutter cut from other Fashion-MNIST images of the same split, like the cluttered translated MNIST
of Mnih et al. 2014 ("Recurrent Models of Visual Attention"). Clutter never overlaps the object's tight
bounding box, which is stored with every sample so attention maps can be scored against where the object is.

Rebuild the shipped file (deterministic for a seed, byte-identical output)::

    python -m vision_attn.data.cluttered --raw-dir ../shared/data/fashion-mnist \\
        --out assets/cluttered_fashion_mnist_64.npz

The file is an ``.npz`` with LZMA-compressed members (``numpy.load`` reads it, no pickle). For ``split`` in
``train``/``test``: ``{split}_images`` uint8 ``[N, S, S]``, ``{split}_labels`` uint8 ``[N]``, ``{split}_boxes``
int16 ``[N, 4]`` (``x_min, y_min, x_max, y_max``, pixels, max exclusive), ``{split}_source_index`` int32 ``[N]``
(row in the Fashion-MNIST idx file); plus ``classes`` (str ``[10]``) and ``meta`` (str ``[1]``, a JSON object:
seed, sizes, mean/std, ...).
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = [
    "DEFAULT_ASSET",
    "FASHION_MNIST_CLASSES",
    "ClutteredFashionMNIST",
    "load_cluttered",
    "make_cluttered_fashion_mnist",
    "read_idx",
    "save_npz_deterministic",
]

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
# The asset lives in the repository's assets/ folder (beside the package in a checkout / editable install).
DEFAULT_ASSET = Path(__file__).resolve().parents[2] / "assets" / "cluttered_fashion_mnist_64.npz"
_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an MNIST-format idx file (``.gz`` or not); returns a uint8 array ``[N]`` or ``[N, H, W]``."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[:4], "big")
    if magic >> 8 != 0x08:  # 0x08 = unsigned byte
        raise ValueError(f"{path} is not a uint8 idx file (magic number {magic:#x})")
    ndim = magic & 0xFF
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _find_idx(raw_dir: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (raw_dir / name).is_file():
            return raw_dir / name
    raise FileNotFoundError(
        f"raw_dir {str(raw_dir)!r} has no {stem}[.gz]; it must hold the Fashion-MNIST idx files "
        "(https://github.com/zalandoresearch/fashion-mnist, or the Debian package dataset-fashion-mnist)"
    )


def _balanced_subset(labels: np.ndarray, num: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of ``num`` samples, the same number per class (``num`` must divide by the class count)."""
    classes = np.unique(labels)
    per_class = num // len(classes)
    picks = [rng.choice(np.flatnonzero(labels == c), per_class, replace=False) for c in classes]
    return rng.permutation(np.concatenate(picks))


def _place_clutter(
    canvas: np.ndarray,
    pool: np.ndarray,
    box: tuple[int, int, int, int],
    num_clutter: int,
    clutter_size: int,
    rng: np.random.Generator,
    exclude: int,
) -> None:
    """Paste ``num_clutter`` inked ``clutter_size`` crops of random ``pool`` images outside ``box`` (in place)."""
    size = canvas.shape[0]
    x0, y0, x1, y1 = box
    src_size = pool.shape[1]
    for _ in range(num_clutter):
        for _attempt in range(50):  # a crop with some ink
            src = int(rng.integers(len(pool)))
            if src == exclude:
                continue
            sy, sx = rng.integers(0, src_size - clutter_size + 1, size=2)
            crop = pool[src, sy : sy + clutter_size, sx : sx + clutter_size]
            if (crop > 32).mean() >= 0.3:
                break
        for _attempt in range(100):  # a place that does not touch the object's box
            py, px = rng.integers(0, size - clutter_size + 1, size=2)
            if px + clutter_size <= x0 or px >= x1 or py + clutter_size <= y0 or py >= y1:
                region = canvas[py : py + clutter_size, px : px + clutter_size]
                np.maximum(region, crop, out=region)
                break


def make_cluttered_fashion_mnist(
    raw_dir: str | os.PathLike,
    num_train: int = 4000,
    num_test: int = 1000,
    canvas_size: int = 64,
    num_clutter: int = 6,
    clutter_size: int = 10,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Build the cluttered Fashion-MNIST arrays from the idx files in ``raw_dir``; returns the ``.npz`` contents.

    Class-balanced subsets of ``num_train`` train and ``num_test`` test images; clutter for a split is cut
    from that split's images only. The same arguments always give the same arrays.
    """
    for name, value in (("num_train", num_train), ("num_test", num_test)):
        if value <= 0 or value % len(FASHION_MNIST_CLASSES):
            raise ValueError(f"{name} must be a positive multiple of 10 (class-balanced), got {value}")
    if canvas_size < 28:
        raise ValueError(f"canvas_size must be >= 28 (the Fashion-MNIST image size), got {canvas_size}")
    if not 0 < clutter_size <= 28:
        raise ValueError(f"clutter_size must be in [1, 28], got {clutter_size}")
    if num_clutter < 0:
        raise ValueError(f"num_clutter must be >= 0, got {num_clutter}")
    raw_dir = Path(raw_dir)
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for split, num in (("train", num_train), ("test", num_test)):
        images = read_idx(_find_idx(raw_dir, _IDX_FILES[split][0]))
        labels = read_idx(_find_idx(raw_dir, _IDX_FILES[split][1]))
        index = _balanced_subset(labels, num, rng)
        canvases = np.zeros((num, canvas_size, canvas_size), dtype=np.uint8)
        boxes = np.zeros((num, 4), dtype=np.int16)
        for i, src in enumerate(index):
            obj = images[src]
            ys, xs = np.nonzero(obj)
            oy, ox = rng.integers(0, canvas_size - 28 + 1, size=2)
            canvases[i, oy : oy + 28, ox : ox + 28] = obj
            box = (ox + xs.min(), oy + ys.min(), ox + xs.max() + 1, oy + ys.max() + 1)
            boxes[i] = box
            _place_clutter(canvases[i], images, box, num_clutter, clutter_size, rng, exclude=int(src))
        out[f"{split}_images"] = canvases
        out[f"{split}_labels"] = labels[index].astype(np.uint8)
        out[f"{split}_boxes"] = boxes
        out[f"{split}_source_index"] = index.astype(np.int32)
    train = out["train_images"].astype(np.float64) / 255.0
    meta = {
        "name": "cluttered_fashion_mnist",
        "source": "Fashion-MNIST (Zalando SE, MIT license), https://github.com/zalandoresearch/fashion-mnist",
        "seed": seed,
        "canvas_size": canvas_size,
        "num_clutter": num_clutter,
        "clutter_size": clutter_size,
        "num_train": num_train,
        "num_test": num_test,
        "box_format": "x_min, y_min, x_max, y_max (pixels, max exclusive)",
        "mean": round(float(train.mean()), 4),
        "std": round(float(train.std()), 4),
    }
    out["classes"] = np.array(FASHION_MNIST_CLASSES)
    out["meta"] = np.array(json.dumps(meta, sort_keys=True))
    return out


def save_npz_deterministic(path: str | os.PathLike, arrays: dict[str, np.ndarray]) -> None:
    """Write ``arrays`` as an LZMA-compressed ``.npz`` (``numpy.load`` reads it); same arrays, same bytes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        for key in sorted(arrays):
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(arrays[key]), allow_pickle=False)
            info = zipfile.ZipInfo(key + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_LZMA  # ~15% smaller than deflate on these images
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue())


def load_cluttered(path: str | os.PathLike | None = None, keys: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Load the cluttered Fashion-MNIST ``.npz`` (default: the shipped asset); returns its arrays by key, all of them
    or only ``keys`` (each array is decompressed when read, so a split alone loads faster)."""
    path = Path(path) if path is not None else DEFAULT_ASSET
    if not path.is_file():
        raise FileNotFoundError(
            f"cluttered Fashion-MNIST file {str(path)!r} not found; it ships in the repository's assets/ folder, "
            "or rebuild it with: python -m vision_attn.data.cluttered --raw-dir <fashion-mnist idx dir> "
            f"--out {path}"
        )
    with np.load(path, allow_pickle=False) as data:
        missing = sorted(set(keys or ()) - set(data.files))
        if missing:
            raise ValueError(
                f"{str(path)!r} is not a cluttered Fashion-MNIST file: it has no arrays {missing} (it holds "
                f"{sorted(data.files)})"
            )
        return {key: data[key] for key in (data.files if keys is None else keys)}


class ClutteredFashionMNIST:
    """Map-style dataset of the cluttered Fashion-MNIST ``split`` (``'train'`` or ``'test'``).

    ``dataset[i]`` returns ``(image, label)``: a uint8 ``[S, S]`` array and an int. ``boxes`` (``[N, 4]``
    int array, ``x_min, y_min, x_max, y_max``), ``targets``, ``classes`` and ``meta`` are attributes; ``masks``
    (``[N, S, S]`` bool) are the objects' own pixels.
    """

    def __init__(self, split: str = "train", path: str | os.PathLike | None = None) -> None:
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        keys = [f"{split}_images", f"{split}_labels", f"{split}_boxes", "classes", "meta"]
        arrays = load_cluttered(path, keys=keys)  # the other split is never decompressed
        self.split = split
        self.images: np.ndarray = arrays[f"{split}_images"]
        self.targets: np.ndarray = arrays[f"{split}_labels"].astype(np.int64)
        self.boxes: np.ndarray = arrays[f"{split}_boxes"].astype(np.int64)
        self.classes: list[str] = [str(c) for c in arrays["classes"]]
        self.meta: dict = json.loads(str(arrays["meta"].reshape(-1)[0]))
        self._masks: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.images)

    @property
    def masks(self) -> np.ndarray:
        """The object's own pixel mask per image, ``[N, S, S]`` bool: the garment's non-zero pixels inside its box.

        Exact by construction: clutter never enters an object's box and the canvas is black, so every non-zero
        pixel in the box is the Fashion-MNIST garment's (its own rare black pixels are left out).
        """
        if self._masks is None:
            size = self.images.shape[1]
            ys, xs = np.arange(size)[None, :, None], np.arange(size)[None, None, :]
            x0, y0, x1, y1 = (self.boxes[:, i, None, None] for i in range(4))
            self._masks = (self.images > 0) & (xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)
        return self._masks

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        return self.images[index], int(self.targets[index])


def main(argv: list[str] | None = None) -> int:
    """Command line: build the ``.npz`` file; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--raw-dir", required=True, help="folder with the Fashion-MNIST idx(.gz) files")
    parser.add_argument("--out", default=str(DEFAULT_ASSET), help="output .npz path")
    parser.add_argument("--num-train", type=int, default=4000)
    parser.add_argument("--num-test", type=int, default=1000)
    parser.add_argument("--canvas-size", type=int, default=64)
    parser.add_argument("--num-clutter", type=int, default=6)
    parser.add_argument("--clutter-size", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    arrays = make_cluttered_fashion_mnist(
        args.raw_dir, args.num_train, args.num_test, args.canvas_size, args.num_clutter, args.clutter_size, args.seed
    )
    save_npz_deterministic(args.out, arrays)
    size_mb = os.path.getsize(args.out) / 1e6
    print(f"wrote {args.out} ({size_mb:.2f} MB): {args.num_train} train + {args.num_test} test images")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
