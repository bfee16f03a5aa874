"""``vision-attn explain`` review findings and its input loading in ``vision_attn.data.images`` (issues 11, 12)."""

from __future__ import annotations

import json
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vision_attn
import vision_attn.cli
from vision_attn._data_config import channel_stats
from vision_attn.data import prepare_images
from vision_attn.data.images import load_dataset_images, load_image_files, read_boxes, unique_names
from vision_attn.explain import explain
from vision_attn.explain.cli import main as explain_main
from vision_attn.explain.metrics import _substrate, energy_pointing, insertion_auc, pointing_game


def _image(path: Path, height: int, width: int, seed: int = 0, mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shape = (height, width, 3) if mode == "RGB" else (height, width)
    Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).save(path)
    return path


def _vit_checkpoint(path: Path, **info: object) -> torch.nn.Module:
    torch.manual_seed(0)
    args = {"depth": 1, "num_classes": 3}
    model = vision_attn.create_model("va_vit_tiny_patch8_64", **args).eval()
    state = {f"net.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "vision_attn": {"model_name": "va_vit_tiny_patch8_64", "model_args": args,
                                                     **info}}, path)  # fmt: skip
    return model


# --- data.images ---------------------------------------------------------------------------------------------------


def test_unique_names_for_repeated_stems() -> None:
    assert unique_names(["a/cat.png", "b/cat.png", "cat_1.png", "dog.jpg", "x y.png"]) == [
        "cat_2", "cat_3", "cat_1", "dog", "x_y",
    ]  # fmt: skip
    assert unique_names(["img.png", "img.png"]) == ["img_1", "img_2"]


def test_channel_stats() -> None:
    assert channel_stats([0.5], 3, "--mean") == (0.5, 0.5, 0.5)
    assert channel_stats([0.1, 0.2, 0.3], 3, "--mean") == (0.1, 0.2, 0.3)
    assert channel_stats([0.1, 0.2, 0.3], 1, "cfg mean", convert=True) == pytest.approx((0.2,))
    with pytest.raises(ValueError, match=r"--mean has 3 values \[0.1, 0.2, 0.3\]; expected 1 value: .*in_chans=1"):
        channel_stats([0.1, 0.2, 0.3], 1, "--mean")
    with pytest.raises(ValueError, match=r"--std has 2 values \[0.1, 0.2\]; expected 1 or 3 values"):
        channel_stats([0.1, 0.2], 3, "--std")
    with pytest.raises(ValueError, match=r"--std \[0.0\] must be > 0"):
        channel_stats([0.0], 3, "--std")


def _config(size: tuple[int, int, int], mean: object = 0.0, std: object = 1.0, crop_pct: float = 1.0) -> dict:
    return {"input_size": size, "mean": mean, "std": std, "crop_pct": crop_pct, "interpolation": "bilinear",
            "crop_mode": "center"}  # fmt: skip


def test_load_image_files_resizes_normalizes_per_channel_and_reads_16_bit(tmp_path: Path) -> None:
    import cv2

    path = _image(tmp_path / "a.png", 20, 40)
    mean, std = [0.1, 0.2, 0.3], [0.5, 0.25, 0.125]
    prepared = load_image_files([path], _config((3, 10, 20), mean, std))  # same aspect: a plain resize
    raw = cv2.resize(np.asarray(Image.open(path)), (20, 10), interpolation=cv2.INTER_LINEAR).astype(np.float32) / 255
    expected = (torch.from_numpy(raw).permute(2, 0, 1) - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[
        :, None, None
    ]
    assert prepared.sizes == [(20, 40)]
    torch.testing.assert_close(prepared.images[0], expected)
    deep = tmp_path / "deep.png"
    Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16)).save(deep)  # 16-bit grey at half range
    grey = load_image_files([deep], _config((1, 4, 4))).images
    torch.testing.assert_close(grey, torch.full((1, 1, 4, 4), 128 / 255))


