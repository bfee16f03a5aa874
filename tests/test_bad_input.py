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
from vision_attn.data.images import load_image_files, read_boxes
from vision_attn.data.pixels import to_uint8_array
from vision_attn.explain import attention_rollout, deletion_auc, explain, gradient_rollout, token_pool_weights
from vision_attn.training import ImageClassifier
from vision_attn.training.callbacks import PredictionWriter
from vision_attn.training.runs import claim_run_folder, find_checkpoint

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
    "unknown method": (lambda m, t: explain(m, torch.randn(1, 3, 32, 32), "occlusion"), ValueError, r"expected one of"),
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
        r"data_dir '.*empty' holds no class folders; expected <class>/<image> folders",
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
    # --- explain (issue 11): targets, token layout and pooling, models explain cannot use, inputs of the CLI
    "explain str target": (
        lambda m, t: explain(m, torch.randn(1, 3, 32, 32), "gradient_rollout", target="3"),
        TypeError,
        r"target must be None, an int class index or one int per image, got str '3'",
    ),
    "explain float targets": (
        lambda m, t: explain(m, torch.randn(2, 3, 32, 32), "gradcam", target=[1, 2.5]),
        TypeError,
        r"target must hold integer class indices, got float 2.5",
    ),
    "explain grid_size against model": (
        lambda m, t: explain(m, torch.randn(1, 3, 32, 32), "rollout", grid_size=(4, 16)),
        ValueError,
        r"grid_size \(4, 16\) does not match the token grid \(8, 8\)",
    ),
    "explain grid_size 0": (
        lambda m, t: explain(m, torch.randn(1, 3, 32, 32), "attention", grid_size=0),
        ValueError,
        r"grid_size must be a positive int or a pair",
    ),
    "explain prefix against model": (
        lambda m, t: explain(m, torch.randn(1, 3, 32, 32), "rollout", num_prefix_tokens=2),
        ValueError,
        r"num_prefix_tokens 2 does not match .* 1 prefix tokens",
    ),
    "explain NaN logits": (
        lambda m, t: explain(_broken_head(), torch.randn(2, 3, 32, 32), "rollout"),
        ValueError,
        r"NaN or Inf logits for images \[0, 1\]",
    ),
    "gradient rollout without classifier": (
        lambda m, t: explain(_featurizer(), torch.randn(1, 3, 32, 32), "gradient_rollout"),
        ValueError,
        r"'gradient_rollout' explains a class logit, but .* num_classes=0",
    ),
    "gradcam without classifier": (
        lambda m, t: explain(_featurizer(), torch.randn(1, 3, 32, 32), "gradcam"),
        ValueError,
        r"'gradcam' explains a class logit, but .* num_classes=0",
    ),
    "deletion AUC without classifier": (
        lambda m, t: deletion_auc(_featurizer(), torch.randn(1, 3, 32, 32), torch.rand(1, 32, 32)),
        ValueError,
        r"num_classes=0",
    ),
    "deletion AUC batch_size 0": (
        lambda m, t: deletion_auc(m, torch.randn(1, 3, 32, 32), torch.rand(1, 32, 32), batch_size=0),
        ValueError,
        r"batch_size must be an int >= 1, got 0",
    ),
    "rollout on avgmax pooling": (  # attention pooling ('map') is read since issue 28
        lambda m, t: explain(_timm_vit(global_pool="avgmax"), torch.randn(1, 3, 32, 32), "rollout"),
        ValueError,
        r"pools its tokens by global_pool='avgmax'",
    ),
    "rollout on max pooling": (
        lambda m, t: explain(_timm_vit(global_pool="max"), torch.randn(1, 3, 32, 32), "attention"),
        ValueError,
        r"global_pool='max', which no weighting of token rows describes",
    ),
    "pool_weights of another length": (
        lambda m, t: attention_rollout([attn()], pool_weights=torch.ones(5)),
        ValueError,
        r"pool_weights has shape \(5,\); expected \[N\] or \[B, N\] with N=17",
    ),
    "unknown token pool": (
        lambda m, t: token_pool_weights("mean", 17, 1),
        ValueError,
        r"pool 'mean' is unknown; expected one of \('token'",
    ),
    "sequence pool without weights": (
        lambda m, t: token_pool_weights("seq", 17, 1),
        ValueError,
        r"pool 'seq' needs sequence_weights \[B, N - num_prefix_tokens\], got None",
    ),
    "unreadable image file": (
        lambda m, t: load_image_files([_write(t / "junk.png", b"not a png")], vision_attn.resolve_data_config(m)),
        ValueError,
        r"image file '.*junk.png' cannot be read as an image",
    ),
    "malformed box": (
        lambda m, t: read_boxes(_write(t / "b.json", b'{"a.png": [4, 4, 2, 8]}'), [Path("a.png")]),
        ValueError,
        r"--boxes entry 'a.png' is \[4, 4, 2, 8\]; expected \[x_min, y_min, x_max, y_max\]",
    ),
    "boxes not JSON": (
        lambda m, t: read_boxes(_write(t / "b.json", b"{oops"), [Path("a.png")]),
        ValueError,
        r"--boxes file '.*b.json' is not readable JSON",
    ),
    # --- training runs and data (issue 11, "train")
    "empty class folder": (
        lambda m, t: ImageDataModule(name="image_folder", data_dir=str(_empty_class(t)), img_size=8).setup(),
        ValueError,
        r"data_dir '.*classes': class folder\(s\) \['dog'\] hold no readable images; every class folder needs",
    ),
    "val class unknown to train": (
        lambda m, t: ImageDataModule(name="image_folder", data_dir=str(_extra_test_class(t)), img_size=8).setup(),
        ValueError,
        r"class folder\(s\) \['wolf'\] that the train split does not have",
    ),
    "test_fraction 1": (lambda m, t: ImageDataModule(test_fraction=1.0), ValueError, r"test_fraction must be in"),
    "eval_batch_size 0": (
        lambda m, t: ImageDataModule(eval_batch_size=0),
        ValueError,
        r"eval_batch_size must be positive \(or null: batch_size\), got 0",
    ),
    "batch_size above the training set": (
        lambda m, t: ImageDataModule(batch_size=5000, num_workers=0).setup("fit"),
        ValueError,
        r"batch_size 5000 is larger than the 3600 training images .*lower data.batch_size",
    ),
    "run_dir under a file": (
        lambda m, t: claim_run_folder(_write(t / "f", b"") / "runs"),
        ValueError,
        r"run_dir '.*f/runs' is not a writable folder",
    ),
    "ckpt_path last without runs": (
        lambda m, t: find_checkpoint(t, "last", resumable=True),
        ValueError,
        r"--ckpt_path last: no resumable checkpoint under '.*version_\*/checkpoints'",
    ),
    "predictions file in a folder": (
        lambda m, t: PredictionWriter("out/p.csv"),
        ValueError,
        r"predictions.filename must be a plain file name, got 'out/p.csv'",
    ),
    "float image array": (
        lambda m, t: to_uint8_array(torch.zeros(4, 4).numpy(), 3),
        TypeError,
        r"image arrays must be uint8 or uint16, got dtype float32",
    ),
    # --- loading and export (issue 11/12)
    "empty safetensors": (
        lambda m, t: vision_attn.load_trained(_write(t / "w.safetensors", b"")),
        ValueError,
        r"w.safetensors' is empty \(0 bytes\); expected a checkpoint or safetensors file",
    ),
    "truncated safetensors": (
        lambda m, t: vision_attn.create_model("va_vit_tiny_patch4_32", checkpoint_path=_truncated(m, t, "safetensors")),
        ValueError,
        r"cut.safetensors' is not a complete safetensors file .*truncated",
    ),
    "empty checkpoint": (
        lambda m, t: vision_attn.load_trained(_write(t / "last.ckpt", b"")),
        ValueError,
        r"last.ckpt' is empty \(0 bytes\)",
    ),
    "truncated checkpoint": (
        lambda m, t: vision_attn.load_trained(_truncated(m, t, "ckpt")),
        ValueError,
        r"cut.ckpt' is not a readable PyTorch or safetensors file \(truncated or damaged\?\)",
    ),
    "checkpoint without network weights": (
        lambda m, t: vision_attn.load_trained(_saved(t / "opt.ckpt", {"state_dict": {}, "global_step": 3})),
        ValueError,
        r"opt.ckpt' is a Lightning checkpoint without network weights \('net.' keys\)",
    ),
    "image renamed to checkpoint": (
        lambda m, t: vision_attn.load_trained(_write(t / "best.ckpt", b"\x89PNG\r\n\x1a\n0000")),
        ValueError,
        r"best.ckpt' is not a readable PyTorch or safetensors file \(it starts with b'\\x89PNG",
    ),
    "weights renamed away from model.json": (
        lambda m, t: vision_attn.load_trained(_bare(m, t / "renamed.safetensors")),
        ValueError,
        r"renamed.safetensors' does not say which model .*give the model name",
    ),
    "missing trained weights": (
        lambda m, t: vision_attn.load_trained(t / "runs" / "export"),
        FileNotFoundError,
        r"path '.*runs/export' does not exist",
    ),
    "folder without weights": (
        lambda m, t: vision_attn.load_trained(_mkdir(t / "export")),
        FileNotFoundError,
        r"export' is a folder without weights; expected an export folder with model.safetensors",
    ),
    "model.json not JSON": (
        lambda m, t: vision_attn.load_trained(_legacy_export(m, t, "{'model_name': 'x'}")),
        ValueError,
        r"model.json' is not valid JSON",
    ),
    "model.json wrong type": (
        lambda m, t: vision_attn.load_trained(
            _legacy_export(m, t, '{"model_name": "va_vit_tiny_patch4_32", "model_args": "depth=1"}')
        ),
        ValueError,
        r"model.json'.*'model_args' must be an object of model keyword arguments, got 'depth=1'",
    ),
    "metadata names unknown model": (
        lambda m, t: vision_attn.load_trained(_legacy_export(m, t, '{"model_name": "va_vit_tiny_patch4_23"}')),
        ValueError,
        r"names a model 'va_vit_tiny_patch4_23', which is neither|names a model 'va_vit_tiny_patch4_23'.*did you mean",
    ),
    "config.json without architecture": (
        lambda m, t: vision_attn.load_trained(_hub_without_architecture(m, t)),
        ValueError,
        r"config.json' has no 'architecture' string naming the model",
    ),
    "folder mixing two exports": (
        lambda m, t: vision_attn.load_trained(_mixed_folder(m, t)),
        ValueError,
        r"config.json' says num_classes=10 but .*model.safetensors' was written for num_classes=3: the folder mixes",
    ),
    "non-finite weights": (
        lambda m, t: vision_attn.load_trained(_nan_export(m, t)),
        ValueError,
        r"nan.safetensors' holds non-finite \(NaN/Inf\) weights in 1 tensor\(s\): head.bias",
    ),
    "class names for another head": (
        lambda m, t: vision_attn.load_trained(_export(m, t, class_names=["a", "b"])),
        ValueError,
        r"model.safetensors'.*2 class_names for num_classes=10",
    ),
    "export into another model's name": (
        lambda m, t: vision_attn.create_model("va_vit_small_patch4_32", checkpoint_path=_export(m, t)),
        ValueError,
        r"holds weights of 'va_vit_tiny_patch4_32', not 'va_vit_small_patch4_32'",
    ),
    "model_args against the weights": (
        lambda m, t: vision_attn.load_trained(_export(m, t), model_args={"embed_dim": 96}),
        ValueError,
        r"model_args embed_dim=96 contradicts .*model.safetensors', whose weights were trained with embed_dim=192",
    ),
    "depth against the weights": (
        lambda m, t: vision_attn.load_trained(_export(m, t), model_args={"depth": 3}),
        ValueError,
        r"model_args depth=3 contradicts .* trained with depth=1",
    ),
    "bare weights without a model name": (
        lambda m, t: vision_attn.load_trained(_bare(m, t / "w.safetensors")),
        ValueError,
        r"does not say which model its weights belong to",
    ),
    "patch-8 weights into a patch-4 model": (
        lambda m, t: vision_attn.load_checkpoint(m, _bare(_patch8(), t / "p8.safetensors")),
        ValueError,
        r"patch_embed.proj.weight: file \(192, 3, 8, 8\) vs model \(192, 3, 4, 4\).*resample_weights=True",
    ),
    "export unknown format": (
        lambda m, t: vision_attn.export_trained(_export(m, t), t / "out", formats=["tflite"]),
        ValueError,
        r"formats \['tflite'\] must be one or more of hub, onnx, torchscript, pt2",
    ),
    "export over a folder of other files": (
        lambda m, t: vision_attn.export_trained(_export(m, t), _folder_with(t / "mine", "notes.txt")),
        ValueError,
        r"mine' holds files that are not an export \(notes.txt\).*new or empty folder",
    ),
    "export out is a file": (
        lambda m, t: vision_attn.export_trained(_export(m, t), _write(t / "out.onnx", b"x")),
        ValueError,
        r"out.onnx' is a file; expected a folder",
    ),
}


