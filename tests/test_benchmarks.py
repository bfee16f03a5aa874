"""The benchmark scripts that write the numbers in README/docs: the docs-block writer, the quiet-machine gate, and
``benchmarks/train_default.py`` end to end with a tiny time box (``slow``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import _machine  # noqa: E402  (benchmarks/ is a folder of scripts, not a package)
import _timing  # noqa: E402


def test_timing_synchronizes_the_device_before_reading_the_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[str] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: events.append("sync"))
    clock = iter(range(100))
    import vision_attn._timing as timing

    monkeypatch.setattr(timing.time, "perf_counter", lambda: events.append("clock") or float(next(clock)))
    assert _timing.timed(lambda: events.append("work"), "cuda:0") == 1.0
    assert events == ["sync", "clock", "work", "sync", "clock"]  # the clock stops after the queued work is done
    events.clear()
    _timing.timed(lambda: events.append("work"), "cpu")
    assert events == ["clock", "work", "clock"]  # nothing to wait for on the CPU
    order: list[str] = []
    medians = _timing.interleaved_times([lambda: order.append("a"), lambda: order.append("b")], 3, "cpu", warmup=1)
    assert order == ["a", "b", "a", "b", "b", "a", "a", "b"]  # warm-up, then alternating turns
    assert len(medians) == 2


def test_write_block_replaces_only_the_marked_block(tmp_path: Path) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text(
        "intro\n<!-- t:start -->\nold table\n<!-- t:end -->\noutro\n<!-- u:start -->\nkeep\n<!-- u:end -->\n"
    )
    _machine.write_block("t", "| new |", [doc])
    text = doc.read_text()
    assert "old table" not in text
    assert "<!-- t:start -->\n| new |\n<!-- t:end -->" in text
    assert text.startswith("intro\n")
    assert "outro" in text
    assert "keep" in text


def test_write_block_refuses_a_file_without_the_block(tmp_path: Path) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text("no markers here\n")
    with pytest.raises(RuntimeError, match="no <!-- t:start -->"):
        _machine.write_block("t", "x", [doc])
    assert doc.read_text() == "no markers here\n"


def test_docs_carry_every_block_the_benchmarks_write() -> None:
    blocks = {
        "main_job": ["README.md", "docs/training.md"],
        "main_job_budget": ["docs/training.md"],
        "explain_scores": ["README.md", "docs/explain.md"],
        "explain_per_class": ["docs/explain.md"],
        "context_probe": ["docs/explain.md"],
        "train_default": ["README.md", "docs/training.md"],
        "pipeline_overhead": ["docs/training.md"],
        "throughput": ["docs/benchmarks.md"],
        "onnx_runtime": ["docs/benchmarks.md"],
        "data_throughput": ["docs/data.md"],
        "explain_quality": ["docs/explain.md"],
        "app_latency": ["docs/app.md"],
        "relevance_cost": ["docs/explain.md"],
        "explain_targets": ["docs/explain.md"],
        "explain_attention_layer": ["docs/explain.md"],
    }
    for name, files in blocks.items():
        for file in files:
            text = (REPO / file).read_text()
            assert f"<!-- {name}:start -->" in text, (name, file)
            assert f"<!-- {name}:end -->" in text, (name, file)


def test_settle_reports_a_busy_machine_as_not_quiet(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_machine, "cpu_busy", lambda seconds=5.0: 0.9)
    monkeypatch.setattr(_machine.time, "sleep", lambda seconds: None)
    record = _machine.settle(max_load=1e9, timeout=0.0)
    assert record["quiet"] is False
    assert record["cpu_busy"] == 0.9
    assert len(record["loadavg"]) == 3
    monkeypatch.setattr(_machine, "cpu_busy", lambda seconds=5.0: 0.0)
    assert _machine.settle(max_load=1e9, timeout=0.0)["quiet"] is True


def test_train_default_table_lists_every_map_method() -> None:
    import train_default

    row = {
        "model": "default", "params": 337035, "test_acc1": 0.8, "train_images_per_second": 250.0, "epochs": 3,
        "load": {"loadavg": [0.1, 0.2, 0.3]},
        "maps": {"rollout": {"pointing_game": 0.9, "energy_in_box": 0.5},
                 "gradient_rollout": {"pointing_game": 0.8, "energy_in_box": 0.6}},
    }  # fmt: skip
    cnn = {**row, "model": "resnet18", "maps": {}}
    text = train_default.table([row, cnn], "00:00:01:00")
    assert "| rollout / gradient_rollout | 0.9 / 0.8 | 0.5 / 0.6 |" in text
    assert "**80.0 %**" in text
    assert "| — | — | — |" in text


def test_main_job_per_class_table_has_one_row_per_attention_method() -> None:
    import main_job

    per_class = {
        m: {"T-shirt": {"images": 2, "pointing_game": v}, "Sandal": {"images": 2, "pointing_game": v / 2}}
        for m, v in (("rollout", 1.0), ("gradient_rollout", 0.9), ("random", 0.1))
    }
    lines = main_job.per_class_table(per_class).splitlines()
    assert lines[0] == "| pointing game per true class | T-shirt | Sandal |"
    assert lines[1] == "|---|---|---|"
    assert lines[2:] == ["| rollout | 1.00 | 0.50 |", "| gradient_rollout | 0.90 | 0.45 |"]  # no random row
    assert main_job.per_class_table({}).splitlines()[0] == "| pointing game per true class |  |"


def test_pipeline_overhead_table_reads_the_paired_ratio() -> None:
    import pipeline_overhead

    bare = [
        {"seconds": 10.0, "images": 1000.0},
        {"seconds": 20.0, "images": 1000.0},
        {"seconds": 12.0, "images": 1000.0},
    ]
    pipe = [
        {"seconds": 11.0, "images": 1000.0, "images_per_second": 95.0},
        {"seconds": 23.0, "images": 1000.0, "images_per_second": 50.0},
        {"seconds": 14.4, "images": 1000.0, "images_per_second": 80.0},
    ]
    lines = pipeline_overhead.table(2, bare, pipe).splitlines()
    assert lines[0].startswith("| 2 epochs of the default config, 3 alternating rounds |")
    assert lines[2] == "| seconds (median) | 12.0 | 14.4 | 1.20 |"
    assert "| 83 | 80 | 1.04 |" in lines[3]  # median bare speed 1000/12 vs the pipeline's training-step speed
    assert lines[4].endswith("| **1.15** (1.10–1.20) |")  # rounds: 1.10, 1.15, 1.20


def test_context_probe_table_per_true_class() -> None:
    import context_probe

    labels = np.array([0, 0, 1, 1, 1])
    preds = {
        "full": np.array([0, 1, 1, 1, 0]),
        "object": np.array([0, 0, 1, 0, 1]),
        "context": np.array([1, 1, 1, 0, 1]),
        "context_confidence": np.array([0.9, 0.5, 0.2, 0.3, 0.4]),
    }
    lines = context_probe.table(preds, labels, ["a", "b", "c"]).splitlines()
    assert lines[2] == "| a | 2 | 0.50 | 1.00 | 0.00 | b (1.00) | 0.70 |"
    assert lines[3] == "| b | 3 | 0.67 | 0.67 | 0.67 | b (0.67) | 0.30 |"
    assert len(lines) == 4  # class 'c' has no images


def test_context_probe_finds_the_newest_export_and_refuses_docs_for_another_model(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    import context_probe

    with pytest.raises(FileNotFoundError, match=r"run benchmarks/main_job\.py first"):
        context_probe.latest_export(tmp_path)
    for version in (2, 10, 9):
        (tmp_path / f"version_{version}" / "export").mkdir(parents=True)
    assert context_probe.latest_export(tmp_path) == tmp_path / "version_10" / "export"  # by number, not by name
    with pytest.raises(SystemExit) as exit_:
        context_probe.main(["--write-docs", "--checkpoint", str(tmp_path)])
    assert exit_.value.code == 2
    assert "--write-docs documents the main job's model" in capsys.readouterr().err


def test_context_probe_runs_a_model_on_the_three_versions() -> None:
    import context_probe

    import vision_attn
    from vision_attn.data.cluttered import load_cluttered
    from vision_attn.data.outliers import blank

    data = load_cluttered()
    model = vision_attn.create_model("va_vit_tiny_patch8_64", num_classes=10, in_chans=1, depth=1).eval()
    images, labels, boxes = data["test_images"][:12], data["test_labels"][:12].astype(np.int64), data["test_boxes"][:12]
    preds = context_probe.probe(model, images, labels, boxes, 0.12, 0.27)
    assert set(preds) == {"full", "object", "context", "context_confidence"}
    classes = [preds[k] for k in ("full", "object", "context")]
    assert all(p.shape == (12,) and p.dtype == np.int64 and ((p >= 0) & (p < 10)).all() for p in classes)
    x = (torch.from_numpy(blank(images, boxes, "context")).float()[:, None] / 255 - 0.12) / 0.27
    with torch.no_grad():
        probs = model(x).softmax(-1)
    assert (probs.argmax(-1).numpy() == preds["context"]).all()
    np.testing.assert_allclose(preds["context_confidence"], probs.max(-1).values.numpy(), rtol=1e-5)


@pytest.mark.slow
def test_train_default_runs_with_a_tiny_time_box_and_refuses_docs_on_a_busy_machine(tmp_path: Path) -> None:
    readme = (REPO / "README.md").read_text()
    cmd = [
        sys.executable, str(REPO / "benchmarks" / "train_default.py"), "--models", "default", "va_resnet18_cbam",
        "--max-time", "00:00:00:15", "--settle", "0", "--max-load", "0", "--runs", str(tmp_path), "--write-docs",
    ]  # fmt: skip
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    # load 0 is never "quiet": the numbers are printed and saved, but the docs are left alone
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "not writing docs" in proc.stderr
    assert (REPO / "README.md").read_text() == readme
    results = json.loads((tmp_path / "bench_train_default.json").read_text())
    assert [r["model"] for r in results] == ["default", "va_resnet18_cbam"]
    for r in results:
        assert 0.0 <= r["test_acc1"] <= 1.0
        assert r["epochs"] >= 1
        assert r["train_images_per_second"] > 0
        assert r["load"]["quiet"] is False
        assert Path(r["tested_checkpoint"]).is_file()
        assert str(tmp_path) in r["tested_checkpoint"]
    assert set(results[0]["maps"]) == {"rollout", "gradient_rollout"}
    assert set(results[1]["maps"]) == {"spatial"}
    for scores in (*results[0]["maps"].values(), *results[1]["maps"].values()):
        assert 0.0 <= scores["pointing_game"] <= 1.0
        assert 0.0 <= scores["energy_in_box"] <= 1.0


def test_publish_writes_only_after_a_quiet_run(tmp_path: Path, capsys) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text("<!-- t:start -->\nold\n<!-- t:end -->\n")
    busy = {"loadavg": [1.9, 1.5, 1.2], "cpu_busy": 0.8, "quiet": False}
    assert _machine.publish("t", "new", [doc], busy) == 1
    assert "not writing docs" in capsys.readouterr().err
    assert "old" in doc.read_text()
    assert _machine.publish("t", "new", [doc], busy, allow_load=True) == 0
    assert _machine.publish("t", "newer", [doc], {**busy, "quiet": True}) == 0
    assert doc.read_text() == "<!-- t:start -->\nnewer\n<!-- t:end -->\n"


def test_docs_allowed_names_when_the_machine_was_busy(capsys) -> None:
    assert _machine.docs_allowed(True, False, "before x")
    assert _machine.docs_allowed(False, True, "before x")
    assert not _machine.docs_allowed(False, False, "before ['resnet18']")
    assert "not writing docs: the machine was busy before ['resnet18']; rerun" in capsys.readouterr().err


def test_main_job_budget_scales_the_default_configs_epochs_and_time_cap(tmp_path: Path) -> None:
    import main_job
    import yaml

    trainer = yaml.safe_load((REPO / "configs" / "default.yaml").read_text())["trainer"]
    epochs, time_cap = main_job.budget_overrides(2)
    assert epochs == f"--trainer.max_epochs={2 * trainer['max_epochs']}"
    days, hours, minutes, seconds = (int(v) for v in trainer["max_time"].split(":"))
    doubled = 2 * (((days * 24 + hours) * 60 + minutes) * 60 + seconds)
    assert time_cap == f"--trainer.max_time=00:{doubled // 3600:02d}:{doubled // 60 % 60:02d}:{doubled % 60:02d}"
    config = tmp_path / "c.yaml"
    config.write_text("trainer:\n  max_epochs: 3\n  max_time: '00:20:00:30'\n")
    assert main_job.budget_overrides(1.5, config) == ["--trainer.max_epochs=4", "--trainer.max_time=01:06:00:45"]
    with pytest.raises(ValueError, match="--budget must be > 0, got 0"):
        main_job.budget_overrides(0, config)
    config.write_text("trainer:\n  max_epochs: 3\n")
    with pytest.raises(ValueError, match=r"c\.yaml needs trainer\.max_epochs .* got 3 and None"):
        main_job.budget_overrides(2, config)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--write-docs", "--", "--trainer.max_epochs=1"], "--write-docs documents the default config"),
        (["--budget", "-1"], "--budget must be > 0, got -1"),
    ],
)
def test_main_job_refuses_docs_for_another_job_and_a_bad_budget_before_training(
    argv: list[str], message: str, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import main_job

    monkeypatch.setattr(main_job, "main_job", lambda *a, **k: pytest.fail("trained although the arguments are bad"))
    with pytest.raises(SystemExit) as exit_:
        main_job.main(argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_main_job_table_shows_the_selection_score_and_the_title() -> None:
    import main_job

    summary = {
        "process_seconds": 125.4, "fit_seconds": 100.0, "epochs": 2, "global_step": 20,
        "train_images_per_second": 300.0, "num_parameters": 235227, "best_model_score": 0.8219,
        "test": {"metrics": {"test/acc1": 0.8, "test/acc5": 0.996}},
    }  # fmt: skip
    lines = main_job.job_table(summary, {"loadavg": [0.5, 0.4, 0.3]}, "main job x2").splitlines()
    assert lines[0] == "| main job x2 | |"
    assert "| best val/acc1 (400 hold-out images of the train split: selects the checkpoint) | 82.2 % |" in lines
    assert "| wall time, whole process (start-up, training, validation, test, export) | **2 min 5 s** |" in lines
    assert any(line.endswith("| **80.0 %** / 99.6 % |") for line in lines)


def test_main_job_budget_run_writes_only_its_own_block(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import main_job

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "training.md").write_text(
        "<!-- main_job:start -->\nthe default job\n<!-- main_job:end -->\n"
        "<!-- main_job_budget:start -->\nSTALE TABLE\n<!-- main_job_budget:end -->\n"
    )
    calls = {}

    def fake_job(extra: list[str], run_dir: Path) -> dict:
        calls["job"] = (extra, run_dir)
        return {
            "process_seconds": 1000.0, "fit_seconds": 980.0, "epochs": 72, "global_step": 8064,
            "train_images_per_second": 290.0, "num_parameters": 235227, "best_model_score": 0.87,
            "test": {"metrics": {"test/acc1": 0.85, "test/acc5": 0.995}}, "run_folder": str(tmp_path / "run"),
        }  # fmt: skip

    scores = {m: {"pointing_game": 0.9, "energy_pointing": 0.5, "deletion_auc": 0.2} for m in main_job.METHODS}
    monkeypatch.setattr(main_job, "REPO", tmp_path)
    monkeypatch.setattr(main_job, "settle", lambda *a: {"loadavg": [0.5, 0.5, 0.5], "cpu_busy": 0.0, "quiet": True})
    monkeypatch.setattr(main_job, "main_job", fake_job)
    monkeypatch.setattr(main_job, "explain_scores", lambda *a: {"summary": scores, "summary_per_class": {}})
    monkeypatch.setattr(main_job, "figure", lambda *a: pytest.fail("a budget run does not redraw the docs figure"))
    assert main_job.main(["--budget", "4", "--write-docs"]) == 0
    assert calls["job"] == (main_job.budget_overrides(4), main_job.OTHER_RUN_DIR)
    text = (docs / "training.md").read_text()
    assert "the default job" in text  # the default job's block is left alone
    assert "STALE TABLE" not in text
    assert "| main job with 4x the budget (`configs/default.yaml --trainer.max_epochs=" in text
    assert "| **85.0 %** / 99.5 % |" in text
    assert "| rollout | 0.900 | 0.500 | 0.200 |" in text
    assert "Made by `python benchmarks/main_job.py --budget 4 --write-docs`." in text


def test_gradient_floor_reaches_the_first_attention_and_leaves_no_hook() -> None:
    """The explain benchmark's reference row: a backward pass to the first attention module's output, hooks removed."""
    import explain as explain_benchmark  # benchmarks/explain.py
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=3).eval()
    attn = model.blocks[0].attn
    seen: list[torch.Tensor] = []

    def watch(module: torch.nn.Module, args: tuple, out: torch.Tensor) -> None:
        out.register_hook(seen.append)

    handle = attn.register_forward_hook(watch)
    try:
        explain_benchmark.gradient_floor(model, torch.randn(2, 3, 32, 32))
    finally:
        handle.remove()
    assert len(seen) == 1  # the gradient reached the first attention module's output
    assert seen[0].abs().sum() > 0
    assert not attn._forward_hooks
    assert not model._forward_hooks


def test_attention_layer_table_times_the_fused_backward_ours_and_its_matmuls_alone() -> None:
    """The one-layer table of the explain benchmark: three backward passes against the fused one, and the matrix-product
    reference makes exactly the five products per block of query rows that ``attention_backward`` makes."""
    import explain as explain_benchmark  # benchmarks/explain.py

    rows = explain_benchmark.bench_attention_layer("cpu", 1, shape=(1, 2, 40, 8))
    assert [row.split(" | ")[0].lstrip("| ") for row in rows] == [
        "fused forward",
        "fused forward + its backward (∇q, ∇k, ∇v)",
        "fused forward + `attention_backward` (∇q, ∇k, ∇v and the map)",
        "fused forward + the five matrix products of `attention_backward` alone",
    ]
    assert rows[1].endswith("| x1.00 |")
    q, k, v, grad_out = (torch.randn(1, 2, 40, 8) for _ in range(4))
    with torch.profiler.profile() as prof:
        explain_benchmark.blockwise_matmuls(q, k, v, grad_out, block=16)
    names = [e.name for e in prof.events() if e.name in ("aten::bmm", "aten::baddbmm_")]
    assert len(names) == 5 * 3  # 40 rows in blocks of 16: 3 blocks


def test_paired_ratio_is_the_median_of_each_rounds_ratio() -> None:
    import explain as explain_benchmark  # benchmarks/explain.py

    # the best times alone would pair round 1's forward with round 3's method: 1.5; each round says 2 or more
    assert explain_benchmark.paired_ratio([1.0, 2.0, 4.0], [3.0, 4.0, 8.0]) == (2.0, 2.0, 3.0)
