"""The page and the API of ``vision-attn app``: a Gradio ``Blocks`` around an :class:`~vision_attn.app.Explorer`.

The page: an image (upload, drag and drop, paste) or a dataset example (boxes in green), the top-5 classes, the map
of the chosen method / target class / opacity with its box scores and downloads (PNG, ``.npy``); for token models
the raw attention of each layer and head and the rollout up to a layer; the methods side by side. The API (Gradio's
own, for ``gradio_client``): ``/predict`` (image -> top-5) and ``/explain`` (image, method, target, options ->
prediction, the map as ``.npy``, the overlay as PNG). Bad input becomes a message in the page (an error the client
raises, for the API); the server keeps serving.
"""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no telemetry, before gradio reads it

import shutil
import tempfile
import threading
import time
import uuid
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
from PIL import Image

from vision_attn._io import atomic_open
from vision_attn.app.explorer import MAX_IMAGE_PIXELS, Explorer, Subject, parse_options
from vision_attn.explain.registry import get_method

__all__ = ["MAX_UPLOAD_BYTES", "build_app", "launch_app"]

MAX_UPLOAD_BYTES = 64 * 1024 * 1024  # larger uploads are refused by Gradio before they reach the model
DOWNLOAD_TTL_S = 600  # files written for download are removed this long after (Gradio serves its own copy)
USER_ERRORS = (ValueError, TypeError, FileNotFoundError, FloatingPointError)  # bad input: a message, not a crash
PREDICTED = "predicted"
COMPARED = 4  # methods side by side by default (the first ones the registry lists; some take seconds on large models)


def _upload(payload: Any) -> tuple[str, str] | None:
    """``(path, original file name)`` of an image payload as Gradio sends it unprocessed (``None``: no image).

    The app's events take images unprocessed (``preprocess=False``): Gradio has checked that the file is one of its
    uploads, and :func:`vision_attn.data.read_image` decodes it with its own checks and messages (Gradio's decoding
    would refuse a huge image with PIL's decompression-bomb error, or a non-image with a bare traceback)."""
    if payload is None or isinstance(payload, str):
        return (payload, os.path.basename(payload)) if payload else None
    path = payload.get("path") if isinstance(payload, dict) else None
    if not path:
        raise ValueError(f"image {payload!r} holds no uploaded file; send the image as a file "
                         "(gradio_client.handle_file(path))")  # fmt: skip
    return str(path), str(payload.get("orig_name") or os.path.basename(path))


def _percent(value: float) -> str:
    return f"{100 * value:.1f} %"


