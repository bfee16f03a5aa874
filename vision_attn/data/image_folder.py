"""The ``image_folder`` dataset: ``<class>/<image>`` folders, optionally under ``train/``, ``val/`` and ``test/``."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

from PIL import Image
from torchvision import datasets as tvd

from vision_attn.data.verify import check_image_files, walk_files

__all__ = ["ImageFolder", "folder_classes", "image_folder_splits", "load_image"]

LAYOUT = "<class>/<image> folders, optionally under train/ (and val/, test/)"


def image_folder_splits(root: str | os.PathLike) -> dict[str, Path | None]:
    """The folders holding the ``'train'``, ``'val'`` and ``'test'`` images under ``root`` (``None``: absent, to be
    held out of the train images).

    ``root/train`` + ``root/val`` + ``root/test``: each its own split. ``root/train`` and one of ``val``/``test``:
    that one is the test split (validation is then held out of the train images). Only ``root/train``, or class
    folders directly in ``root``: the train images alone (test and validation are both held out).
    """
    root = Path(root)
    if not (root / "train").is_dir():
        return {"train": root, "val": None, "test": None}
    val, test = ((root / name) if (root / name).is_dir() else None for name in ("val", "test"))
    if test is None:
        val, test = None, val
    return {"train": root / "train", "val": val, "test": test}


def folder_classes(folder: str | os.PathLike) -> list[str]:
    """The sorted class-folder names in ``folder`` (hidden folders such as ``.ipynb_checkpoints`` are not classes);
    a ``FileNotFoundError`` names ``folder`` when it has none."""
    folder = Path(folder)
    try:
        classes = sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
    except OSError as err:
        raise FileNotFoundError(f"data_dir {str(folder)!r} is not a readable folder ({err.strerror})") from err
    if not classes:
        raise FileNotFoundError(f"data_dir {str(folder)!r} holds no class folders; expected {LAYOUT}")
    return classes


def load_image(path: str) -> Image.Image:
    """The image at ``path``, decoded in its own mode (16-bit stays 16-bit; :func:`~vision_attn.data.pixels.
    to_uint8_array` scales it later), unlike torchvision's loader, which converts to 8-bit RGB by clipping."""
    with open(path, "rb") as f:
        image = Image.open(f)
        image.load()
    return image


class ImageFolder(tvd.ImageFolder):
    """``torchvision``'s ``ImageFolder`` read safely: every file is decoded once first (``bad_images='error'``
    raises naming the unreadable files, ``'skip'`` leaves them out), symbolic-link loops are walked once, an empty
    class folder is a ``ValueError``, images keep their bit depth, and ``classes`` (the train split's) fixes the
    label numbering of a val/test folder that lacks some classes.
    """

    def __init__(self, root: str | os.PathLike, bad_images: str = "error", classes: Sequence[str] | None = None):
        self._given_classes = list(classes) if classes is not None else None
        super().__init__(str(root), loader=load_image, is_valid_file=check_image_files(root, bad_images))

    def find_classes(self, directory: str | os.PathLike) -> tuple[list[str], dict[str, int]]:
        """The classes (the given ones, else the folder's own) and their indices."""
        found = folder_classes(directory)
        if self._given_classes is None:
            return found, {name: i for i, name in enumerate(found)}
        unknown = sorted(set(found) - set(self._given_classes))
        if unknown:
            raise ValueError(
                f"data_dir {str(directory)!r} has class folder(s) {unknown} that the train split does not have "
                f"({self._given_classes}); every split must use the train split's classes"
            )
        return self._given_classes, {name: i for i, name in enumerate(self._given_classes)}

    def make_dataset(
        self,
        directory: str | os.PathLike,
        class_to_idx: dict[str, int],
        extensions: tuple[str, ...] | None = None,
        is_valid_file: Callable[[str], bool] | None = None,
        allow_empty: bool = False,
    ) -> list[tuple[str, int]]:
        """``(path, class index)`` of every valid file, class by class; an empty class folder is a ``ValueError``."""
        samples, empty = [], []
        for name, index in sorted(class_to_idx.items(), key=lambda item: item[1]):
            folder = Path(directory) / name
            if not folder.is_dir():  # a val/test folder without this class
                continue
            files = [str(p) for p in walk_files(folder) if is_valid_file is None or is_valid_file(str(p))]
            if not files:
                empty.append(name)
            samples += [(path, index) for path in files]
        if empty:
            raise ValueError(
                f"data_dir {str(directory)!r}: class folder(s) {empty} hold no readable images; every class folder "
                "needs at least one image (add images or remove the folder)"
            )
        return samples
