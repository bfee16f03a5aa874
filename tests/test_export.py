"""``vision-attn export`` and ``load_trained`` (issue 12): the timm / Hugging Face folder loads in timm (and a plain
ViT in timm without vision_attn), every exported program reproduces eager outputs, one loader reads every format
we write, and ``fit`` ends with the timm/HF folder."""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path

import lightning as L
import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, TensorDataset

import vision_attn
from vision_attn.cli import main as cli_main
from vision_attn.export import write_export
from vision_attn.export.programs import onnx_available
from vision_attn.training import ExportBackbone, ImageClassifier, export_checkpoint, export_model

CLASSES = ["shirt", "shoe", "bag"]
META = {"classes": CLASSES, "mean": [0.25], "std": [0.5], "data_name": "tiny"}


def tiny_vit(**kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    args = dict(depth=1, in_chans=1, num_classes=3, **kwargs)
    return vision_attn.create_model("va_vit_tiny_patch4_32", **args).eval()


def logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


X = torch.randn(4, 1, 32, 32, generator=torch.Generator().manual_seed(0))


def train_checkpoint(path: Path, ema_offset: float = 0.01) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A checkpoint laid out as train.py writes it (net + EMA copy + ``vision_attn`` entry); returns (net, ema)."""
    net = tiny_vit()
    ema = tiny_vit()
    with torch.no_grad():
        for p in ema.parameters():
            p.add_(ema_offset)
    state = {f"net.{k}": v for k, v in net.state_dict().items()}
    state.update({f"ema.module.{k}": v for k, v in ema.state_dict().items()})
    info = {"model_name": "va_vit_tiny_patch4_32", "model_args": {"depth": 1, "in_chans": 1, "num_classes": 3},
            **META, "img_size": 32, "in_chans": 1, "num_classes": 3}  # fmt: skip
    torch.save({"state_dict": state, "vision_attn": info, "epoch": 2, "global_step": 30}, path)
    return net, ema


def test_hub_folder_loads_in_timm_with_push_to_hf_hub_layout(tmp_path):
    from timm.models._hub import save_for_hf

    model = tiny_vit()
    result = write_export(model, tmp_path / "export", meta={**META, "model_args": {"depth": 1, "in_chans": 1}})
    out = result.folder
    # timm's own loader, after import vision_attn registers the architecture
    loaded = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    torch.testing.assert_close(logits(loaded, X), logits(model, X), atol=0, rtol=0)
    assert loaded.pretrained_cfg["mean"] == (0.25,) or list(loaded.pretrained_cfg["mean"]) == [0.25]
    assert tuple(loaded.pretrained_cfg["input_size"]) == (1, 32, 32)
    assert loaded.pretrained_cfg["label_names"] == CLASSES
    # the layout push_to_hf_hub publishes (its save_for_hf, safetensors only): same files, same config values
    save_for_hf(model, tmp_path / "timm", safe_serialization=True, model_config={"label_names": CLASSES},
                data_config={"mean": (0.25,), "std": (0.5,)})  # fmt: skip
    assert {p.name for p in (tmp_path / "timm").iterdir()} <= {p.name for p in out.iterdir()}
    ours, theirs = (json.loads((d / "config.json").read_text()) for d in (out, tmp_path / "timm"))
    assert {k: ours[k] for k in theirs} == theirs
    assert set(load_file(out / "model.safetensors")) == set(model.state_dict())


def test_plain_vit_config_rebuilds_in_plain_timm(tmp_path):
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    torch.manual_seed(0)
    model = vision_attn.create_model(
        "va_vit_tiny_patch8_64", depth=2, global_pool="avg", class_token=False, reg_tokens=2, init_values=0.1,
        qk_norm=True, num_classes=5,
    ).eval()  # fmt: skip
    out = write_export(model, tmp_path / "export").folder
    config = json.loads((out / "config.json").read_text())
    assert config["timm_architecture"] == "vit_tiny_patch16_224"
    assert config["timm_model_args"]["patch_size"] == [8, 8]
    state = load_file(out / "model.safetensors")  # what a user without vision_attn has: the JSON and the weights
    x = torch.randn(2, 3, 64, 64)
    for plain in (TimmViT(**config["timm_model_args"]), timm.create_model(config["timm_architecture"],
                                                                           **config["timm_model_args"])):  # fmt: skip
        plain.load_state_dict(state, strict=True)
        torch.testing.assert_close(logits(plain.eval(), x), logits(model, x), atol=1e-5, rtol=0)
    for name in ("va_cct_2_3x2_32", "va_vit_spt_lsa_tiny_patch4_32"):  # no timm equivalent: no such fields
        other = vision_attn.create_model(name, depth=1)
        config = json.loads((write_export(other, tmp_path / name).folder / "config.json").read_text())
        assert "timm_architecture" not in config


def test_export_cli_from_training_checkpoint_writes_every_format(tmp_path, capsys):
    ckpt = tmp_path / "last.ckpt"
    net, ema = train_checkpoint(ckpt)
    formats = ["hub", "torchscript", "pt2"]
    has_onnx = onnx_available() == (True, True)  # the export extra; the ONNX part is skipped without it
    if has_onnx:
        formats.append("onnx")
    out = tmp_path / "exported"
    assert cli_main(["export", "--checkpoint", str(ckpt), "--out", str(out), "--formats", *formats]) == 0
    printed = capsys.readouterr().out
    expected = logits(ema, X)  # a checkpoint exports its EMA weights
    model, info = vision_attn.load_trained(out)
    torch.testing.assert_close(logits(model, X), expected, atol=0, rtol=0)
    assert info["class_names"] == CLASSES
    assert info["mean"] == [0.25]
    assert info["input_size"] == (1, 32, 32)
    with pytest.warns(FutureWarning):  # torch marks TorchScript deprecated
        scripted = torch.jit.load(str(out / "model.torchscript.pt"))
    torch.testing.assert_close(logits(scripted, X), expected, atol=1e-4, rtol=0)
    program = torch.export.load(str(out / "model.pt2")).module()
    torch.testing.assert_close(logits(program, X), expected, atol=1e-4, rtol=0)  # batch 4, traced with 2
    if has_onnx:
        import onnxruntime

        session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
        (out_np,) = session.run(["logits"], {"images": X[:3].numpy()})
        torch.testing.assert_close(torch.from_numpy(out_np), expected[:3], atol=1e-4, rtol=0)
        assert "onnx: " in printed
        assert "matches eager PyTorch" in printed
        run_readme_reuse_snippet(tmp_path, expected)
    # --no-ema exports the raw network
    assert cli_main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "raw"), "--no-ema"]) == 0
    raw, info = vision_attn.load_trained(tmp_path / "raw")
    torch.testing.assert_close(logits(raw, X), logits(net, X), atol=0, rtol=0)


def run_readme_reuse_snippet(cwd: Path, expected: torch.Tensor) -> None:
    """Run README's "Reuse elsewhere" Python block in ``cwd`` (which holds ``exported/``)."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("### Reuse elsewhere", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)
    namespace: dict = {}
    with pytest.MonkeyPatch.context() as patch, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load
        patch.chdir(cwd)
        exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["logits"].shape == (8, 3)
    torch.testing.assert_close(logits(namespace["vit"].eval(), X), expected, atol=1e-5, rtol=0)  # plain timm
    assert set(namespace["feats"]) == {"first_block", "final"}


def test_export_cli_from_model_name_and_weights(tmp_path):
    model = tiny_vit()
    torch.save(model.state_dict(), tmp_path / "w.pth")
    args = ["export", "--model", "va_vit_tiny_patch4_32", "--weights", str(tmp_path / "w.pth"), "--model-args",
            '{"depth": 1, "in_chans": 1, "num_classes": 3}', "--out", str(tmp_path / "out")]  # fmt: skip
    assert cli_main(args) == 0
    loaded = timm.create_model(f"local-dir:{tmp_path / 'out'}", pretrained=True).eval()
    torch.testing.assert_close(logits(loaded, X), logits(model, X), atol=0, rtol=0)
    # an export folder is a source too: exported into itself, it gains a format and keeps the others
    assert cli_main(["export", "--checkpoint", str(tmp_path / "out"), "--out", str(tmp_path / "out"),
                     "--formats", "pt2"]) == 0  # fmt: skip
    names = ["config.json", "model.json", "model.pt2", "model.safetensors"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == names
    program = torch.export.load(str(tmp_path / "out" / "model.pt2")).module()
    torch.testing.assert_close(logits(program, X), logits(model, X), atol=1e-4, rtol=0)
    # into another folder, an export replaces it as a whole: no stale file of other weights survives
    assert cli_main(["export", "--checkpoint", str(tmp_path / "out"), "--out", str(tmp_path / "pt2"),
                     "--formats", "pt2"]) == 0  # fmt: skip
    assert cli_main(["export", "--weights", str(tmp_path / "w.pth"), "--model", "va_vit_tiny_patch4_32",
                     "--model-args", '{"depth": 1, "in_chans": 1, "num_classes": 3}', "--out", str(tmp_path / "pt2")]
                    ) == 0  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "pt2").iterdir()) == ["config.json", "model.json", "model.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "staging folders left behind"


def test_load_trained_reads_every_format_we_write(tmp_path):
    ckpt = tmp_path / "last.ckpt"
    _, ema = train_checkpoint(ckpt)
    expected = logits(ema, X)
    sources = {"checkpoint": ckpt}
    sources["bare safetensors + header"] = export_checkpoint(ckpt, tmp_path / "a" / "w.safetensors")
    sources["export folder"] = write_export(ema, tmp_path / "b", meta={**META, "model_args": {"depth": 1}}).folder
    legacy = tmp_path / "legacy"  # the layout before this change: no header metadata, model.json beside
    legacy.mkdir()
    save_file(ema.state_dict(), str(legacy / "model.safetensors"), metadata={"format": "pt"})
    legacy_meta = {"model_name": "va_vit_tiny_patch4_32", "model_args": {"depth": 1, "in_chans": 1, "num_classes": 3},
                   "class_names": CLASSES, "mean": [0.25], "std": [0.5]}  # fmt: skip
    (legacy / "model.json").write_text(json.dumps(legacy_meta))
    sources["legacy export folder"] = legacy
    sources["legacy safetensors"] = legacy / "model.safetensors"
    from timm.models._hub import save_for_hf

    save_for_hf(ema, tmp_path / "hf", safe_serialization=True, model_config={"label_names": CLASSES},
                data_config={"mean": (0.25,), "std": (0.5,)})  # fmt: skip
    sources["timm save_for_hf folder"] = tmp_path / "hf"
    for kind, path in sources.items():
        model, info = vision_attn.load_trained(path)
        torch.testing.assert_close(logits(model, X), expected, atol=0, rtol=0, msg=kind)
        assert info["model_name"] == "va_vit_tiny_patch4_32", kind
        assert info["class_names"] == CLASSES, kind
        assert info["mean"] == [0.25], kind
        assert not model.training, kind
    assert vision_attn.load_trained(ckpt)[1]["weights"] == "ema"
    assert vision_attn.load_trained(ckpt, use_ema=False)[1]["weights"] == "net"
    # bare weights need the model name; create_model(checkpoint_path=) reads the same formats
    torch.save(ema.state_dict(), tmp_path / "bare.pth")
    model, info = vision_attn.load_trained(tmp_path / "bare.pth", "va_vit_tiny_patch4_32",
                                           {"depth": 1, "in_chans": 1, "num_classes": 3})  # fmt: skip
    torch.testing.assert_close(logits(model, X), expected, atol=0, rtol=0)
    for path in (ckpt, sources["export folder"], sources["legacy safetensors"]):
        model = vision_attn.create_model("va_vit_tiny_patch4_32", checkpoint_path=path).eval()
        torch.testing.assert_close(logits(model, X), expected, atol=0, rtol=0)


def test_load_model_opens_weights_through_the_loader_and_names_alone(tmp_path):
    ckpt = tmp_path / "last.ckpt"
    _, ema = train_checkpoint(ckpt)
    out = write_export(ema, tmp_path / "export", meta={**META, "model_args": {"depth": 1}}).folder
    for source in (ckpt, out):
        model, info = vision_attn.load_model(checkpoint=source)
        torch.testing.assert_close(logits(model, X), logits(ema, X), atol=0, rtol=0)
        assert info["model_name"] == "va_vit_tiny_patch4_32"
        assert info["class_names"] == CLASSES
        config = vision_attn.resolve_data_config(model, info)
        assert config["input_size"] == (1, 32, 32)
        assert (config["mean"], config["std"]) == ((0.25,), (0.5,))
    model, info = vision_attn.load_model(model_name="va_vit_tiny_patch4_32", model_args={"depth": 1, "in_chans": 1})
    assert (info["weights"], info["source"]) == ("random", "model_name")
    assert vision_attn.resolve_data_config(model, info) == vision_attn.resolve_data_config(model)  # its own config


@pytest.mark.parametrize("use_best", [True, False])
def test_fit_ends_with_the_timm_hub_folder(tmp_path, use_best):
    torch.manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(8, 1, 32, 32), torch.randint(0, 3, (8,))), batch_size=4)
    module = ImageClassifier("va_vit_tiny_patch4_32", {"depth": 1}, num_classes=3, in_chans=1, img_size=32,
                             warmup_epochs=0.0, ema_decay=0.5)  # fmt: skip
    export = ExportBackbone(dirpath=str(tmp_path / "export"), use_best=use_best)
    callbacks: list = [export]
    if use_best:
        callbacks.append(L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/acc1", mode="max"))
    trainer = L.Trainer(max_steps=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        accelerator="cpu", callbacks=callbacks, enable_checkpointing=use_best,
                        default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(module, data, data)
    assert {p.name for p in (tmp_path / "export").iterdir()} == {"config.json", "model.safetensors", "model.json"}
    timm_model = timm.create_model(f"local-dir:{tmp_path / 'export'}", pretrained=True).eval()
    ours, info = vision_attn.load_trained(tmp_path / "export")
    torch.testing.assert_close(logits(timm_model, X), logits(module.eval_net.eval(), X), atol=0, rtol=0)
    torch.testing.assert_close(logits(ours, X), logits(module.eval_net, X), atol=0, rtol=0)
    assert info["model_args"]["in_chans"] == 1
    if use_best:
        assert info["global_step"] == 2
        assert "source_checkpoint" in json.loads((tmp_path / "export" / "model.json").read_text())


def test_export_model_keeps_the_earlier_single_file_api(tmp_path):
    model = tiny_vit()
    path = export_model(model, tmp_path / "m", "va_vit_tiny_patch4_32", {"depth": 1, "in_chans": 1, "num_classes": 3},
                        class_names=CLASSES)  # fmt: skip
    assert path.name == "m.safetensors"
    assert path.with_suffix(".json").is_file()
    shutil.move(path, tmp_path / "renamed.safetensors")  # the header carries the metadata: a renamed file loads
    loaded, info = vision_attn.load_trained(tmp_path / "renamed.safetensors")
    torch.testing.assert_close(logits(loaded, X), logits(model, X), atol=0, rtol=0)
    assert info["class_names"] == CLASSES
