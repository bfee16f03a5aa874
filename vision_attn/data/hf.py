"""Hugging Face ``datasets`` (``data.name: hf``): a Hub dataset, a ``save_to_disk`` folder or parquet files.

:class:`HFSource` opens ``hf_name`` and finds its image column (the ``Image`` feature), its label column (the
``ClassLabel`` feature, whose names become the class names) and its train / validation / test splits.
Each split is read either as a map-style :class:`HFImageDataset` of ``(PIL image, label)`` (the DataModule's
seeded order, hold-outs and exact resume apply as for every other dataset) or, with ``streaming``, as an
:class:`HFImageStream` that decodes and augments examples as they download. Needs the ``datasets`` extra.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, IterableDataset, get_worker_info
from torchdata.stateful_dataloader import StatefulDataLoader

from vision_attn.data.datasets import DatasetInfo
from vision_attn.data.pixels import to_uint8_array
from vision_attn.data.resumable import sample_seed

__all__ = ["VAL_SPLITS", "HFImageDataset", "HFImageStream", "HFSource", "decode_image"]

VAL_SPLITS = ("validation", "valid", "val")  # looked for, in this order, when val_split is not given
STREAM_SHUFFLE_BUFFER = 1000  # examples held by a streamed train split's shuffle buffer (the datasets default)
INSTALL = "pip install 'vision_attn[datasets]'"


def _datasets() -> Any:
    try:
        import datasets
    except ImportError as err:  # an optional extra
        raise ImportError(f"data.name 'hf' needs the Hugging Face datasets library: {INSTALL}") from err
    return datasets


def decode_image(encoded: dict[str, Any] | bytes, where: str) -> Image.Image:
    """The PIL image of an encoded ``datasets.Image`` value (``{'bytes', 'path'}``) or of raw file bytes, decoded in
    its own mode; a ``ValueError`` naming ``where`` when it is not a readable image."""
    data = encoded.get("bytes") if isinstance(encoded, dict) else encoded
    try:
        if data is None:
            with open(encoded["path"], "rb") as f:  # type: ignore[index]
                data = f.read()
        image = Image.open(io.BytesIO(data))
        image.load()
    except (OSError, SyntaxError, ValueError, TypeError, KeyError) as err:  # PIL: OSError, SyntaxError (bad PNG)
        raise ValueError(f"{where} is not a readable image: {err}") from err
    return image


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.endswith(".parquet") or Path(name).expanduser().exists()


class HFSource:
    """``hf_name`` (a Hub name such as ``'beans'``, a folder written by ``save_to_disk``, a folder of data files, or
    parquet files: a path or glob ending in ``.parquet``, read as the train split) with its columns and splits.

    ``image_column`` / ``label_column`` default to the dataset's ``Image`` and ``ClassLabel`` columns;
    ``train_split`` must exist; ``val_split`` defaults to the first of :data:`VAL_SPLITS` and ``test_split`` to
    ``'test'`` when the dataset has them. As for an image folder, a dataset with only one of validation / test
    uses it as the test split (``None`` here: the DataModule then holds validation out of the train split).
    Bad names raise a ``ValueError`` naming the option, the value and what the dataset has.
    """

    def __init__(
        self,
        hf_name: str | None,
        hf_config: str | None = None,
        cache_dir: str | None = None,
        streaming: bool = False,
        train_split: str = "train",
        val_split: str | None = None,
        test_split: str | None = None,
        image_column: str | None = None,
        label_column: str | None = None,
    ) -> None:
        if not isinstance(hf_name, str) or not hf_name.strip():
            raise ValueError(
                f"data.hf_name is required for data.name 'hf' (a Hub name such as 'beans', a save_to_disk folder "
                f"or parquet files), got {hf_name!r}"
            )
        self.hf_name, self.hf_config, self.cache_dir, self.streaming = hf_name, hf_config, cache_dir, streaming
        self.where = f"data.hf_name {hf_name!r}" + (f" (hf_config {hf_config!r})" if hf_config else "")
        self._opened: dict[bool, Any] = {}
        # a Hub dataset is described from its metadata only (nothing is downloaded before prepare_data)
        described = self._open(streaming=streaming or not _looks_local(hf_name))
        split_names = list(described)
        first = described[train_split] if train_split in described else next(iter(described.values()), None)
        features = getattr(first, "features", None)
        if features is None and first is not None:  # a streamed dataset without metadata: read one example
            features = first._resolve_features().features
        if not split_names or features is None:
            raise ValueError(f"{self.where} holds no dataset (no splits or no features)")
        self.image_column, self.label_column, self.class_names = resolve_columns(
            features, image_column, label_column, self.where
        )
        self.splits = resolve_splits(split_names, train_split, val_split, test_split, self.where)

    # --- opening ------------------------------------------------------------------------------------------
    def _open(self, streaming: bool) -> Any:
        """The ``DatasetDict`` (``IterableDatasetDict`` when ``streaming``) of ``hf_name``, opened once."""
        if streaming in self._opened:
            return self._opened[streaming]
        datasets = _datasets()
        path = Path(self.hf_name).expanduser()
        local = _looks_local(self.hf_name)
        try:
            if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
                loaded = datasets.load_from_disk(str(path))
                if isinstance(loaded, datasets.Dataset):
                    loaded = datasets.DatasetDict(train=loaded)
                if streaming:
                    loaded = datasets.IterableDatasetDict({k: v.to_iterable_dataset() for k, v in loaded.items()})
            elif self.hf_name.endswith(".parquet"):
                loaded = datasets.load_dataset("parquet", data_files={"train": str(path)}, cache_dir=self.cache_dir,
                                               streaming=streaming)  # fmt: skip
            elif local:
                if not path.exists():
                    raise FileNotFoundError(f"{self.where}: no such file or folder")
                loaded = datasets.load_dataset(str(path), cache_dir=self.cache_dir, streaming=streaming)
            else:
                loaded = datasets.load_dataset(self.hf_name, self.hf_config, cache_dir=self.cache_dir,
                                               streaming=streaming)  # fmt: skip
        except (FileNotFoundError, ConnectionError) as err:
            raise FileNotFoundError(
                f"{self.where} could not be loaded ({_first_line(err)}); expected a Hub dataset name (needs a "
                "network or the datasets cache), a save_to_disk folder or parquet files"
            ) from err
        except ValueError as err:  # e.g. an empty or unreadable data file, a missing config name
            raise ValueError(f"{self.where} could not be loaded: {_first_line(err)}") from err
        if not isinstance(loaded, datasets.DatasetDict | datasets.IterableDatasetDict):
            loaded = {"train": loaded}
        self._opened[streaming] = loaded
        return loaded

    def prepare(self) -> None:
        """Download and prepare the dataset (Hub names; once, on one process); a streamed one is not downloaded."""
        if not self.streaming:
            self._open(streaming=False)

    # --- reading --------------------------------------------------------------------------------------------
    def split(self, split: str) -> Any:
        """The raw ``datasets`` split ``split`` (a name of this dataset); a ``ValueError`` for an empty one."""
        data = self._open(self.streaming)[split]
        if not self.streaming and len(data) == 0:
            raise ValueError(f"split {split!r} of {self.where} holds no examples")
        features = data.features
        if features is not None and self.label_column in features:
            names = getattr(features[self.label_column], "names", None)
            if names is not None and list(names) != self.class_names:
                raise ValueError(f"split {split!r} of {self.where} has class names {list(names)}, but the train "
                                 f"split has {self.class_names}")  # fmt: skip
        return data

    def dataset(self, split: str) -> HFImageDataset:
        """Split ``split`` as a map-style dataset of ``(PIL image, label)``."""
        return HFImageDataset(self.split(split), self.image_column, self.label_column, self.class_names,
                              where=f"split {split!r} of {self.where}")  # fmt: skip

    # --- the DataModule's DataSource interface ----------------------------------------------------------
    @property
    def iterable(self) -> bool:
        """Whether the splits are streamed (``streaming``) rather than map-style."""
        return self.streaming

    def info(self, info: DatasetInfo) -> DatasetInfo:
        """``info`` with this dataset's class count."""
        return replace(info, num_classes=len(self.class_names))

    def datasets(self) -> tuple[HFImageDataset, HFImageDataset | None, HFImageDataset | None]:
        """Map-style ``(train, val, test)``; ``None`` for a split the DataModule holds out of train."""
        train, val, test = (self.splits[part] for part in ("train", "val", "test"))
        return self.dataset(train), self.dataset(val) if val else None, self.dataset(test) if test else None

    def streams(self, datamodule: Any) -> tuple[HFImageStream, HFImageStream | None, HFImageStream]:
        """Streamed ``(train, val, test)`` with the DataModule's transforms; a split the dataset lacks is a seeded
        hash band of the train split (``test_fraction``, then ``val_fraction`` of the rest; ``val_fraction=0``:
        no validation). One process only: several read LitData shards (``vision-attn shard``)."""
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        if world > 1:
            raise ValueError(
                f"data.streaming true reads {self.where} in one process, and this run has {world}; for several "
                "processes or machines write LitData shards (vision-attn shard --config ... --out DIR) and train "
                "with data.name: litdata"
            )
        test_band = 0.0 if self.splits["test"] else datamodule.test_fraction
        val_band = 0.0 if self.splits["val"] else datamodule.val_fraction * (1 - test_band)
        bands = {"test": (0.0, test_band), "val": (test_band, test_band + val_band),
                 "train": (test_band + val_band, 1.0)}  # fmt: skip
        seed, in_chans = datamodule.seed, datamodule.in_chans

        def stream(part: str, transform: Any, shuffle: bool) -> HFImageStream:
            split = self.splits[part] or self.splits["train"]
            held_out = split == self.splits["train"] and bool(test_band or val_band)
            return HFImageStream(self.split(split), self.image_column, self.label_column, transform, in_chans,
                                 shuffle=shuffle, seed=seed, part=part, holdout=bands if held_out else None,
                                 where=f"split {split!r} of {self.where}")  # fmt: skip

        train = stream("train", datamodule.train_transform, shuffle=True)
        val = stream("val", datamodule.eval_transform, False) if self.splits["val"] or val_band else None
        return train, val, stream("test", datamodule.eval_transform, False)

    def loader(self, dataset: HFImageStream, batch_size: int, num_workers: int) -> StatefulDataLoader:
        """A ``StatefulDataLoader`` (its position is saved in checkpoints); training drops the last partial batch."""
        return StatefulDataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                                  drop_last=dataset.shuffle, persistent_workers=num_workers > 0)  # fmt: skip


