"""Registered networks. Importing this package registers every model with timm."""

from vision_attn._data_config import model_input_size
from vision_attn.models._factory import create_model, load_checkpoint
from vision_attn.models._loading import load_model, load_trained
from vision_attn.models._registry import list_models
from vision_attn.models.resnet_attn import AttnResNet
from vision_attn.models.vit import VisionTransformer

__all__ = [
    "AttnResNet",
    "VisionTransformer",
    "create_model",
    "list_models",
    "load_checkpoint",
    "load_model",
    "load_trained",
    "model_input_size",
]
