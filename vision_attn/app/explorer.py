"""The work behind ``vision-attn app``, without the browser: one opened model, its eval pipeline, the explain methods
that apply to it, and the pictures the page shows.

Everything is computed by the library the CLI and the evaluation use (:func:`~vision_attn.data.prepare_images`,
:func:`~vision_attn.explain.runner.predict`, :func:`~vision_attn.explain.runner.explain_batches`,
:func:`~vision_attn.explain.runner.score_maps`, :func:`~vision_attn.explain.capture_token_attention`), so the app
shows exactly what ``vision-attn explain`` writes. One lock serializes the model: requests that arrive together run
it one after the other (capturing attention hooks the model), while decoding and drawing run side by side.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn

from vision_attn._data_config import resolve_data_config
from vision_attn.data.images import load_dataset_images
from vision_attn.data.preprocess import MAX_IMAGE_PIXELS, ImageLike, prepare_images
from vision_attn.explain._common import NotApplicableError, normalize_maps, upsample_maps
from vision_attn.explain.plot import overlay, to_display_image
from vision_attn.explain.registry import applicable_methods, get_method
from vision_attn.explain.rollout import attention_rollout, tokens_to_grid
from vision_attn.explain.runner import explain_batches, predict, score_maps
from vision_attn.explain.tokens import capture_token_attention
from vision_attn.models import load_model

__all__ = ["BOX_SCORES", "MAX_IMAGE_PIXELS", "Explorer", "Subject", "TokenMaps", "parse_options"]

BOX_SCORES = ("pointing_game", "energy_pointing")  # the scores a picture with an object box gets
DISPLAY_SIZE = 256  # pictures smaller than this are enlarged (nearest neighbour) so the page shows their pixels


@dataclass
class Subject:
    """One image as the model sees it: ``images`` ``[1, C, H, W]`` (through the eval pipeline), a file-safe
    ``name``, the object ``box`` ``[4]`` in input pixels (dataset examples; NaN where the crop removed it) and the
    true ``label``."""

    images: torch.Tensor
    name: str
    box: torch.Tensor | None = None
    label: int | None = None

    @property
    def has_box(self) -> bool:
        """Whether the image has an object box inside the model input (so box scores can be computed)."""
        return self.box is not None and bool(torch.isfinite(self.box).all())


@dataclass
class TokenMaps:
    """A token model's raw attention for one image, each map ``[H, W]`` float32 in [0, 1] at the input size:
    ``attention`` of ``layer`` (``head``, or the heads' mean for ``None``), ``rollout`` through layers
    ``0..rollout_layer``, and ``heads`` (one map per head of ``layer``)."""

    layer: int
    head: int | None
    rollout_layer: int
    attention: np.ndarray
    rollout: np.ndarray
    heads: list[np.ndarray]


def _check_index(value: Any, name: str, size: int, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < size:
        raise ValueError(f"{name} {value!r} is out of range: {what} has {size} (0 to {size - 1})")
    return value


class Explorer:
    """A model opened for exploration: ``model`` (eval mode, on ``device``) with the ``info`` that
    :func:`~vision_attn.models.load_model` returned, its eval ``data_config``, the explain ``methods`` that apply
    (``{name: ''}``, and ``unavailable`` ``{name: reason}``), and ``examples``: the first ``num_examples`` images
    of ``dataset`` (``'cluttered_fashion_mnist[:test|train]'``; ``None`` for none) with their boxes."""

    def __init__(
        self,
        model: nn.Module,
        info: Mapping[str, Any],
        device: str | torch.device = "cpu",
        dataset: str | None = "cluttered_fashion_mnist:test",
        num_examples: int = 24,
        cmap: str = "jet",
    ) -> None:
        from matplotlib import colormaps

        if cmap not in colormaps:
            raise ValueError(f"cmap {cmap!r} is not a matplotlib colormap (e.g. jet, viridis, inferno)")
        if not isinstance(num_examples, int) or isinstance(num_examples, bool) or num_examples < 0:
            raise ValueError(f"num_examples must be an int >= 0, got {num_examples!r}")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.info = dict(info)
        self.data_config = resolve_data_config(model, info)
        self.cmap = cmap
        self.class_names = [str(n) for n in (info.get("class_names") or [])]
        reasons = applicable_methods(model)
        self.methods = [name for name, reason in reasons.items() if not reason]
        self.unavailable = {name: reason for name, reason in reasons.items() if reason}
        self._lock = threading.Lock()
        channels, height, width = self.data_config["input_size"]
        probe = torch.zeros(1, channels, height, width)
        self.num_classes = int(self._predict(probe).shape[0])
        self.heads_per_layer: list[int] = []
        if "attention" in self.methods or "rollout" in self.methods:  # a token model: its layers and heads
            with self._lock:
                tokens = capture_token_attention(self.model, probe.to(self.device))
            self.heads_per_layer = [int(a.shape[1]) for a in tokens.attentions]
        self.examples: list[Subject] = []
        if dataset is not None and num_examples > 0:
            prepared, names, labels = load_dataset_images(dataset, num_examples, self.data_config)
            self.examples = [
                Subject(prepared.images[i : i + 1], names[i], prepared.boxes[i], int(labels[i]))
                for i in range(len(names))
            ]
        self.dataset = dataset if self.examples else None

    @classmethod
    def open(
        cls,
        checkpoint: str | os.PathLike | None = None,
        model_name: str | None = None,
        weights: str | os.PathLike | None = None,
        model_args: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> Explorer:
        """An :class:`Explorer` of the model :func:`~vision_attn.models.load_model` opens (a checkpoint, an export
        folder, or a model name with optional bare weights); ``kwargs`` go to :class:`Explorer`."""
        model, info = load_model(checkpoint, model_name, weights, model_args)
        return cls(model, info, **kwargs)

    # -- inputs --------------------------------------------------------------------------------------------------

    def prepare(self, image: ImageLike, name: str = "image") -> Subject:
        """``image`` (a file path, a PIL image or a uint8 array; any size, grey, RGB or RGBA) through the model's
        eval pipeline; a ``ValueError`` names the file when it is not an image, is damaged or has more than
        :data:`MAX_IMAGE_PIXELS` pixels."""
        names = None if isinstance(image, (str, os.PathLike)) else [name]
        prepared = prepare_images([image], self.data_config, names=names)
        return Subject(prepared.images, _safe_name(name))

    def example(self, index: int) -> Subject:
        """The ``index``-th dataset example (with its box and true label)."""
        _check_index(index, "example", len(self.examples), "the example list")
        return self.examples[index]

    # -- the model -----------------------------------------------------------------------------------------------

    def _predict(self, images: torch.Tensor) -> torch.Tensor:
        with self._lock:
            return predict(self.model, images.to(self.device))[0].cpu()

    def class_name(self, index: int) -> str:
        """The name of class ``index`` (``'class 3'`` where the model has no class names)."""
        return self.class_names[index] if index < len(self.class_names) else f"class {index}"

    def _top(self, probs: torch.Tensor, k: int) -> dict[str, Any]:
        values, indices = probs.topk(min(k, probs.shape[0]))
        top = [
            {"class": int(i), "name": self.class_name(int(i)), "probability": float(p)}
            for p, i in zip(values, indices, strict=True)
        ]
        return {"prediction": top[0]["class"], "class_name": top[0]["name"], "probability": top[0]["probability"],
                "top": top}  # fmt: skip

    def prediction(self, subject: Subject, k: int = 5) -> dict[str, Any]:
        """The model's answer for ``subject``: ``{'prediction': int, 'class_name', 'probability', 'top':
        [{'class', 'name', 'probability'}, ...]}`` for the ``k`` most probable classes."""
        return self._top(self._predict(subject.images), k)

    def check_target(self, target: int | None) -> int | None:
        """``target`` if it is ``None`` (the predicted class) or a class index of the model, else a ``ValueError``."""
        if target is None:
            return None
        return _check_index(target, "target", self.num_classes, f"model {self.info.get('model_name')!r}")

    def explain(
        self, subject: Subject, method: str, target: int | None = None, options: Mapping[str, Any] | None = None
    ) -> np.ndarray:
        """The map of ``method`` for ``subject``, ``[H, W]`` float32 in [0, 1] at the model's input size: exactly
        :func:`~vision_attn.explain.explain` of ``subject.images`` (``target``: ``None`` = the predicted class).
        A method that does not apply raises :class:`~vision_attn.explain.NotApplicableError` with the reason."""
        return self.explain_with_prediction(subject, method, target, options, predict_too=False)[1]

    def explain_with_prediction(
        self,
        subject: Subject,
        method: str,
        target: int | None = None,
        options: Mapping[str, Any] | None = None,
        k: int = 5,
        predict_too: bool = True,
    ) -> tuple[dict[str, Any] | None, np.ndarray]:
        """``(prediction, map)``: :meth:`prediction` (``k`` classes) and :meth:`explain` of ``subject`` from one run
        of the method: the model's output on the image is read from the method's own forward pass where it makes
        one, so the prediction costs no second pass (``predict_too=False``: ``(None, map)``)."""
        if method in self.unavailable:
            raise NotApplicableError(f"method {method!r} does not apply to this model: {self.unavailable[method]}")
        get_method(method)  # an unknown name is a ValueError listing the registered ones
        target = self.check_target(target)
        images = subject.images.to(self.device)
        with self._lock, _output_on(self.model, images) as outputs:
            maps = explain_batches(self.model, images, method, target, 1, **dict(options or {}))
            result = None
            if predict_too:
                probs = outputs[0].float().softmax(dim=-1)[0] if outputs else predict(self.model, images)[0]
                result = self._top(probs.cpu(), k)
        return result, maps[0].float().cpu().numpy()

    def scores(self, subject: Subject, saliency: np.ndarray) -> dict[str, float]:
        """Pointing game and energy in box of ``saliency`` ``[H, W]`` against ``subject``'s box (``{}`` without one)."""
        if not subject.has_box:
            return {}
        maps = torch.from_numpy(np.asarray(saliency, dtype=np.float32))[None]
        scores = score_maps(self.model, subject.images, maps, subject.box[None], scores=BOX_SCORES, steps=0)
        return {name: float(value[0]) for name, value in scores.items()}

    def token_maps(self, subject: Subject, layer: int, head: int | None = None, rollout_layer: int = -1) -> TokenMaps:
        """Raw attention of one ``layer`` and ``head`` (``None``: mean of its heads), the rollout through layers
        ``0..rollout_layer`` (``-1``: all, what the ``rollout`` method gives) and every head of ``layer``, read at
        the tokens the model's head pools (as the ``attention`` and ``rollout`` methods read them)."""
        if not self.heads_per_layer:
            raise NotApplicableError(self.unavailable.get("attention") or "this model has no token attention")
        depth = len(self.heads_per_layer)
        layer = _check_index(layer, "layer", depth, "the model's attention layer list")
        rollout_layer = depth - 1 if rollout_layer == -1 else rollout_layer
        rollout_layer = _check_index(rollout_layer, "rollout_layer", depth, "the model's attention layer list")
        if head is not None:
            head = _check_index(head, "head", self.heads_per_layer[layer], f"layer {layer}'s head list")
        with self._lock:
            tokens = capture_token_attention(self.model, subject.images.to(self.device))
        prefix, grid, readout = tokens.num_prefix_tokens, tokens.grid, tokens.readout
        attn = tokens.attentions[layer].float()  # 1, heads, N, N
        raw = [tokens_to_grid(attn.mean(1) if head is None else attn[:, head], prefix, grid, readout)]
        through = tokens.attentions[: rollout_layer + 1]
        raw.append(attention_rollout(through, prefix, grid_size=grid, pool_weights=readout))
        raw += [tokens_to_grid(attn[:, h], prefix, grid, readout) for h in range(attn.shape[1])]
        size = tuple(subject.images.shape[-2:])
        maps = [normalize_maps(upsample_maps(m.cpu(), size))[0].numpy() for m in raw]
        return TokenMaps(layer, head, rollout_layer, maps[0], maps[1], maps[2:])

    # -- pictures ------------------------------------------------------------------------------------------------

    def display(
        self, subject: Subject, saliency: np.ndarray | None = None, alpha: float = 0.5, enlarge: bool = True
    ) -> np.ndarray:
        """``subject`` as the model sees it (``uint8 [H', W', 3]``; with ``enlarge``, at least 256 px by whole-pixel
        repetition), with ``saliency`` ``[H, W]`` blended over it at opacity ``alpha`` and the object box outlined
        where it has one."""
        image = subject.images[0].cpu()
        mean, std = self.data_config["mean"], self.data_config["std"]
        if saliency is None:
            rgb = to_display_image(image, mean, std)
        else:
            heat = torch.from_numpy(np.asarray(saliency, dtype=np.float32))
            rgb = overlay(image, heat, cmap=self.cmap, alpha=float(alpha), mean=mean, std=std)
        pixels = (np.clip(rgb, 0, 1) * 255).round().astype(np.uint8)
        scale = max(1, math.ceil(DISPLAY_SIZE / max(pixels.shape[:2]))) if enlarge else 1
        pixels = pixels.repeat(scale, 0).repeat(scale, 1)
        if subject.has_box:
            picture = Image.fromarray(pixels)
            x0, y0, x1, y1 = (float(v) * scale for v in subject.box)
            ImageDraw.Draw(picture).rectangle((x0, y0, x1 - 1, y1 - 1), outline=(0, 255, 0), width=max(1, scale // 2))
            pixels = np.asarray(picture)
        return pixels

    def describe(self) -> dict[str, Any]:
        """What the app shows about the model: name, source, input size, classes, methods (and why others do not
        apply), token layers and heads, examples; JSON-ready."""
        info = self.info
        return {
            "model_name": info.get("model_name"),
            "source": info.get("source"),
            "path": info.get("path"),
            "weights": info.get("weights"),
            "input_size": list(self.data_config["input_size"]),
            "mean": list(self.data_config["mean"]),
            "std": list(self.data_config["std"]),
            "num_classes": self.num_classes,
            "class_names": self.class_names or None,
            "methods": self.methods,
            "unavailable": self.unavailable,
            "heads_per_layer": self.heads_per_layer,
            "dataset": self.dataset,
            "examples": len(self.examples),
        }


@contextlib.contextmanager
def _output_on(model: nn.Module, images: torch.Tensor) -> Iterator[list[torch.Tensor]]:
    """Collect (detached) what ``model`` returns when it is called on ``images`` itself (the same memory, not a
    perturbed copy) while the block runs; the hook is removed afterwards."""
    outputs: list[torch.Tensor] = []

    def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        given = args[0] if args else None
        if (
            not outputs
            and isinstance(given, torch.Tensor)
            and isinstance(output, torch.Tensor)
            and given.shape == images.shape
            and given.data_ptr() == images.data_ptr()
        ):
            outputs.append(output.detach())

    handle = model.register_forward_hook(hook)
    try:
        yield outputs
    finally:
        handle.remove()


def _safe_name(name: str) -> str:
    stem = os.path.splitext(os.path.basename(str(name)))[0]
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in stem)[:80] or "image"


def parse_options(text: str | Mapping[str, Any] | None, method: str) -> dict[str, Any]:
    """``text`` (a JSON object of ``method``'s options, e.g. ``'{"head_fusion": "max"}'``; empty = none) as a dict;
    a ``ValueError``/``TypeError`` names what is wrong and the options ``method`` accepts."""
    if text is None or (isinstance(text, str) and not text.strip()):
        return {}
    if isinstance(text, Mapping):
        options = dict(text)
    else:
        try:
            options = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"options {text!r} is not JSON ({err}); expected an object such as "
                             '{"head_fusion": "max"}') from err  # fmt: skip
    if not isinstance(options, dict):
        raise ValueError(f"options must be a JSON object of {method!r}'s options, got {text!r}")
    get_method(method).check_options(options)
    return options