def resolve_columns(
    features: Any, image_column: str | None, label_column: str | None, where: str
) -> tuple[str, str, list[str]]:
    """``(image column, label column, class names)`` of a dataset with ``features``: the given columns, checked,
    or the ``Image`` and the ``ClassLabel`` column; a ``ValueError`` naming the option when one is missing or wrong."""
    datasets = _datasets()
    columns = ", ".join(f"{k} ({type(f).__name__})" for k, f in features.items())
    if image_column is None:
        found = [k for k, f in features.items() if isinstance(f, datasets.Image)]
        if not found:
            raise ValueError(f"{where} has no Image column (its columns: {columns}); set data.image_column")
        image_column = found[0]
    elif image_column not in features:
        raise ValueError(f"data.image_column {image_column!r} is not a column of {where}; its columns: {columns}")
    elif not isinstance(features[image_column], datasets.Image):
        raise ValueError(
            f"data.image_column {image_column!r} of {where} is a {type(features[image_column]).__name__} column; "
            "expected an Image column"
        )
    if label_column is None:
        found = [k for k, f in features.items() if isinstance(f, datasets.ClassLabel)]
        if len(found) != 1:
            what = f"several ClassLabel columns {found}" if found else "no ClassLabel column (labels with class names)"
            raise ValueError(f"{where} has {what} (its columns: {columns}); set data.label_column to the ClassLabel "
                             "column to train on")  # fmt: skip
        label_column = found[0]
    elif label_column not in features:
        raise ValueError(f"data.label_column {label_column!r} is not a column of {where}; its columns: {columns}")
    feature = features[label_column]
    if not isinstance(feature, datasets.ClassLabel) or not feature.names:
        raise ValueError(
            f"data.label_column {label_column!r} of {where} is a {type(feature).__name__} column without class "
            f"names; expected a ClassLabel column (cast it: dataset.cast_column({label_column!r}, "
            "ClassLabel(names=[...])))"
        )
    return image_column, label_column, list(feature.names)


