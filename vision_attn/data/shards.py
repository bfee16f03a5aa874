"""LitData shards (``data.name: litdata``): write any dataset we read with ``litdata.optimize`` and stream it back
on one machine or many.

* :func:`write_shards` (``vision-attn shard --config ... --out DIR``) writes the train / validation / test splits
  of a DataModule, hold-outs already made (seeded, as in training), each into ``DIR/<split>/`` (LitData chunks
  + ``index.json``), in a seeded shuffled order, images as their stored file bytes (lossless PNG for decoded
  arrays), with :data:`SHARD_META` (class names, channels, size, mean/std, counts, the source) beside them;
* :class:`ImageShards` (a ``litdata.StreamingDataset``) streams a split from a folder or an ``s3://`` / ``gs://``
  URL: LitData gives each rank and each loader worker its own samples (equal whole batches per rank under DDP);
  images are decoded and augmented in the workers, the augmentations seeded per batch from the position in the
  stream, so that with :class:`ShardLoader` (a ``StreamingDataLoader``, whose state Lightning stores in the
  checkpoint) ``--ckpt_path last`` resumes mid-epoch with exactly the batches of an unbroken run.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import struct
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("LITDATA_DISABLE_VERSION_CHECK", "1")  # never ask PyPI for a newer litdata

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchdata.stateful_dataloader import StatefulDataLoader

try:
    import litdata
    from litdata.streaming.dataset import _replay_sampling
except ImportError as err:  # an optional extra
    raise ImportError(
        "data.name 'litdata' and vision-attn shard need LitData: pip install 'vision_attn[datasets]'"
    ) from err

from vision_attn._io import atomic_dir
from vision_attn.data.hf import decode_image
from vision_attn.data.pixels import to_uint8_array
from vision_attn.data.resumable import sample_seed

__all__ = [
    "SHARD_META",
    "SPLITS",
    "ImageShards",
    "ShardItems",
    "ShardLoader",
    "ShardSource",
    "check_shards",
    "read_shard_meta",
    "write_shards",
]

SHARD_META = "vision_attn_shards.json"
SPLITS = ("train", "val", "test")
FORMAT = "vision_attn litdata shards"
REMOTE = ("s3://", "gs://", "r2://")
_STREAM_STRIDE = 1 << 32  # separates the batch counters of the (rank, worker) streams in the augmentation seeds


def is_remote(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an object-storage URL (``s3://``, ``gs://``, ``r2://``) rather than a local folder."""
    return str(path).startswith(REMOTE)


def _join(root: str, name: str) -> str:
    return f"{root.rstrip('/')}/{name}" if is_remote(root) else str(Path(root).expanduser() / name)


# --- writing ------------------------------------------------------------------------------------------------
def _label(base: Dataset, index: int) -> int:
    for name in ("targets", "labels"):
        values = getattr(base, name, None)
        if values is not None:
            return int(values[index])
    return int(base[index][1])


def encoded_image(base: Dataset, index: int) -> bytes:
    """The bytes stored for image ``index`` of ``base``: its file as stored (an image folder's file, a Hugging Face
    dataset's encoded image), else the decoded image as a lossless PNG in its own mode."""
    encoded = getattr(base, "encoded", None)
    if callable(encoded):
        return encoded(index)
    samples = getattr(base, "samples", None)
    if samples is not None:  # torchvision's DatasetFolder: read the file, never re-encode it
        return Path(samples[index][0]).read_bytes()
    image = base[index][0]
    if not isinstance(image, Image.Image):
        array = image.numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
        image = Image.fromarray(array[:, :, 0] if array.ndim == 3 and array.shape[2] == 1 else array)
    buffer = io.BytesIO()
    try:
        image.save(buffer, format="PNG")
    except OSError:  # a mode PNG cannot hold (CMYK, ...)
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


class _ShardItem:
    """``litdata.optimize``'s function: base index -> ``{'image': bytes, 'label': int, 'index': int}``."""

    def __init__(self, base: Dataset) -> None:
        self.base = base

    def __call__(self, index: int) -> dict[str, Any]:
        return {"image": encoded_image(self.base, index), "label": _label(self.base, index), "index": int(index)}


def _split_items(dataset: Any) -> tuple[Dataset, list[int]] | None:
    """``(raw base dataset, its indices)`` of a DataModule split (a ``TransformedDataset``), ``None`` if absent."""
    if dataset is None:
        return None
    base = getattr(dataset, "base", None)
    if base is None:
        raise ValueError(
            f"vision-attn shard reads map-style datasets; this split is a {type(dataset).__name__} (a stream): set "
            "data.streaming false"
        )
    indices = dataset.indices if dataset.indices is not None else range(len(base))
    return base, [int(i) for i in indices]