class _Handlers:
    """The functions behind the page's events and the API, around one :class:`Explorer`."""

    def __init__(self, explorer: Explorer) -> None:
        self.explorer = explorer
        self.work_dir = Path(tempfile.mkdtemp(prefix="vision_attn_app_"))
        self._finalizer = weakref.finalize(self, shutil.rmtree, str(self.work_dir), True)
        self._subjects: OrderedDict[str, Subject] = OrderedDict()  # decoded uploads, newest last
        self._cache_lock = threading.Lock()

    # -- inputs --------------------------------------------------------------------------------------------------

    def subject(self, payload: Any, example: int | None) -> Subject | None:
        """The image to explain: the dataset example ``example``, else the uploaded image ``payload``, else None."""
        if example is not None:
            return self.explorer.example(int(example))
        upload = _upload(payload)
        if upload is None:
            return None
        image, name = upload
        with self._cache_lock:
            if image in self._subjects:
                self._subjects.move_to_end(image)
                return self._subjects[image]
        try:
            subject = self.explorer.prepare(image, name=name)
        except (ValueError, FileNotFoundError) as err:  # name the file as the user knows it, not Gradio's copy
            raise type(err)(str(err).replace(image, name)) from err
        with self._cache_lock:  # uploads live at content-hashed paths: a path always means the same image
            self._subjects[image] = subject
            while len(self._subjects) > 16:
                self._subjects.popitem(last=False)
        return subject

    def target(self, choice: str | float | int | None) -> int | None:
        """The target class of a dropdown choice or an API number (``None`` / ``'predicted'``: the prediction)."""
        if choice is None or choice == PREDICTED or choice == "":
            return None
        if isinstance(choice, float):
            if not choice.is_integer():
                raise ValueError(f"target {choice!r} is not a class index; expected an int in 0.."
                                 f"{self.num_classes - 1}")  # fmt: skip
            choice = int(choice)
        if isinstance(choice, str):
            try:
                choice = int(choice.split(":", 1)[0])
            except ValueError as err:
                raise ValueError(f"target {choice!r} is not a class index or {PREDICTED!r}") from err
        return self.explorer.check_target(choice)

    @property
    def num_classes(self) -> int:
        """The model's class count."""
        return self.explorer.num_classes

    # -- outputs -------------------------------------------------------------------------------------------------

    def _downloads(self, subject: Subject, method: str, saliency: np.ndarray, alpha: float | None,
                   grey: bool = True) -> dict[str, str]:  # fmt: skip
        """Write, each atomically, the map (``'npy'``: float32 [H, W] in [0, 1]), unless ``alpha`` is None its
        overlay at that opacity (``'overlay'``: PNG at the input size) and with ``grey`` the map as a grey PNG
        (``'png'``); returns their paths."""
        self._prune()
        folder = self.work_dir / uuid.uuid4().hex
        stem = f"{subject.name}_{method}".replace("+", "p")
        paths = {"npy": folder / f"{stem}_map.npy"}
        with atomic_open(paths["npy"], "wb") as f:
            np.save(f, saliency.astype(np.float32))
        if grey:
            paths["png"] = folder / f"{stem}_map.png"
            with atomic_open(paths["png"], "wb") as f:
                Image.fromarray((np.clip(saliency, 0, 1) * 255).round().astype(np.uint8)).save(f, format="png")
        if alpha is not None:
            paths["overlay"] = folder / f"{stem}_overlay.png"
            with atomic_open(paths["overlay"], "wb") as f:
                Image.fromarray(self.explorer.display(subject, saliency, alpha, enlarge=False)).save(f, format="png")
        return {kind: str(path) for kind, path in paths.items()}

    def _prune(self) -> None:
        now = time.time()
        for folder in self.work_dir.iterdir():
            try:
                if now - folder.stat().st_mtime > DOWNLOAD_TTL_S:
                    shutil.rmtree(folder, ignore_errors=True)
            except FileNotFoundError:  # another request pruned it
                pass

    def _details(self, subject: Subject, result: dict[str, Any], method: str, target: int | None,
                 scores: dict[str, float]) -> str:  # fmt: skip
        explorer = self.explorer
        lines = [f"**prediction:** {result['class_name']} ({_percent(result['probability'])})"]
        if get_method(method).class_specific:
            shown = result["prediction"] if target is None else target
            lines.append(f"**map of:** {explorer.class_name(shown)}{' (the prediction)' if target is None else ''}")
        else:
            lines.append(f"**map:** `{method}` is class-agnostic (the target class does not change it)")
        if subject.label is not None:
            lines.append(f"**true class:** {_true_name(explorer, subject.label)}")
        if scores:
            lines.append(
                f"**pointing game:** {scores['pointing_game']:.2f} · **energy in box:** {scores['energy_pointing']:.3f}"
            )
        elif subject.box is not None:
            lines.append("the crop removed the object box: no box scores")
        return "  \n".join(lines)

    def main(self, image: Any, example: int | None, method: str, target: str, opacity: float,
             options: str) -> tuple[Any, ...]:  # fmt: skip
        """The map view: ``(overlay, top-5, details, status, downloads)``; bad input leaves a message in status."""
        try:
            subject = self.subject(image, example)
            if subject is None:
                return None, None, "", "Upload, drop or paste an image, or pick an example.", None
            chosen = self.target(target)
            result, saliency = self.explorer.explain_with_prediction(
                subject, method, chosen, parse_options(options, method)
            )
            top5 = {row["name"]: row["probability"] for row in result["top"]}
            picture = self.explorer.display(subject, saliency, opacity)
            scores = self.explorer.scores(subject, saliency)
            details = self._details(subject, result, method, chosen, scores)
            return picture, top5, details, "", list(self._downloads(subject, method, saliency, opacity).values())
        except USER_ERRORS as err:
            return None, None, "", _message(err), None

    def upload(self, image: Any, method: str, target: str, opacity: float, options: str) -> tuple[Any, ...]:
        """A new image from the user: forget the example, then :meth:`main`."""
        return (None, *self.main(image, None, method, target, opacity, options))

    def pick_example(self, event: gr.SelectData, method: str, target: str, opacity: float,
                     options: str) -> tuple[Any, ...]:  # fmt: skip
        """An example picked in the gallery: show it as the image, remember its index, then :meth:`main`."""
        index = int(event.index)
        picture = self.explorer.display(self.explorer.example(index))
        return (picture, index, *self.main(None, index, method, target, opacity, options))

    def tokens(self, image: Any, example: int | None, layer: int, head: int, mean_heads: bool,
               rollout_layer: int, opacity: float) -> tuple[Any, ...]:  # fmt: skip
        """The layer and head view: ``(attention overlay, rollout overlay, heads gallery, status)``."""
        try:
            subject = self.subject(image, example)
            if subject is None:
                return None, None, None, ""
            maps = self.explorer.token_maps(subject, int(layer), None if mean_heads else int(head), int(rollout_layer))
            show = self.explorer.display
            gallery = [(show(subject, m, opacity), f"layer {maps.layer} head {h}") for h, m in enumerate(maps.heads)]
            return show(subject, maps.attention, opacity), show(subject, maps.rollout, opacity), gallery, ""
        except USER_ERRORS as err:
            return None, None, None, _message(err)

    def compare(self, image: Any, example: int | None, methods: Sequence[str], target: str,
                opacity: float) -> tuple[Any, ...]:  # fmt: skip
        """The methods side by side: ``(gallery of (overlay, method), status)``."""
        try:
            subject = self.subject(image, example)
            if subject is None:
                return None, ""
            chosen = self.target(target)
            cells, problems = [], []
            for method in methods or ():
                try:
                    saliency = self.explorer.explain(subject, method, chosen)
                except USER_ERRORS as err:
                    problems.append(f"`{method}`: {err}")
                    continue
                scores = self.explorer.scores(subject, saliency)
                caption = method + (f" (pointing {scores['pointing_game']:.2f}, energy {scores['energy_pointing']:.2f})"
                                    if scores else "")  # fmt: skip
                cells.append((self.explorer.display(subject, saliency, opacity), caption))
            return cells, "  \n".join(problems)
        except USER_ERRORS as err:
            return None, _message(err)

    # -- the API ---------------------------------------------------------------------------------------------------

    def api_predict(self, image: Any) -> dict[str, Any]:
        """``/predict``: the top-5 classes of an image (``{'prediction', 'class_name', 'probability', 'top'}``)."""
        try:
            subject = self.subject(image, None)
            if subject is None:
                raise ValueError("image is missing; send an image file")
            return self.explorer.prediction(subject)
        except USER_ERRORS as err:
            raise gr.Error(f"{type(err).__name__}: {err}", print_exception=False) from err

    def api_explain(self, image: Any, method: str = "rollout", target: float | None = None, options: str | None = "",
                    opacity: float | None = None) -> tuple[dict[str, Any], str, str | None]:  # fmt: skip
        """``/explain``: ``(the prediction with 'method', 'target', 'map_shape'; the map as .npy; its overlay PNG at
        ``opacity``, or None when ``opacity`` is None)``."""
        try:
            subject = self.subject(image, None)
            if subject is None:
                raise ValueError("image is missing; send an image file")
            chosen = self.target(target)
            result, saliency = self.explorer.explain_with_prediction(
                subject, method, chosen, parse_options(options, method)
            )
            if opacity is not None and not 0.0 <= float(opacity) <= 1.0:
                raise ValueError(f"opacity {opacity!r} must be in [0, 1] (or empty for no overlay)")
            files = self._downloads(subject, method, saliency, None if opacity is None else float(opacity), grey=False)
            result.update(method=method, target=result["prediction"] if chosen is None else chosen,
                          map_shape=list(saliency.shape))  # fmt: skip
            return result, files["npy"], files.get("overlay")
        except USER_ERRORS as err:
            raise gr.Error(f"{type(err).__name__}: {err}", print_exception=False) from err


