"""Which explanation to trust on the main job's model: our methods and the ones users would pick instead, scored
in one table on the same model and the same images (issue 22).

``vision-attn evaluate-maps`` on the newest export of ``benchmarks/main_job.py`` (``runs/bench_main_job``) and the
embedded test split (1,000 images, boxes and object masks): pointing game, energy in box, mask AP / mIoU, deletion
and insertion AUC, the randomisation and class-sensitivity checks (Adebayo et al. 2018) and the cost. In the same
invocation, as references:

* pytorch-grad-cam's ``GradCAM`` for ViTs, with its documented ``reshape_transform`` recipe (the last block's
  ``norm1``, tokens reshaped to the patch grid; the recipe's ``[:, 1:]`` drops the class token, here the model's
  ``num_prefix_tokens``, which is 0 for the sequence-pooling default model);
* captum's ``IntegratedGradients`` and ``Saliency`` (our ``integrated_gradients`` / ``saliency`` methods call them);
* lxt's AttnLRP, where lxt's patches cover the model (its ``efficient`` patch maps cover Hugging Face models and
  torchvision's ViT; a timm-style model is listed as skipped, with the reason).

Usage::

    python benchmarks/main_job.py                       # first: the model (runs/bench_main_job/version_K/export)
    python benchmarks/explain_quality.py                # ~15 minutes on 2 idle cores; prints the table
    python benchmarks/explain_quality.py --write-docs   # also rewrites the block in docs/explain.md
    python benchmarks/explain_quality.py --limit 100 --sanity-images 16 --allow-load   # a quick look

When ``runs/swin_default`` holds a trained Swin (``python train.py fit --config configs/swin_default.yaml``), its
maps are scored too, in a second table: a hierarchical model's explanations against the same boxes and masks.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
from _machine import REPO, docs_allowed, settle, write_block  # benchmarks/ is on sys.path when run
from torch import nn

import vision_attn
from vision_attn.explain import NotApplicableError, register_method
from vision_attn.explain.evaluation import MethodEvaluation, evaluate_maps, evaluation_table
from vision_attn.explain.registry import list_methods
from vision_attn.explain.relevance import attnlrp
from vision_attn.explain.runner import load_inputs
from vision_attn.explain.tokens import token_layout

RUN_DIR = REPO / "runs" / "bench_main_job"
SWIN_RUN_DIR = REPO / "runs" / "swin_default"  # python train.py fit --config configs/swin_default.yaml
SWIN_METHODS = ("rollout", "gradient_rollout", "transformer_attribution", "attnlrp", "gradcam", "random")
REFERENCES = ("pytorch_grad_cam", "integrated_gradients", "saliency", "lxt_attnlrp")
OURS = ("rollout", "gradient_rollout", "transformer_attribution", "attnlrp", "attnlrp_pixels", "attnlrp_pixels_cp_g1",
        "attention", "gradcam", "gradcam++", "layercam")  # fmt: skip


@register_method("pytorch_grad_cam", needs=("class_target",), reference="pytorch-grad-cam (Gildenblat)",
                 description="pytorch-grad-cam's GradCAM with its ViT reshape_transform recipe")  # fmt: skip
def pytorch_grad_cam(model: nn.Module, images: torch.Tensor, target: Any = None) -> torch.Tensor:
    """pytorch-grad-cam's ``GradCAM`` on the last block's ``norm1``, tokens reshaped to the patch grid."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    prefix, (gh, gw) = token_layout(model, tuple(images.shape[-2:]))

    def reshape_transform(tensor: torch.Tensor) -> torch.Tensor:  # the documented ViT recipe
        result = tensor[:, prefix:, :].reshape(tensor.size(0), gh, gw, tensor.size(2))
        return result.transpose(2, 3).transpose(1, 2)

    with torch.no_grad():
        classes = model(images).argmax(dim=1) if target is None else torch.as_tensor(target).expand(images.shape[0])
    cam = GradCAM(model=model, target_layers=[model.blocks[-1].norm1], reshape_transform=reshape_transform)
    with torch.enable_grad():
        maps = cam(input_tensor=images, targets=[ClassifierOutputTarget(int(c)) for c in classes])
    return torch.as_tensor(maps)