@contextlib.contextmanager
def _private_optimizer_cache() -> Iterator[None]:
    """Point LitData's optimizer caches (``/tmp/chunks``, ``/tmp/data`` by default, shared by every run) at a
    folder of this run's own, removed afterwards."""
    keys = ("DATA_OPTIMIZER_CACHE_FOLDER", "DATA_OPTIMIZER_DATA_CACHE_FOLDER")
    saved = {key: os.environ.get(key) for key in keys}
    with tempfile.TemporaryDirectory(prefix="vision_attn_shard_") as tmp:
        for key in keys:
            os.environ[key] = str(Path(tmp) / key.lower())
        try:
            yield
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def write_shards(
    datamodule: Any, out: str | os.PathLike, num_workers: int = 1, chunk_bytes: str | int = "64MB"
) -> dict[str, Any]:
    """Write the splits of ``datamodule`` (an :class:`~vision_attn.data.ImageDataModule`) as LitData shards under
    the new local folder ``out``; returns the metadata written to ``out/`` :data:`SHARD_META`.

    The hold-outs are the DataModule's (``val_fraction``, ``test_fraction``, ``seed``); each split is written in
    an order shuffled by ``seed``, so that LitData's chunk-wise shuffling mixes classes. The folder appears in one
    atomic step when every split is written; an existing ``out`` is never written over.
    """
    if is_remote(out):
        raise ValueError(f"--out {str(out)!r} must be a local folder; copy it to object storage afterwards (e.g. "
                         "aws s3 cp --recursive DIR s3://bucket/DIR)")  # fmt: skip
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {str(out)!r} already exists; shards are never written over other files: choose a "
                         "new folder")  # fmt: skip
    if num_workers < 1:
        raise ValueError(f"--num-workers must be >= 1, got {num_workers}")
    datamodule.setup("validate")  # every split, hold-outs made, no training-only extras
    splits = {name: _split_items(getattr(datamodule, f"{name}_set")) for name in SPLITS}
    meta: dict[str, Any] = {
        "format": FORMAT,
        "version": 1,
        "classes": list(datamodule.classes),
        "in_chans": datamodule.in_chans,
        "img_size": datamodule.img_size,
        "mean": list(datamodule.mean),
        "std": list(datamodule.std),
        "splits": {},
        "source": {key: datamodule.hparams.get(key) for key in ("name", "data_dir", "hf_name", "hf_config",
                                                               "val_fraction", "test_fraction", "seed")},
    }  # fmt: skip
    rng = np.random.default_rng(datamodule.seed)
    with atomic_dir(out) as staging, _private_optimizer_cache():
        for name, items in splits.items():
            if items is None:
                continue
            base, indices = items
            if not indices:
                raise ValueError(f"the {name} split of dataset {datamodule.name!r} holds no images")
            order = [indices[i] for i in rng.permutation(len(indices))]
            litdata.optimize(fn=_ShardItem(base), inputs=order, output_dir=str(staging / name),
                             chunk_bytes=chunk_bytes, num_workers=min(num_workers, len(order)), verbose=False,
                             start_method="fork" if os.name == "posix" else None)  # fmt: skip
            meta["splits"][name] = len(order)
        (staging / SHARD_META).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    return meta


# --- reading ------------------------------------------------------------------------------------------------
def _read_text(path: str) -> str:
    if not is_remote(path):
        return Path(path).read_text(encoding="utf-8")
    from litdata.streaming.fs_provider import _get_fs_provider

    with tempfile.TemporaryDirectory(prefix="vision_attn_meta_") as tmp:
        local = str(Path(tmp) / Path(path).name)
        _get_fs_provider(path).download_file(path, local)
        return Path(local).read_text(encoding="utf-8")


def read_shard_meta(data_dir: str | os.PathLike | None) -> dict[str, Any]:
    """The metadata that :func:`write_shards` left in ``data_dir`` (a folder or an object-storage URL).

    ``FileNotFoundError`` when ``data_dir`` holds none, ``ValueError`` when it is not ours or is malformed; both name
    ``data.data_dir`` and the value."""
    if data_dir is None or not str(data_dir).strip():
        raise ValueError("data.data_dir is required for data.name 'litdata': the folder (or s3:// / gs:// URL) "
                         "that vision-attn shard --out wrote")  # fmt: skip
    path = _join(str(data_dir), SHARD_META)
    try:
        meta = json.loads(_read_text(path))
    except (OSError, ValueError) as err:
        if isinstance(err, FileNotFoundError | PermissionError) or not isinstance(err, ValueError):
            raise FileNotFoundError(
                f"data.data_dir {str(data_dir)!r} holds no readable {SHARD_META}: expected the folder written by "
                f"vision-attn shard --config ... --out DIR ({type(err).__name__}: {err})"
            ) from err
        raise ValueError(f"data.data_dir {str(data_dir)!r}: {SHARD_META} is not valid JSON ({err})") from err
    keys = ("format", "classes", "in_chans", "img_size", "mean", "std", "splits")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or any(k not in meta for k in keys):
        raise ValueError(f"data.data_dir {str(data_dir)!r}: {SHARD_META} is not a vision-attn shard description "
                         f"(expected the keys {list(keys)})")  # fmt: skip
    if "train" not in meta["splits"] or not meta["classes"]:
        raise ValueError(f"data.data_dir {str(data_dir)!r} has no train split or no class names: rewrite it with "
                         "vision-attn shard")  # fmt: skip
    return meta