def _true_name(explorer: Explorer, label: int) -> str:
    from vision_attn.data.cluttered import FASHION_MNIST_CLASSES

    names = explorer.class_names or (FASHION_MNIST_CLASSES if (explorer.dataset or "").startswith("cluttered") else ())
    return names[label] if label < len(names) else f"class {label}"


def _message(err: BaseException) -> str:
    """A user-facing one-line message for a bad input."""
    return f"**{type(err).__name__}:** {err}"


def _header(explorer: Explorer) -> str:
    d = explorer.describe()
    where = f" from `{os.path.basename(d['path'])}`" if d["path"] else f" ({d['weights']} weights)"
    size = "x".join(str(v) for v in d["input_size"][1:])
    lines = [
        f"# vision-attn app: `{d['model_name']}`{where}",
        f"Input {size} px, {d['input_size'][0]} channel(s), mean {d['mean']}, std {d['std']}; "
        f"{d['num_classes']} classes. Images of any size (up to {MAX_IMAGE_PIXELS:,} pixels) go through the "
        "model's own eval pipeline.",
    ]
    return "\n\n".join(lines)


def _index_slider(count: int, value: int, label: str, elem_id: str) -> gr.components.Component:
    """A slider over ``0..count - 1`` (a fixed number where there is only one: Gradio's slider needs a range)."""
    if count > 1:
        return gr.Slider(0, count - 1, value=value, step=1, label=label, elem_id=elem_id)
    return gr.Number(value=0, precision=0, label=f"{label} (the only one)", interactive=False, elem_id=elem_id)