def test_load_dataset_images_per_channel_stats_boxes_and_masks() -> None:
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 0.125)
    prepared, names, labels = load_dataset_images("cluttered_fashion_mnist:test", 2, _config((3, 32, 32), mean, std))
    native, native_names, _ = load_dataset_images("cluttered_fashion_mnist", 2, _config((1, 64, 64)))
    assert prepared.images.shape == (2, 3, 32, 32)
    assert names == native_names == ["test_0000", "test_0001"]
    assert labels.shape == (2,)
    torch.testing.assert_close(prepared.boxes, native.boxes / 2)  # 64 -> 32 px: the boxes shrink with the image
    assert prepared.masks.shape == (2, 32, 32)
    assert native.masks.shape == (2, 64, 64)
    assert prepared.masks.float().mean() == pytest.approx(native.masks.float().mean(), abs=0.02)
    unnormalized = prepared.images * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
    torch.testing.assert_close(unnormalized[:, 0], unnormalized[:, 2], atol=1e-5, rtol=0)  # grey repeated
    small = torch.nn.functional.interpolate(native.images, size=(32, 32), mode="bilinear", antialias=True)
    assert (unnormalized[:, 0] - small[:, 0]).abs().mean() < 0.03
    assert native.images.shape == (2, 1, 64, 64)
    assert (native.images[:, 0][native.masks] > 0).all()  # the mask is the object's own (non-zero) pixels


def test_boxes_and_masks_follow_the_eval_resize_and_crop(tmp_path: Path) -> None:
    image = np.zeros((40, 80), dtype=np.uint8)  # H 40, W 80: short side 40 -> 32 (x0.8), then a centre crop of 32
    image[20:40, 10:30] = 255
    mask = image > 0
    prepared = prepare_images([image, image], _config((1, 32, 32)), boxes=[[10, 20, 30, 40], [0, 0, 8, 8]],
                              masks=[mask, mask])  # fmt: skip
    torch.testing.assert_close(prepared.boxes[0], torch.tensor([0.0, 16.0, 8.0, 32.0]))  # x: 8..24 minus 16, clipped
    assert torch.isnan(prepared.boxes[1]).all()  # cropped away entirely
    object_pixels = prepared.images[0, 0] > 0.5
    assert prepared.masks[0].tolist() == object_pixels.tolist()  # the mask moves with the image
    table = {str(tmp_path / "a" / "x.png"): [1, 2, 3, 4], "x.png": [5, 6, 7, 8]}
    (tmp_path / "boxes.json").write_text(json.dumps(table))
    got = read_boxes(tmp_path / "boxes.json", [tmp_path / "a" / "x.png", tmp_path / "b" / "x.png"])
    torch.testing.assert_close(got, torch.tensor([[1.0, 2, 3, 4], [5, 6, 7, 8]]))  # full path first, then name


def test_attention_overlays_boxes_follow_the_eval_crop() -> None:
    from vision_attn.data import ImageDataModule
    from vision_attn.training.callbacks import AttentionOverlays

    data = ImageDataModule(img_size=64, eval_crop_pct=0.8, val_fraction=0.1, num_workers=0)
    data.setup()
    callback = AttentionOverlays(num_images=3)
    callback._fixed_batch(types.SimpleNamespace(datamodule=data))
    rows = data.val_set.indices[:3]
    raw = torch.as_tensor(data.val_set.base.boxes[rows], dtype=torch.float32)
    expected = (raw * 80 / 64 - 8).clamp(0, 64)  # resize 64 -> 80, centre crop 64 (offset 8)
    torch.testing.assert_close(callback._boxes, expected)
    assert not torch.allclose(callback._boxes, raw)
    # the box outlines the object in the image the model sees: the object is brighter than the background
    images = callback._images[:, 0]
    inside = torch.stack([images[i, int(b[1]) : int(b[3]), int(b[0]) : int(b[2])].mean() for i, b in
                          enumerate(callback._boxes)])  # fmt: skip
    assert (inside > images.mean(dim=(1, 2))).all()