def check_shards(data_dir: str | os.PathLike, split: str, expected: int | None = None) -> str:
    """The location of split ``split`` under ``data_dir``, checked when it is local: ``index.json`` readable, every
    chunk present with the size it records, ``expected`` images in all. A ``ValueError`` / ``FileNotFoundError``
    naming ``data.data_dir`` and the file says what is wrong (a partial copy, a truncated or lost chunk)."""
    where = _join(str(data_dir), split)
    if is_remote(where):
        return where
    fix = "the shards are incomplete or corrupt: rewrite them with vision-attn shard"
    index_file = Path(where) / "index.json"
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
        chunks = index["chunks"]
    except FileNotFoundError as err:
        raise FileNotFoundError(f"data.data_dir {str(data_dir)!r}: {split}/index.json is missing; {fix}") from err
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"data.data_dir {str(data_dir)!r}: {split}/index.json is unreadable ({err}); {fix}") from err
    count = 0
    for chunk in chunks:
        file = Path(where) / chunk["filename"]
        size = file.stat().st_size if file.is_file() else None
        if size != chunk["chunk_bytes"]:
            found = "missing" if size is None else f"{size} bytes"
            raise ValueError(f"data.data_dir {str(data_dir)!r}: shard {split}/{chunk['filename']} is {found}, "
                             f"index.json says {chunk['chunk_bytes']} bytes; {fix}")  # fmt: skip
        count += int(chunk["chunk_size"])
    if count == 0 or (expected is not None and count != expected):
        raise ValueError(f"data.data_dir {str(data_dir)!r}: split {split} holds {count} images, "
                         f"{SHARD_META} says {expected}; {fix}")  # fmt: skip
    return where


class ImageShards(litdata.StreamingDataset):
    """A split written by :func:`write_shards`, streamed as ``(transform(image) float [C, H, W], label)``.

    LitData assigns each rank and loader worker its own chunks and items (with ``drop_last``: equal whole batches
    everywhere) and shuffles by ``(seed, epoch)`` the chunks, blocks of 256 items within them and the items of each
    block (the items were written in a seeded shuffled order, so blocks mix classes). Augmentations are seeded once
    per batch from ``(seed, epoch, rank and worker, batch number)``, so a resumed epoch draws the same ones;
    undecodable images raise a ``ValueError`` naming ``where``.
    """

    def __init__(
        self,
        input_dir: str,
        transform: Callable[..., dict[str, Any]],
        in_chans: int,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool | None = None,
        where: str = "shards",
    ) -> None:
        # LitData's default item shuffle: blocks of 256 items in a chunk, then the items of each block (a full
        # in-chunk permutation reads items 3x slower); the chunks were written in a shuffled order
        super().__init__(input_dir, shuffle=shuffle, seed=seed, drop_last=drop_last, batch_decode=0)
        self.image_transform, self.in_chans, self.where = transform, in_chans, where
        self._position = 0

    def __iter__(self) -> ImageShards:
        super().__iter__()
        state = self._state_dict
        self._position = 0
        if state and state.get("resume_mode") != "elastic":  # the items this worker yielded before the save
            replay = _replay_sampling(state["num_samples_yielded"], state["batch_size"], state["num_workers"])
            self._position = replay.get(self.worker_env.rank, 0)
        return self

    def __next__(self) -> tuple[torch.Tensor, int]:
        batch_size = max(1, self.batch_size)
        if self._position % batch_size == 0:
            stream = self.distributed_env.global_rank * self.worker_env.world_size + self.worker_env.rank
            batch = stream * _STREAM_STRIDE + self._position // batch_size
            self.image_transform.set_random_seed(sample_seed(self.seed, self.current_epoch, batch))
        item = super().__next__()
        self._position += 1
        return item

    def __getitem__(self, index: Any) -> tuple[torch.Tensor, int]:
        """``(image [C, H, W], label)`` of item ``index`` (LitData's ``ChunkedIndex`` or a global index)."""
        where = f"item {getattr(index, 'index', index)} of {self.where}"
        try:
            item = super().__getitem__(index)
        except (struct.error, OSError, ValueError, IndexError, KeyError, TypeError, UnicodeDecodeError) as err:
            raise ValueError(f"{where} is unreadable ({type(err).__name__}: {err}); the shards are corrupt: rewrite "
                             "them with vision-attn shard") from err  # fmt: skip
        image = decode_image(item["image"], where)
        return self.image_transform(image=to_uint8_array(image, self.in_chans))["image"], int(item["label"])


