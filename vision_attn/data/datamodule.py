"""One ``LightningDataModule`` for every dataset in :data:`vision_attn.data.datasets.DATASETS`."""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning as L
import numpy as np
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset
from torchdata.stateful_dataloader import StatefulDataLoader

from vision_attn._data_config import INTERPOLATIONS, channel_stats, check_data_config
from vision_attn.data.datasets import TransformedDataset, build_dataset, dataset_info
from vision_attn.data.image_folder import LAYOUT, folder_classes, image_folder_splits
from vision_attn.data.outliers import ContextOutliers
from vision_attn.data.resumable import EpochSampler
from vision_attn.data.sources import open_source
from vision_attn.data.transforms import build_train_transform, create_transform
from vision_attn.data.verify import BAD_IMAGE_POLICIES

__all__ = ["ImageDataModule"]

warnings.filterwarnings("ignore", message="'set_vital' is deprecated")  # torchdata 0.11 on torch >= 2.7


class ImageDataModule(L.LightningDataModule):
    """Train / val / test / predict loaders for the dataset ``name`` with albumentations pipelines.

    ``val_fraction`` of the train split (seeded by ``seed``) is held out for validation (model selection,
    early stopping); ``val_fraction=0`` means no validation at all. The test split is never used for validation:
    it is read only by ``test`` (which ``fit`` runs once, at its end).

    An ``image_folder`` uses its ``val/`` and ``test/`` folders when it has both; with one of them, that one is the
    test split; with neither, ``test_fraction`` of the train images (seeded) is held out as the test split first,
    and validation is ``val_fraction`` of the rest — never the training images.

    ``img_size``/``in_chans``/``mean``/``std`` default to the dataset's; grey data with ``in_chans=3`` is
    repeated to RGB, RGB data with ``in_chans=1`` converted to luminance.
    ``num_classes``, ``in_chans``, ``img_size``, ``mean`` and ``std`` are attributes right after construction
    (LightningCLI links them to the model).

    ``name='hf'`` reads the Hugging Face dataset ``hf_name`` (:mod:`vision_attn.data.hf`: ``hf_config``, the split
    names, ``image_column`` / ``label_column``, ``streaming``; ``data_dir`` is its cache); ``name='litdata'`` streams
    the LitData shards that ``vision-attn shard`` wrote to ``data_dir`` (:mod:`vision_attn.data.shards`).

    ``context_outliers=k`` (datasets with object boxes, such as the embedded one) adds to each training batch the
    context-only versions of its first ``k`` images, labelled ``-1``: the training loss asks for a uniform
    prediction on them, so clutter alone is no evidence for any class (:mod:`vision_attn.data.outliers`).
    """

    def __init__(
        self,
        name: str = "cluttered_fashion_mnist",
        data_dir: str | None = None,
        download: bool = False,
        img_size: int | None = None,
        in_chans: int | None = None,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 2,
        seed: int = 42,
        crop_scale: tuple[float, float] | None = (0.35, 1.0),
        translate: float = 0.0,
        hflip: float = 0.5,
        color_jitter: float = 0.0,
        coarse_dropout: float = 0.0,
        eval_crop_pct: float = 1.0,
        eval_interpolation: str = "bilinear",
        bad_images: str = "error",
        context_outliers: int = 0,
        hf_name: str | None = None,
        hf_config: str | None = None,
        train_split: str = "train",
        val_split: str | None = None,
        test_split: str | None = None,
        image_column: str | None = None,
        label_column: str | None = None,
        streaming: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        info = dataset_info(name)
        self.source = open_source(name, data_dir, hf_name=hf_name, hf_config=hf_config, train_split=train_split,
                                  val_split=val_split, test_split=test_split, image_column=image_column,
                                  label_column=label_column, streaming=streaming)  # fmt: skip
        if self.source is not None:  # hf / litdata: classes (and the shards' recorded statistics) from the data
            info = self.source.info(info)
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if eval_batch_size is not None and eval_batch_size <= 0:
            raise ValueError(f"eval_batch_size must be positive (or null: batch_size), got {eval_batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if in_chans not in (None, 1, 3):
            raise ValueError(f"in_chans must be 1, 3 or None (the dataset's own: {info.in_chans}), got {in_chans}")
        if img_size is not None and img_size <= 0:
            raise ValueError(f"img_size must be positive, got {img_size}")
        if not 0 <= context_outliers <= batch_size:
            raise ValueError(
                f"context_outliers must be in [0, batch_size={batch_size}] (context-only copies of a batch's first "
                f"images), got {context_outliers}"
            )
        if not 0.0 < eval_crop_pct <= 1.0:
            raise ValueError(f"eval_crop_pct must be in (0, 1], got {eval_crop_pct}")
        if eval_interpolation not in INTERPOLATIONS:
            raise ValueError(f"eval_interpolation must be one of {INTERPOLATIONS}, got {eval_interpolation!r}")
        if bad_images not in BAD_IMAGE_POLICIES:
            raise ValueError(f"bad_images must be one of {BAD_IMAGE_POLICIES}, got {bad_images!r}")
        self.name = name
        self.data_dir = data_dir
        self.download = download
        self.in_chans: int = in_chans or info.in_chans
        self.img_size: int = img_size or info.img_size
        self.mean: tuple[float, ...] = channel_stats(mean if mean is not None else info.mean, self.in_chans, "mean",
                                                     convert=mean is None)  # fmt: skip
        self.std: tuple[float, ...] = channel_stats(std if std is not None else info.std, self.in_chans, "std",
                                                    convert=std is None)  # fmt: skip
        self.num_classes: int = info.num_classes or len(self._folder_classes())
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.seed = seed
        self.bad_images = bad_images
        self.context_outliers = context_outliers
        self.train_transform = build_train_transform(
            self.img_size, self.mean, self.std, crop_scale=crop_scale, translate=translate, hflip=hflip,
            color_jitter=color_jitter, coarse_dropout=coarse_dropout,
        )  # fmt: skip
        # the eval preprocessing, recorded with every checkpoint and export: explain and the app read it back
        self.data_config = check_data_config(
            {"input_size": (self.in_chans, self.img_size, self.img_size), "interpolation": eval_interpolation,
             "mean": self.mean, "std": self.std, "crop_pct": eval_crop_pct, "crop_mode": "center"},
            "data",
        )  # fmt: skip
        self.eval_transform = create_transform(self.data_config)
        # resolved values, so checkpoints say what the model saw (and agree with the model's linked hparams)
        self.hparams.update(img_size=self.img_size, in_chans=self.in_chans, mean=self.mean, std=self.std)
        self.classes: list[str] | None = None
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    def _folder_classes(self) -> list[str]:
        if self.data_dir is None:
            raise ValueError("data_dir is required for dataset 'image_folder'")
        root = Path(self.data_dir).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(
                f"dataset 'image_folder' not found: data_dir {str(root)!r} is not a folder; expected {LAYOUT}"
            )
        return folder_classes(image_folder_splits(root)["train"] or root)

    def prepare_data(self) -> None:
        """Download (if asked) on one process only; datasets without a download (``image_folder``, the embedded
        one) are not read here (``setup`` reads them once, with the ``bad_images`` policy)."""
        if self.source is not None:
            self.source.prepare()
        elif self.download and self.name not in ("image_folder", "cluttered_fashion_mnist"):
            for split in ("train", "test"):
                build_dataset(self.name, self.data_dir, split, download=True)

    def _splits(self) -> tuple[Dataset, Dataset | None, Dataset | None]:
        """The raw (train, val, test) datasets; ``None`` for a split to hold out of the train images."""
        if self.source is not None:
            return self.source.datasets()
        read = dict(download=False, bad_images=self.bad_images)
        train = build_dataset(self.name, self.data_dir, "train", **read)
        if self.name != "image_folder":
            return train, None, build_dataset(self.name, self.data_dir, "test", **read)
        folders = image_folder_splits(Path(self.data_dir).expanduser())  # type: ignore[arg-type]
        classes = list(train.classes)  # type: ignore[attr-defined]
        val, test = (
            build_dataset(self.name, self.data_dir, split, classes=classes, **read) if folders[split] else None
            for split in ("val", "test")
        )
        return train, val, test

    def setup(self, stage: str | None = None) -> None:
        """Build the datasets; the held-out splits are the same for a given ``seed`` on every process.

        Context outliers (which need object boxes) are added to the train set only for ``fit`` (or ``None``):
        ``validate``/``test``/``predict`` never read the train set, so they work on any dataset."""
        outliers = self.context_outliers if stage in (None, "fit") else 0
        if self.train_set is not None and (not outliers or isinstance(self.train_set, ContextOutliers)):
            return
        if self.source is not None and self.source.iterable:
            self._setup_streams(outliers)
            return
        train, val, test = self._splits()
        self.classes = list(getattr(train, "classes", []) or [str(i) for i in range(self.num_classes)])
        if len(self.classes) != self.num_classes:
            raise ValueError(f"dataset {self.name!r} has {len(self.classes)} classes, expected {self.num_classes}")
        self.hparams["class_names"] = list(self.classes)
        n = len(train)  # type: ignore[arg-type]
        order = np.random.default_rng(self.seed).permutation(n)
        test_idx = None
        if test is None:  # no test images of its own: hold some train images out, never test on trained ones
            num_test = max(1, round(n * self.test_fraction)) if n > 1 else 0
            test_idx, order = np.sort(order[:num_test]), order[num_test:]
            rank_zero_info(
                f"{self.name} {self.data_dir}: no test/ (or val/) folder, so {num_test} of the {n} train images "
                f"(test_fraction={self.test_fraction}, seed={self.seed}) are held out as the test split"
            )
        if val is None:
            num_val = round(len(order) * self.val_fraction)
            train_idx, val_idx = np.sort(order[num_val:]), np.sort(order[:num_val])
            self.val_set = TransformedDataset(train, self.eval_transform, self.in_chans, val_idx) if num_val else None
        else:
            train_idx = np.sort(order)
            self.val_set = TransformedDataset(val, self.eval_transform, self.in_chans)
        if stage in (None, "fit") and len(train_idx) < self.batch_size:
            raise ValueError(
                f"batch_size {self.batch_size} is larger than the {len(train_idx)} training images of "
                f"{self.name!r}: the last partial batch is dropped, so no training step would run; lower "
                "data.batch_size"
            )
        if outliers:
            self.train_set = ContextOutliers(train, self.train_transform, self.in_chans, train_idx, outliers,
                                             name=f"dataset {self.name!r}")  # fmt: skip
        else:
            self.train_set = TransformedDataset(train, self.train_transform, self.in_chans, train_idx)
        self.test_set = TransformedDataset(test if test is not None else train, self.eval_transform, self.in_chans,
                                           test_idx)  # fmt: skip

    def _setup_streams(self, outliers: int) -> None:
        """Streamed splits (LitData shards, a streamed Hugging Face dataset): read in the order the source gives,
        split between ranks and workers by the source; hold-outs are the source's (see its ``streams``)."""
        if outliers:
            raise ValueError(f"data.context_outliers={outliers} needs object boxes for the training images, and "
                             f"dataset {self.name!r} has none; set data.context_outliers=0")  # fmt: skip
        self.classes = list(self.source.class_names)
        self.hparams["class_names"] = list(self.classes)
        self.train_set, self.val_set, self.test_set = self.source.streams(self)

    def _loader(self, dataset: Dataset | None, train: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError("call setup() before asking for a dataloader")
        if self.source is not None and self.source.iterable:
            return self.source.loader(dataset, self.batch_size if train else self.eval_batch_size, self.num_workers)
        # the train order and augmentations follow (seed, epoch) and the loader's position is saved in
        # checkpoints, so a run resumed mid-epoch sees exactly the batches an unbroken run would
        return StatefulDataLoader(
            dataset,
            batch_size=self.batch_size if train else self.eval_batch_size,
            sampler=EpochSampler(len(dataset), seed=self.seed) if train else None,
            drop_last=train,  # Mixup/CutMix need an even, full batch
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=False,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled, augmented train loader (last partial batch dropped)."""
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader | list:
        """Validation loader over the held-out part of the train split (eval pipeline); ``[]`` (Lightning then
        skips validation) when ``val_fraction=0``."""
        if self.val_set is None and self.train_set is not None:
            return []
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        """Test-split loader (eval pipeline)."""
        return self._loader(self.test_set, train=False)

    def predict_dataloader(self) -> DataLoader:
        """The test split again, for ``predict``."""
        return self._loader(self.test_set, train=False)
