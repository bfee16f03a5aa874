"""The explain methods, by name: :func:`register_method` (also a decorator), :func:`list_methods`,
:func:`get_method` and :func:`applicable_methods`, in the spirit of timm's ``register_model`` / ``list_models``.

A method is a callable ``fn(model, images, target=None, **options) -> maps [B, h, w]`` at any resolution
(:func:`vision_attn.explain.explain` upsamples and scales them). It declares what it needs of a model (:data:`NEEDS`)
and its options (by default its keyword parameters), so ``explain()``, ``vision-attn explain --method``, the map
evaluation and the docs' method list all read this one registry. Each built-in method lives in one module of
:mod:`vision_attn.explain.methods` and registers itself; user code registers its own the same way (the CLI loads
such a module with ``--plugin``).
"""

from __future__ import annotations

import fnmatch
import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = [
    "NEEDS",
    "ExplainMethod",
    "applicable_methods",
    "get_method",
    "list_methods",
    "methods_markdown",
    "register_method",
]

MethodFn = Callable[..., torch.Tensor]

# what a method may need of a model; each is checked before the method runs
NEEDS = {
    "token_attention": "a ViT-style model: token attention the recorder captures, read at the tokens its head pools",
    "token_embeddings": "token embeddings on a grid: a patch_embed module, where relevance is read",
    "class_target": "a classifier head (num_classes > 0): the method explains one class logit",
    "feature_layer": "a layer with a spatial feature map, or tokens on a known grid (Grad-CAM's target layer)",
    "captum": "the captum package (an optional extra: pip install 'vision_attn[references]')",
    "spatial_attention": "attention CNN modules that compute spatial maps (gates, or attention over positions)",
}
_FIXED_PARAMS = ("model", "images", "target")


@dataclass(frozen=True)
class ExplainMethod:
    """A registered method: ``fn(model, images, target=None, **options) -> [B, h, w]``, what it ``needs`` (keys of
    :data:`NEEDS`), the ``options`` it accepts, a one-line ``description`` and the ``reference`` it follows."""

    name: str
    fn: MethodFn
    needs: frozenset[str]
    options: tuple[str, ...]
    description: str
    reference: str

    @property
    def class_specific(self) -> bool:
        """Whether the map explains one class (the ``target``), not the model's input as a whole."""
        return "class_target" in self.needs

    def check_options(self, options: dict[str, Any]) -> None:
        """Raise a ``TypeError`` naming the options this method does not accept."""
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            raise TypeError(
                f"explain(method={self.name!r}) got unknown options {unknown}; it accepts {list(self.options)}"
            )

    def reason_not_applicable(self, model: nn.Module) -> str:
        """Why this method cannot explain ``model`` (``''`` when it can, as far as can be told without running it)."""
        from vision_attn.explain._needs import unmet_need

        for need in sorted(self.needs):
            reason = unmet_need(need, model, self.name)
            if reason:
                return reason
        return ""


_METHODS: dict[str, ExplainMethod] = {}


def _options_of(fn: MethodFn) -> tuple[str, ...]:
    """The keyword parameters of ``fn`` after ``(model, images, target)``."""
    params = list(inspect.signature(fn).parameters.values())
    names = [p.name for p in params[:3]]
    if tuple(names) != _FIXED_PARAMS or params[2].default is not None:
        raise TypeError(
            f"an explain method must be fn(model, images, target=None, **options); {getattr(fn, '__name__', fn)!r} "
            f"takes ({', '.join(p.name for p in params)})"
        )
    return tuple(p.name for p in params[3:] if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


def register_method(
    name: str,
    fn: MethodFn | None = None,
    *,
    needs: Iterable[str] = (),
    options: Iterable[str] | None = None,
    description: str = "",
    reference: str = "",
    overwrite: bool = False,
) -> Any:
    """Register ``fn`` as the explain method ``name``; returns ``fn``. Without ``fn``, returns a decorator.

    ``fn(model, images, target=None, **options)`` gets the unwrapped model in eval mode and ``images`` ``[B, C, H,
    W]`` on its device, and returns maps ``[B, h, w]`` (any resolution; higher = more relevant). ``needs``: keys of
    :data:`NEEDS`; ``options``: the option names it accepts (default: its keyword parameters after ``target``).
    Registering a taken name is a ``ValueError`` unless ``overwrite=True``.
    """
    if not isinstance(name, str) or not name or ":" in name or any(c.isspace() for c in name):
        raise ValueError(f"method name must be a non-empty string without ':' or spaces, got {name!r}")
    needs = frozenset(needs)
    unknown = sorted(needs - set(NEEDS))
    if unknown:
        raise ValueError(f"needs {unknown} are unknown; a method can need {sorted(NEEDS)}")

    def register(function: MethodFn) -> MethodFn:
        if not callable(function):
            raise TypeError(f"method {name!r} must be callable, got {type(function).__name__}")
        if name in _METHODS and not overwrite:
            raise ValueError(f"explain method {name!r} is already registered; pass overwrite=True to replace it")
        accepted = tuple(options) if options is not None else _options_of(function)
        doc = (inspect.getdoc(function) or "").split("\n", 1)[0]
        _METHODS[name] = ExplainMethod(name, function, needs, accepted, description or doc, reference)
        return function

    return register if fn is None else register(fn)


def list_methods(pattern: str = "*") -> list[str]:
    """Names of the registered methods matching the wildcard ``pattern``, in registration order."""
    return [name for name in _METHODS if fnmatch.fnmatch(name, pattern)]


def get_method(name: str) -> ExplainMethod:
    """The registered method ``name``; a ``ValueError`` lists the registered ones."""
    if name not in _METHODS:
        raise ValueError(f"method {name!r} is unknown; expected one of {tuple(_METHODS)}")
    return _METHODS[name]


def applicable_methods(model: nn.Module) -> dict[str, str]:
    """``{method: ''}`` for every registered method that applies to ``model`` and ``{method: reason}`` for the rest,
    as far as can be told from the model without running it (a method may still refuse at run time)."""
    from vision_attn.explain._common import unwrap_model

    model = unwrap_model(model)
    return {name: method.reason_not_applicable(model) for name, method in _METHODS.items()}


def methods_markdown() -> str:
    """The registered methods as a markdown table (name, what it needs, options, what it shows, reference)."""
    lines = ["| method | needs | options | what it shows | reference |", "|---|---|---|---|---|"]
    for method in _METHODS.values():
        needs = ", ".join(sorted(method.needs)) or "—"
        options = ", ".join(f"`{o}`" for o in method.options) or "—"
        lines.append(f"| `{method.name}` | {needs} | {options} | {method.description} | {method.reference or '—'} |")
    return "\n".join(lines)