def test_blur_substrate_on_non_square_images() -> None:
    from torchvision.transforms.functional import gaussian_blur

    images = torch.rand(2, 3, 16, 64)
    blurred = _substrate(images, "blur")
    assert blurred.shape == images.shape
    assert torch.isfinite(blurred).all()
    assert blurred.std() < images.std() / 2
    square = torch.rand(2, 3, 32, 32)  # square images keep the previous blur (sigma = side / 8)
    torch.testing.assert_close(_substrate(square, "blur"), gaussian_blur(square, [25, 25], [4.0, 4.0]))

    class Mean(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.stack([x.mean(dim=(1, 2, 3)), -x.mean(dim=(1, 2, 3))], dim=1)

    auc = insertion_auc(Mean().eval(), images, torch.rand(2, 16, 64), target=0, steps=4)
    assert auc.shape == (2,)
    assert torch.isfinite(auc).all()


# --- the CLI -------------------------------------------------------------------------------------------------------


def test_cli_moves_boxes_with_the_image(tmp_path: Path) -> None:
    paths = [_image(tmp_path / "imgs" / f"i{k}.png", 40, 80, seed=k) for k in range(2)]
    boxes = {p.name: [8, 4, 40, 20] for p in paths}  # in the 80x40 image's pixels
    (tmp_path / "boxes.json").write_text(json.dumps(boxes))
    out = tmp_path / "out"
    args = ["--model", "va_vit_tiny_patch4_32", "--model-args", '{"depth": 1, "num_classes": 3}', "--images",
            *map(str, paths), "--boxes", str(tmp_path / "boxes.json"), "--method", "random", "--steps", "0",
            "--no-overlays", "--out", str(out)]  # fmt: skip
    assert explain_main(args) == 0
    scores = json.loads((out / "scores.json").read_text())["images"]
    model = vision_attn.create_model("va_vit_tiny_patch4_32", depth=1, num_classes=3).eval()
    maps = explain(model, torch.zeros(2, 3, 32, 32), "random", seed=0)  # the CLI's random maps (seed = chunk)
    scaled = torch.tensor([[0.0, 3.2, 16.0, 16.0]] * 2)  # 80x40 -> 64x32 (x0.8), centre crop 32 (x - 16), clipped
    expected = energy_pointing(maps, scaled)
    got = torch.tensor([s["models"]["va_vit_tiny_patch4_32"]["scores"]["random"]["energy_pointing"] for s in scores])
    torch.testing.assert_close(got, expected)
    unscaled = energy_pointing(maps, torch.tensor([[8.0, 4.0, 32.0, 20.0]] * 2))
    assert not torch.allclose(got, unscaled)
    pointing = [s["models"]["va_vit_tiny_patch4_32"]["scores"]["random"]["pointing_game"] for s in scores]
    assert pointing == pointing_game(maps, scaled).tolist()


def test_cli_uses_the_checkpoint_img_size_for_cnns(tmp_path: Path) -> None:
    torch.manual_seed(0)
    args = {"layers": [1, 1, 1, 1], "num_classes": 3}
    model = vision_attn.create_model("va_resnet18_32", **args).eval()
    ckpt = {"state_dict": {f"net.{k}": v for k, v in model.state_dict().items()},
            "vision_attn": {"model_name": "va_resnet18_32", "model_args": args, "img_size": 48}}  # fmt: skip
    torch.save(ckpt, tmp_path / "cnn.ckpt")
    path = _image(tmp_path / "photo.png", 64, 64)
    out = tmp_path / "out"
    argv = ["--checkpoint", str(tmp_path / "cnn.ckpt"), "--images", str(path), "--method", "gradcam", "--steps", "0"]
    assert explain_main([*argv, "--out", str(out)]) == 0
    with Image.open(out / "photo_gradcam.png") as overlay:
        assert overlay.size == (48, 48)  # not the model config's 32
    assert explain_main([*argv, "--out", str(out), "--img-size", "40"]) == 0
    with Image.open(out / "photo_gradcam.png") as overlay:
        assert overlay.size == (40, 40)


def test_cli_normalizes_each_channel_with_its_own_stats(tmp_path: Path) -> None:
    model = _vit_checkpoint(tmp_path / "vit.ckpt")
    out = tmp_path / "out"
    mean, std = [0.1, 0.4, 0.7], [0.2, 0.3, 0.4]
    argv = ["--checkpoint", str(tmp_path / "vit.ckpt"), "--dataset", "cluttered_fashion_mnist:test", "--limit", "2",
            "--method", "attention", "--steps", "0", "--no-overlays", "--out", str(out),
            "--mean", *map(str, mean), "--std", *map(str, std)]  # fmt: skip
    assert explain_main(argv) == 0
    records = json.loads((out / "scores.json").read_text())["images"]
    grey = torch.from_numpy(vision_attn.data.ClutteredFashionMNIST("test").images[:2]).float().div(255)[:, None]
    x = (grey.expand(-1, 3, -1, -1) - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    first_only = (grey.expand(-1, 3, -1, -1) - mean[0]) / std[0]  # what the CLI did before
    with torch.no_grad():
        probs, old = model(x).softmax(-1), model(first_only).softmax(-1)
    got = [r["models"]["va_vit_tiny_patch8_64"]["probability"] for r in records]
    assert got == pytest.approx(probs.amax(dim=1).tolist(), abs=1e-5)
    assert got != pytest.approx(old.amax(dim=1).tolist(), abs=1e-3)


def test_cli_overlay_names_are_unique_per_input(tmp_path: Path) -> None:
    paths = [_image(tmp_path / "a" / "img.png", 32, 32, 0), _image(tmp_path / "b" / "img.png", 32, 32, 1)]
    out = tmp_path / "out"
    argv = ["--model", "va_vit_tiny_patch4_32", "--model-args", '{"depth": 1, "num_classes": 3}', "--images",
            str(tmp_path / "a"), str(tmp_path / "b"), "--method", "rollout", "--steps", "0",
            "--out", str(out)]  # fmt: skip
    assert explain_main(argv) == 0
    first, second = Image.open(out / "img_1_rollout.png"), Image.open(out / "img_2_rollout.png")
    assert not np.array_equal(np.asarray(first), np.asarray(second))
    records = json.loads((out / "scores.json").read_text())["images"]
    assert [(r["image"], r["path"]) for r in records] == [("img_1", str(paths[0])), ("img_2", str(paths[1]))]


def test_cli_skips_methods_that_do_not_apply_and_still_writes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = _image(tmp_path / "x.png", 32, 32)
    out = tmp_path / "out"
    argv = ["--model", "resnet10t", "--model-args", '{"num_classes": 3}', "--images", str(path), "--img-size", "32",
            "--method", "rollout", "gradcam", "attention", "--steps", "1", "--out", str(out)]  # fmt: skip
    assert explain_main(argv) == 0
    assert (out / "grid.png").is_file()
    result = json.loads((out / "scores.json").read_text())
    assert list(result["summary"]) == ["gradcam"]
    skipped = [(s["model"], s["method"]) for s in result["skipped"]]
    assert skipped == [("resnet10t", "rollout"), ("resnet10t", "attention")]
    assert all("no token-attention modules" in s["reason"] for s in result["skipped"])
    assert "skipped resnet10t:rollout" in capsys.readouterr().out
    assert (out / "x_gradcam.png").is_file()
    assert not (out / "x_rollout.png").exists()


def test_cli_device_cuda_without_gpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    path = _image(tmp_path / "x.png", 32, 32)
    argv = ["explain", "--model", "va_vit_tiny_patch4_32", "--images", str(path), "--out", str(tmp_path / "o")]
    monkeypatch.delenv("VISION_ATTN_TRACEBACK", raising=False)
    with pytest.raises(SystemExit) as exit_:
        vision_attn.cli.main([*argv, "--device", "cuda"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert "--device 'cuda' needs a CUDA GPU, but none is available here; use --device cpu" in err
    assert "Traceback" not in err


def test_cli_records_true_and_predicted_classes_for_dataset_images(tmp_path: Path) -> None:
    from vision_attn.data.cluttered import ClutteredFashionMNIST
    from vision_attn.explain.cli import _row_title

    args = ["--model", "va_vit_tiny_patch8_64", "--model-args", '{"depth": 1, "num_classes": 10, "in_chans": 1}',
            "--dataset", "cluttered_fashion_mnist:test", "--limit", "3", "--method", "rollout", "--steps", "0",
            "--no-overlays", "--out", str(tmp_path)]  # fmt: skip
    assert explain_main(args) == 0
    records = json.loads((tmp_path / "scores.json").read_text())["images"]
    assert [r["label"] for r in records] == ClutteredFashionMNIST("test").targets[:3].tolist()
    first = records[0]
    title = _row_title(first).split("\n")
    assert title[0] == first["image"]
    assert title[1] == f"true: {first['label']}"  # a bare model knows no class names: the index
    assert title[2] == f"pred: {first['models']['va_vit_tiny_patch8_64']['prediction']}"
    named = {**first, "class_name": "Coat", "models": {"0:a": {"prediction": 1, "class_name": "Trouser"},
                                                        "1:b": {"prediction": 4, "class_name": "Coat"}}}  # fmt: skip
    assert _row_title(named).split("\n")[1:] == ["true: Coat", "0: Trouser", "1: Coat"]


def test_per_class_means_groups_scores_by_true_class() -> None:
    from vision_attn.explain.cli import per_class_means

    scores = {
        "pointing_game": torch.tensor([1.0, 0.0, 1.0, 1.0]),
        "energy_pointing": torch.tensor([0.2, 0.4, 0.6, 0.9]),
    }
    out = per_class_means(scores, torch.tensor([2, 2, 0, 2]), ["a", "b", "c"])
    assert list(out) == ["a", "c"]  # label order; class 'b' has no images
    assert out["a"] == {"images": 1, "pointing_game": 1.0, "energy_pointing": pytest.approx(0.6)}
    assert out["c"]["images"] == 3
    assert out["c"]["pointing_game"] == pytest.approx(2 / 3)
    assert out["c"]["energy_pointing"] == pytest.approx((0.2 + 0.4 + 0.9) / 3)
    assert list(per_class_means(scores, torch.tensor([5, 5, 1, 1]))) == ["1", "5"]  # no names: the index


def test_cli_writes_per_class_scores_for_dataset_images(tmp_path: Path) -> None:
    args = ["--model", "va_vit_tiny_patch8_64", "--model-args", '{"depth": 1, "num_classes": 10, "in_chans": 1}',
            "--dataset", "cluttered_fashion_mnist:test", "--limit", "30", "--method", "rollout", "random",
            "--scores", "pointing_game", "energy_pointing", "--steps", "0", "--no-overlays",
            "--out", str(tmp_path)]  # fmt: skip
    assert explain_main(args) == 0
    result = json.loads((tmp_path / "scores.json").read_text())
    assert set(result["summary_per_class"]) == {"rollout", "random"}
    for method in ("rollout", "random"):
        per_class = result["summary_per_class"][method]
        labels = sorted({r["label"] for r in result["images"]})
        assert list(per_class) == [str(label) for label in labels]  # a bare model has no class names
        assert sum(c["images"] for c in per_class.values()) == 30
        for label in labels:
            values = [r["models"]["va_vit_tiny_patch8_64"]["scores"][method]["pointing_game"]
                      for r in result["images"] if r["label"] == label]  # fmt: skip
            assert per_class[str(label)]["pointing_game"] == pytest.approx(sum(values) / len(values))
    image_file = _image(tmp_path / "x.png", 64, 64, mode="L")
    out = tmp_path / "files"
    assert explain_main([*args[:4], "--images", str(image_file), "--method", "rollout", "--steps", "0",
                         "--no-overlays", "--out", str(out)]) == 0  # fmt: skip
    assert "summary_per_class" not in json.loads((out / "scores.json").read_text())  # no labels, no classes
