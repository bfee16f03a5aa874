"""Explain methods as a registry (issue 26): a method registered in user code works in explain(), the CLI (also
through ``--plugin``) and the method table like the built-in ones; the docs' method list is the registry's."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vision_attn
import vision_attn.cli
from vision_attn.explain import NotApplicableError, applicable_methods, explain, get_method, list_methods
from vision_attn.explain import register_method as register
from vision_attn.explain.cli import main as explain_main
from vision_attn.explain.registry import _METHODS, methods_markdown

ROOT = Path(__file__).resolve().parents[1]
BUILT_IN = ("rollout", "gradient_rollout", "transformer_attribution", "attnlrp", "attention", "gradcam", "gradcam++",
            "layercam", "spatial", "integrated_gradients", "saliency", "random")  # fmt: skip


def brightness(model: torch.nn.Module, images: torch.Tensor, target=None, channel: int = 0) -> torch.Tensor:
    """A toy method: the image's own brightness in one channel (no model needed)."""
    return images[:, channel] - images[:, channel].amin()


@pytest.fixture
def toy():
    register("toy_brightness", brightness, description="brightness of one channel")
    yield get_method("toy_brightness")
    _METHODS.pop("toy_brightness", None)


def test_the_built_in_methods_register_themselves_in_order() -> None:
    assert tuple(list_methods()) == BUILT_IN
    assert list_methods("grad*") == ["gradient_rollout", "gradcam", "gradcam++"]
    assert get_method("gradcam").options == ("target_layers", "num_prefix_tokens", "grid_size")
    assert get_method("rollout").needs == {"token_attention"}
    assert not get_method("rollout").class_specific
    assert get_method("attnlrp").class_specific


def test_a_method_registered_in_user_code_works_in_explain(toy) -> None:
    assert toy.options == ("channel",)  # read from its keyword parameters
    assert "toy_brightness" in list_methods()
    model = vision_attn.create_model("va_vit_tiny_patch4_32", depth=1, num_classes=3).eval()
    x = torch.randn(2, 3, 32, 32)
    maps = explain(model, x, "toy_brightness", channel=1)
    expected = (x[:, 1] - x[:, 1].flatten(1).amin(1)[:, None, None]) / (x[:, 1].flatten(1).amax(1) - x[:, 1].flatten(
        1).amin(1))[:, None, None]  # fmt: skip
    torch.testing.assert_close(maps, expected)  # scaled to [0, 1] by explain(), as for every method
    with pytest.raises(TypeError, match=r"got unknown options \['colour'\]; it accepts \['channel'\]"):
        explain(model, x, "toy_brightness", colour=1)
    assert applicable_methods(model)["toy_brightness"] == ""
    assert "| `toy_brightness` | — | `channel` | brightness of one channel |" in methods_markdown()


def test_the_decorator_the_needs_and_bad_registrations() -> None:
    @register("toy_needs_tokens", needs=("token_attention", "class_target"))
    def needs_tokens(model, images, target=None):
        """Constant maps."""
        return torch.ones(images.shape[0], 2, 2)

    try:
        assert needs_tokens.__name__ == "needs_tokens"  # the decorator returns the function
        assert get_method("toy_needs_tokens").description == "Constant maps."
        cnn = vision_attn.create_model("va_resnet18_32", layers=[1, 1, 1, 1], num_classes=3).eval()
        assert "no token-attention modules" in applicable_methods(cnn)["toy_needs_tokens"]
        with pytest.raises(NotApplicableError, match="no token-attention modules"):
            explain(cnn, torch.randn(1, 3, 32, 32), "toy_needs_tokens")
        headless = vision_attn.create_model("va_vit_tiny_patch4_32", depth=1, num_classes=0).eval()
        assert "num_classes=0" in applicable_methods(headless)["toy_needs_tokens"]
        with pytest.raises(ValueError, match="'toy_needs_tokens' is already registered"):
            register("toy_needs_tokens", needs_tokens)
        register("toy_needs_tokens", needs_tokens, overwrite=True, description="replaced")
        assert get_method("toy_needs_tokens").description == "replaced"
    finally:
        _METHODS.pop("toy_needs_tokens", None)
    with pytest.raises(ValueError, match=r"needs \['gpu'\] are unknown"):
        register("toy_bad", brightness, needs=("gpu",))
    with pytest.raises(TypeError, match=r"must be fn\(model, images, target=None, \*\*options\)"):
        register("toy_bad", lambda model, images: images[:, 0])
    with pytest.raises(ValueError, match="method name must be a non-empty string without ':'"):
        register("a:b", brightness)
    assert "toy_bad" not in list_methods()
    with pytest.raises(ValueError, match=r"method 'toy_bad' is unknown; expected one of \('rollout'"):
        explain(vision_attn.create_model("va_vit_tiny_patch4_32", depth=1), torch.randn(1, 3, 32, 32), "toy_bad")