class ShardItems(Dataset):
    """A split of shards read by index, ``(image [C, H, W], label)``: for validation and test, where Lightning's
    ``DistributedSampler`` then splits the items evenly between ranks, as for every other dataset (LitData's own
    split hands out whole batches, so a small split leaves some ranks without any)."""

    def __init__(self, shards: ImageShards, count: int) -> None:
        self.shards, self.count = shards, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        """Item ``index`` of the split."""
        return self.shards[int(index)]


class ShardLoader(litdata.StreamingDataLoader):
    """LitData's ``StreamingDataLoader`` (its ``state_dict``, the position in the epoch, is what Lightning stores in
    checkpoints), fixed for a resumed epoch that ends after ``len(loader)`` batches: LitData forgets a restored
    position only when an epoch is read past its end, which Lightning's loop never does, so the next epoch would
    start from the checkpoint's position again; here a restored position is used once."""

    def __iter__(self) -> Iterator[Any]:
        for batch in super().__iter__():
            self.restore = False
            yield batch


class ShardSource:
    """The shards in ``data_dir`` (a folder or an ``s3://`` / ``gs://`` URL) as the DataModule's data source: class
    names, channels, size and mean/std as recorded by :func:`write_shards`, and the splits as it wrote them (the
    validation split is there when it was held out; ``vision-attn shard`` with ``val_fraction: 0`` writes none)."""

    iterable = True

    def __init__(self, data_dir: str | os.PathLike | None) -> None:
        self.meta = read_shard_meta(data_dir)
        self.data_dir = str(data_dir)
        self.class_names: list[str] = [str(c) for c in self.meta["classes"]]

    def info(self, info: Any) -> Any:
        """``info`` (a :class:`~vision_attn.data.datasets.DatasetInfo`) with the recorded classes and statistics."""
        from dataclasses import replace

        meta = self.meta
        return replace(info, num_classes=len(self.class_names), in_chans=int(meta["in_chans"]),
                       img_size=int(meta["img_size"]), mean=tuple(meta["mean"]), std=tuple(meta["std"]))  # fmt: skip

    def prepare(self) -> None:
        """Nothing to download: LitData fetches the chunks it reads."""

    def datasets(self) -> tuple[Dataset, Dataset | None, Dataset | None]:
        """Not map-style: see :meth:`streams`."""
        raise TypeError("LitData shards are streamed; use streams()")

    def streams(self, datamodule: Any) -> tuple[ImageShards, ShardItems | None, ShardItems]:
        """``(train, val, test)`` with the DataModule's transforms and seed: the train split streamed
        (:class:`ImageShards`: shuffled, equal whole batches per rank and worker), the others read by index
        (:class:`ShardItems`)."""
        counts = self.meta["splits"]
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        if counts["train"] // world < datamodule.batch_size:
            raise ValueError(
                f"batch_size {datamodule.batch_size} is larger than the {counts['train']} training images of "
                f"data.data_dir {self.data_dir!r} per process ({world}): no training step would run; lower "
                "data.batch_size"
            )

        def split(name: str) -> ImageShards:
            where = check_shards(self.data_dir, name, counts[name])
            train = name == "train"
            transform = datamodule.train_transform if train else datamodule.eval_transform
            return ImageShards(where, transform, datamodule.in_chans, shuffle=train, seed=datamodule.seed,
                               drop_last=True if train else None,
                               where=f"data.data_dir {self.data_dir!r} ({name})")  # fmt: skip

        if "test" not in counts:
            raise ValueError(f"data.data_dir {self.data_dir!r} has no test split; rewrite it with vision-attn shard")
        val = ShardItems(split("val"), counts["val"]) if "val" in counts else None
        return split("train"), val, ShardItems(split("test"), counts["test"])

    def loader(self, dataset: ImageShards | ShardItems, batch_size: int, num_workers: int) -> DataLoader:
        """A :class:`ShardLoader` over the train stream; a plain in-order loader over a :class:`ShardItems` split."""
        if isinstance(dataset, ShardItems):
            return StatefulDataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                                      persistent_workers=num_workers > 0)  # fmt: skip
        return ShardLoader(dataset, batch_size=batch_size, num_workers=num_workers)
