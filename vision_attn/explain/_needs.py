"""Checks of what a method needs of a model (:data:`vision_attn.explain.registry.NEEDS`), from its modules alone."""

from __future__ import annotations

from torch import nn

from vision_attn.explain._common import NotApplicableError
from vision_attn.explain.capture import AttentionRecorder
from vision_attn.explain.tokens import token_attention_problem

__all__ = ["unmet_need"]


def unmet_need(need: str, model: nn.Module, method: str) -> str:
    """Why ``model`` lacks ``need`` of ``method`` (``''`` when it has it, as far as can be told without running it)."""
    if need == "token_attention":
        return token_attention_problem(model)
    if need == "token_embeddings":
        from vision_attn.explain.lrp import embedding_module

        try:
            embedding_module(model)
        except NotApplicableError as err:
            return f"{err} ({method!r} reads relevance there)"
        return ""
    if need == "captum":
        import importlib.util

        if importlib.util.find_spec("captum") is None:
            return f"method {method!r} runs captum, which is not installed: pip install 'vision_attn[references]'"
        return ""
    if need == "spatial_attention":
        recorder = AttentionRecorder(model)
        kinds = {kind for name, kind in recorder.kinds.items() if name not in recorder.token_names}
        if not kinds & {"spatial", "attention"}:
            return (
                f"model {type(model).__name__} has no spatial attention maps (AttentionTap kind 'spatial' or conv "
                f"attention 'attention'); found kinds {sorted(set(recorder.kinds.values()))}"
            )
        return ""
    if need == "class_target" and getattr(model, "num_classes", None) == 0:
        return (
            f"method {method!r} explains a class logit, but model {type(model).__name__} has num_classes=0 (no "
            "classifier head: it returns features); build it with num_classes > 0 or use a class-agnostic method "
            "such as 'rollout'"
        )
    return ""