@register_method("attnlrp_pixels", needs=("token_embeddings", "class_target"), reference="Achtibat et al. 2024",
                 description="attnlrp read at the input pixels (level='pixels'), positive part")  # fmt: skip
def attnlrp_pixels(model: nn.Module, images: torch.Tensor, target: Any = None) -> torch.Tensor:
    """:func:`vision_attn.explain.relevance.attnlrp` with ``level='pixels'``, positive part."""
    return attnlrp(model, images, target, level="pixels").clamp(min=0)


@register_method("attnlrp_pixels_cp_g1", needs=("token_embeddings", "class_target"), reference="Achtibat et al. 2024",
                 description="attnlrp at the pixels with CP-LRP in the attention and LRP-gamma 1 on the convolutions, "
                 "the setting chosen on the validation hold-out (benchmarks/lrp_rules_sweep.py)")  # fmt: skip
def attnlrp_pixels_cp_g1(model: nn.Module, images: torch.Tensor, target: Any = None) -> torch.Tensor:
    """``attnlrp`` with ``level='pixels'``, ``attention_rule='cp'``, ``conv_gamma=1``: the best energy in box on the
    main job's 400 validation images (``benchmarks/lrp_rules_sweep.py``), positive part."""
    return attnlrp(model, images, target, level="pixels", attention_rule="cp", conv_gamma=1.0).clamp(min=0)


@register_method("lxt_attnlrp", needs=("class_target",), reference="lxt (Achtibat et al. 2024)",
                 description="lxt's own AttnLRP (its efficient monkey patches)")  # fmt: skip
def lxt_attnlrp(model: nn.Module, images: torch.Tensor, target: Any = None) -> torch.Tensor:
    """lxt's AttnLRP where its patch maps cover ``model``; refused with the reason otherwise."""
    try:
        from lxt.efficient.models import get_default_map  # noqa: F401  (imports transformers' model modules)
    except ImportError as err:
        raise NotApplicableError(
            f"lxt's efficient AttnLRP patches Hugging Face and torchvision models only and needs transformers to "
            f"import them ({err}); it has no patch map for a timm-style {type(model).__name__}: see attnlrp"
        ) from err
    raise NotApplicableError(
        f"lxt's efficient AttnLRP has patch maps for Hugging Face models and torchvision's ViT only, none for a "
        f"timm-style {type(model).__name__}: see attnlrp, which the tests check against lxt's explicit rules"
    )


def newest_export(run_dir: Path = RUN_DIR, how: str = "run benchmarks/main_job.py first") -> Path:
    """The export folder of the newest run in ``run_dir``."""
    exports = sorted(run_dir.glob("version_*/export"), key=lambda p: int(p.parent.name.split("_")[1]))
    if not exports:
        raise FileNotFoundError(f"no export under {run_dir}: {how}")
    return exports[-1]


def test_accuracy(export: Path) -> str:
    """The test top-1 of the run that wrote ``export`` (its ``summary.json``), as text."""
    import json

    summary = export.parent / "summary.json"
    if not summary.is_file():
        return "test top-1 unknown"
    acc = json.loads(summary.read_text()).get("test", {}).get("metrics", {}).get("test/acc1")
    return "test top-1 unknown" if acc is None else f"test top-1 {100 * acc:.1f} %"