def build_app(explorer: Explorer) -> gr.Blocks:
    """The Gradio ``Blocks`` of ``vision-attn app`` for ``explorer`` (not launched): the page and the ``/predict``
    and ``/explain`` API endpoints."""
    handlers = _Handlers(explorer)
    methods = explorer.methods
    if not methods:
        raise ValueError(f"no explain method applies to model {explorer.info.get('model_name')!r}: "
                         f"{explorer.unavailable}")  # fmt: skip
    default_method = "rollout" if "rollout" in methods else methods[0]
    targets = [("predicted class", PREDICTED)] + [
        (f"{i}: {explorer.class_name(i)}", str(i)) for i in range(explorer.num_classes)
    ]
    with gr.Blocks(title="vision-attn app", analytics_enabled=False, delete_cache=(600, 3600)) as demo:
        demo._vision_attn_handlers = handlers  # keeps the download folder alive as long as the app
        example = gr.State(None)
        gr.Markdown(_header(explorer))
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.Image(type="filepath", image_mode=None, sources=["upload", "clipboard"], format="png",
                                 label="image (upload, drop or paste)", elem_id="va-image")  # fmt: skip
                method = gr.Dropdown(methods, value=default_method, label="method", elem_id="va-method")
                target = gr.Dropdown(targets, value=PREDICTED, label="target class", elem_id="va-target")
                opacity = gr.Slider(0.0, 1.0, value=0.5, step=0.05, label="opacity", elem_id="va-opacity")
                with gr.Accordion("method options", open=False):
                    options = gr.Textbox(label="options (JSON object, e.g. {\"head_fusion\": \"max\"})", value="",
                                         elem_id="va-options")  # fmt: skip
                if explorer.unavailable:
                    gr.Markdown("Not available for this model: " + "; ".join(
                        f"`{name}` ({reason})" for name, reason in explorer.unavailable.items()))  # fmt: skip
            with gr.Column(scale=1):
                picture = gr.Image(label="map", format="png", interactive=False, elem_id="va-overlay")
                status = gr.Markdown(elem_id="va-status")
                details = gr.Markdown(elem_id="va-details")
            with gr.Column(scale=1):
                top5 = gr.Label(num_top_classes=5, label="top-5", elem_id="va-top5")
                downloads = gr.File(label="map (.npy, PNG) and overlay (PNG)", file_count="multiple",
                                    interactive=False, elem_id="va-downloads")  # fmt: skip
        gallery = None
        if explorer.examples:
            gallery = gr.Gallery(
                [(explorer.display(s), _true_name(explorer, s.label)) for s in explorer.examples],
                label=f"examples: {explorer.dataset} (object boxes in green); click one", columns=12,
                allow_preview=False, format="png", elem_id="va-examples", height=130, object_fit="contain",
            )  # fmt: skip
        token_outputs: list[Any] = []
        with gr.Tabs():
            if explorer.heads_per_layer:
                depth, heads = len(explorer.heads_per_layer), max(explorer.heads_per_layer)
                with gr.Tab("layers and heads"):
                    with gr.Row():
                        layer = _index_slider(depth, depth - 1, "layer", "va-layer")
                        head = _index_slider(heads, 0, "head", "va-head")
                        mean_heads = gr.Checkbox(value=False, label="mean of the heads", elem_id="va-mean-heads")
                        rollout_layer = _index_slider(depth, depth - 1, "rollout up to layer", "va-rollout-layer")
                    with gr.Row():
                        token_attention = gr.Image(label="raw attention (layer, head)", format="png",
                                                   interactive=False, elem_id="va-token-attention")  # fmt: skip
                        token_rollout = gr.Image(label="rollout (layers 0 to the chosen one)", format="png",
                                                 interactive=False, elem_id="va-token-rollout")  # fmt: skip
                    token_heads = gr.Gallery(label="every head of the layer", columns=max(heads, 6), format="png",
                                             allow_preview=False, elem_id="va-token-heads", height="auto")  # fmt: skip
                    token_status = gr.Markdown(elem_id="va-token-status")
                token_inputs = [image, example, layer, head, mean_heads, rollout_layer, opacity]
                token_outputs = [token_attention, token_rollout, token_heads, token_status]
            with gr.Tab("compare methods"):
                compare_methods = gr.CheckboxGroup(methods, value=methods[:COMPARED], label="methods",
                                                   elem_id="va-compare")  # fmt: skip
                compare_gallery = gr.Gallery(
                    label="side by side", columns=min(len(methods), 6), format="png", allow_preview=False,
                    elem_id="va-compare-gallery", height="auto",
                )  # fmt: skip
                compare_status = gr.Markdown(elem_id="va-compare-status")
        compare_inputs = [image, example, compare_methods, target, opacity]
        compare_outputs = [compare_gallery, compare_status]
        main_inputs = [image, example, method, target, opacity, options]
        main_outputs = [picture, top5, details, status, downloads]
        settings = [method, target, opacity, options]
        private = {"api_visibility": "private", "preprocess": False}  # images reach read_image undecoded

        def follow(event: Any) -> None:  # the token and compare views follow every new image or setting
            if token_outputs:
                event = event.then(handlers.tokens, token_inputs, token_outputs, **private)
            event.then(handlers.compare, compare_inputs, compare_outputs, **private)

        follow(image.input(handlers.upload, [image, *settings], [example, *main_outputs], **private))
        if gallery is not None:
            follow(gallery.select(handlers.pick_example, settings, [image, example, *main_outputs], **private))
        for control in (method, options):
            control.change(handlers.main, main_inputs, main_outputs, **private)
        target.change(handlers.main, main_inputs, main_outputs, **private).then(
            handlers.compare, compare_inputs, compare_outputs, **private
        )
        follow(opacity.release(handlers.main, main_inputs, main_outputs, **private))
        if token_outputs:
            for control in (layer, head, mean_heads, rollout_layer):
                control.change(handlers.tokens, token_inputs, token_outputs, **private)
        compare_methods.change(handlers.compare, compare_inputs, compare_outputs, **private)

        with gr.Column(visible=False):  # the API's own inputs and outputs (gradio_client reads their types)
            api_image = gr.Image(type="filepath", image_mode=None, label="image")
            api_method = gr.Textbox(value=default_method, label="method")
            api_target = gr.Number(value=None, precision=0, label="target")  # None: the predicted class
            api_options = gr.Textbox(value="", label="options")  # a JSON object of the method's options
            api_opacity = gr.Number(value=None, label="opacity")  # None: no overlay
            api_result = gr.JSON(label="prediction")
            api_npy = gr.File(label="map")  # .npy, float32 [H, W] in [0, 1]
            api_png = gr.File(label="overlay")  # PNG
            api_button = gr.Button("api")
        api = {"preprocess": False, "concurrency_limit": 4}
        api_button.click(handlers.api_predict, [api_image], [api_result], api_name="predict", **api)
        api_button.click(handlers.api_explain, [api_image, api_method, api_target, api_options, api_opacity],
                         [api_result, api_npy, api_png], api_name="explain", **api)  # fmt: skip
    demo.queue(default_concurrency_limit=2, max_size=64)
    return demo


def launch_app(
    explorer: Explorer,
    host: str = "127.0.0.1",
    port: int | None = None,
    auth: Sequence[tuple[str, str]] | None = None,
    quiet: bool = True,
) -> tuple[gr.Blocks, str]:
    """Build and start the app on ``host``:``port`` (``None``: Gradio's first free port from 7860) in a background
    thread; returns ``(blocks, url)``. ``auth``: ``(user, password)`` pairs for Gradio's login page. Never makes a
    share link; call ``blocks.close()`` to stop it."""
    demo = build_app(explorer)
    demo.launch(
        server_name=host, server_port=port, auth=list(auth) if auth else None, share=False, inbrowser=False,
        prevent_thread_lock=True, show_error=True, quiet=quiet, ssr_mode=False, max_file_size=MAX_UPLOAD_BYTES,
        footer_links=["api"], mcp_server=False, pwa=False, enable_monitoring=False,
    )  # fmt: skip
    shown = f"[{host}]" if ":" in host else host
    return demo, f"http://{shown}:{demo.server_port}/"
