"""Object-mask scores, the sanity checks (Adebayo et al. 2018) and ``vision-attn evaluate-maps`` (issue 22)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import vision_attn
from vision_attn.explain import register_method
from vision_attn.explain.evaluate_cli import main as evaluate_main
from vision_attn.explain.evaluation import evaluate_maps, evaluation_table
from vision_attn.explain.metrics import average_precision, mask_ap, mask_iou, mask_pixel_accuracy
from vision_attn.explain.registry import _METHODS
from vision_attn.explain.runner import ExplainInputs
from vision_attn.explain.sanity import (
    cascade_groups,
    cascading_randomization,
    class_sensitivity,
    passes_randomization,
    randomized_copy,
    spearman,
)


def _ap_reference(scores: np.ndarray, labels: np.ndarray) -> float:
    """scikit-learn's average_precision_score, by its definition: a step sum over the distinct thresholds."""
    ap, previous_recall = 0.0, 0.0
    for threshold in np.unique(scores)[::-1]:
        chosen = scores >= threshold
        true_pos = (chosen & labels).sum()
        recall, precision = true_pos / labels.sum(), true_pos / chosen.sum()
        ap += (recall - previous_recall) * precision
        previous_recall = recall
    return float(ap)


def _rank_reference(values: np.ndarray) -> np.ndarray:
    """Average ranks by explicit loops (ties share the mean of their positions)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = np.empty(len(values))
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for k in range(start, end + 1):
            ranks[order[k]] = (start + end) / 2
        start = end + 1
    return ranks


# --- masks --------------------------------------------------------------------------------------------------------


def test_average_precision_matches_its_definition_with_ties() -> None:
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 6, (5, 40)).astype(np.float32)  # many ties
    labels = rng.random((5, 40)) < 0.3
    got = average_precision(torch.from_numpy(scores), torch.from_numpy(labels))
    assert got.tolist() == pytest.approx([_ap_reference(s, y) for s, y in zip(scores, labels, strict=True)])
    perfect = average_precision(torch.tensor([[3.0, 2.0, 1.0, 0.0]]), torch.tensor([[True, True, False, False]]))
    assert perfect.item() == pytest.approx(1.0)
    assert average_precision(torch.rand(1, 4), torch.zeros(1, 4, dtype=torch.bool)).item() == 0.0


def test_mask_scores_follow_the_segmentation_protocol() -> None:
    maps = torch.zeros(2, 4, 4)
    maps[0, :2, :2] = 1.0  # exactly the object
    maps[1, 2:, 2:] = 1.0  # the opposite corner
    masks = torch.zeros(2, 4, 4, dtype=torch.bool)
    masks[:, :2, :2] = True
    assert mask_pixel_accuracy(maps, masks).tolist() == [1.0, 0.5]  # thresholded at the map's mean
    assert mask_iou(maps, masks).tolist() == pytest.approx([1.0, (0.0 + 8 / 16) / 2])  # mean of object, background
    ap = mask_ap(maps, masks)
    assert ap[0].item() == pytest.approx(1.0)
    flat = np.concatenate([1 - maps[1].flatten().numpy(), maps[1].flatten().numpy()])
    truth = np.concatenate([~masks[1].flatten().numpy(), masks[1].flatten().numpy()])
    assert ap[1].item() == pytest.approx(_ap_reference(flat, truth))
    with pytest.raises(ValueError, match=r"masks have shape \(2, 3, 3\) for maps \(2, 4, 4\)"):
        mask_iou(maps, masks[:, :3, :3])


# --- sanity checks --------------------------------------------------------------------------------------------------


def test_spearman_averages_tied_ranks() -> None:
    rng = np.random.default_rng(1)
    a, b = rng.integers(0, 4, (3, 25)).astype(np.float64), rng.random((3, 25))
    expected = [np.corrcoef(_rank_reference(x), _rank_reference(y))[0, 1] for x, y in zip(a, b, strict=True)]
    assert spearman(torch.from_numpy(a), torch.from_numpy(b)).tolist() == pytest.approx(expected, abs=1e-6)
    assert spearman(torch.ones(1, 5), torch.rand(1, 5)).item() == 0.0  # a constant map has no ranking
    assert spearman(torch.arange(5.0)[None], -torch.arange(5.0)[None]).item() == pytest.approx(-1.0)


def test_cascade_randomizes_from_the_head_down_and_leaves_the_model_alone() -> None:
    torch.manual_seed(0)
    model = vision_attn.create_model("va_vit_tiny_patch4_32", depth=2, num_classes=3).eval()
    names = [name for name, _ in cascade_groups(model)]
    assert names == ["head", "fc_norm", "norm", "blocks.1", "blocks.0", "patch_embed"] or names[:1] == ["head"]
    assert names.index("blocks.1") < names.index("blocks.0") < names.index("patch_embed")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    copy = randomized_copy(model, depth=names.index("blocks.1") + 1, seed=0)
    after = copy.state_dict()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the model itself is untouched
    assert not torch.equal(after["head.weight"], before["head.weight"])
    assert not torch.equal(after["blocks.1.attn.qkv.weight"], before["blocks.1.attn.qkv.weight"])
    assert torch.equal(after["blocks.0.attn.qkv.weight"], before["blocks.0.attn.qkv.weight"])  # not reached yet
    assert torch.equal(after["pos_embed"], before["pos_embed"])
    full = randomized_copy(model, depth=len(names), seed=0).state_dict()
    assert not torch.equal(full["pos_embed"], before["pos_embed"])  # parameters without reset_parameters too
    again = randomized_copy(model, len(names), seed=0).state_dict()
    torch.testing.assert_close(full["head.weight"], again["head.weight"])  # seeded


def test_a_map_that_ignores_the_model_fails_and_one_that_reads_it_passes() -> None:
    @register_method("toy_edges")
    def toy_edges(model, images, target=None):
        """The image's own horizontal gradient: no model in it."""
        return (images[:, 0, :, 1:] - images[:, 0, :, :-1]).abs()

    try:
        torch.manual_seed(0)
        model = vision_attn.create_model("va_vit_tiny_patch4_32", depth=2, num_classes=3).eval()
        x = torch.randn(4, 3, 32, 32)
        stages = cascading_randomization(model, x, "toy_edges")
        assert [name for name, _ in stages][-1] == "all"
        assert all(rho.mean().item() == pytest.approx(1.0) for _, rho in stages)
        assert not passes_randomization(stages[-1][1].mean().item())
        lrp = dict(cascading_randomization(model, x, "attnlrp"))
        assert lrp["head"].mean() < 0.9  # the relevance of another head's logit
        assert passes_randomization(lrp["all"].mean().item())
        assert class_sensitivity(model, x, "toy_edges").mean().item() == pytest.approx(1.0)
        assert class_sensitivity(model, x, "attnlrp").mean().item() < 0.99
    finally:
        _METHODS.pop("toy_edges", None)


