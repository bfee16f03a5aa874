"""Reproducible, resumable data order: a run killed mid-epoch and resumed sees exactly the batches it would have.

* :class:`EpochSampler` fixes the shuffled order by ``(seed, epoch)`` (Lightning calls ``set_epoch``) and hands
  each item an augmentation seed, so random augmentations do not depend on what ran before either;
* torchdata's ``StatefulDataLoader`` saves how far into the epoch it got; Lightning stores that state in its
  checkpoints and restores it with ``--ckpt_path``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Sampler

__all__ = ["EpochSampler", "sample_seed"]

_MIX = 0x9E3779B97F4A7C15  # 64-bit golden-ratio constant: decorrelates neighbouring (seed, epoch, index) triples
_MASK = (1 << 63) - 1


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """Return a 31-bit augmentation seed for item ``index`` in ``epoch`` of a run seeded with ``seed``."""
    value = (seed * _MIX + epoch) & _MASK
    value = (value * _MIX + index) & _MASK
    return (value ^ (value >> 29)) % (2**31 - 1)


class EpochSampler(Sampler[tuple[int, int]]):
    """Yield ``(index, augmentation_seed)`` for ``num_samples`` items, shuffled by ``(seed, epoch)`` if ``shuffle``.

    The order of an epoch depends only on ``seed`` and the epoch set with :meth:`set_epoch`, not on any global
    random state, so it is the same after a resume and on every process.
    """

    def __init__(self, num_samples: int, seed: int = 0, shuffle: bool = True) -> None:
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        self.num_samples = num_samples
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order :meth:`__iter__` yields (Lightning calls this at each epoch start)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def state_dict(self) -> dict[str, Any]:
        """The epoch whose order is being read (its position is kept by the iterator's own state)."""
        return {"epoch": self.epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the epoch saved by :meth:`state_dict`."""
        self.epoch = int(state_dict["epoch"])

    def __iter__(self) -> _EpochIterator:
        if self.shuffle:
            generator = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, -1))
            order = torch.randperm(self.num_samples, generator=generator).tolist()
        else:
            order = list(range(self.num_samples))
        return _EpochIterator([(index, sample_seed(self.seed, self.epoch, index)) for index in order])


class _EpochIterator(Iterator[tuple[int, int]]):
    """Iterator over one epoch's items whose position is saved and restored (torchdata's ``Stateful``)."""

    def __init__(self, items: list[tuple[int, int]]) -> None:
        self.items = items
        self.position = 0

    def __next__(self) -> tuple[int, int]:
        if self.position >= len(self.items):
            raise StopIteration
        self.position += 1
        return self.items[self.position - 1]

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.position = int(state_dict["position"])