def _broken_head() -> torch.nn.Module:
    model = vision_attn.create_model("va_vit_tiny_patch4_32", depth=1, num_classes=3).eval()
    with torch.no_grad():
        model.head.bias.fill_(float("nan"))
    return model


def _featurizer() -> torch.nn.Module:
    return vision_attn.create_model("va_vit_tiny_patch4_32", depth=1, num_classes=0).eval()


def _timm_vit(**kwargs: object) -> torch.nn.Module:
    import timm

    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, num_classes=3, **kwargs).eval()


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


def _png(path: Path) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (10, 20, 30)).save(path)
    return path


def _empty_class(tmp: Path) -> Path:
    """An image folder whose class ``dog`` holds no image."""
    _png(tmp / "classes" / "cat" / "0.png")
    (tmp / "classes" / "dog").mkdir()
    return tmp / "classes"


def _extra_test_class(tmp: Path) -> Path:
    for split, name in (("train", "cat"), ("train", "dog"), ("test", "cat"), ("test", "wolf")):
        for i in range(2):
            _png(tmp / "split" / split / name / f"{i}.png")
    return tmp / "split"


def _truncated_checkpoint(tmp: Path) -> Path:
    path = tmp / "cut.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1000)}, "global_step": 1}, path)
    path.write_bytes(path.read_bytes()[:300])
    return path


