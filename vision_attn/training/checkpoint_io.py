"""Atomic checkpoint writes for Lightning: a kill or a full disk during a save leaves the previous file loadable."""

from __future__ import annotations

import os
from typing import Any

from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

from vision_attn._io import atomic_torch_save

__all__ = ["AtomicCheckpointIO"]


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves go through :func:`vision_attn._io.atomic_torch_save`: a temporary
    file in the checkpoint's own folder, ``fsync``, then ``os.replace`` over the old file.

    Lightning's own save stages the bytes in the system temp folder and moves them over, which is a copy (not a
    rename) when that folder is on another filesystem: a kill then leaves a 0-byte ``last.ckpt``. Remote paths
    (``s3://``...) keep Lightning's behaviour.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        """Write ``checkpoint`` to ``path`` atomically (``storage_options`` is not supported, as in Lightning)."""
        if storage_options is not None or not _is_local_file_protocol(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        path = os.fspath(path)
        atomic_torch_save(checkpoint, path.removeprefix("file://"))