# --- the evaluation -------------------------------------------------------------------------------------------------


def test_evaluate_maps_scores_the_methods_and_refuses_mismatched_inputs() -> None:
    torch.manual_seed(0)
    model = vision_attn.create_model("va_vit_tiny_patch4_32", depth=1, num_classes=3).eval()
    x = torch.randn(6, 3, 32, 32)
    boxes = torch.tensor([[4.0, 4.0, 20.0, 20.0]] * 6)
    masks = torch.zeros(6, 32, 32, dtype=torch.bool)
    masks[:, 4:20, 4:20] = True
    inputs = ExplainInputs(x, [f"i{k}" for k in range(6)], boxes, masks)
    results, skipped = evaluate_maps(model, inputs, ["rollout", "random", "spatial"], steps=2, batch_size=4,
                                     sanity_images=2)  # fmt: skip
    assert [r.method for r in results] == ["rollout", "random"]
    assert [s["method"] for s in skipped] == ["spatial"]
    rollout, random = results
    assert set(rollout.scores) == {"pointing_game", "energy_pointing", "deletion_auc", "insertion_auc", "mask_ap",
                                   "mask_iou", "mask_pixel_accuracy"}  # fmt: skip
    assert len(rollout.per_image["mask_ap"]) == 6
    assert rollout.class_rho is None  # class-agnostic
    assert random.self_rho is not None
    assert random.self_rho < 0.5
    assert random.passes is False  # random maps do not depend on the weights
    assert rollout.cost_ratio > 0
    assert rollout.maps_per_second > 0
    table = evaluation_table(results, skipped)
    assert "| random |" in table
    assert "**fails**" in table
    assert "Skipped `spatial`" in table
    with pytest.raises(ValueError, match="masks has 5 entries for 6 images"):
        evaluate_maps(model, ExplainInputs(x, ["a"] * 6, boxes, masks[:5]), ["rollout"], steps=0, sanity_images=0)
    with pytest.raises(ValueError, match=r"target \[7\] is out of range: the model has 3 classes"):
        evaluate_maps(model, inputs, ["rollout"], target=7, steps=0, sanity_images=0)


def test_evaluate_maps_cli_on_the_embedded_dataset(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    argv = ["--model", "va_vitc2_seq_tiny_patch8_64", "--model-args", '{"in_chans": 1}', "--limit", "8",
            "--method", "gradient_rollout", "attnlrp", "random", "--steps", "2", "--sanity-images", "2",
            "--no-progress", "--out", str(tmp_path)]  # fmt: skip
    assert evaluate_main(argv) == 0
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert [m["method"] for m in scores["methods"]] == ["gradient_rollout", "attnlrp", "random"]
    assert scores["images"] == 8
    assert scores["dataset"] == "cluttered_fashion_mnist:test"
    for method in scores["methods"]:
        assert {"pointing_game", "mask_ap", "mask_iou", "deletion_auc"} <= set(method["scores"])
        assert "all" in method["randomization"]
    table = (tmp_path / "table.md").read_text()
    assert table.startswith("| method | pointing game ↑")
    assert "attnlrp" in capsys.readouterr().out
    for bad, message in (
        (["--method", "nope"], "--method ['nope'] unknown"),
        (["--boxes", "b.json"], "--boxes applies to --images"),
        (["--batch-size", "0"], "--batch-size: must be an int >= 1, got '0'"),
    ):
        with pytest.raises(SystemExit) as exit_:
            evaluate_main([*argv[:4], *bad, "--out", str(tmp_path / "bad")])
        assert exit_.value.code == 2
        assert message in capsys.readouterr().err
    with pytest.raises(ValueError, match="--target 12 is out of range: the model has 10 classes"):
        evaluate_main([*argv[:6], "--target", "12", "--steps", "0", "--sanity-images", "0", "--out", str(tmp_path)])