def resolve_splits(
    available: Sequence[str], train: str, val: str | None, test: str | None, where: str
) -> dict[str, str | None]:
    """The split names used as ``'train'``, ``'val'`` and ``'test'`` (``None``: held out of train by the DataModule).

    Unnamed, validation is the first of :data:`VAL_SPLITS` and test is ``'test'``; a dataset with only one of them
    uses it as the test split. A named split that does not exist raises a ``ValueError`` listing the splits."""
    listed = ", ".join(available)
    for option, name in (("train_split", train), ("val_split", val), ("test_split", test)):
        if name is not None and name not in available:
            raise ValueError(f"data.{option} {name!r} is not a split of {where}; its splits: {listed}")
    found_val = val or next((s for s in VAL_SPLITS if s in available and s not in (train, test)), None)
    found_test = test or ("test" if "test" in available and "test" not in (train, found_val) else None)
    if found_test is None and val is None and found_val is not None:  # one held-out split: the test split
        found_test, found_val = found_val, None
    named = [s for s in (train, found_val, found_test) if s is not None]
    if len(set(named)) != len(named):
        raise ValueError(f"data.train_split / val_split / test_split of {where} must differ, got {named}")
    return {"train": train, "val": found_val, "test": found_test}


class HFImageDataset(Dataset):
    """A ``datasets`` split as a map-style dataset of ``(PIL image, label)``, with ``classes`` and ``targets``.

    Images are decoded here, in their own mode (16-bit stays 16-bit until converted); :meth:`encoded` gives the
    stored file bytes (what ``vision-attn shard`` writes, never re-encoded)."""

    def __init__(self, data: Any, image_column: str, label_column: str, classes: Sequence[str], where: str) -> None:
        datasets = _datasets()
        self.data = data.select_columns([image_column]).cast_column(image_column, datasets.Image(decode=False))
        self.targets = np.asarray(data.with_format("numpy")[label_column], dtype=np.int64)
        self.classes = list(classes)
        self.image_column = image_column
        self.where = where

    def __len__(self) -> int:
        return len(self.data)

    def encoded(self, index: int) -> bytes:
        """The stored bytes of image ``index`` (its file, as encoded in the dataset)."""
        value = self.data[int(index)][self.image_column]
        if value.get("bytes") is not None:
            return value["bytes"]
        return Path(value["path"]).read_bytes()

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        """``(image, label)`` of example ``index``."""
        value = self.data[int(index)][self.image_column]
        return decode_image(value, f"example {index} of {self.where}"), int(self.targets[index])