def targets_met(results: list[MethodEvaluation]) -> list[str]:
    """The issue's targets against the measured rows, as lines of text."""
    ours = [r for r in results if r.method in OURS]
    refs = [r for r in results if r.method in REFERENCES]
    lines = []
    best_pointing = max(ours, key=lambda r: r.scores.get("pointing_game", 0))
    best_energy = max(ours, key=lambda r: r.scores.get("energy_pointing", 0))
    lines.append(f"best pointing game of ours: {best_pointing.method} {best_pointing.scores['pointing_game']:.3f} "
                 "(target >= 0.98)")  # fmt: skip
    lines.append(f"best energy in box of ours: {best_energy.method} {best_energy.scores['energy_pointing']:.3f} "
                 "(target >= 0.85)")  # fmt: skip
    for key, higher in (("energy_pointing", True), ("deletion_auc", False)):
        sign = 1.0 if higher else -1.0
        mine = max(ours, key=lambda r: sign * r.scores[key])
        if refs:
            best_ref = max(refs, key=lambda r: sign * r.scores[key])
            wins = sign * mine.scores[key] > sign * best_ref.scores[key]
            lines.append(f"{key}: ours {mine.method} {mine.scores[key]:.3f} vs best reference {best_ref.method} "
                         f"{best_ref.scores[key]:.3f}: {'beats it' if wins else 'does NOT beat it'}")  # fmt: skip
    for name in ("transformer_attribution", "attnlrp"):
        row = next((r for r in results if r.method == name), None)
        if row is not None:
            lines.append(f"cost of {name}: {row.cost_ratio:.2f} x a plain forward (target <= 3)")
    failing = [r.method for r in results if r.passes is False]
    lines.append(f"fail the randomisation check: {', '.join(failing) or 'none'}")
    return lines


def main(argv: list[str] | None = None) -> int:
    """Evaluate ours and the references on the main job's model; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=None, help="default: the newest main-job export")
    parser.add_argument("--limit", type=int, default=None, help="first N test images (default: all 1,000)")
    parser.add_argument("--sanity-images", type=int, default=64)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--max-load", type=float, default=1.0)
    parser.add_argument("--settle", type=float, default=240.0)
    parser.add_argument("--allow-load", action="store_true")
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args(argv)
    source = args.checkpoint or newest_export()
    model, info = vision_attn.load_model(checkpoint=source)
    inputs = load_inputs(vision_attn.resolve_data_config(model, info), dataset="cluttered_fashion_mnist:test",
                         limit=args.limit)  # fmt: skip
    load = settle(args.max_load, args.settle)
    print(f"model {info['model_name']} from {source}; {len(inputs.names)} images; load before: {load}", flush=True)
    methods = [m for m in (*OURS, *REFERENCES, "random") if m in list_methods()]
    results, skipped = evaluate_maps(
        model, inputs, methods, steps=args.steps, batch_size=args.batch_size, sanity_images=args.sanity_images,
        progress=lambda method, stage: print(f"  {method}: {stage}", flush=True),
    )  # fmt: skip
    table = f"Main job model (`{info['model_name']}`, {test_accuracy(Path(source))}):\n\n" + evaluation_table(
        results, skipped
    )
    print(table)
    for line in targets_met(results):
        print(line)
    if any(SWIN_RUN_DIR.glob("version_*/export")):
        swin_source = newest_export(SWIN_RUN_DIR, "train configs/swin_default.yaml")
        swin, swin_info = vision_attn.load_model(checkpoint=swin_source)
        swin_inputs = load_inputs(vision_attn.resolve_data_config(swin, swin_info),
                                  dataset="cluttered_fashion_mnist:test", limit=args.limit)  # fmt: skip
        swin_results, swin_skipped = evaluate_maps(
            swin, swin_inputs, [m for m in SWIN_METHODS if m in list_methods()], steps=args.steps,
            batch_size=args.batch_size, sanity_images=args.sanity_images,
            progress=lambda method, stage: print(f"  swin {method}: {stage}", flush=True),
        )  # fmt: skip
        swin_table = evaluation_table(swin_results, swin_skipped)
        table += (f"\n\nSwin (`configs/swin_default.yaml`, {swin_info['model_name']} made small, "
                  f"{test_accuracy(swin_source)}), the same images:\n\n{swin_table}")  # fmt: skip
        print(swin_table)
    after = settle(float("inf"), 0)
    made_by = (
        f"\n\nMade by `python benchmarks/explain_quality.py --write-docs` ({len(inputs.names)} test images, sanity "
        f"checks on the first {args.sanity_images}; 1-minute load average {load['loadavg'][0]} before, "
        f"{after['loadavg'][0]} after, 2 cores)."
    )
    if args.write_docs and docs_allowed(load["quiet"], args.allow_load, f"before the run ({load})"):
        write_block("explain_quality", table + made_by, [REPO / "docs" / "explain.md"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
