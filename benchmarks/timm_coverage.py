"""Which explain method maps which timm attention family: one small config of every attention family the installed
timm registers (random init, no weights, CPU), every registered method run on a batch of two images, and the family x
method table (supported / refused with the reason) written into docs/explain.md.

A method *supports* a family when it returns a map that is not constant for every image; it *refuses* it with
:class:`~vision_attn.explain.NotApplicableError`, whose reason the table shows. Anything else (another exception, a
constant map) is a failure: the script exits 1 and ``tests/test_families.py`` runs the same sweep. Random-init
weights that are exactly zero (zero-initialised classifier heads, post-norm scales) or tiny (LayerScale gammas) are
raised first, so that the random model's gradients do not vanish (:func:`liven`).

:data:`FAMILIES` has one entry per attention family; :data:`NOT_ATTENTION` lists every other model module of the
installed timm with why it has no attention maps (CNNs, MLPs, state-space models, channel gates), so that a timm that
adds a module makes :func:`unlisted_modules` name it.

Usage::

    python benchmarks/timm_coverage.py                 # prints the table (a few minutes on 2 cores)
    python benchmarks/timm_coverage.py --family swin   # one family (a substring of the family names)
    python benchmarks/timm_coverage.py --write-docs    # also rewrites the timm_coverage block of docs/explain.md
"""

from __future__ import annotations

import argparse
import re
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

import vision_attn  # noqa: F401  (registers our models with timm: the 'vit' and 'resnet_attn' modules)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

__all__ = ["FAMILIES", "NOT_ATTENTION", "Family", "liven", "run_family", "sweep", "table", "unlisted_modules"]


@dataclass(frozen=True)
class Family:
    """A small config of one timm family: ``build() -> model`` (random init, 3 classes), its image size, and the seed
    of its random init. Before an average-pooled linear head, Grad-CAM++ and LayerCAM weigh channels by positive
    gradients only, so their map is ``relu(sum_c w_c+ a_c)``; at random init (and with noise images, on which a
    CNN's features are nearly the same at every position) whether that is positive anywhere is chance; a few hybrid
    families take the seed of an init where it is."""

    module: str
    build: Callable[[], nn.Module]
    size: int = 32
    seed: int = 0


def _timm(name: str, **kwargs: Any) -> Callable[[], nn.Module]:
    return lambda: timm.create_model(name, pretrained=False, num_classes=3, **kwargs)