class HFImageStream(IterableDataset):
    """A streamed ``datasets`` split as ``(transform(image) float [C, H, W], label)``, decoded and augmented as the
    examples arrive (one process: several processes read LitData shards instead, see ``vision-attn shard``).

    ``shuffle``: a buffer of :data:`STREAM_SHUFFLE_BUFFER` examples, seeded by ``seed`` and the epoch.
    ``holdout``: ``{part: (low, high)}`` bands of a seeded hash of each image's bytes; only the examples whose
    hash falls into the band of ``part`` are kept, so hold-outs of a stream are seeded and disjoint without
    reading the stream first. The position in the stream is saved and restored (torchdata's
    ``StatefulDataLoader`` state, in the checkpoint); ``datasets`` does not save the shuffle buffer, so after a
    resume the rest of that epoch is shuffled anew.
    """

    def __init__(
        self,
        stream: Any,
        image_column: str,
        label_column: str,
        transform: Callable[..., dict[str, Any]],
        in_chans: int,
        shuffle: bool = False,
        seed: int = 0,
        part: str = "train",
        holdout: dict[str, tuple[float, float]] | None = None,
        where: str = "stream",
    ) -> None:
        datasets = _datasets()
        self.stream = stream.select_columns([image_column, label_column]).cast_column(
            image_column, datasets.Image(decode=False)
        )
        self.image_column, self.label_column = image_column, label_column
        self.transform, self.in_chans = transform, in_chans
        self.shuffle, self.seed, self.part, self.holdout, self.where = shuffle, seed, part, holdout, where
        self.epoch = 0
        self._live: Any = None
        self._resume: dict[str, Any] | None = None

    def _in_part(self, data: bytes) -> bool:
        if not self.holdout:
            return True
        digest = hashlib.blake2b(data, digest_size=8, key=str(self.seed).encode()).digest()
        low, high = self.holdout[self.part]
        return low <= int.from_bytes(digest, "little") / 2**64 < high

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        stream = self.stream
        if self.shuffle:
            stream = stream.shuffle(seed=self.seed, buffer_size=STREAM_SHUFFLE_BUFFER)
            stream.set_epoch(self.epoch)
        if self._resume is not None:
            stream.load_state_dict(self._resume)
            self._resume = None
        self._live = stream
        worker = get_worker_info()
        self.transform.set_random_seed(sample_seed(self.seed, self.epoch, worker.id if worker else 0))
        for number, example in enumerate(stream):
            value = example[self.image_column]
            data = value["bytes"] if value.get("bytes") is not None else Path(value["path"]).read_bytes()
            if not self._in_part(data):
                continue
            image = decode_image(data, f"example {number} of {self.where}")
            yield self.transform(image=to_uint8_array(image, self.in_chans))["image"], int(example[self.label_column])
        self.epoch += 1
        self._live = None

    def state_dict(self) -> dict[str, Any]:
        """The epoch and the position in the stream (``datasets``' own state)."""
        return {"epoch": self.epoch, "stream": self._live.state_dict() if self._live is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a :meth:`state_dict`: the next iteration starts where it was saved."""
        self.epoch = int(state["epoch"])
        self._resume = state.get("stream")
