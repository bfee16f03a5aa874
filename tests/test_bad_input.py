"""One table of bad inputs across the public API, the CLI and the configs: each fails with a message that names
what was wrong and what is expected; the CLI exits with code 2 and no traceback."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import vision_attn
from vision_attn.cli import main as cli_main
from vision_attn.data import ImageDataModule
from vision_attn.explain import attention_rollout, explain, gradient_rollout
from vision_attn.training import ImageClassifier

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = str(ROOT / "configs" / "default.yaml")


@pytest.fixture(scope="module")
def vit() -> torch.nn.Module:
    return vision_attn.create_model("va_vit_tiny_patch4_32", depth=1).eval()


def attn(batch: int = 2, heads: int = 3, tokens: int = 17) -> torch.Tensor:
    return torch.rand(batch, heads, tokens, tokens).softmax(-1)


class Payload:
    """Anything but tensors and plain types: a weights_only load must refuse it."""

    def __reduce__(self):
        return (print, ("this code ran while loading",))


API_CASES = {
    # models
    "wrong channels": (lambda m, t: m(torch.randn(1, 1, 32, 32)), ValueError, r"1 channels .*in_chans=3"),
    "wrong size": (lambda m, t: m(torch.randn(1, 3, 48, 48)), ValueError, r"48x48; the model expects img_size=32x32"),
    "integer images": (lambda m, t: m(torch.zeros(1, 3, 32, 32, dtype=torch.uint8)), TypeError, r"dtype torch.uint8"),
    "3-D tensor": (lambda m, t: m(torch.randn(3, 32, 32)), ValueError, r"must be 4-D \[B, C, H, W\], got 3-D"),
    "numpy input": (lambda m, t: m([[0.0]]), TypeError, r"must be a torch.Tensor"),
    "unknown model": (
        lambda m, t: vision_attn.create_model("va_vit_tiny_patch4_23"),
        ValueError,
        r"did you mean va_vit_tiny_patch4_32",
    ),
    "bad global_pool": (
        lambda m, t: vision_attn.create_model("va_vit_tiny_patch4_32", global_pool="max"),
        ValueError,
        r"'max' is not one",
    ),
    "heads do not divide dim": (
        lambda m, t: vision_attn.create_model("va_vit_tiny_patch4_32", num_heads=5),
        ValueError,
        r"192 .* num_heads 5",
    ),
    "img_size not divisible": (
        lambda m, t: vision_attn.create_model("va_vit_tiny_patch4_32", img_size=30),
        ValueError,
        r"not divisible",
    ),
    "unknown CNN attention": (
        lambda m, t: vision_attn.create_model("va_resnet18_32", attn_layer="gate"),
        ValueError,
        r"known: none, se, eca",
    ),
    "CNN input below stride": (
        lambda m, t: vision_attn.create_model("va_resnet18_224", layers=(1, 1, 1, 1))(torch.randn(1, 3, 16, 16)),
        ValueError,
        r"16x16.*minimum",
    ),
    "missing weights file": (
        lambda m, t: vision_attn.create_model("va_vit_tiny_patch4_32", checkpoint_path=t / "nope.safetensors"),
        FileNotFoundError,
        r"nope.safetensors' does not exist",
    ),
    "corrupt weights file": (
        lambda m, t: vision_attn.create_model("va_vit_tiny_patch4_32", checkpoint_path=_write(t / "bad.pth", b"junk")),
        ValueError,
        r"not a readable PyTorch or safetensors file",
    ),
    "weights holding code": (
        lambda m, t: vision_attn.create_model("va_vit_tiny_patch4_32", checkpoint_path=_pickled(t / "evil.pth")),
        ValueError,
        r"not a readable PyTorch or safetensors file",
    ),
    "weights of another architecture": (
        lambda m, t: vision_attn.create_model("va_vit_tiny_patch4_32", checkpoint_path=_other_weights(t)),
        ValueError,
        r"shape mismatch \(\d+\): .*file \(384",
    ),
    # explain
    "NaN image": (lambda m, t: explain(m, _nan_images()), ValueError, r"NaN or Inf values \(batch indices \[1\]\)"),
    "unknown method": (lambda m, t: explain(m, torch.randn(1, 3, 32, 32), "saliency"), ValueError, r"expected one of"),
    "unknown head fusion": (
        lambda m, t: attention_rollout([attn()], head_fusion="median"),
        ValueError,
        r"'median' is unknown.*mean",
    ),
    "discard_ratio 1": (lambda m, t: attention_rollout([attn()], discard_ratio=1.0), ValueError, r"\[0, 1\), got 1.0"),
    "attention not 4-D": (
        lambda m, t: attention_rollout([torch.rand(3, 17, 17)]),
        ValueError,
        r"4-D \[B, heads, N, N\], got shape",
    ),
    "mismatched layers": (lambda m, t: attention_rollout([attn(), attn(tokens=10)]), ValueError, r"attentions\[1\]"),
    "no square grid": (lambda m, t: attention_rollout([attn(tokens=13)]), ValueError, r"grid_size"),
    "gradients per layer": (
        lambda m, t: gradient_rollout([attn(), attn()], [attn()]),
        ValueError,
        r"gradients has 1 layers.*2",
    ),
    "attention method on a CNN": (
        lambda m, t: explain(
            vision_attn.create_model("va_resnet18_32", layers=(1, 1, 1, 1)).eval(), torch.randn(1, 3, 32, 32), "rollout"
        ),
        ValueError,
        r"attention",
    ),
    "explain wrong image size": (
        lambda m, t: explain(m, torch.randn(1, 3, 40, 40)),
        ValueError,
        r"40x40; the model expects img_size=32x32",
    ),
    # data
    "unknown dataset": (lambda m, t: ImageDataModule(name="imagenet"), ValueError, r"known datasets: .*cifar10"),
    "missing data dir": (
        lambda m, t: ImageDataModule(name="cifar10", data_dir=str(t / "none")).setup(),
        FileNotFoundError,
        r"not found under data_dir .*download=False.*download: true",
    ),
    "empty image folder": (
        lambda m, t: ImageDataModule(name="image_folder", data_dir=str(_mkdir(t / "empty"))),
        FileNotFoundError,
        r"Couldn't find any class folder in .*empty",
    ),
    "val_fraction 1": (lambda m, t: ImageDataModule(val_fraction=1.0), ValueError, r"val_fraction must be in \[0, 1\)"),
    "batch_size 0": (lambda m, t: ImageDataModule(batch_size=0), ValueError, r"batch_size must be positive, got 0"),
    "bad_images policy": (lambda m, t: ImageDataModule(bad_images="warn"), ValueError, r"bad_images must be one of"),
    # training recipe
    "lr 0": (lambda m, t: ImageClassifier(lr=0.0, num_classes=10), ValueError, r"lr must be > 0, got 0.0"),
    "negative mixup": (
        lambda m, t: ImageClassifier(mixup_alpha=-1.0, num_classes=10),
        ValueError,
        r"mixup_alpha must be >= 0",
    ),
    "label smoothing 1.5": (
        lambda m, t: ImageClassifier(label_smoothing=1.5, num_classes=10),
        ValueError,
        r"label_smoothing must be in",
    ),
    "ema_decay 1": (lambda m, t: ImageClassifier(ema_decay=1.0, num_classes=10), ValueError, r"ema_decay must be in"),
    "model_args against data": (
        lambda m, t: ImageClassifier(model_args={"in_chans": 3}, in_chans=1, num_classes=10),
        ValueError,
        r"model_args in_chans=3 does not match the data's in_chans=1",
    ),
}


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


def _pickled(path: Path) -> Path:
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": Payload()}, path, pickle_module=pickle)
    return path


def _other_weights(tmp: Path) -> Path:
    path = tmp / "small.safetensors"
    save_file(vision_attn.create_model("va_vit_small_patch4_32", depth=1).state_dict(), str(path))
    return path


def _nan_images() -> torch.Tensor:
    images = torch.randn(2, 3, 32, 32)
    images[1, 0, 5, 5] = float("nan")
    return images


def test_table_is_large_enough():
    assert len(API_CASES) + len(CLI_CASES) >= 30


@pytest.mark.parametrize("case", API_CASES, ids=list(API_CASES))
def test_api_bad_input(case, vit, tmp_path, capsys):
    call, error, pattern = API_CASES[case]
    with pytest.raises(error, match=pattern):
        call(vit, tmp_path)
    assert "this code ran" not in capsys.readouterr().out


CLI_CASES = {
    "unknown subcommand": (["frobnicate"], r"unknown command 'frobnicate'"),
    "bad YAML key": (["fit", "--config", DEFAULT, "--model.lrr=0.1"], r"lrr"),
    "missing config file": (["fit", "--config", "configs/nope.yaml"], r"nope.yaml"),
    "lr 0 in config": (["fit", "--config", DEFAULT, "--model.lr=0"], r"lr must be > 0, got 0.0"),
    "unknown dataset in config": (["fit", "--config", DEFAULT, "--data.name=imagenet"], r"unknown dataset name"),
    "model does not fit data": (
        ["fit", "--config", DEFAULT, '--model.model_args={"in_chans": 3}'],
        r"model_args in_chans=3 does not match the data's in_chans=1",
    ),
    "explain missing image": (
        ["explain", "--model", "va_vit_tiny_patch4_32", "--images", "no/such.png", "--out", "OUT"],
        r"no/such.png",
    ),
    "explain unknown model": (
        ["explain", "--model", "va_vit_tiny_patch4_23", "--images", "IMG", "--out", "OUT"],
        r"va_vit_tiny_patch4_23",
    ),
}


@pytest.mark.parametrize("case", CLI_CASES, ids=list(CLI_CASES))
def test_cli_bad_input_exits_2_without_traceback(case, tmp_path, capsys, monkeypatch):
    argv, pattern = CLI_CASES[case]
    image = tmp_path / "img.png"
    torch.manual_seed(0)
    from PIL import Image

    Image.new("RGB", (32, 32)).save(image)
    argv = [a.replace("OUT", str(tmp_path / "out")).replace("IMG", str(image)) for a in argv]
    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("VISION_ATTN_TRACEBACK", raising=False)
    try:
        code = cli_main(argv)
    except SystemExit as exit_:  # argument parsers exit themselves
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err
    assert pytest.importorskip("re").search(pattern, err), err[-2000:]
