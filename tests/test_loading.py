"""Nothing silently wrong, nothing lost when loading and exporting (issue 11): strict loading (other architectures,
contradicting model arguments, non-finite weights, malformed metadata), files that are empty, truncated or renamed,
and exports that a kill at any moment leaves complete (the old folder or the new one, never a mix)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

import vision_attn
from vision_attn import _io
from vision_attn.export import write_export
from vision_attn.training import export_model

ROOT = Path(__file__).resolve().parents[1]
X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def logits(model: torch.nn.Module, x: torch.Tensor = X) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


@pytest.fixture(scope="module")
def patch8(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    """An export of ``va_vit_tiny_patch8_64`` (patch 8, 8x8 grid), and the model."""
    torch.manual_seed(0)
    model = vision_attn.create_model("va_vit_tiny_patch8_64", depth=1)
    return model, write_export(model, tmp_path_factory.mktemp("patch8") / "export").folder


def test_patch8_weights_into_patch4_model_is_an_error_unless_resampling_is_asked(patch8, tmp_path):
    _, folder = patch8
    with pytest.raises(ValueError, match=r"holds weights of 'va_vit_tiny_patch8_64', not 'va_vit_tiny_patch4_32'"):
        vision_attn.create_model("va_vit_tiny_patch4_32", depth=1, checkpoint_path=folder)
    target = vision_attn.create_model("va_vit_tiny_patch4_32", depth=1)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError, match=r"patch_embed.proj.weight: file \(192, 3, 8, 8\) vs model \(192, 3, 4, 4\)"
                       r".*resample_weights=True"):  # fmt: skip
        vision_attn.load_checkpoint(target, folder)
    assert all(torch.equal(v, target.state_dict()[k]) for k, v in before.items())  # nothing was loaded
    save_file(target.state_dict(), str(tmp_path / "bare.safetensors"))  # bare weights: the shapes speak
    with pytest.raises(ValueError, match=r"patch_embed.proj.weight: file \(192, 3, 4, 4\) vs model \(192, 3, 8, 8\)"):
        vision_attn.create_model("va_vit_tiny_patch8_64", depth=1, checkpoint_path=tmp_path / "bare.safetensors")
    # asked for explicitly, the patch projection is resampled (timm's resample_patch_embed) and the rest loads
    vision_attn.load_checkpoint(target, folder, resample_weights=True)
    assert not torch.equal(target.patch_embed.proj.weight, before["patch_embed.proj.weight"])
    torch.testing.assert_close(target.blocks[0].attn.qkv.weight, patch8[0].blocks[0].attn.qkv.weight)


def test_model_args_that_contradict_the_weights_are_an_error(patch8):
    model, folder = patch8
    with pytest.raises(ValueError, match=r"model_args depth=2 contradicts .* trained with depth=1"):
        vision_attn.load_trained(folder, model_args={"depth": 2})
    with pytest.raises(ValueError, match=r"model_args num_classes=5 contradicts .* num_classes=10"):
        vision_attn.create_model("va_vit_tiny_patch8_64", checkpoint_path=folder, num_classes=5)
    with pytest.raises(ValueError, match=r"num_heads=6 is not recorded .* cannot be checked"):  # same shapes!
        vision_attn.load_trained(folder, model_args={"num_heads": 6})
    with pytest.raises(ValueError, match=r"img_size=96 contradicts .*img_size=.64, 64..*resample_weights=True"):
        vision_attn.load_trained(folder, model_args={"img_size": 96})
    # values that agree, and run-time options, are fine
    same, _ = vision_attn.load_trained(folder, model_args={"depth": 1, "num_classes": 10, "drop_path_rate": 0.1})
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(logits(same, x), logits(model, x), atol=0, rtol=0)
    bigger, _ = vision_attn.load_trained(folder, model_args={"img_size": 96}, resample_weights=True)
    assert bigger.pos_embed.shape == (1, 1 + 12 * 12, 192)


def test_non_finite_weights_are_an_error_naming_the_file(tmp_path):
    model = vision_attn.create_model("va_vit_tiny_patch4_32", depth=1)
    state = model.state_dict()
    state["blocks.0.mlp.fc1.weight"][0, 0] = float("nan")
    path = export_model(state, tmp_path / "diverged.safetensors", "va_vit_tiny_patch4_32", {"depth": 1})
    for load in (vision_attn.load_trained, lambda p: vision_attn.load_checkpoint(model, p)):
        with pytest.raises(ValueError, match=r"diverged.safetensors' holds non-finite .*blocks.0.mlp.fc1.weight"):
            load(path)


@pytest.mark.parametrize(
    ("content", "pattern"),
    [
        ("{not json", r"model.json' is not valid JSON"),
        ("[1, 2]", r"model.json' holds a JSON list; expected an object"),
        ('{"model_name": 3}', r"'model_name' must be a model name string, got 3"),
        ('{"model_name": "va_vit_tiny_patch4_32", "model_args": [1]}', r"'model_args' must be an object"),
        ('{"model_name": "va_vit_tiny_patch4_32", "mean": "grey"}', r"'mean' must be a list of finite numbers"),
        ('{"model_name": "va_vit_tiny_patch4_32", "std": [0.0]}', r"'std' must be positive"),
        ('{"model_name": "va_vit_tiny_patch4_32", "class_names": ["a", "b"], "model_args": {"depth": 1}}',
         r"2 class_names for num_classes=10"),
        ('{"model_name": "va_vit_tiny_patch4_23"}', r"model.safetensors' names a model 'va_vit_tiny_patch4_23'.*did "
                                                    r"you mean va_vit_tiny_patch4_32"),
    ],
)  # fmt: skip
def test_legacy_metadata_is_validated_with_the_file_named(tmp_path, content, pattern):
    folder = tmp_path / "export"
    folder.mkdir()
    weights = vision_attn.create_model("va_vit_tiny_patch4_32", depth=1).state_dict()
    save_file(weights, str(folder / "model.safetensors"))
    (folder / "model.json").write_text(content)
    with pytest.raises(ValueError, match=pattern):
        vision_attn.load_trained(folder)


def test_empty_truncated_and_renamed_files(tmp_path):
    model = vision_attn.create_model("va_vit_tiny_patch4_32", depth=1)
    path = export_model(model, tmp_path / "model.safetensors", "va_vit_tiny_patch4_32", {"depth": 1})
    data = path.read_bytes()
    (tmp_path / "empty.safetensors").write_bytes(b"")
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    torch.save({"state_dict": {f"net.{k}": v for k, v in model.state_dict().items()},
                "vision_attn": {"model_name": "va_vit_tiny_patch4_32", "model_args": {"depth": 1}}},
               tmp_path / "last.ckpt")  # fmt: skip
    ckpt = (tmp_path / "last.ckpt").read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(ckpt[: len(ckpt) // 2])
    cases = {
        "empty.safetensors": r"empty.safetensors' is empty \(0 bytes\)",
        "cut.safetensors": r"cut.safetensors' is not a complete safetensors file .*truncated",
        "cut.ckpt": r"cut.ckpt' is not a readable PyTorch or safetensors file \(truncated or damaged\?\)",
    }
    for name, pattern in cases.items():
        with pytest.raises(ValueError, match=pattern):
            vision_attn.load_trained(tmp_path / name)
    # renamed files are recognised by their content, not their name
    os.replace(tmp_path / "last.ckpt", tmp_path / "weights.safetensors")
    os.replace(path, tmp_path / "model.ckpt")
    for name in ("weights.safetensors", "model.ckpt"):
        loaded, _ = vision_attn.load_trained(tmp_path / name)
        torch.testing.assert_close(logits(loaded), logits(model), atol=0, rtol=0)
    # an earlier-layout export renamed away from its model.json: the error says what is missing
    legacy = tmp_path / "legacy.safetensors"
    save_file(model.state_dict(), str(legacy))
    with pytest.raises(ValueError, match=r"legacy.safetensors' does not say which model .*give the model name"):
        vision_attn.load_trained(legacy)


def test_header_metadata_wins_over_a_stale_sidecar(tmp_path, monkeypatch):
    """A kill between the weights and their ``.json`` leaves a new file with an old sidecar: the header decides."""
    old = vision_attn.create_model("va_vit_tiny_patch4_32", depth=1, num_classes=2)
    new = vision_attn.create_model("va_vit_tiny_patch4_32", depth=2, num_classes=3)
    export_model(old, tmp_path / "m.safetensors", "va_vit_tiny_patch4_32", {"depth": 1, "num_classes": 2},
                 class_names=["a", "b"])  # fmt: skip

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # the process dies after the weights were replaced

    monkeypatch.setattr("vision_attn.training.export.atomic_write_text", killed)
    with pytest.raises(KeyboardInterrupt):
        export_model(new, tmp_path / "m.safetensors", "va_vit_tiny_patch4_32", {"depth": 2, "num_classes": 3},
                     class_names=["x", "y", "z"])  # fmt: skip
    assert json.loads((tmp_path / "m.json").read_text())["class_names"] == ["a", "b"]  # stale
    loaded, info = vision_attn.load_trained(tmp_path / "m.safetensors")
    assert info["class_names"] == ["x", "y", "z"]
    torch.testing.assert_close(logits(loaded), logits(new), atol=0, rtol=0)


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_failed_export_leaves_the_previous_folder_intact(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(_io, "_exchange", lambda a, b: False)
    first = vision_attn.create_model("va_vit_tiny_patch4_32", depth=1)
    out = write_export(first, tmp_path / "export").folder
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("vision_attn.export.hub._save_config", disk_full)  # after the new weights were written
    second = vision_attn.create_model("va_vit_tiny_patch4_32", depth=2)
    with pytest.raises(OSError, match="No space left"):
        write_export(second, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no staging folder left behind
    monkeypatch.undo()
    if not exchange:
        monkeypatch.setattr(_io, "_exchange", lambda a, b: False)
    write_export(second, out)  # and a successful one replaces it as a whole
    loaded, _ = vision_attn.load_trained(out)
    torch.testing.assert_close(logits(loaded), logits(second), atol=0, rtol=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


KILL_LOOP = """
import sys, torch, vision_attn
from vision_attn.export import write_export
models = [vision_attn.create_model("va_vit_tiny_patch4_32", depth=d, num_classes=2 + d) for d in (1, 2)]
print("ready", flush=True)
i = 0
while True:
    write_export(models[i % 2], sys.argv[1], meta={"classes": [str(c) for c in range(3 + i % 2)]})
    i += 1
"""


def test_sigkill_during_repeated_exports_never_leaves_a_mixed_folder(tmp_path):
    out = tmp_path / "export"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for delay in (0.2, 0.9):
        proc = subprocess.Popen([sys.executable, "-c", KILL_LOOP, str(out)], stdout=subprocess.PIPE, env=env)
        assert proc.stdout.readline().strip() == b"ready"
        deadline = time.time() + 60
        while not out.exists() and time.time() < deadline:  # at least one export finished
            time.sleep(0.05)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert out.is_dir()
        model, info = vision_attn.load_trained(out)  # header, config.json and model.json agree
        config = json.loads((out / "config.json").read_text())
        legacy = json.loads((out / "model.json").read_text())
        assert config["num_classes"] == legacy["num_classes"] == info["num_classes"] == len(info["class_names"])
        assert config["model_args"]["depth"] == legacy["model_args"]["depth"] == len(model.blocks)
        timm_model = timm.create_model(f"local-dir:{out}", pretrained=True)
        torch.testing.assert_close(logits(timm_model), logits(model), atol=0, rtol=0)
