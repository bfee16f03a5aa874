"""One eval pipeline for every entry point (issue 26): a file reaches the model as a validation image does, through
the preprocessing recorded with the weights; timm reads the same preprocessing from our exports; old checkpoints
load with the old defaults, said once."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import vision_attn
from vision_attn.data import ImageDataModule
from vision_attn.data.images import load_image_files
from vision_attn.explain import explain
from vision_attn.explain.cli import main as explain_main
from vision_attn.export import write_export

NAMES = ("0_grey", "1_rgba", "2_wide", "3_large")


def _images(folder: Path) -> list[Path]:
    """A grey, an RGBA, a non-square and a large image, each with a bright object off-centre."""
    rng = np.random.default_rng(0)
    specs = {"0_grey": ("L", (50, 50)), "1_rgba": ("RGBA", (64, 64)), "2_wide": ("RGB", (40, 96)),
             "3_large": ("RGB", (700, 900))}  # fmt: skip
    paths = []
    for name, (mode, (height, width)) in specs.items():
        channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
        pixels = rng.integers(0, 80, (height, width, channels), dtype=np.uint8)
        pixels[height // 4 : height // 2, width // 5 : width // 2] = 230
        folder.mkdir(parents=True, exist_ok=True)
        paths.append(folder / f"{name}.png")
        Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode).save(paths[-1])
    return paths


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """An image folder whose val/ split holds the four images, its DataModule (crop 0.875, bicubic), and a model
    exported with the DataModule's recorded preprocessing, as a fit's export would be."""
    root = tmp_path_factory.mktemp("folder")
    val = _images(root / "val" / "a")
    for split in ("train", "test"):
        for name in ("a", "b"):
            _images(root / split / name)[:2]
    data = ImageDataModule(name="image_folder", data_dir=str(root), img_size=32, in_chans=3, mean=(0.4, 0.5, 0.6),
                           std=(0.2, 0.25, 0.3), eval_crop_pct=0.875, eval_interpolation="bicubic", batch_size=2,
                           num_workers=0)  # fmt: skip
    data.setup("validate")
    torch.manual_seed(0)
    model = vision_attn.create_model("va_vit_tiny_patch8_64", img_size=32, depth=1, num_classes=2).eval()
    meta = {"model_name": "va_vit_tiny_patch8_64", "class_names": data.classes, **data.data_config}
    export = write_export(model, root / "export", meta=meta).folder
    return {"root": root, "val": val, "data": data, "model": model, "export": export}


def test_every_entry_point_feeds_the_model_the_same_tensor(trained: dict, tmp_path: Path) -> None:
    data, model = trained["data"], trained["model"]
    files = sorted(trained["val"])
    assert [Path(p).stem for p, _ in data.val_set.base.samples] == list(NAMES)
    validation = torch.stack([data.val_set[i][0] for i in range(len(NAMES))])  # what validation feeds the model
    # explain() on files: the loader with the preprocessing recorded in the export
    loaded, info = vision_attn.load_model(checkpoint=trained["export"])
    config = vision_attn.resolve_data_config(loaded, info)
    assert (config["crop_pct"], config["interpolation"], config["input_size"]) == (0.875, "bicubic", (3, 32, 32))
    from_files = load_image_files(files, config).images
    torch.testing.assert_close(from_files, validation, atol=0, rtol=0)
    with torch.no_grad():
        expected = model(validation).softmax(-1)
    torch.testing.assert_close(explain(loaded, from_files, "rollout"), explain(model, validation, "rollout"))
    # the explain CLI on the same files
    assert explain_main(["--checkpoint", str(trained["export"]), "--images", *map(str, files), "--method",
                         "rollout", "--steps", "0", "--no-overlays", "--out", str(tmp_path / "out")]) == 0  # fmt: skip
    records = json.loads((tmp_path / "out" / "scores.json").read_text())["images"]
    got = [r["models"]["va_vit_tiny_patch8_64"] for r in records]
    assert [r["image"] for r in records] == list(NAMES)
    assert [g["prediction"] for g in got] == expected.argmax(-1).tolist()
    assert [g["probability"] for g in got] == pytest.approx(expected.amax(-1).tolist(), abs=1e-6)
    # the old path stretched the whole file to the input size: for the non-square and large files it differs
    mean, std = (torch.tensor(config[k])[:, None, None] for k in ("mean", "std"))
    pils = [Image.open(f).convert("RGB").resize((32, 32)) for f in files]
    stretched = torch.stack([torch.from_numpy(np.asarray(image)) for image in pils])
    stretched = (stretched.permute(0, 3, 1, 2).float() / 255 - mean) / std
    assert (stretched[2] - validation[2]).abs().max() > 0.5


def test_timm_builds_the_recorded_pipeline_from_our_export(trained: dict) -> None:
    config = json.loads((trained["export"] / "config.json").read_text())["pretrained_cfg"]
    assert (config["crop_pct"], config["interpolation"], config["crop_mode"]) == (0.875, "bicubic", "center")
    model = timm.create_model(f"local-dir:{trained['export']}", pretrained=True)
    resolved = timm.data.resolve_data_config({}, model=model)
    ours = trained["data"].data_config
    assert resolved["input_size"] == ours["input_size"]
    assert (resolved["crop_pct"], resolved["interpolation"]) == (ours["crop_pct"], ours["interpolation"])
    assert resolved["mean"] == pytest.approx(ours["mean"])
    assert resolved["std"] == pytest.approx(ours["std"])


def test_an_export_records_no_local_path(trained: dict, tmp_path: Path) -> None:
    ckpt = tmp_path / "best.ckpt"
    model = trained["model"]
    torch.save({"state_dict": {f"net.{k}": v for k, v in model.state_dict().items()},
                "vision_attn": {"model_name": "va_vit_tiny_patch8_64", "model_args": {"img_size": 32, "depth": 1,
                                "num_classes": 2}, **trained["data"].data_config}}, ckpt)  # fmt: skip
    out = vision_attn.export_trained(ckpt, tmp_path / "export").folder
    texts = [(out / name).read_text() for name in ("config.json", "model.json")]
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        texts.append(json.dumps(f.metadata()))
    for text in texts:
        assert str(tmp_path) not in text
    assert json.loads(texts[1])["source_checkpoint"] == "best.ckpt"


def test_old_checkpoints_load_with_the_old_defaults_said_once(trained: dict, tmp_path: Path) -> None:
    model = trained["model"]
    ckpt = tmp_path / "old.ckpt"  # written before the eval preprocessing was recorded: mean/std and img_size only
    torch.save({"state_dict": {f"net.{k}": v for k, v in model.state_dict().items()},
                "vision_attn": {"model_name": "va_vit_tiny_patch8_64", "model_args": {"img_size": 32, "depth": 1,
                                "num_classes": 2}, "mean": [0.5], "std": [0.5], "img_size": 32}}, ckpt)  # fmt: skip
    with pytest.warns(UserWarning, match=r"old.ckpt' records no crop_pct, interpolation, crop_mode.*crop_pct=1.0"):
        _, info = vision_attn.load_trained(ckpt)
    assert (info["crop_pct"], info["interpolation"], info["crop_mode"]) == (1.0, "bilinear", "center")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once: the second load is silent
        vision_attn.load_trained(ckpt)


@pytest.mark.parametrize("sidecar", ["{not json", "[1, 2]"])
def test_a_broken_sidecar_is_an_error_even_beside_header_metadata(trained: dict, tmp_path: Path, sidecar: str) -> None:
    from vision_attn.training import export_model

    path = export_model(trained["model"], tmp_path / "model.safetensors", "va_vit_tiny_patch8_64")
    path.with_suffix(".json").write_text(sidecar)
    expected = r"model.json' is not valid JSON" if sidecar.startswith("{") else r"model.json' holds a JSON list"
    with pytest.raises(ValueError, match=expected):
        vision_attn.load_trained(path)
