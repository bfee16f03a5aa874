"""Recipe findings of issue 11: command line vs checkpoint on resume, EMA once per optimizer step, no weight
decay on LSA's temperature, CUDA random states in checkpoints, ``predict`` writes a CSV."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import pytest
import torch
from timm.utils import ModelEmaV3
from torch.utils.data import DataLoader, TensorDataset
from train_helpers import TinyNet, fit_args

from vision_attn.cli import main as cli_main
from vision_attn.training import ImageClassifier, rng
from vision_attn.training.cli import main

QUIET = ("--trainer.logger=false", "--overlays.every_n_epochs=0", "--test_after_fit=false")


@pytest.mark.parametrize("which", ["last", "file"])
def test_resume_applies_the_given_optimizer_values(which: str, tmp_path: Path, capsys) -> None:
    assert main(fit_args(tmp_path, *QUIET)) == 0
    capsys.readouterr()
    changed = ("--model.lr=0.0005", "--model.weight_decay=0.01", "--model.betas=[0.8, 0.99]")
    ckpt = "last" if which == "last" else tmp_path / "version_0" / "checkpoints" / "last.ckpt"
    assert main(fit_args(tmp_path, *QUIET, *changed, f"--ckpt_path={ckpt}", epochs=2)) == 0
    out = capsys.readouterr().out
    assert "resuming with the given model options instead of the checkpoint's: lr 0.001 -> 0.0005" in out
    ckpt = torch.load(tmp_path / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 4
    groups = ckpt["optimizer_states"][0]["param_groups"]
    assert [g["initial_lr"] for g in groups] == [0.0005, 0.0005]
    assert [g["weight_decay"] for g in groups] == [0.0, 0.01]  # (no-decay group, decay group)
    assert all(tuple(g["betas"]) == (0.8, 0.99) for g in groups)
    assert ckpt["lr_schedulers"][0]["base_lrs"] == [0.0005, 0.0005]
    assert ckpt["hyper_parameters"]["lr"] == 0.0005


def test_a_network_option_that_contradicts_the_checkpoint_is_an_error(tmp_path: Path, capsys) -> None:
    assert main(fit_args(tmp_path, *QUIET)) == 0
    ckpt = tmp_path / "version_0" / "checkpoints" / "last.ckpt"
    before = ckpt.read_bytes()
    other = '--model.model_args={"embed_dim": 48, "depth": 4, "num_heads": 3, "mlp_ratio": 2.0}'
    for command in ("fit", "test"):
        assert cli_main(fit_args(tmp_path, *QUIET, other, f"--ckpt_path={ckpt}", epochs=2, command=command)) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err
        assert "model.model_args {'embed_dim': 48" in err, err
        assert "given, the checkpoint has {'num_classes': 10, 'in_chans': 1" in err  # the default model's own args
        assert "other shape" in err
    assert ckpt.read_bytes() == before


def test_ema_updates_once_per_optimizer_step(monkeypatch: pytest.MonkeyPatch) -> None:
    steps: list[int] = []
    update = ModelEmaV3.update
    monkeypatch.setattr(ModelEmaV3, "update", lambda self, model, step=None: (steps.append(step), update(self, model)))
    loader = DataLoader(TensorDataset(torch.randn(16, 3, 8, 8), torch.randint(0, 10, (16,))), batch_size=2)
    trainer = L.Trainer(max_epochs=1, accumulate_grad_batches=4, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")  # fmt: skip
    trainer.fit(ImageClassifier(TinyNet(), num_classes=10, ema_decay=0.9, warmup_epochs=0.0), loader)
    assert trainer.global_step == 2  # 8 micro-batches, 4 per optimizer step
    assert steps == [1, 2]


def test_lsa_temperature_gets_no_weight_decay() -> None:
    module = ImageClassifier(
        "va_vit_spt_lsa_tiny_patch4_32", model_args={"depth": 2, "embed_dim": 24, "num_heads": 2}, num_classes=10
    )
    temperatures = [p for name, p in module.net.named_parameters() if name.endswith("attn.log_temperature")]
    assert len(temperatures) == 2
    assert all(t.ndim == 3 for t in temperatures)  # [heads, 1, 1]: not caught by the "1-D means no decay" rule
    optimizer = module.configure_optimizers()["optimizer"]
    decay_of = {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}
    assert [decay_of[id(t)] for t in temperatures] == [0.0, 0.0]
    assert decay_of[id(module.net.blocks[0].attn.qkv.weight)] == 0.05


def test_cuda_random_states_are_saved_and_restored(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    if not torch.cuda.is_available():
        assert "cuda" not in rng.rng_states()
    devices = [torch.arange(16, dtype=torch.uint8), torch.arange(16, 32, dtype=torch.uint8)]
    restored: dict[int, torch.Tensor] = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [d.clone() for d in devices])
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.__setitem__(device, state))
    checkpoint: dict = {}
    ImageClassifier(TinyNet(), num_classes=10).on_save_checkpoint(checkpoint)
    torch.save(checkpoint, tmp_path / "c.ckpt")
    loaded = torch.load(tmp_path / "c.ckpt", weights_only=True)  # still loadable without unpickling code
    rng.set_rng_states(loaded["rng_states"])
    assert sorted(restored) == [0, 1]
    assert all(torch.equal(restored[i], devices[i]) for i in (0, 1))


def test_predict_writes_paths_labels_and_probabilities(tmp_path: Path, cifar_folder: Path) -> None:
    data = (f"--data.data_dir={cifar_folder}", "--data.name=image_folder", "--data.img_size=32")
    assert main(fit_args(tmp_path, *QUIET, *data, "--trainer.limit_predict_batches=null", command="predict")) == 0
    with open(tmp_path / "version_0" / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["index", "path", "label", "probability", "true_label"]
    assert len(rows) == 12  # the val/ folder (the test split: no test/ beside it), 4 images of 3 classes
    assert [int(r["index"]) for r in rows] == list(range(12))
    for row in rows:
        path = Path(row["path"])
        assert path.is_file()
        assert path.parent.parent == cifar_folder / "val"
        assert row["true_label"] == path.parent.name
        assert row["label"] in {"airplane", "cat", "ship"}
        assert 1 / 3 <= float(row["probability"]) <= 1.0  # the top class of 3
