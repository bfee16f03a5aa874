"""Lightning training: the classification recipe, callbacks, export and the LightningCLI entry point."""

from vision_attn.training.callbacks import AttentionOverlays, ExportBackbone, PredictionWriter, RunGuard, TrainSummary
from vision_attn.training.export import export_checkpoint, export_model
from vision_attn.training.module import ImageClassifier

__all__ = [
    "AttentionOverlays",
    "ExportBackbone",
    "ImageClassifier",
    "PredictionWriter",
    "RunGuard",
    "TrainSummary",
    "export_checkpoint",
    "export_model",
]