def _mvit(**cfg: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from timm.models import mvitv2

        pool = "token" if cfg.get("use_cls_token") else "avg"
        config = mvitv2.MultiScaleVitCfg(depths=(1, 1, 1, 1), embed_dim=16, num_heads=1, **cfg)
        return mvitv2.MultiScaleVit(cfg=config, img_size=64, num_classes=3, global_pool=pool)

    return build


_VIT = dict(img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=2)
_SWIN = dict(img_size=32, window_size=4, embed_dim=24, depths=(2, 2), num_heads=(1, 2))
_STAGES = dict(depths=(1, 1, 1, 1), embed_dims=(16, 32, 64, 128), num_heads=(1, 2, 4, 8))

# family -> config; the first column of the table
FAMILIES: dict[str, Family] = {
    "ViT (class token)": Family("vision_transformer", _timm("vit_tiny_patch16_224", **_VIT)),
    "ViT + registers, avg pool": Family(
        "vision_transformer", _timm("vit_tiny_patch16_224", **_VIT, reg_tokens=4, global_pool="avg")
    ),
    "SigLIP (attention pool 'map')": Family("vision_transformer", _timm("vit_base_patch16_siglip_224", **_VIT)),
    "DeiT distilled": Family("deit", _timm("deit_tiny_distilled_patch16_224", **_VIT)),
    "DeiT-III": Family("deit", _timm("deit3_small_patch16_224", **_VIT)),
    "BEiT": Family("beit", _timm("beit_base_patch16_224", **_VIT)),
    "EVA-02": Family(
        "eva", _timm("eva02_tiny_patch14_224", img_size=28, patch_size=7, depth=2, embed_dim=48, num_heads=2), 28
    ),
    "Perception Encoder (EVA, 'map')": Family(
        "eva", _timm("vit_pe_core_tiny_patch16_384", img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=2)
    ),
    "NaFlexViT": Family("naflexvit", _timm("naflexvit_base_patch16_gap", **_VIT)),
    "ViT relpos": Family("vision_transformer_relpos", _timm("vit_relpos_small_patch16_224", **_VIT)),
    "ViT hybrid (ResNet stem)": Family(
        "vision_transformer_hybrid", _timm("vit_tiny_r_s16_p8_224", img_size=64, depth=2), 64
    ),
    "SAM ViT (windows + global)": Family(
        "vision_transformer_sam",
        _timm(
            "samvit_base_patch16",
            img_size=64,
            patch_size=8,
            depth=2,
            embed_dim=48,
            num_heads=2,
            window_size=4,
            global_attn_indexes=(1,),
            use_rel_pos=False,
        ),
        64,
    ),
    "CaiT": Family(
        "cait",
        _timm("cait_xxs24_224", img_size=32, patch_size=8, depth=2, depth_token_only=1, embed_dim=48, num_heads=2),
    ),
    "XCiT": Family(
        "xcit", _timm("xcit_nano_12_p16_224", img_size=32, depth=2, embed_dim=48, num_heads=2, cls_attn_layers=1)
    ),
    "TNT": Family(
        "tnt",
        _timm(
            "tnt_s_patch16_224", img_size=32, depth=2, embed_dim=48, inner_dim=12, num_heads_outer=2, num_heads_inner=2
        ),
    ),
    "PiT": Family(
        "pit",
        _timm(
            "pit_ti_224", img_size=64, patch_size=8, stride=4, depth=(1, 1, 1), heads=(1, 2, 4), base_dims=(16, 16, 16)
        ),
        64,
    ),
    "Twins-SVT": Family(
        "twins", _timm("twins_svt_small", img_size=64, wss=(2, 2, 2, 2), sr_ratios=(4, 2, 1, 1), **_STAGES), 64
    ),
    "Twins-PCPVT": Family("twins", _timm("twins_pcpvt_small", img_size=128, sr_ratios=(8, 4, 2, 1), **_STAGES), 128),
    "PVT v2": Family("pvt_v2", _timm("pvt_v2_b0", depths=(1, 1, 1, 1)), 64),
    "PVT v2 linear": Family("pvt_v2", _timm("pvt_v2_b2_li", **_STAGES), 64),
    "Swin": Family("swin_transformer", _timm("swin_tiny_patch4_window7_224", **_SWIN)),
    "Swin v2": Family("swin_transformer_v2", _timm("swinv2_tiny_window8_256", **_SWIN)),
    "Swin v2 CR": Family("swin_transformer_v2_cr", _timm("swinv2_cr_tiny_224", **{**_SWIN, "img_size": (32, 32)})),
    "MaxViT": Family("maxxvit", _timm("maxvit_tiny_tf_224", img_size=64), 64),
    "CoAtNet": Family("maxxvit", _timm("coatnet_pico_rw_224", img_size=128), 128),
    "DaViT": Family("davit", _timm("davit_tiny", window_size=2, **_STAGES), 64),
    "MViTv2": Family("mvitv2", _mvit(), 64),
    "MViTv2 (class token)": Family("mvitv2", _mvit(use_cls_token=True), 64),
    "Hiera": Family("hiera", _timm("hiera_tiny_224", img_size=64, embed_dim=16, num_heads=1, stages=(1, 1, 1, 1)), 64),
    "vision_attn ViT": Family("vit", _timm("va_vit_tiny_patch4_32", depth=2)),
    "vision_attn CCT (sequence pool)": Family("vit", _timm("va_cct_2_3x2_32"), seed=1),
    "vision_attn ResNet + BoT": Family("resnet_attn", _timm("va_resnet18_bot_32")),
    "vision_attn ResNet + CBAM": Family("resnet_attn", _timm("va_resnet18_cbam_32"), 64),
    "BoTNet": Family("byoanet", _timm("botnet26t_256", img_size=128), 128),
    "HaloNet": Family("byoanet", _timm("halonet26t"), 256),
    "LambdaNet": Family("byoanet", _timm("lambda_resnet26t", img_size=128), 128),
    "Visformer": Family("visformer", _timm("visformer_tiny"), 224),
    "FastViT": Family("fastvit", _timm("fastvit_sa12"), 128),
    "DeepSeek ViT": Family("deepseek_vit", _timm("deepseek_vit_412m", **_VIT)),
    "Gemma 4 ViT": Family("gemma4_vit", _timm("gemma4_vit_167m", **_VIT)),
    "Qwen3 ViT": Family("qwen3_vit", _timm("qwen3_vit_88m", **_VIT)),
    "Qwen3 ViT (merger)": Family("qwen3_vit", _timm("qwen3_vit_88m_merge", **_VIT)),
    "CoaT": Family("coat", _timm("coat_lite_tiny", img_size=224), 224),
    "ConViT": Family("convit", _timm("convit_tiny", **_VIT, local_up_to_layer=1), 32),
    "CPU-Bone": Family("cpubone", _timm("cpubone_nano"), 224, seed=1),
    "CrossViT": Family("crossvit", _timm("crossvit_tiny_240", img_size=(240, 240)), 240),
    "CSATv2": Family("csatv2", _timm("csatv2"), 224),
    "EdgeNeXt": Family("edgenext", _timm("edgenext_xx_small"), 224),
    "EfficientFormer": Family("efficientformer", _timm("efficientformer_l1", img_size=224), 224, seed=2),
    "EfficientFormer v2": Family("efficientformer_v2", _timm("efficientformerv2_s0", img_size=224), 224),
    "EfficientViM": Family("efficientvim", _timm("efficientvim_m1"), 224),
    "EfficientViT (MIT)": Family("efficientvit_mit", _timm("efficientvit_b0"), 224),
    "EfficientViT (MSRA)": Family("efficientvit_msra", _timm("efficientvit_m0", img_size=224), 224),
    "GC ViT": Family("gcvit", _timm("gcvit_xxtiny", img_size=224), 224),
    "iFormer": Family("iformer", _timm("iformer_t"), 224),
    "LeViT": Family("levit", _timm("levit_128s", img_size=224), 224),
    "LowFormer": Family("lowformer", _timm("lowformer_b0"), 224, seed=2),
    "CAFormer (MetaFormer)": Family("metaformer", _timm("caformer_s18"), 224),
    "MobileNetV5": Family("mobilenetv5", _timm("mobilenetv5_base"), 256),
    "MobileViT": Family("mobilevit", _timm("mobilevit_xxs"), 224),
    "MobileViT v2": Family("mobilevit", _timm("mobilevitv2_050"), 224),
    "NesT": Family("nest", _timm("nest_tiny", img_size=32, patch_size=2), 32),
    "Next-ViT": Family("nextvit", _timm("nextvit_small"), 224),
    "SAM2 Hiera": Family("hieradet_sam2", _timm("sam2_hiera_tiny"), 128),
    "SHViT": Family("shvit", _timm("shvit_s1"), 224),
    "SwiftFormer": Family("swiftformer", _timm("swiftformer_xs"), 224),
    "TinyViT": Family("tiny_vit", _timm("tiny_vit_5m_224"), 224),
    "ViTamin": Family("vitamin", _timm("vitamin_small_224", img_size=224), 224),
    "VOLO": Family("volo", _timm("volo_d1_224", img_size=224), 224, seed=1),
}


def liven(model: nn.Module, seed: int = 0) -> nn.Module:
    """Raise random-init weights that would make gradients vanish: an all-zero or tiny weight matrix (a zero- or
    1e-3-scaled classifier head) gets random values (std 0.02); an all-zero or tiny 1-D scale (LayerScale gammas at
    1e-5, Swin v2's post-norm weights at 0) becomes 1. Biases are left as they are. Returns ``model``."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim >= 2 and param.abs().max() < 1e-3:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
            elif param.ndim == 1 and not name.endswith("bias") and param.numel() > 0 and param.abs().max() < 1e-3:
                param.fill_(1.0)
    return model


# options that keep the sweep small (the table is about which method applies, not about its quality)
METHOD_OPTIONS = {"integrated_gradients": {"n_steps": 4, "internal_batch_size": 2}}


def run_family(family: Family, methods: list[str] | None = None) -> dict[str, tuple[str, str]]:
    """``{method: (outcome, detail)}`` for one family: outcome ``'supported'``, ``'refused'`` (detail: the reason),
    ``'constant'`` or ``'error'`` (detail: the exception)."""
    from vision_attn.explain import NotApplicableError, explain, list_methods

    torch.manual_seed(family.seed)
    methods = methods or list_methods()
    try:
        model = liven(family.build().eval())
    except Exception as err:  # a config this timm cannot build
        return dict.fromkeys(methods, ("error", f"build: {type(err).__name__}: {err}"))
    images = torch.randn(2, 3, family.size, family.size, generator=torch.Generator().manual_seed(1))
    outcomes = {}
    for method in methods:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                maps = explain(model, images, method, **METHOD_OPTIONS.get(method, {}))
        except NotApplicableError as err:
            outcomes[method] = ("refused", str(err))
            continue
        except Exception as err:  # every other exception is a failure the table reports
            outcomes[method] = ("error", f"{type(err).__name__}: {err}")
            continue
        spans = (maps.flatten(1).amax(dim=1) - maps.flatten(1).amin(dim=1)).tolist()
        constant = not torch.isfinite(maps).all() or min(spans) <= 0
        outcomes[method] = ("constant", f"spans {spans}") if constant else ("supported", "")
    return outcomes


def sweep(names: list[str] | None = None, methods: list[str] | None = None) -> dict[str, dict[str, tuple[str, str]]]:
    """:func:`run_family` over ``names`` (default every family of :data:`FAMILIES`)."""
    return {name: run_family(FAMILIES[name], methods) for name in names or FAMILIES}


def _short(reason: str) -> str:
    """The gist of a refusal for the notes under the table (the model's class name left out, so that families with
    the same reason share one note)."""
    text = re.sub(r"^model \w+ \((.+?)\): ", r"\1: ", reason)
    text = re.sub(r"model \w+(?:'s)? ?", "", text)
    return text.split(";")[0].replace("|", "/").strip()


def table(results: dict[str, dict[str, tuple[str, str]]]) -> str:
    """The family x method markdown table (✓ supported; ✗ refused, with the reasons below it)."""
    methods = list(next(iter(results.values())))
    lines = ["| family | timm module | " + " | ".join(f"`{m}`" for m in methods) + " |"]
    lines.append("|---|---|" + "---|" * len(methods))
    reasons: dict[str, int] = {}
    for name, outcomes in results.items():
        cells = []
        for method in methods:
            outcome, detail = outcomes[method]
            if outcome == "supported":
                cells.append("✓")
            elif outcome == "refused":
                index = reasons.setdefault(_short(detail), len(reasons) + 1)
                cells.append(f"✗ {index}")
            else:
                cells.append(f"**{outcome}**")
        lines.append(f"| {name} | `{FAMILIES[name].module}` | " + " | ".join(cells) + " |")
    lines.append("")
    lines.extend(f"{index}. {reason}" for reason, index in reasons.items())
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Print (and with ``--write-docs`` publish) the table; returns 1 when a method failed on a family."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--family", default="", help="only families whose name contains this (case-insensitive)")
    parser.add_argument("--method", nargs="*", default=None, help="only these methods")
    parser.add_argument("--write-docs", action="store_true", help="rewrite the timm_coverage block of docs/explain.md")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [n for n in FAMILIES if args.family.lower() in n.lower()]
    start = time.perf_counter()
    results = {}
    for name in names:
        results[name] = run_family(FAMILIES[name], args.method)
        print(f"{name}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    text = table(results)
    print(text)
    failures = [(n, m, o) for n, res in results.items() for m, o in res.items() if o[0] in ("error", "constant")]
    for name, method, (outcome, detail) in failures:
        print(f"FAILED {name} / {method}: {outcome} {detail[:300]}", file=sys.stderr)
    unlisted = unlisted_modules()
    if unlisted:
        print(f"timm modules in neither FAMILIES nor NOT_ATTENTION: {unlisted}", file=sys.stderr)
    if args.write_docs and not args.family and args.method is None and not failures:
        from _machine import write_block

        footer = f"\n\nMade by `python benchmarks/timm_coverage.py --write-docs` (timm {timm.__version__})."
        write_block("timm_coverage", text + footer, [REPO / "docs" / "explain.md"])
    return 1 if failures or unlisted else 0


_CNN = "a CNN: convolutions, at most channel gates (SE, ECA, global context), no token-to-token attention"
NOT_ATTENTION: dict[str, str] = {
    **dict.fromkeys(
        (
            "byobnet", "convmixer", "convnext", "cspnet", "cspnext", "densenet", "dla", "dpn", "efficientnet",
            "fasternet", "ghostnet", "hardcorenas", "hgnet", "hrnet", "inception_next", "inception_resnet_v2",
            "inception_v3", "inception_v4", "lcnetv2", "mobilenetv3", "nasnet", "nfnet", "pnasnet", "rdnet", "regnet",
            "repghost", "repvit", "res2net", "resnet", "resnetv2", "rexnet", "selecsls", "senet", "starnet", "tresnet",
            "vgg", "vovnet", "xception", "xception_aligned",
        ),
        _CNN,
    ),
    "resnest": "split attention: a softmax over channel groups (a channel gate), no token-to-token attention",
    "sknet": "selective kernels: a softmax over kernel branches (a channel gate), no token-to-token attention",
    "focalnet": "focal modulation: gated aggregation of convolution context, no attention probabilities",
    "mambaout": "gated convolutions (MambaOut), no attention",
    "mlp_mixer": "token-mixing MLPs (a fixed linear mixing per layer), no attention",
    "sequencer": "bidirectional LSTMs over rows and columns, no attention",
}  # fmt: skip


def unlisted_modules() -> list[str]:
    """timm model modules that are neither an attention family here nor listed as having no attention maps."""
    from timm.models import _registry

    modules = set(_registry._model_to_module.values())
    covered = {f.module for f in FAMILIES.values()} | set(NOT_ATTENTION)
    return sorted(modules - covered)


if __name__ == "__main__":
    raise SystemExit(main())