def test_a_method_that_returns_a_wrong_shape_is_named(toy) -> None:
    register("toy_flat", lambda model, images, target=None: images.flatten(1))
    try:
        model = vision_attn.create_model("va_vit_tiny_patch4_32", depth=1).eval()
        with pytest.raises(ValueError, match=r"method 'toy_flat' returned \(2, 3072\); .* maps \[B, h, w\]"):
            explain(model, torch.randn(2, 3, 32, 32), "toy_flat")
    finally:
        _METHODS.pop("toy_flat", None)


def test_the_cli_runs_a_registered_method_and_all(toy, tmp_path: Path) -> None:
    image = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(image)
    args = ["--model", "va_vit_tiny_patch4_32", "--model-args", '{"depth": 1, "num_classes": 3}', "--images",
            str(image), "--steps", "0", "--no-overlays"]  # fmt: skip
    assert explain_main([*args, "--method", "toy_brightness", "--out", str(tmp_path / "one")]) == 0
    assert list(json.loads((tmp_path / "one" / "scores.json").read_text())["summary"]) == ["toy_brightness"]
    assert explain_main([*args, "--method", "all", "--out", str(tmp_path / "all")]) == 0
    result = json.loads((tmp_path / "all" / "scores.json").read_text())
    ran = list(result["summary"])
    assert set(ran) | {s["method"] for s in result["skipped"]} == set(list_methods())
    assert "toy_brightness" in ran
    assert [s["method"] for s in result["skipped"]] == ["spatial"]  # a ViT has no CNN attention maps


def test_plugin_modules_register_methods_for_the_cli(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    plugin = tmp_path / "my_methods.py"
    plugin.write_text(
        "import torch\n"
        "from vision_attn.explain import register_method\n\n\n"
        "@register_method('centre_prior', description='a Gaussian at the image centre')\n"
        "def centre_prior(model, images, target=None, width=0.25):\n"
        "    ys = torch.linspace(-1, 1, images.shape[-2])[:, None]\n"
        "    xs = torch.linspace(-1, 1, images.shape[-1])[None, :]\n"
        "    return torch.exp(-(xs**2 + ys**2) / width).expand(images.shape[0], -1, -1)\n"
    )
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(image)
    monkeypatch.syspath_prepend(str(tmp_path))
    argv = ["--model", "va_vit_tiny_patch4_32", "--model-args", '{"depth": 1}', "--images", str(image), "--steps",
            "0", "--method", "centre_prior", "--out", str(tmp_path / "out")]  # fmt: skip
    with pytest.raises(SystemExit) as exit_:  # without the plugin the method is unknown
        explain_main(argv)
    assert exit_.value.code == 2
    assert "--method 'centre_prior' is not [K:]METHOD" in capsys.readouterr().err
    try:
        for spec in ("my_methods", str(plugin)):  # a module name on the path, or a file
            _METHODS.pop("centre_prior", None)
            sys.modules.pop("my_methods", None)
            assert explain_main(["--plugin", spec, *argv]) == 0
            assert list(json.loads((tmp_path / "out" / "scores.json").read_text())["summary"]) == ["centre_prior"]
            with Image.open(tmp_path / "out" / "x_centre_prior.png") as overlay:
                assert overlay.size == (32, 32)
        _METHODS.pop("centre_prior", None)
        sys.modules.pop("my_methods", None)
        capsys.readouterr()
        assert vision_attn.cli.main(["methods", "--plugin", "my_methods"]) == 0
        assert "| `centre_prior` | — | `width` | a Gaussian at the image centre |" in capsys.readouterr().out
        with pytest.raises(SystemExit):
            explain_main(["--plugin", str(tmp_path / "missing.py"), *argv])
        assert "--plugin" in capsys.readouterr().err
    finally:
        _METHODS.pop("centre_prior", None)
        sys.modules.pop("my_methods", None)


def test_docs_list_every_registered_method() -> None:
    docs = (ROOT / "docs" / "explain.md").read_text()
    block = docs.split("<!-- methods:start -->\n", 1)[1].split("<!-- methods:end -->", 1)[0]
    assert block.strip().splitlines()[: len(BUILT_IN) + 2] == methods_markdown().splitlines()
