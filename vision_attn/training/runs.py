"""Run folders: every command writes into its own ``<run_dir>/version_K/`` and never into another run's.

* a new folder is claimed with an atomic ``mkdir`` (two processes started at once get two folders) and locked
  while the process runs (``fcntl.flock``, released by the kernel even after ``kill -9``), so a second process
  cannot resume into a folder that is in use;
* ``--ckpt_path last`` / ``best`` are looked up among the version folders of one ``run_dir``
  (:func:`find_checkpoint`); a resumed run keeps writing into the folder of the checkpoint it resumes.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from vision_attn._io import check_writable_dir

try:
    import fcntl
except ImportError:  # Windows: folders are still claimed atomically, just not locked
    fcntl = None  # type: ignore[assignment]

__all__ = ["CHECKPOINT_DIR", "RunFolder", "claim_run_folder", "find_checkpoint", "open_run_folder", "run_folder_of"]

CHECKPOINT_DIR = "checkpoints"
LOCK_FILE = ".lock"
_VERSION = re.compile(r"version_(\d+)")
_RESUMABLE_KEYS = ("state_dict", "optimizer_states", "loops")


class RunFolder:
    """A ``version_K`` folder held by this process until :meth:`release` (``resumed``: it held a run before)."""

    def __init__(self, path: Path, resumed: bool, lock_fd: int | None, created: Sequence[Path] = ()) -> None:
        self.path = path
        self.resumed = resumed
        self._lock_fd = lock_fd
        self._created = list(created)  # parent folders made for this run, deepest first
        self._notes: list[Path] = []

    def on_release(self, path: Path) -> None:
        """Remove the file ``path`` (a note about this run kept beside it) when the folder is released."""
        self._notes.append(path)

    def release(self) -> None:
        """Unlock the folder; a folder this process claimed and left without files (a failed start) is removed,
        with the parent folders it had to create."""
        for note in self._notes:
            with contextlib.suppress(OSError):
                note.unlink()
        self._notes = []
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        with contextlib.suppress(OSError):
            if not self.resumed and not any(p.is_file() and p.name != LOCK_FILE for p in self.path.rglob("*")):
                shutil.rmtree(self.path)
                for folder in self._created:
                    os.rmdir(folder)  # fails, and stops, at the first one another run has used meanwhile

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r}, resumed={self.resumed})"


def _lock(folder: Path) -> int | None:
    """Lock ``folder`` for this process; raises a ``ValueError`` naming the holder when another process has it."""
    if fcntl is None:
        return None
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise ValueError(
            f"run folder {str(folder)!r} is in use by another process (pid {holder}); wait for it to end, or start "
            "a new run (without --ckpt_path) that gets its own folder"
        ) from err
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def version_folders(run_dir: str | os.PathLike) -> list[Path]:
    """The ``version_K`` folders of ``run_dir``, by ``K``."""
    root = Path(run_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _VERSION.fullmatch(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def claim_run_folder(run_dir: str | os.PathLike) -> RunFolder:
    """Create and lock ``<run_dir>/version_K`` with the next free ``K``; raises a ``ValueError`` naming ``run_dir``
    when it is not a writable folder."""
    root = Path(run_dir)
    created = [p for p in (root, *root.parents) if not p.exists()]  # deepest first
    root = check_writable_dir(root, "run_dir")
    while True:
        existing = [int(p.name.removeprefix("version_")) for p in version_folders(root)]
        path = root / f"version_{max(existing, default=-1) + 1}"
        try:
            path.mkdir()  # atomic: of two processes picking the same K, one gets FileExistsError and tries K + 1
        except FileExistsError:
            continue
        except OSError as err:
            raise ValueError(f"run_dir {str(root)!r} is not a writable folder: {err.strerror or err}") from err
        try:
            return RunFolder(path, resumed=False, lock_fd=_lock(path), created=created)
        except BaseException:
            shutil.rmtree(path, ignore_errors=True)
            raise


def open_run_folder(path: str | os.PathLike) -> RunFolder:
    """Lock the existing run folder ``path`` to continue a run in it."""
    folder = check_writable_dir(path, "run folder")
    return RunFolder(folder, resumed=True, lock_fd=_lock(folder))


def run_folder_of(ckpt_path: str | os.PathLike) -> Path | None:
    """The run folder holding ``ckpt_path`` (``.../version_K/checkpoints/x.ckpt``), else ``None``."""
    path = Path(ckpt_path).resolve()
    if path.parent.name == CHECKPOINT_DIR and _VERSION.fullmatch(path.parent.parent.name):
        return path.parent.parent
    return None


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any] | None:
    """The checkpoint at ``path`` (tensors memory-mapped, never unpickling code), or ``None`` if unreadable."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # truncated, empty, not a zip checkpoint, holding code: all mean "not usable"
        return None
    return ckpt if isinstance(ckpt, dict) else None


