"""Reliability: corrupt image folders, reproducible and resumable data order."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vision_attn.data.resumable import EpochSampler, sample_seed
from vision_attn.data.verify import BadImagesError, check_image_files, find_bad_images


def jpeg_bytes(seed: int, size: int = 32) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def make_corrupt_folder(root: Path, num_good: int = 4) -> dict[str, Path]:
    """Two classes of good JPEGs plus a truncated JPEG, a text file named .jpg and a stray .txt file."""
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(num_good):
            (root / cls / f"{i}.jpg").write_bytes(jpeg_bytes(i + (100 if cls == "dog" else 0)))
    bad = {
        "truncated": root / "cat" / "truncated.jpg",
        "not_image": root / "dog" / "notes.jpg",
        "stray_text": root / "dog" / "README.txt",
    }
    bad["truncated"].write_bytes(jpeg_bytes(7)[:300])
    bad["not_image"].write_text("this is not a JPEG")
    bad["stray_text"].write_text("labels were checked by hand")
    (root / "cat" / ".DS_Store").write_bytes(b"\x00\x01")  # hidden files are ignored
    return bad


def test_find_bad_images_names_each_bad_file(tmp_path):
    bad = make_corrupt_folder(tmp_path)
    found = dict(find_bad_images(tmp_path))
    assert set(found) == {str(p) for p in bad.values()}
    assert "truncated" in found[str(bad["truncated"])].lower()


def test_bad_images_error_lists_files_and_the_way_out(tmp_path):
    bad = make_corrupt_folder(tmp_path)
    with pytest.raises(BadImagesError, match=r"3 file\(s\) under .* are not readable images") as info:
        check_image_files(tmp_path, "error")
    message = str(info.value)
    assert all(str(p) in message for p in bad.values())
    assert "bad_images: skip" in message


def test_bad_images_skip_warns_with_count_and_filters(tmp_path):
    bad = make_corrupt_folder(tmp_path)
    with pytest.warns(UserWarning, match=r"skipping 3 unreadable file\(s\)"):
        is_valid = check_image_files(tmp_path, "skip")
    assert not any(is_valid(str(p)) for p in bad.values())
    assert is_valid(str(tmp_path / "cat" / "0.jpg"))
    assert not is_valid(str(tmp_path / "cat" / ".DS_Store"))
    with pytest.raises(ValueError, match=r"bad_images must be one of \('error', 'skip'\), got 'ignore'"):
        check_image_files(tmp_path, "ignore")


def test_epoch_sampler_order_depends_only_on_seed_and_epoch():
    sampler = EpochSampler(50, seed=3)
    sampler.set_epoch(2)
    first = list(sampler)
    again = EpochSampler(50, seed=3)
    again.set_epoch(0)
    list(again)  # consuming another epoch first changes nothing
    again.set_epoch(2)
    assert list(again) == first
    assert sorted(i for i, _ in first) == list(range(50))
    sampler.set_epoch(3)
    assert [i for i, _ in sampler] != [i for i, _ in first]
    assert len({s for _, s in first}) == 50  # distinct augmentation seeds per item
    assert first[0][1] == sample_seed(3, 2, first[0][0])
    assert [i for i, _ in EpochSampler(5, seed=3, shuffle=False)] == [0, 1, 2, 3, 4]
