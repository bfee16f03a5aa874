"""Find unreadable images in an ``ImageFolder`` tree before training starts, not in the middle of an epoch."""

from __future__ import annotations

import os
import warnings
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path

from PIL import Image, UnidentifiedImageError

__all__ = ["BAD_IMAGE_POLICIES", "BadImagesError", "check_image_files", "find_bad_images", "walk_files"]

BAD_IMAGE_POLICIES = ("error", "skip")


class BadImagesError(ValueError):
    """Raised when an image folder holds files that are not readable images."""


def _image_problem(path: Path) -> str | None:
    """Return why ``path`` is not a fully decodable image, or ``None`` when it is."""
    try:
        with Image.open(path) as image:
            image.load()  # decodes every byte: truncated files fail here, not at training time
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        return f"{type(err).__name__}: {err}"
    return None


def walk_files(folder: str | os.PathLike) -> Iterator[Path]:
    """Yield every non-hidden file under ``folder`` (sorted by folder, then name), following symbolic links except
    those that point back to a folder the walk is inside (a loop), and entering each real folder once: a link
    loop neither hangs the walk nor repeats files."""
    seen: set[tuple[int, int]] = set()
    pending = deque([Path(folder)])  # breadth first, names sorted: which of two links to one folder wins is fixed
    found: list[tuple[str, str, Path]] = []
    while pending:
        current = pending.popleft()
        try:
            info = current.stat()
            entries = sorted(os.scandir(current), key=lambda entry: entry.name)
        except OSError:  # a dangling link or an unreadable folder holds nothing we can read
            continue
        if (info.st_dev, info.st_ino) in seen:
            continue
        seen.add((info.st_dev, info.st_ino))
        real = os.path.realpath(current)
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                if entry.is_dir():  # follows links
                    target = os.path.realpath(entry.path)
                    if entry.is_symlink() and (real + os.sep).startswith(target.rstrip(os.sep) + os.sep):
                        continue  # a link to this folder or one above it: a loop
                    pending.append(Path(entry.path))
                elif entry.is_file():
                    found.append((str(current), entry.name, Path(entry.path)))
            except OSError:
                continue
    yield from (path for _, _, path in sorted(found))


def find_bad_images(root: str | os.PathLike) -> list[tuple[str, str]]:
    """Return ``(path, reason)`` for every file under the class folders of ``root`` that is not a readable image.

    Hidden files and folders (``.DS_Store``, ...) are ignored; any other file counts, whatever its extension.
    """
    bad = []
    for class_dir in sorted(p for p in Path(root).iterdir() if p.is_dir() and not p.name.startswith(".")):
        for path in walk_files(class_dir):
            problem = _image_problem(path)
            if problem is not None:
                bad.append((str(path), problem))
    return bad


def check_image_files(root: str | os.PathLike, policy: str = "error") -> Callable[[str], bool]:
    """Scan ``root`` and return an ``is_valid_file`` predicate for ``torchvision.datasets.ImageFolder``.

    ``policy='error'`` raises :class:`BadImagesError` naming the bad files; ``'skip'`` warns with their count and
    leaves them out.
    """
    if policy not in BAD_IMAGE_POLICIES:
        raise ValueError(f"bad_images must be one of {BAD_IMAGE_POLICIES}, got {policy!r}")
    bad = find_bad_images(root)
    if bad and policy == "error":
        listing = "\n".join(f"  {path} ({reason})" for path, reason in bad[:20])
        more = f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else ""
        raise BadImagesError(
            f"{len(bad)} file(s) under {str(root)!r} are not readable images:\n{listing}{more}\n"
            "remove or fix them, or set bad_images: skip (--data.bad_images=skip) to leave them out"
        )
    if bad:
        warnings.warn(
            f"skipping {len(bad)} unreadable file(s) under {str(root)!r} (bad_images='skip'), e.g. {bad[0][0]}",
            stacklevel=2,
        )
    skipped = {os.path.realpath(path) for path, _ in bad}
    return lambda path: not Path(path).name.startswith(".") and os.path.realpath(path) not in skipped
