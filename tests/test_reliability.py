"""Reliability: corrupt image folders, reproducible and resumable data order."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from vision_attn.cli import main
from vision_attn.data import ImageDataModule
from vision_attn.data.resumable import EpochSampler, sample_seed
from vision_attn.data.verify import BadImagesError, check_image_files, find_bad_images
from vision_attn.training import ImageClassifier
from vision_attn.training.export import export_checkpoint


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


class NaNNet(torch.nn.Module):
    num_classes = 10

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(3 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1)) * float("nan")


def test_non_finite_loss_stops_training_with_a_clear_message():
    images, labels = torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))
    loader = DataLoader(TensorDataset(images, labels), batch_size=4)
    module = ImageClassifier(NaNNet(), num_classes=10, warmup_epochs=0.0)
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu")  # fmt: skip
    with pytest.raises(FloatingPointError, match=r"training loss is nan at epoch 0, step 0 .*Lower model.lr"):
        trainer.fit(module, loader)


def test_checkpoints_are_loaded_without_unpickling_code(tmp_path, capsys):
    class Payload:
        def __reduce__(self):
            return (print, ("this code ran while loading",))

    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "vision_attn": {"model_name": "x"}, "payload": Payload()}, path)
    with pytest.raises(pickle.UnpicklingError):
        export_checkpoint(path, tmp_path / "out.safetensors")
    assert main(["explain", "--checkpoint", str(path), "--images", str(path), "--out", str(tmp_path / "o")]) == 2
    assert "this code ran" not in capsys.readouterr().out


def test_image_datamodule_fails_before_training_or_skips_on_request(tmp_path):
    bad = make_corrupt_folder(tmp_path)
    strict = ImageDataModule(name="image_folder", data_dir=str(tmp_path), img_size=32, num_workers=0, batch_size=2)
    with pytest.raises(BadImagesError, match=r"truncated.jpg"):
        strict.setup()
    lenient = ImageDataModule(name="image_folder", data_dir=str(tmp_path), img_size=32, num_workers=0, batch_size=2,
                              bad_images="skip", val_fraction=0.0)  # fmt: skip
    with pytest.warns(UserWarning, match=r"skipping 3 unreadable file\(s\)"):
        lenient.setup()
    assert len(lenient.train_set) + len(lenient.test_set) == 8  # no test/ folder: 1 image held out as the test split
    assert len(lenient.train_set) == 7
    for images, _ in lenient.train_dataloader():  # a whole epoch reads without error
        assert images.shape[1:] == (3, 32, 32)
    assert str(bad["truncated"]) not in {path for path, _ in lenient.train_set.base.samples}
