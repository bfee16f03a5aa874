"""vision_attn: attention for computer vision (timm-compatible ViTs, attention CNNs, training, attention maps)."""

from vision_attn import models  # noqa: F401  (registers every model with timm)
from vision_attn._data_config import resolve_data_config
from vision_attn.export import export_trained
from vision_attn.models import create_model, list_models, load_checkpoint, load_model, load_trained

__version__ = "0.1.0"
__all__ = [
    "__version__",
    "create_model",
    "export_trained",
    "list_models",
    "load_checkpoint",
    "load_model",
    "load_trained",
    "resolve_data_config",
]
