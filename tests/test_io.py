"""Atomic writes: the destination is either the old file or the new one, never a partial one."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from vision_attn._io import atomic_open, atomic_torch_save, atomic_write_bytes, atomic_write_text, check_writable_dir


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "a.txt"
    atomic_write_text(path, "one")
    atomic_write_text(path, "two")
    assert path.read_text() == "two"
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.txt"]
    assert oct(path.stat().st_mode & 0o777) != oct(0o600)  # not mkstemp's private mode


def test_error_mid_write_keeps_previous_file(tmp_path: Path) -> None:
    path = atomic_write_bytes(tmp_path / "w.bin", b"old")

    def write_until_disk_full() -> None:
        with atomic_open(path) as f:
            f.write(b"partial new")
            raise OSError(28, "disk full")

    with pytest.raises(OSError, match="disk full"):
        write_until_disk_full()
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.bin"]


def test_torch_save_roundtrip(tmp_path: Path) -> None:
    path = atomic_torch_save({"x": torch.arange(3)}, tmp_path / "x.pt")
    assert torch.equal(torch.load(path, weights_only=True)["x"], torch.arange(3))


def test_check_writable_dir(tmp_path: Path) -> None:
    assert check_writable_dir(tmp_path / "new", "out").is_dir()
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ValueError, match=r"out '.*file/x' is not a writable folder"):
        check_writable_dir(blocker / "x", "out")
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(ValueError, match="not a writable folder"):
            check_writable_dir(locked, "out")
