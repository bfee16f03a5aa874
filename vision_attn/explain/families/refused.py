"""Hybrid CNN-transformers with global attention over a feature map (BoTNet, Visformer, FastViT), and the families the
token methods refuse, each with the reason.

A hybrid's attention layers attend over every position of a stage's feature map; they are read like a ViT's blocks on
that grid, and convolution stages between them (strided) merge each coarse position from its stride cell (the rule of
:mod:`~vision_attn.explain.families.windows`). The map lies on the first attention stage's grid (coarse: the earlier
stages are convolutions, which rollout does not follow).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from vision_attn.explain.families.base import FeatureLayout, Refused, register_adapter
from vision_attn.explain.families.windows import BlockInfo, HierarchicalAdapter

__all__: list[str] = []


def _nchw(module: nn.Module, args: tuple[Any, ...]) -> BlockInfo:
    x = args[0]
    return BlockInfo((int(x.shape[-2]), int(x.shape[-1])), [None])


def _hybrid_classes() -> dict[str, Any]:
    from timm.layers.bottleneck_attn import BottleneckAttn
    from timm.models import fastvit, visformer

    return {
        "blocks": {
            visformer.Attention: (_nchw, ("",)),
            fastvit.Attention: (_nchw, ("",)),
            BottleneckAttn: (_nchw, ("",)),
        }
    }


def _hybrid_layout(module: nn.Module) -> Any:
    from timm.layers.bottleneck_attn import BottleneckAttn

    if isinstance(module, BottleneckAttn):  # [B * heads, N, N]
        heads = module.num_heads
        return lambda probs, batch: probs.reshape(batch, heads, 1, *probs.shape[-2:])
    return "bhqk"


def _last_stage(model: nn.Module) -> tuple[nn.Module, FeatureLayout] | None:
    info = getattr(model, "feature_info", None)
    if not info:
        return None
    return model.get_submodule(info[-1]["module"]), FeatureLayout("nchw")


register_adapter(
    HierarchicalAdapter(
        "hybrid CNN + global attention",
        _hybrid_classes,
        layout=_hybrid_layout,
        embedding=lambda m: None,
        cam=_last_stage,
    )
)


def _classes(path: str, *names: str) -> Any:
    def load() -> tuple[type, ...]:
        import importlib

        try:
            module = importlib.import_module(path)
        except ImportError:
            return ()
        return tuple(getattr(module, n) for n in names if hasattr(module, n))

    return load


_NOT_YET = "not described yet (no adapter places its maps on the token grid); use a Grad-CAM method or attnlrp"
REFUSED = [
    ("CoaT", _classes("timm.models.coat", "FactorAttnConvRelPosEnc"),
     "factorized attention (a softmax over the tokens of each key channel, then kᵀv) has no token-to-token "
     "probabilities"),
    ("CrossViT", _classes("timm.models.crossvit", "MultiScaleBlock"),
     "two token branches of different patch sizes exchange information through their class tokens: the map has no "
     "single token grid"),
    ("EdgeNeXt", _classes("timm.models.edgenext", "CrossCovarianceAttn"),
     "its only attention is cross-covariance attention over channels, which moves nothing between tokens"),
    ("EfficientViT (MIT)", _classes("timm.models.efficientvit_mit", "LiteMLA"),
     "ReLU linear attention: no softmax probabilities between tokens"),
    ("MobileViT v2", _classes("timm.models.mobilevit", "LinearSelfAttention"),
     "separable linear self-attention: one context score per token, no token-to-token map"),
    ("SwiftFormer", _classes("timm.models.swiftformer", "EfficientAdditiveAttention"),
     "additive attention: one global query vector, no token-to-token map"),
    ("EfficientViM", _classes("timm.models.efficientvim", "HSMSSD"),
     "a hidden-state mixer (state-space model), not attention between tokens"),
    ("LambdaNet", _classes("timm.layers.lambda_layer", "LambdaLayer"),
     "lambda layers summarise the context into a linear map: no token-to-token attention"),
    ("HaloNet", _classes("timm.layers.halo_attn", "HaloAttn"),
     f"blocked local attention whose key windows (halos) overlap: {_NOT_YET}"),
    ("LeViT", _classes("timm.models.levit", "AttentionDownsample"),
     f"attention that subsamples its queries with no residual path: {_NOT_YET}"),
    ("VOLO", _classes("timm.models.volo", "OutlookAttention"),
     f"outlook attention (local maps folded back over overlapping windows): {_NOT_YET}"),
    ("ConViT", _classes("timm.models.convit", "GPSA"),
     f"gated positional self-attention (a content and a positional map mixed by a learned gate): {_NOT_YET}"),
    ("GC ViT", _classes("timm.models.gcvit", "WindowAttentionGlobal"),
     f"global query attention (queries from the whole image attend within windows): {_NOT_YET}"),
    ("EfficientViT (MSRA)", _classes("timm.models.efficientvit_msra", "CascadedGroupAttention"),
     f"cascaded group attention (each head attends over the previous head's output, in windows): {_NOT_YET}"),
    ("MobileViT", _classes("timm.models.mobilevit", "MobileVitBlock"),
     f"attention across unfolded patches at each pixel offset: {_NOT_YET}"),
    ("NesT", _classes("timm.models.nest", "NestLevel"),
     f"nested blocks aggregated by convolution and pooling: {_NOT_YET}"),
    ("Next-ViT", _classes("timm.models.nextvit", "EfficientAttention"),
     f"reduced-key attention on a hybrid: {_NOT_YET}"),
    ("MobileNetV5", _classes("timm.layers.attention2d", "MultiQueryAttention2d"),
     f"multi-query attention with downsampled keys in a CNN: {_NOT_YET}"),
    ("CPU-Bone", _classes("timm.models.cpubone", "ConvAttention"),
     f"convolutional attention on a downsampled map: {_NOT_YET}"),
    ("LowFormer", _classes("timm.models.lowformer", "ConvAttention"),
     f"convolutional attention on a downsampled map: {_NOT_YET}"),
    ("iFormer", _classes("timm.models.iformer", "SHMA"), f"single-head modulation attention: {_NOT_YET}"),
    ("SHViT", _classes("timm.models.shvit", "SHSA"), f"single-head attention on part of the channels: {_NOT_YET}"),
    ("CSATv2", _classes("timm.models.csatv2", "SpatialTransformerBlock"), f"hybrid spatial attention: {_NOT_YET}"),
    ("TinyViT", _classes("timm.models.tiny_vit", "TinyVitBlock"), f"window attention in a hybrid: {_NOT_YET}"),
    ("EfficientFormer", _classes("timm.models.efficientformer", "Attention"),
     f"global attention in the last stage of a hybrid: {_NOT_YET}"),
    ("EfficientFormer v2", _classes("timm.models.efficientformer_v2", "Attention2d", "Attention2dDownsample"),
     f"attention with downsampled queries in a hybrid: {_NOT_YET}"),
    ("MetaFormer (CAFormer)", _classes("timm.models.metaformer", "Attention"),
     f"attention stages of a MetaFormer hybrid: {_NOT_YET}"),
    ("ViTamin", _classes("timm.models.vitamin", "MbConvStages"), f"convolution stages then a ViT stage: {_NOT_YET}"),
    ("SAM2 Hiera", _classes("timm.models.hieradet_sam2", "MultiScaleAttention"),
     f"windowed attention with pooled queries on channels-last maps: {_NOT_YET}"),
]  # fmt: skip


def _coat_cam(model: nn.Module) -> tuple[nn.Module, FeatureLayout] | None:
    """CoaT-Lite: the last serial block's ``norm1`` (its head reads the class token only); CoaT with parallel blocks:
    the generic search."""
    if getattr(model, "parallel_blocks", None):
        return None
    return model.serial_blocks4[-1].norm1, FeatureLayout("tokens", 1)


CAMS = {"CoaT": _coat_cam}
NO_EMBEDDING = {"CrossViT"}  # two patch embeddings (one per branch): no single token grid to read relevance on

for family, classes, reason in REFUSED:
    embedding = (lambda model: None) if family in NO_EMBEDDING else None
    register_adapter(Refused(family, classes, reason, cam=CAMS.get(family), embedding=embedding))
