"""``vision-attn app`` (issue 23): the engine, the API through ``gradio_client`` against the library, bad input and
concurrent clients, the command line, and the page in a real headless browser (Debian's chromium, Playwright)."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vision_attn
import vision_attn.cli
from vision_attn.app import Explorer
from vision_attn.app.cli import main as app_main
from vision_attn.app.cli import read_auth_file
from vision_attn.data import prepare_images, resolve_data_config
from vision_attn.data.images import load_dataset_images
from vision_attn.explain import (
    attention_rollout,
    capture_token_attention,
    explain,
    get_method,
    list_methods,
    register_method,
)
from vision_attn.explain._common import normalize_maps, upsample_maps
from vision_attn.explain.metrics import energy_pointing, pointing_game

gr = pytest.importorskip("gradio", reason="the app needs the app extra: pip install -e '.[app]'")
gradio_client = pytest.importorskip("gradio_client", reason="the API tests need the app extra (gradio_client)")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

from vision_attn.app.server import build_app, launch_app  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MODEL = "va_vitc2_seq_tiny_patch8_64"  # the default model, random weights
MODEL_ARGS = {"num_classes": 10, "in_chans": 1}
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _image(path: Path, height: int, width: int, seed: int = 0, mode: str = "RGB") -> Path:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    pixels = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode).save(path)
    return path


def _huge_png(path: Path, width: int, height: int) -> Path:
    """A valid 1-bit PNG of ``width`` x ``height`` black pixels (a few kB: the rows compress to nothing)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    packer = zlib.compressobj(9)
    body = b"".join(packer.compress(row * 1000) for _ in range(height // 1000)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b""))
    return path


def _reference_images() -> list[np.ndarray]:
    """Two images the test model tells apart: noise (class 0) and a black square (class 1)."""
    noise = np.random.default_rng(7).integers(0, 256, (64, 64), dtype=np.uint8)
    return [noise, np.zeros((64, 64), np.uint8)]


def _separate(model: torch.nn.Module, config: dict) -> None:
    """Make ``model``'s head tell the reference images apart (a random ViT's pooled features barely depend on the
    image, so it predicts one class for everything): class 0 for the first, class 1 for the second."""
    x = prepare_images(_reference_images(), config).images
    with torch.no_grad():
        features = model.forward_head(model.forward_features(x), pre_logits=True)  # 2, D
        direction = features[0] - features[1]
        scale = 20.0 / direction.norm() ** 2  # a logit margin of 10 either side of the midpoint
        middle = features.mean(0)
        model.head.weight[0] += scale * direction
        model.head.weight[1] -= scale * direction
        model.head.bias[0] -= float(scale * direction @ middle)
        model.head.bias[1] += float(scale * direction @ middle)


@pytest.fixture(scope="module")
def explorer() -> Explorer:
    torch.manual_seed(0)
    model = vision_attn.create_model(MODEL, **MODEL_ARGS).eval()
    _separate(model, resolve_data_config(model, {}))
    info = {"model_name": MODEL, "model_args": MODEL_ARGS, "class_names": [f"garment{i}" for i in range(10)],
            "source": "test", "weights": "random", "path": None}  # fmt: skip
    return Explorer(model, info, num_examples=4)


@pytest.fixture(scope="module")
def served(explorer: Explorer):
    demo, url = launch_app(explorer, port=_free_port())
    yield url
    demo.close()


@pytest.fixture(scope="module")
def client(served: str, tmp_path_factory: pytest.TempPathFactory) -> Client:
    return Client(served, verbose=False, download_files=str(tmp_path_factory.mktemp("downloads")))


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("images")
    return {
        "rgb": _image(folder / "photo.png", 90, 120, seed=1),
        "rgba": _image(folder / "logo.png", 40, 33, seed=2, mode="RGBA"),
        "grey": _image(folder / "scan.png", 300, 200, seed=3, mode="L"),
    }


def _expected(explorer: Explorer, path: Path, method: str, target: int | None = None, **options: object):
    """``(probabilities [classes], map [H, W])`` straight from the library for ``path``."""
    x = prepare_images([path], explorer.data_config).images
    with torch.no_grad():
        probs = explorer.model(x).softmax(-1)[0]
    return probs, explain(explorer.model, x, method, target, **options)[0].numpy()


# --- the API, through gradio_client -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["rgb", "rgba", "grey"])
def test_api_prediction_matches_the_model(client: Client, explorer: Explorer, images: dict[str, Path],
                                          kind: str) -> None:  # fmt: skip
    result = client.predict(handle_file(str(images[kind])), api_name="/predict")
    probs, _ = _expected(explorer, images[kind], "random")
    values, indices = probs.topk(5)
    assert [row["class"] for row in result["top"]] == indices.tolist()
    assert [row["name"] for row in result["top"]] == [f"garment{i}" for i in indices.tolist()]
    np.testing.assert_allclose([row["probability"] for row in result["top"]], values.numpy(), atol=1e-5)
    assert result["prediction"] == int(probs.argmax())


API_CASES = [("rollout", None), ("gradient_rollout", None), ("gradcam", 3), ("attention", None),
             ("transformer_attribution", 2), ("attnlrp", None)]  # fmt: skip


@pytest.mark.parametrize(("method", "target"), API_CASES)
def test_api_map_matches_explain(client: Client, explorer: Explorer, images: dict[str, Path], method: str,
                                 target: int | None) -> None:  # fmt: skip
    if method not in list_methods():
        pytest.skip(f"method {method!r} is not registered in this version")
    assert method in explorer.methods  # the relevance methods appear by themselves
    result, npy, png = client.predict(handle_file(str(images["rgb"])), method, target, "", 0.5, api_name="/explain")
    probs, expected = _expected(explorer, images["rgb"], method, target)
    saliency = np.load(npy)
    assert saliency.shape == expected.shape == (64, 64)
    np.testing.assert_allclose(saliency, expected, atol=1e-5)
    assert result["prediction"] == int(probs.argmax())  # read from the method's own forward pass
    np.testing.assert_allclose(result["top"][0]["probability"], float(probs.max()), atol=1e-4)
    assert result["target"] == (int(probs.argmax()) if target is None else target)
    assert result["method"] == method
    overlay = np.asarray(Image.open(png))
    assert overlay.shape == (64, 64, 3)


def test_the_documented_api_example(client: Client, explorer: Explorer, images: dict[str, Path]) -> None:
    prediction, map_file, overlay_file = client.predict(
        handle_file(str(images["rgb"])), method="gradcam", target=3, opacity=0.5, api_name="/explain"
    )  # as docs/app.md shows it
    probs, expected = _expected(explorer, images["rgb"], "gradcam", 3)
    assert prediction["top"][0]["class"] == int(probs.argmax())
    np.testing.assert_allclose(np.load(map_file), expected, atol=1e-5)
    assert Image.open(overlay_file).size == (64, 64)
    default = client.predict(handle_file(str(images["rgb"])), api_name="/explain")  # rollout, no overlay
    np.testing.assert_allclose(np.load(default[1]), _expected(explorer, images["rgb"], "rollout")[1], atol=1e-5)
    assert default[2] is None


def test_api_options_reach_the_method(client: Client, explorer: Explorer, images: dict[str, Path]) -> None:
    options = '{"head_fusion": "max", "discard_ratio": 0.5}'
    _, npy, png = client.predict(handle_file(str(images["grey"])), "rollout", None, options, None, api_name="/explain")
    assert png is None  # no opacity, no overlay
    _, expected = _expected(explorer, images["grey"], "rollout", head_fusion="max", discard_ratio=0.5)
    _, plain = _expected(explorer, images["grey"], "rollout")
    np.testing.assert_allclose(np.load(npy), expected, atol=1e-5)
    assert np.abs(expected - plain).max() > 1e-3  # the options changed the map


def test_bad_input_gives_a_message_and_the_server_keeps_serving(client: Client, tmp_path: Path,
                                                                images: dict[str, Path]) -> None:  # fmt: skip
    (tmp_path / "notes.png").write_text("this is not an image")
    data = images["rgb"].read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    _huge_png(tmp_path / "huge.png", 20_000, 20_000)  # over twice the limit: PIL refuses even to read its size
    _huge_png(tmp_path / "big.png", 12_000, 8_000)  # 96 Mpx: just over the limit
    rgb = handle_file(str(images["rgb"]))

    def file(name: str) -> dict:
        return handle_file(str(tmp_path / name))

    cases = [
        ((file("notes.png"), "rollout", None, "", 0.5), r"'notes.png' cannot be read as an image"),
        ((file("cut.png"), "rollout", None, "", 0.5), r"'cut.png' cannot be decoded \(truncated"),
        ((file("huge.png"), "rollout", None, "", 0.5), r"'huge.png' has more pixels than the limit of 89,478,485"),
        ((file("big.png"), "rollout", None, "", 0.5), r"'big.png' is 12000 x 8000 pixels, more than the limit of "
                                                     r"89,478,485"),
        ((rgb, "spatial", None, "", 0.5), r"NotApplicableError: method 'spatial' does not apply .*no spatial"),
        ((rgb, "no_such_method", None, "", 0.5), r"method 'no_such_method' is unknown; expected one of \('rollout'"),
        ((rgb, "gradcam", 10, "", 0.5), r"target 10 is out of range: model .* has 10 \(0 to 9\)"),
        ((rgb, "rollout", None, "{head_fusion", 0.5), r"options '\{head_fusion' is not JSON"),
        ((rgb, "rollout", None, '{"layer": 1}', 0.5), r"unknown options \['layer'\]; it accepts"),
        ((None, "rollout", None, "", 0.5), r"image is missing"),
        ((rgb, "rollout", None, "", 2.0), r"opacity 2.0 must be in \[0, 1\]"),
    ]  # fmt: skip
    for args, message in cases:
        with pytest.raises(AppError, match=message):
            client.predict(*args, api_name="/explain")
    _, npy, _ = client.predict(rgb, "rollout", None, "", 0.5, api_name="/explain")  # still serving
    assert np.load(npy).shape == (64, 64)


def test_a_large_image_within_the_limit_is_resized(client: Client, explorer: Explorer, tmp_path: Path) -> None:
    path = _huge_png(tmp_path / "wide.png", 6000, 4000)  # 24 Mpx, under MAX_IMAGE_PIXELS
    _, npy, _ = client.predict(handle_file(str(path)), "rollout", None, "", 0.5, api_name="/explain")
    np.testing.assert_allclose(np.load(npy), _expected(explorer, path, "rollout")[1], atol=1e-5)


def test_concurrent_clients_get_the_maps_of_their_own_images(served: str, explorer: Explorer,
                                                             tmp_path: Path) -> None:  # fmt: skip
    paths = [_image(tmp_path / f"client{i}.png", 50 + 7 * i, 64, seed=10 + i) for i in range(4)]
    expected = [_expected(explorer, p, "gradient_rollout") for p in paths]
    clients = [Client(served, verbose=False, download_files=str(tmp_path / f"dl{i}")) for i in range(len(paths))]
    start, answers, errors = threading.Barrier(len(paths)), {}, []

    def ask(i: int) -> None:
        try:
            start.wait()
            for round_ in range(2):
                answers[i, round_] = clients[i].predict(handle_file(str(paths[i])), "gradient_rollout", None, "", 0.5,
                                                        api_name="/explain")  # fmt: skip
        except Exception as err:  # reported below, in the test's thread
            errors.append(err)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(paths))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    assert len(answers) == 2 * len(paths)
    for (i, _), (result, npy, _) in answers.items():
        probs, saliency = expected[i]
        np.testing.assert_allclose(np.load(npy), saliency, atol=1e-5)
        np.testing.assert_allclose(result["top"][0]["probability"], float(probs.max()), atol=1e-4)
    assert max(np.abs(expected[0][1] - e[1]).max() for e in expected[1:]) > 1e-2  # the images' maps differ


def test_auth_file_is_passed_to_gradio(explorer: Explorer, tmp_path: Path, images: dict[str, Path]) -> None:
    auth_file = tmp_path / "users.txt"
    auth_file.write_text("# who may log in\nada:lovelace\n\nalan: turing \n")
    assert read_auth_file(auth_file) == [("ada", "lovelace"), ("alan", " turing ")]
    demo, url = launch_app(explorer, port=_free_port(), auth=read_auth_file(auth_file))
    try:
        with pytest.raises(Exception):  # noqa: B017, PT011 (gradio_client raises what its HTTP layer meets)
            Client(url, verbose=False)
        with pytest.raises(ValueError):  # noqa: PT011 (gradio_client's own message)
            Client(url, verbose=False, auth=("ada", "wrong"))
        logged_in = Client(url, verbose=False, auth=("ada", "lovelace"), download_files=str(tmp_path))
        assert logged_in.predict(handle_file(str(images["rgb"])), api_name="/predict")["top"]
    finally:
        demo.close()


@pytest.mark.parametrize(("text", "message"), [
    ("", r"holds no 'user:password' line"),
    ("ada\n", r"line 1 is not 'user:password'"),
    ("# c\nada:lovelace\n:secret\n", r"line 3 is not 'user:password'"),
    ("ada:\n", r"line 1 is not 'user:password'"),
])  # fmt: skip
def test_malformed_auth_file_names_the_line_not_the_password(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "users.txt"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as info:
        read_auth_file(path)
    assert "secret" not in str(info.value)
    assert "users.txt" in str(info.value)


# --- the engine ---------------------------------------------------------------------------------------------------


def test_method_list_comes_from_the_registry(explorer: Explorer) -> None:
    @register_method("app_test_center", description="a bump in the middle, for the app's test")
    def center(model: torch.nn.Module, images: torch.Tensor, target: object = None, width: float = 0.2) -> torch.Tensor:
        side = torch.linspace(-1, 1, 8)
        return torch.exp(-(side[:, None] ** 2 + side[None] ** 2) / width).expand(images.shape[0], 8, 8)

    try:
        later = Explorer(explorer.model, explorer.info, num_examples=0)
        assert "app_test_center" in later.methods
        assert "app_test_center" not in explorer.methods  # the list is read when an app opens its model
        demo = build_app(later)
        dropdown = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "va-method")
        assert "app_test_center" in [value for _, value in dropdown.choices]
        subject = later.prepare(np.zeros((64, 64), np.uint8))
        saliency = later.explain(subject, "app_test_center", options={"width": 0.5})
        np.testing.assert_allclose(saliency, explain(later.model, subject.images, "app_test_center", width=0.5)[0])
    finally:
        from vision_attn.explain import registry

        registry._METHODS.pop("app_test_center", None)  # other tests list the registry
    assert "spatial" not in explorer.methods
    assert get_method("spatial").reason_not_applicable(explorer.model) == explorer.unavailable["spatial"]


def test_token_views_read_what_the_methods_read(explorer: Explorer) -> None:
    subject = explorer.example(0)
    depth = len(explorer.heads_per_layer)
    assert explorer.heads_per_layer == [3] * depth
    views = explorer.token_maps(subject, layer=0, head=None, rollout_layer=-1)
    np.testing.assert_allclose(views.rollout, explain(explorer.model, subject.images, "rollout")[0], atol=1e-5)
    np.testing.assert_allclose(views.attention, explain(explorer.model, subject.images, "attention", layer=0)[0],
                               atol=1e-5)  # fmt: skip
    assert len(views.heads) == 3
    one = explorer.token_maps(subject, layer=0, head=2, rollout_layer=0)
    np.testing.assert_allclose(one.attention, views.heads[2], atol=1e-6)
    tokens = capture_token_attention(explorer.model, subject.images)  # rollout_layer=0: the first layer alone
    first = attention_rollout(tokens.attentions[:1], tokens.num_prefix_tokens, pool_weights=tokens.readout)
    np.testing.assert_allclose(one.rollout, normalize_maps(upsample_maps(first, (64, 64)))[0], atol=1e-5)
    assert np.abs(one.rollout - views.rollout).max() > 1e-3  # fewer layers, another map
    with pytest.raises(ValueError, match=r"head 3 is out of range: layer 0's head list has 3 \(0 to 2\)"):
        explorer.token_maps(subject, layer=0, head=3)
    with pytest.raises(ValueError, match=rf"layer {depth} is out of range"):
        explorer.token_maps(subject, layer=depth)


def test_a_cnn_gets_its_own_methods_and_no_token_views() -> None:
    torch.manual_seed(0)
    model = vision_attn.create_model("va_resnet18_cbam_32", num_classes=3).eval()
    cnn = Explorer(model, {"model_name": "va_resnet18_cbam_32"}, num_examples=1)
    assert "spatial" in cnn.methods
    assert "gradcam" in cnn.methods
    assert "rollout" in cnn.unavailable
    assert cnn.heads_per_layer == []
    subject = cnn.example(0)  # the grey 64 x 64 example through an RGB 32 x 32 model's pipeline
    assert subject.images.shape == (1, 3, 32, 32)
    np.testing.assert_allclose(cnn.explain(subject, "spatial"), explain(model, subject.images, "spatial")[0])
    with pytest.raises(ValueError, match=r"method 'rollout' does not apply to this model: .*no token-attention"):
        cnn.explain(subject, "rollout")
    with pytest.raises(ValueError, match=r"no token-attention"):
        cnn.token_maps(subject, 0)
    ids = {getattr(block, "elem_id", None) for block in build_app(cnn).blocks.values()}
    assert "va-method" in ids
    assert "va-layer" not in ids  # no layers-and-heads tab


def test_examples_carry_boxes_and_their_scores(explorer: Explorer) -> None:
    prepared, names, labels = load_dataset_images("cluttered_fashion_mnist:test", 4, explorer.data_config)
    assert [s.name for s in explorer.examples] == names
    subject = explorer.example(2)
    torch.testing.assert_close(subject.images, prepared.images[2:3])
    torch.testing.assert_close(subject.box, prepared.boxes[2])
    assert subject.label == int(labels[2])
    saliency = explorer.explain(subject, "gradient_rollout")
    scores = explorer.scores(subject, saliency)
    maps, box = torch.from_numpy(saliency)[None], prepared.boxes[2:3]
    assert scores == pytest.approx({"pointing_game": float(pointing_game(maps, box)[0]),
                                    "energy_pointing": float(energy_pointing(maps, box)[0])})  # fmt: skip
    picture = explorer.display(subject, saliency)
    assert picture.shape == (256, 256, 3)
    x0, y0 = (int(v) * 4 for v in subject.box[:2])
    assert tuple(picture[y0 + 5, x0]) == (0, 255, 0)  # the box is drawn
    with pytest.raises(ValueError, match=r"example 4 is out of range: the example list has 4 \(0 to 3\)"):
        explorer.example(4)


def test_page_handlers_put_bad_input_in_the_status(explorer: Explorer, tmp_path: Path) -> None:
    from vision_attn.app.server import _Handlers

    handlers = _Handlers(explorer)
    (tmp_path / "notes.txt").write_text("not an image")
    picture, top5, _, status, files = handlers.main({"path": str(tmp_path / "notes.txt"), "orig_name": "notes.txt"},
                                                    None, "rollout", "predicted", 0.5, "")  # fmt: skip
    assert (picture, top5, files) == (None, None, None)
    assert "'notes.txt' cannot be read as an image" in status
    picture, top5, details, status, files = handlers.main(None, 1, "gradcam", "4", 0.3, "")
    assert status == ""
    assert len(top5) == 5
    assert "map of:** garment4" in details
    assert "pointing game" in details
    assert sorted(Path(f).suffix for f in files) == [".npy", ".png", ".png"]
    expected = explain(explorer.model, explorer.example(1).images, "gradcam", 4)[0]
    np.testing.assert_allclose(np.load(next(f for f in files if f.endswith(".npy"))), expected, atol=1e-5)
    attention, _, heads, status = handlers.tokens(None, 1, 0, 2, False, 0, 0.5)
    assert attention.shape == (256, 256, 3)
    assert [caption for _, caption in heads] == ["layer 0 head 0", "layer 0 head 1", "layer 0 head 2"]
    attention, _, _, status = handlers.tokens(None, 1, 0, 5, False, 0, 0.5)
    assert attention is None
    assert "head 5 is out of range" in status
    cells, problems = handlers.compare(None, 1, ["rollout", "spatial", "random"], "predicted", 0.5)
    assert [caption.split(" ")[0] for _, caption in cells] == ["rollout", "random"]
    assert "`spatial`: method 'spatial' does not apply" in problems


# --- the command line ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("args", "message"), [
    (["--model", MODEL, "--checkpoint", "x.ckpt"], "give exactly one of --checkpoint PATH or --model NAME"),
    ([], "give exactly one of --checkpoint PATH or --model NAME"),
    (["--checkpoint", "x.ckpt", "--weights", "w.safetensors"], "--weights goes with --model NAME"),
    (["--model", MODEL, "--port", "0"], "argument --port: must be a TCP port, an int in 1..65535, got '0'"),
    (["--model", MODEL, "--auth-file", "missing-users.txt"], "--auth-file 'missing-users.txt' does not exist"),
    (["--model", MODEL, "--dataset", "mnist"], "--dataset 'mnist' is unknown"),
    (["--model", MODEL, "--model-args", "[1]"], "--model-args must be a JSON object"),
    (["--model", MODEL, "--cmap", "rainbowz"], "--cmap 'rainbowz' is not a matplotlib colormap"),
])  # fmt: skip
def test_cli_bad_arguments_exit_2_with_one_line(capsys: pytest.CaptureFixture, args: list[str], message: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        app_main(args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_without_gradio_says_which_extra_to_install(monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    monkeypatch.setitem(sys.modules, "vision_attn.app.server", None)  # as if gradio were not installed
    assert app_main(["--model", MODEL]) == 2
    assert "install the app extra: pip install 'vision_attn[app]'" in capsys.readouterr().err


@pytest.mark.parametrize("sidecar", ["{not json", "[1, 2]"])
def test_malformed_metadata_beside_the_weights_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                                   sidecar: str) -> None:  # fmt: skip
    from safetensors.torch import save_file

    model = vision_attn.create_model("va_vit_tiny_patch4_32", depth=1, num_classes=3)
    save_file(model.state_dict(), str(tmp_path / "weights.safetensors"))  # no metadata in the header...
    (tmp_path / "weights.json").write_text(sidecar)  # ...so the file beside it is read, and must be an object
    code = vision_attn.cli.main(["app", "--checkpoint", str(tmp_path / "weights.safetensors")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1
    assert "weights.json" in err
    assert "not valid JSON" in err if sidecar.startswith("{") else "expected an object" in err


def _listening_addresses(port: int) -> list[str]:
    """Local addresses with a TCP socket listening on ``port`` (Linux ``/proc/net/tcp``)."""
    found = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, _, hex_port = local.partition(":")
        if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
            found.append(socket.inet_ntoa(struct.pack("<I", int(address, 16))))
    return found


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads Linux's /proc/net/tcp")
def test_cli_serves_on_loopback_prints_the_address_and_stops_on_sigterm(tmp_path: Path) -> None:
    torch.manual_seed(0)
    args = {"img_size": 32, "patch_size": 8, "depth": 1, "embed_dim": 48, "num_heads": 2, "num_classes": 4}
    model = vision_attn.create_model("vit_tiny_patch16_224", **args).eval()  # a timm ViT: RGB, class token
    from safetensors.torch import save_file

    save_file(model.state_dict(), str(tmp_path / "vit.safetensors"))
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "vision_attn.cli", "app", "--model", "vit_tiny_patch16_224", "--weights",
               str(tmp_path / "vit.safetensors"), "--model-args", json.dumps(args), "--port", str(port),
               "--examples", "0"]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        lines = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "Ctrl+C" in line:
                break
        assert f"vision-attn app: vit_tiny_patch16_224 (safetensors) at http://127.0.0.1:{port}/\n" in lines, lines
        assert _listening_addresses(port) == ["127.0.0.1"]  # loopback only
        image = _image(tmp_path / "photo.png", 40, 50, seed=5, mode="RGBA")
        client = Client(f"http://127.0.0.1:{port}/", verbose=False, download_files=str(tmp_path))
        result = client.predict(handle_file(str(image)), api_name="/predict")
        config = resolve_data_config(model, {})
        with torch.no_grad():
            probs = model(prepare_images([image], config).images).softmax(-1)[0]
        assert [row["class"] for row in result["top"]] == probs.topk(4).indices.tolist()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


# --- the page, in a real browser ----------------------------------------------------------------------------------


def _playwright():
    sync_api = pytest.importorskip("playwright.sync_api", reason="the browser test needs the dev extra (playwright)")
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing: .ci/run must install Debian's chromium (apt-get install -y chromium)")
        pytest.skip(f"{CHROMIUM} is missing (apt-get install -y chromium)")
    return sync_api


def test_browser_upload_change_method_and_pick_an_example(served: str, explorer: Explorer, tmp_path: Path) -> None:
    sync_api = _playwright()
    import httpx

    first, second = tmp_path / "noise.png", tmp_path / "black.png"
    for path, pixels in zip((first, second), _reference_images(), strict=True):
        Image.fromarray(pixels).save(path)
    top = {p: explorer.prediction(explorer.prepare(p))["class_name"] for p in (first, second)}
    assert top == {first: "garment0", second: "garment1"}
    (tmp_path / "notes.png").write_text("not an image")
    outside: list[str] = []

    def overlay_src(page) -> str:
        return page.locator("#va-overlay img").get_attribute("src") or ""

    def wait_new_overlay(page, old: str) -> str:
        page.wait_for_function("old => { const img = document.querySelector('#va-overlay img');"
                               " return img && img.src && img.src !== old; }", arg=old, timeout=30_000)  # fmt: skip
        return overlay_src(page)

    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            local = (served, "data:", "blob:")
            page.on("request", lambda r: None if r.url.startswith(local) else outside.append(r.url))
            page.goto(served)
            page.locator("#va-image input[type=file]").set_input_files(str(first))
            src = wait_new_overlay(page, "")
            page.wait_for_function("name => document.querySelector('#va-top5').innerText.includes(name)",
                                   arg=top[first], timeout=30_000)  # fmt: skip
            # the overlay shown is the rollout map of this very image, as the library draws it
            shown = np.asarray(Image.open(io.BytesIO(httpx.get(src).content)).convert("RGB"))
            subject = explorer.prepare(first)
            expected = explorer.display(subject, explorer.explain(subject, "rollout"), 0.5)
            np.testing.assert_array_equal(shown, expected)

            page.locator("#va-method input").click()  # another method: the overlay follows
            page.locator("ul[role=listbox] li", has_text="gradcam").first.click()
            src = wait_new_overlay(page, src)
            shown = np.asarray(Image.open(io.BytesIO(httpx.get(src).content)).convert("RGB"))
            expected = explorer.display(subject, explorer.explain(subject, "gradcam"), 0.5)
            np.testing.assert_array_equal(shown, expected)

            page.locator("#va-image input[type=file]").set_input_files(str(second))  # another image: the top-5 too
            src = wait_new_overlay(page, src)
            page.wait_for_function("name => document.querySelector('#va-top5').innerText.includes(name)",
                                   arg=top[second], timeout=30_000)  # fmt: skip
            assert top[first] not in page.locator("#va-top5").inner_text().split("\n")[1]  # the heading changed

            page.locator("#va-image input[type=file]").set_input_files(str(tmp_path / "notes.png"))  # bad input
            page.wait_for_function("() => document.querySelector('#va-status').innerText.includes('cannot be read')",
                                   timeout=30_000)  # fmt: skip
            assert "'notes.png' cannot be read as an image" in page.locator("#va-status").inner_text()

            page.locator("#va-examples button.thumbnail-item").nth(1).click()  # an example: box and scores
            page.wait_for_function("() => document.querySelector('#va-details').innerText.includes('pointing game')",
                                   timeout=30_000)  # fmt: skip
            example = explorer.example(1)
            scores = explorer.scores(example, explorer.explain(example, "gradcam"))
            assert f"pointing game: {scores['pointing_game']:.2f}" in page.locator("#va-details").inner_text()
            assert page.locator("#va-status").inner_text().strip() == ""
        finally:
            browser.close()
    assert outside == []  # the page loads nothing from outside this machine
