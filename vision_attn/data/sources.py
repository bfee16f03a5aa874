"""Datasets that bring their own reader: ``hf`` (:mod:`vision_attn.data.hf`) and ``litdata``
(:mod:`vision_attn.data.shards`). :func:`open_source` gives the DataModule their :class:`DataSource`."""

from __future__ import annotations

from typing import Any, Protocol

from torch.utils.data import DataLoader, Dataset

from vision_attn.data.datasets import DatasetInfo

__all__ = ["DataSource", "open_source"]


class DataSource(Protocol):
    """What the DataModule asks of a dataset that has its own reader."""

    class_names: list[str]
    iterable: bool  # True: the splits are streams (streams/loader); False: map-style datasets (datasets)

    def info(self, info: DatasetInfo) -> DatasetInfo:
        """``info`` with what the data says: the class count, and for shards their recorded size and statistics."""
        ...

    def prepare(self) -> None:
        """Download what must be downloaded (once, on one process)."""
        ...

    def datasets(self) -> tuple[Dataset, Dataset | None, Dataset | None]:
        """Raw map-style ``(train, val, test)`` of ``(image, label)``; ``None``: held out of train by the DataModule."""
        ...

    def streams(self, datamodule: Any) -> tuple[Dataset, Dataset | None, Dataset]:
        """Transformed ``(train, val, test)`` streams of ``(image [C, H, W], label)``; ``val`` ``None``: none."""
        ...

    def loader(self, dataset: Dataset, batch_size: int, num_workers: int) -> DataLoader:
        """The resumable loader of one of :meth:`streams`' datasets."""
        ...


def open_source(name: str, data_dir: str | None, **options: Any) -> DataSource | None:
    """The :class:`DataSource` of dataset ``name`` (``'hf'``: the ``hf_*``, split, column and ``streaming``
    ``options``; ``'litdata'``: the shards in ``data_dir``), or ``None`` for the datasets of
    :data:`~vision_attn.data.datasets.DATASETS` read by ``build_dataset``."""
    if name == "hf":
        from vision_attn.data.hf import HFSource

        return HFSource(options.pop("hf_name"), cache_dir=data_dir, **options)
    if name == "litdata":
        from vision_attn.data.shards import ShardSource

        return ShardSource(data_dir)
    return None