def _truncated(model: torch.nn.Module, tmp: Path, kind: str) -> Path:
    """Half of a real export (``safetensors``) or train.py checkpoint (``ckpt``), as an interrupted copy leaves it."""
    if kind == "safetensors":
        data = _export(model, tmp).read_bytes()
    else:
        torch.save({"state_dict": {f"net.{k}": v for k, v in model.state_dict().items()},
                    "vision_attn": {"model_name": "va_vit_tiny_patch4_32", "model_args": {"depth": 1}}},
                   tmp / "full.ckpt")  # fmt: skip
        data = (tmp / "full.ckpt").read_bytes()
    return _write(tmp / f"cut.{kind}", data[: len(data) // 2])


def _export(model: torch.nn.Module, tmp: Path, **extra) -> Path:
    from vision_attn.training import export_model

    return export_model(model, tmp / "model.safetensors", "va_vit_tiny_patch4_32", {"depth": 1}, **extra)


def _bare(model: torch.nn.Module, path: Path) -> Path:
    save_file(model.state_dict(), str(path))
    return path


def _legacy_export(model: torch.nn.Module, tmp: Path, meta: str) -> Path:
    folder = _mkdir(tmp / "export")
    _bare(model, folder / "model.safetensors")
    (folder / "model.json").write_text(meta)
    return folder


def _hub_without_architecture(model: torch.nn.Module, tmp: Path) -> Path:
    folder = _mkdir(tmp / "hub")
    _bare(model, folder / "model.safetensors")
    (folder / "config.json").write_text('{"num_classes": 10}')
    return folder


def _saved(path: Path, obj: dict) -> Path:
    torch.save(obj, path)
    return path


def _mixed_folder(model: torch.nn.Module, tmp: Path) -> Path:
    """An export folder whose config.json belongs to another export than its weights."""
    from vision_attn.export import write_export

    folder = write_export(model, tmp / "export").folder
    other = vision_attn.create_model("va_vit_tiny_patch4_32", depth=1, num_classes=3)
    (write_export(other, tmp / "other").folder / "model.safetensors").replace(folder / "model.safetensors")
    return folder


def _nan_export(model: torch.nn.Module, tmp: Path) -> Path:
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["head.bias"][3] = float("inf")
    return _export(state, tmp).rename(tmp / "nan.safetensors")


def _folder_with(folder: Path, name: str) -> Path:
    _mkdir(folder)
    (folder / name).write_text("keep me")
    return folder


def _patch8() -> torch.nn.Module:
    return vision_attn.create_model("va_vit_tiny_patch8_64", depth=1)


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
    assert len(API_CASES) + len(CLI_CASES) >= 80  # issue 11


@pytest.mark.parametrize("case", API_CASES, ids=list(API_CASES))
def test_api_bad_input(case, vit, tmp_path, capsys):
    call, error, pattern = API_CASES[case]
    with pytest.raises(error, match=pattern):
        call(vit, tmp_path)
    assert "this code ran" not in capsys.readouterr().out


EXPLAIN = ["explain", "--model", "va_vit_tiny_patch4_32", "--images", "IMG", "--out", "OUT"]

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
    # --- explain (issue 11): options of vision-attn explain
    "explain --batch-size 0": ([*EXPLAIN, "--batch-size", "0"], r"argument --batch-size: must be an int >= 1, got '0'"),
    "explain --limit 0": (
        [
            "explain",
            "--model",
            "va_vit_tiny_patch4_32",
            "--dataset",
            "cluttered_fashion_mnist",
            "--limit",
            "0",
            "--out",
            "OUT",
        ],
        r"argument --limit: must be an int >= 1, got '0'",
    ),
    "explain --limit with --images": ([*EXPLAIN, "--limit", "3"], r"--limit 3 applies to --dataset only"),
    "explain --mean of wrong length": (
        [*EXPLAIN, "--mean", "0.1", "0.2"],
        r"--mean has 2 values \[0.1, 0.2\]; expected 1 or 3 values .*in_chans=3",
    ),
    "explain --std of wrong length": (
        [*EXPLAIN, "--std", "0.1", "0.2", "0.3", "0.4"],
        r"--std has 4 values .*; expected 1 or 3 values",
    ),
    "explain --std 0": ([*EXPLAIN, "--std", "0"], r"--std \[0.0\] must be > 0"),
    "explain --device on a missing GPU": ([*EXPLAIN, "--device", "cuda:99"], r"--device 'cuda:99'"),
    "explain --device typo": ([*EXPLAIN, "--device", "gpu"], r"--device 'gpu' is not a device; expected cpu, cuda"),
    "explain --steps -1": ([*EXPLAIN, "--steps", "-1"], r"argument --steps: must be an int >= 0, got '-1'"),
    "explain --alpha 2": ([*EXPLAIN, "--alpha", "2"], r"argument --alpha: must be a number in \[0, 1\], got '2'"),
    "explain --target -1": ([*EXPLAIN, "--target", "-1"], r"argument --target: must be an int >= 0, got '-1'"),
    "explain --target beyond the classes": (
        [*EXPLAIN, "--target", "12", "--method", "gradcam"],
        r"--target 12 is out of range: model va_vit_tiny_patch4_32 has 10 classes \(0 to 9\)",
    ),
    "explain --cmap unknown": ([*EXPLAIN, "--cmap", "rainbowz"], r"--cmap 'rainbowz' is not a matplotlib colormap"),
    "explain --img-size 3 values": ([*EXPLAIN, "--img-size", "1", "2", "3"], r"--img-size takes N or H W, got 3"),
    "explain --model-args not an object": ([*EXPLAIN, "--model-args", "[1]"], r"--model-args must be a JSON object"),
    "explain --dataset unknown": (
        ["explain", "--model", "va_vit_tiny_patch4_32", "--dataset", "cifar10", "--out", "OUT"],
        r"--dataset 'cifar10' is unknown; expected 'cluttered_fashion_mnist\[:test\|train\]'",
    ),
    "explain --boxes without the image": (
        [*EXPLAIN, "--boxes", "BOXES"],
        r"--boxes file '.*boxes.json' has no box for \['img.png'\]",
    ),
    "explain --out under a file": (
        ["explain", "--model", "va_vit_tiny_patch4_32", "--images", "IMG", "--out", "IMG/sub"],
        r"--out '.*img.png/sub' is not a writable folder",
    ),
    "explain no method applies": (
        ["explain", "--model", "resnet10t", "--images", "IMG", "--out", "OUT", "--method", "rollout", "attention"],
        r"no method applies to any model: resnet10t:rollout: .*no token-attention modules",
    ),
    # --- training runs and data (issue 11, "train"); every run_dir is under the test's tmp_path
    "unwritable run_dir": (
        ["fit", "--config", DEFAULT, "--run_dir=IMG/runs"],
        r"run_dir '.*img.png/runs' is not a writable folder",
    ),
    "unwritable export folder": (
        ["fit", "--config", DEFAULT, "--run_dir=OUT", "--export.dirpath=IMG/export"],
        r"export.dirpath '.*img.png/export' is not a writable folder",
    ),
    "negative max_epochs": (
        ["fit", "--config", DEFAULT, "--run_dir=OUT", "--trainer.max_epochs=-5"],
        r"trainer.max_epochs must be >= 1 \(or -1: no epoch limit, .*\), got -5",
    ),
    "max_epochs 0": (["fit", "--config", DEFAULT, "--run_dir=OUT", "--trainer.max_epochs=0"], r"max_epochs .* got 0$"),
    "max_steps 0": (["fit", "--config", DEFAULT, "--run_dir=OUT", "--trainer.max_steps=0"], r"max_steps must be >= 1"),
    "run without end": (
        ["fit", "--config", DEFAULT, "--run_dir=OUT", "--trainer.max_epochs=-1", "--trainer.max_time=null"],
        r"max_epochs -1 \(no epoch limit\) needs trainer.max_steps or trainer.max_time",
    ),
    "limit_train_batches 0": (
        ["fit", "--config", DEFAULT, "--run_dir=OUT", "--trainer.limit_train_batches=0"],
        r"trainer.limit_train_batches must be > 0 .*got 0",
    ),
    "batch_size 0 in config": (
        ["fit", "--config", DEFAULT, "--run_dir=OUT", "--data.batch_size=0"],
        r"batch_size must be positive, got 0",
    ),
    "batch_size above the data": (
        ["fit", "--config", DEFAULT, "--run_dir=OUT", "--trainer.logger=false", "--data.batch_size=5000"],
        r"batch_size 5000 is larger than the 3600 training images",
    ),
    "empty class folder in config": (
        lambda t: [
            *("fit", "--config", DEFAULT, "--run_dir=OUT", "--trainer.logger=false", "--data.name=image_folder"),
            *(f"--data.data_dir={_empty_class(t)}", "--data.img_size=32"),
        ],
        r"class folder\(s\) \['dog'\] hold no readable images",
    ),
    "ckpt_path last without a run": (
        ["fit", "--config", DEFAULT, "--run_dir=OUT", "--ckpt_path=last"],
        r"--ckpt_path last: no resumable checkpoint under .*start a new run without --ckpt_path",
    ),
    "ckpt_path best without a run": (
        ["test", "--config", DEFAULT, "--run_dir=OUT", "--ckpt_path=best"],
        r"--ckpt_path best: no best checkpoint under .*val_fraction > 0",
    ),
    "ckpt_path missing": (
        ["fit", "--config", DEFAULT, "--run_dir=OUT", "--ckpt_path=OUT/nope.ckpt"],
        r"ckpt_path '.*nope.ckpt' does not exist",
    ),
    "ckpt_path truncated": (
        lambda t: ["test", "--config", DEFAULT, "--run_dir=OUT", f"--ckpt_path={_truncated_checkpoint(t)}"],
        r"ckpt_path '.*cut.ckpt' is not a readable Lightning checkpoint",
    ),
    "checkpoint.dirpath given": (
        ["fit", "--config", DEFAULT, "--run_dir=OUT", "--checkpoint.dirpath=OUT/ckpt"],
        r"checkpoint.dirpath '.*ckpt' cannot be set: every run writes into its own <run_dir>/version_K/",
    ),
    "limit_train_batches below one batch": (
        ["fit", "--config", DEFAULT, "--run_dir=OUT", "--trainer.logger=false", "--trainer.limit_train_batches=0.001"],
        r"You requested to check 0.001 of the `train_dataloader`",
    ),
    # --- loading and export (issue 11/12)
    "export without a source": (["export", "--out", "OUT"], r"give exactly one of --checkpoint PATH or --weights"),
    "export missing checkpoint": (
        ["export", "--checkpoint", "no/such.ckpt", "--out", "OUT"],
        r"--checkpoint 'no/such.ckpt' does not exist",
    ),
    "export empty checkpoint": (
        ["export", "--checkpoint", "vision_attn/py.typed", "--out", "OUT"],
        r"is empty \(0 bytes\)",
    ),
    "export text file as checkpoint": (
        ["export", "--checkpoint", "README.md", "--out", "OUT"],
        r"README.md' is not a readable PyTorch or safetensors file \(it starts with b'# vision",
    ),
    "export folder without weights": (
        ["export", "--checkpoint", "configs", "--out", "OUT"],
        r"configs' is a folder without weights",
    ),
    "export unknown format": (
        ["export", "--checkpoint", "README.md", "--out", "OUT", "--formats", "hub", "keras"],
        r"--formats \['keras'\] unknown; expected one or more of hub, onnx, torchscript, pt2",
    ),
    "export model-args not JSON": (
        [
            "export",
            "--model",
            "va_vit_tiny_patch4_32",
            "--weights",
            "README.md",
            "--model-args",
            "{depth}",
            "--out",
            "O",
        ],
        r"--model-args '\{depth\}' is not JSON",
    ),
    "export model with checkpoint": (
        ["export", "--checkpoint", "README.md", "--model", "va_vit_tiny_patch4_32", "--out", "OUT"],
        r"--model goes with --weights",
    ),
    "export unwritable out": (
        ["export", "--checkpoint", "README.md", "--out", "/proc/vision_attn/out"],
        r"--out '/proc/vision_attn/out' cannot be written: .*'/proc/vision_attn' is not a writable folder",
    ),
    "export out over other files": (
        ["export", "--checkpoint", "README.md", "--out", "configs"],
        r"out 'configs' holds files that are not an export \(cct_cifar10.yaml",
    ),
    "explain empty checkpoint": (
        ["explain", "--checkpoint", "vision_attn/py.typed", "--images", "IMG", "--out", "OUT"],
        r"py.typed' is empty \(0 bytes\)",
    ),
    "explain text file as checkpoint": (
        ["explain", "--checkpoint", "README.md", "--images", "IMG", "--out", "OUT"],
        r"README.md' is not a readable PyTorch or safetensors file",
    ),
}


@pytest.mark.parametrize("case", CLI_CASES, ids=list(CLI_CASES))
def test_cli_bad_input_exits_2_without_traceback(case, tmp_path, capsys, monkeypatch):
    argv, pattern = CLI_CASES[case]
    argv = argv(tmp_path) if callable(argv) else argv  # a case that needs files made first
    image = tmp_path / "img.png"
    torch.manual_seed(0)
    from PIL import Image

    Image.new("RGB", (32, 32)).save(image)
    (tmp_path / "boxes.json").write_text('{"other.png": [0, 0, 4, 4]}')
    argv = [a.replace("OUT", str(tmp_path / "out")).replace("IMG", str(image)) for a in argv]
    argv = [a.replace("BOXES", str(tmp_path / "boxes.json")) for a in argv]
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
