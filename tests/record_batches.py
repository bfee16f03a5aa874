"""A callback that records what each rank trains on (for the multi-process tests; importable by a fresh process)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import lightning as L
import numpy as np


class RecordBatches(L.Callback):
    """Write ``out_dir/rank{R}.json``: per epoch, a short hash of every training image this rank was given."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.seen: dict[int, list[str]] = {}

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        images = batch[0].detach().cpu().numpy()
        digests = [hashlib.sha1(np.ascontiguousarray(x).tobytes()).hexdigest()[:16] for x in images]
        self.seen.setdefault(trainer.current_epoch, []).extend(digests)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.seen))