def is_resumable(ckpt: dict[str, Any] | None) -> bool:
    """Whether ``ckpt`` holds what ``fit`` needs to continue (weights, optimizer, loop state)."""
    return ckpt is not None and all(key in ckpt for key in _RESUMABLE_KEYS)


def _checkpoints_newest_first(run_dir: str | os.PathLike) -> list[Path]:
    found = []
    for folder in version_folders(run_dir):
        for path in (folder / CHECKPOINT_DIR).glob("*.ckpt"):
            with contextlib.suppress(OSError):  # removed meanwhile by a running process (an old best)
                found.append((path.stat().st_mtime_ns, path))
    return [p for _, p in sorted(found, reverse=True)]


def _best_of(ckpt: dict[str, Any], folder: Path) -> Path | None:
    """The best checkpoint recorded by a monitoring ``ModelCheckpoint`` in ``ckpt``, looked up in ``folder``
    (the recorded path may be absolute from another working directory or machine)."""
    for key, state in (ckpt.get("callbacks") or {}).items():
        if key.startswith("ModelCheckpoint") and isinstance(state, dict) and state.get("best_model_path"):
            candidate = folder / CHECKPOINT_DIR / Path(state["best_model_path"]).name
            if candidate.is_file():
                return candidate
    return None


def find_checkpoint(run_dir: str | os.PathLike, which: str, resumable: bool = False) -> Path:
    """The checkpoint ``which`` (``'last'`` or ``'best'``) among the runs of ``run_dir``.

    ``'last'``: the most recently written readable checkpoint (a resumable one when ``resumable``), whatever its
    version folder. ``'best'``: the best checkpoint (by the monitored metric) of the most recent run that has one.
    Raises a ``ValueError`` saying what was searched when there is none.
    """
    if which not in ("last", "best"):
        raise ValueError(f"which must be 'last' or 'best', got {which!r}")
    skipped: list[str] = []
    seen: set[Path] = set()
    for path in _checkpoints_newest_first(run_dir):
        folder = path.parent.parent
        if which == "best" and folder in seen:
            continue  # a run's best is recorded in its newest readable checkpoint
        ckpt = read_checkpoint(path)
        if ckpt is None or (resumable and not is_resumable(ckpt)):
            skipped.append(f"{path} ({'unreadable' if ckpt is None else 'not resumable'})")
            continue
        seen.add(folder)
        found = path if which == "last" else _best_of(ckpt, folder)
        if found is not None:
            return found
    kind = "resumable checkpoint" if resumable else "checkpoint" if which == "last" else "best checkpoint"
    why = "; skipped: " + ", ".join(skipped) if skipped else ""
    hint = (
        "best checkpoints are written when validation runs (data.val_fraction > 0)"
        if which == "best"
        else "start a new run without --ckpt_path, or pass a checkpoint file"
    )
    raise ValueError(
        f"--ckpt_path {which}: no {kind} under {str(Path(run_dir) / 'version_*' / CHECKPOINT_DIR)!r} "
        f"(run_dir {str(run_dir)!r}){why}; {hint}"
    )


def newest_step_in(folder: Path) -> int:
    """The highest ``global_step`` among the readable checkpoints of run folder ``folder`` (-1 if none)."""
    steps = [-1]
    for path in (folder / CHECKPOINT_DIR).glob("*.ckpt"):
        ckpt = read_checkpoint(path)
        if ckpt is not None:
            steps.append(int(ckpt.get("global_step", -1)))
    return max(steps)
