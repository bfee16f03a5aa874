"""Saliency metrics, plots and the ``vision-attn explain`` CLI (issue 6)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import vision_attn
import vision_attn.cli
from vision_attn.explain import explain
from vision_attn.explain.cli import main as explain_main
from vision_attn.explain.metrics import (
    box_masks,
    deletion_auc,
    energy_pointing,
    insertion_auc,
    pointing_game,
    random_maps,
)
from vision_attn.explain.plot import method_grid, overlay

BOXES = torch.tensor([[2.0, 4.0, 10.0, 12.0], [8.0, 0.0, 16.0, 6.0]])  # x_min, y_min, x_max, y_max


def _box_maps(boxes: torch.Tensor, size: tuple[int, int] = (16, 16)) -> torch.Tensor:
    return box_masks(boxes, size).float()


class _BoxEvidenceModel(nn.Module):
    """Two classes; P(class 0) = mean intensity inside the box (softmax of log-probabilities is exact)."""

    def __init__(self, box: tuple[int, int, int, int]) -> None:
        super().__init__()
        self.box = box

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x0, y0, x1, y1 = self.box
        p = x[:, 0, y0:y1, x0:x1].mean(dim=(1, 2)).clamp(1e-6, 1 - 1e-6)
        return torch.stack([p.log(), (1 - p).log()], dim=1)


def test_box_masks_are_max_exclusive() -> None:
    masks = box_masks(BOXES, (16, 16))
    assert masks.shape == (2, 16, 16)
    assert masks[0].sum() == 8 * 8
    assert masks[0, 4, 2]
    assert not masks[0, 12, 2]
    assert not masks[0, 4, 10]


def test_pointing_and_energy_perfect_and_elsewhere() -> None:
    perfect = _box_maps(BOXES)
    elsewhere = 1.0 - perfect
    torch.testing.assert_close(pointing_game(perfect, BOXES), torch.ones(2))
    torch.testing.assert_close(energy_pointing(perfect, BOXES), torch.ones(2))
    torch.testing.assert_close(pointing_game(elsewhere, BOXES), torch.zeros(2))
    torch.testing.assert_close(energy_pointing(elsewhere, BOXES), torch.zeros(2))
    peak_outside = torch.zeros(2, 16, 16)
    peak_outside[:, 15, 0] = 1.0  # one pixel left of / below the boxes
    assert pointing_game(peak_outside, BOXES).tolist() == [0.0, 0.0]
    assert pointing_game(peak_outside, BOXES, tolerance=4).tolist() == [1.0, 0.0]


def test_pointing_game_splits_tied_maxima() -> None:
    plateau = torch.zeros(2, 16, 16)
    plateau[:, 0:4, 0:8] = 1.0  # a flat maximum: rows 0-3, columns 0-7
    boxes = torch.tensor([[4.0, 0.0, 12.0, 16.0], [8.0, 0.0, 16.0, 16.0]])
    assert pointing_game(plateau, boxes).tolist() == [0.5, 0.0]  # half the tied pixels in the first box
    assert pointing_game(plateau, boxes, tolerance=2).tolist() == [0.75, 0.25]
    uniform = torch.zeros(2, 16, 16)
    area = box_masks(BOXES, (16, 16)).flatten(1).float().mean(dim=1)
    torch.testing.assert_close(pointing_game(uniform, BOXES), area)
    rounding = torch.zeros(1, 16, 16)
    rounding[0, 5, 5], rounding[0, 5, 12] = 1.0, 1.0 - 1e-7  # equal up to float32 rounding
    assert pointing_game(rounding, BOXES[:1]).tolist() == [0.5]


def test_pointing_game_of_upsampled_coarse_maps_is_flip_invariant() -> None:
    # bilinear upsampling keeps edge cells flat out to the border: mirrored map and box must score the same
    coarse = torch.rand(64, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    maps = torch.nn.functional.interpolate(coarse, size=(16, 16), mode="bilinear", align_corners=False)[:, 0]
    boxes = torch.tensor([[2.0, 0.0, 6.0, 16.0], [10.0, 0.0, 14.0, 16.0]]).repeat(32, 1)
    mirrored = torch.stack([16 - boxes[:, 2], boxes[:, 1], 16 - boxes[:, 0], boxes[:, 3]], dim=1)
    scores = pointing_game(maps, boxes)
    torch.testing.assert_close(pointing_game(maps.flip(-1), mirrored), scores)
    assert set(scores.tolist()) == {0.0, 0.5}  # a corner cell's plateau is 4 columns wide, 2 of them in the box


def test_random_baseline_scores_box_area_share() -> None:
    boxes = BOXES.repeat(256, 1)
    maps = random_maps(512, (16, 16), seed=0)
    area = box_masks(boxes, (16, 16)).flatten(1).float().mean(dim=1)
    torch.testing.assert_close(energy_pointing(maps, boxes).mean(), area.mean(), atol=0.01, rtol=0)
    assert abs(pointing_game(maps, boxes).mean() - area.mean()) < 0.06
    blocky = random_maps(2, (16, 16), grid_size=(4, 4), seed=1)
    assert blocky.shape == (2, 16, 16)
    assert blocky[:, :4, :4].unique().numel() == 2  # one value per 4x4 cell


def test_deletion_and_insertion_rank_perfect_above_wrong_maps() -> None:
    box = (0, 0, 4, 16)  # a quarter of a 16x16 image
    model = _BoxEvidenceModel(box).eval()
    images = torch.ones(2, 1, 16, 16)
    perfect = _box_maps(torch.tensor([box, box], dtype=torch.float32))
    wrong = 1.0 - perfect
    del_perfect = deletion_auc(model, images, perfect, target=0, steps=16)
    del_wrong = deletion_auc(model, images, wrong, target=0, steps=16)
    # deleting the box first: p falls linearly to 0 by 1/4 deleted -> AUC 1/8; last: p stays 1 until 3/4 -> 7/8
    torch.testing.assert_close(del_perfect, torch.full((2,), 0.125), atol=1e-4, rtol=0)
    torch.testing.assert_close(del_wrong, torch.full((2,), 0.875), atol=1e-4, rtol=0)
    ins_perfect = insertion_auc(model, images, perfect, target=0, steps=16, substrate="zero")
    ins_wrong = insertion_auc(model, images, wrong, target=0, steps=16, substrate="zero")
    torch.testing.assert_close(ins_perfect, torch.full((2,), 0.875), atol=1e-4, rtol=0)
    torch.testing.assert_close(ins_wrong, torch.full((2,), 0.125), atol=1e-4, rtol=0)
    batched = deletion_auc(model, images, torch.stack([perfect[0], wrong[0]]), target=0, steps=16, batch_size=1)
    torch.testing.assert_close(batched, torch.tensor([0.125, 0.875]), atol=1e-4, rtol=0)


def test_metrics_bad_input() -> None:
    maps = torch.rand(2, 16, 16)
    with pytest.raises(ValueError, match=r"boxes must be \[B, 4\]"):
        energy_pointing(maps, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="x_max > x_min"):
        pointing_game(maps, torch.tensor([[5.0, 0, 5, 4], [0, 0, 4, 4]]))
    with pytest.raises(ValueError, match="one box per map"):
        energy_pointing(maps, BOXES[:1])
    with pytest.raises(ValueError, match="3-D"):
        pointing_game(torch.rand(16, 16), BOXES)
    model = _BoxEvidenceModel((0, 0, 4, 4))
    with pytest.raises(ValueError, match="same B, H, W"):
        deletion_auc(model, torch.ones(2, 1, 16, 16), torch.rand(2, 8, 8))
    with pytest.raises(ValueError, match="substrate 'noise' is unknown"):
        insertion_auc(model, torch.ones(2, 1, 16, 16), maps, substrate="noise")


def test_overlay_and_method_grid(tmp_path: Path) -> None:
    images = torch.rand(2, 1, 16, 16)
    maps = {"rollout": torch.rand(2, 16, 16), "model:gradcam": torch.rand(2, 16, 16)}
    blended = overlay(images[0], maps["rollout"][0], alpha=0.0)
    np.testing.assert_allclose(blended, images[0, 0, :, :, None].expand(16, 16, 3).numpy(), atol=1e-6)
    full = overlay(images[0], torch.ones(16, 16), alpha=1.0, cmap="gray")
    np.testing.assert_allclose(full, np.ones((16, 16, 3)), atol=1e-6)
    fig = method_grid(images, maps, tmp_path / "grid.png", boxes=BOXES)
    assert len(fig.axes) == 2 * 3
    with Image.open(tmp_path / "grid.png") as png:
        assert png.format == "PNG"
    with pytest.raises(ValueError, match="expected"):
        method_grid(images, {"bad": torch.rand(2, 8, 8)})


def _write_images(folder: Path, count: int, size: int) -> list[Path]:
    folder.mkdir()
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        path = folder / f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def test_cli_model_name_writes_overlays_grid_and_scores(tmp_path: Path) -> None:
    paths = _write_images(tmp_path / "imgs", 2, 32)
    (tmp_path / "boxes.json").write_text(json.dumps({p.name: [0, 0, 16, 16] for p in paths}))
    args = ["--model", "va_vit_tiny_patch4_32", "--model-args", '{"depth": 1, "num_classes": 3}']
    args += ["--images", str(tmp_path / "imgs"), "--method", "rollout", "gradcam", "--out", str(tmp_path / "out")]
    args += ["--boxes", str(tmp_path / "boxes.json"), "--steps", "2"]
    assert vision_attn.cli.main(["explain", *args]) == 0
    out = tmp_path / "out"
    assert (out / "grid.png").is_file()
    assert (out / "img1_gradcam.png").is_file()
    scores = json.loads((out / "scores.json").read_text())
    entry = scores["images"][0]["models"]["va_vit_tiny_patch4_32"]
    assert entry["prediction"] in (0, 1, 2)
    assert set(entry["scores"]) == {"rollout", "gradcam"}
    assert set(entry["scores"]["rollout"]) == {"deletion_auc", "insertion_auc", "pointing_game", "energy_pointing"}
    assert 0.0 <= entry["scores"]["rollout"]["energy_pointing"] <= 1.0


def test_cli_lightning_checkpoint_matches_model(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = vision_attn.create_model("va_vit_tiny_patch4_32", depth=1, num_classes=3).eval()
    ckpt = {  # the layout train.py writes (ImageClassifier.net + on_save_checkpoint)
        "state_dict": {f"net.{k}": v for k, v in model.state_dict().items()},
        "vision_attn": {"model_name": "va_vit_tiny_patch4_32", "model_args": {"depth": 1, "num_classes": 3}},
    }
    torch.save(ckpt, tmp_path / "last.ckpt")
    paths = _write_images(tmp_path / "imgs", 1, 32)
    out = tmp_path / "out"
    args = ["--checkpoint", str(tmp_path / "last.ckpt"), "--images", str(paths[0]), "--method", "attention"]
    assert explain_main([*args, "--out", str(out), "--steps", "0", "--mean", "0.5", "--std", "0.25"]) == 0
    entry = json.loads((out / "scores.json").read_text())["images"][0]["models"]["va_vit_tiny_patch4_32"]
    x = (torch.from_numpy(np.asarray(Image.open(paths[0]), dtype=np.float32) / 255).permute(2, 0, 1) - 0.5) / 0.25
    with torch.no_grad():
        probs = model(x[None]).softmax(-1)[0]
    assert entry["prediction"] == int(probs.argmax())
    assert entry["probability"] == pytest.approx(float(probs.max()), abs=1e-5)
    maps = explain(model, x[None], method="attention")
    assert maps.shape == (1, 32, 32)


def test_cli_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        explain_main(["--model", "va_vit_tiny_patch4_32", "--images", str(tmp_path / "missing.png"), "--out", "x"])
    assert "neither a file nor a folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        explain_main(["--images", "a.png", "--out", str(tmp_path), "--method", "occlusion"])
    assert "is not [K:]METHOD with METHOD 'all' or one of ('rollout'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        explain_main(["--model", "resnet10t", "--images", "a.png", "--out", str(tmp_path), "--method", "1:gradcam"])
    assert "beyond the 1 models given" in capsys.readouterr().err


def test_cli_two_models_with_per_model_methods(tmp_path: Path) -> None:
    paths = _write_images(tmp_path / "imgs", 2, 32)
    (tmp_path / "boxes.json").write_text(json.dumps({p.name: [0, 0, 16, 16] for p in paths}))
    args = ["--model", "va_vit_tiny_patch4_32", "--model", "resnet10t", "--model-args", '{"num_classes": 3}']
    args += ["--images", *map(str, paths), "--method", "attention", "1:gradcam", "random", "--steps", "0"]
    args += ["--boxes", str(tmp_path / "boxes.json"), "--scores", "energy_pointing", "--out", str(tmp_path / "out")]
    args += ["--target-layer", "layer3"]
    assert explain_main(args) == 0
    summary = json.loads((tmp_path / "out" / "scores.json").read_text())["summary"]
    assert list(summary) == [
        "0:va_vit_tiny_patch4_32:attention",
        "0:va_vit_tiny_patch4_32:random",
        "1:resnet10t:gradcam",
        "1:resnet10t:random",
    ]
    assert all(set(row) == {"energy_pointing"} for row in summary.values())


def test_cli_dataset_split_with_boxes(tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ["--model", "va_vit_tiny_patch8_64", "--model-args", '{"depth": 1, "num_classes": 10, "in_chans": 1}']
    args += ["--dataset", "cluttered_fashion_mnist:test", "--limit", "3", "--method", "rollout", "random"]
    assert explain_main([*args, "--out", str(out), "--steps", "2", "--no-overlays"]) == 0
    result = json.loads((out / "scores.json").read_text())
    assert len(result["images"]) == 3
    assert set(result["summary"]) == {"rollout", "random"}
    assert set(result["summary"]["random"]) == {"pointing_game", "energy_pointing", "deletion_auc", "insertion_auc"}
    assert (out / "grid.png").is_file()
    assert not (out / "test_0000_rollout.png").exists()
