"""Building blocks shared by the vision_attn models (timm parameter names, timm helpers reused)."""

from timm.layers import DropPath, LayerScale, Mlp

from vision_attn.layers.attention import Attention
from vision_attn.layers.attention_tap import AttentionTap, HookPoint, attention_hook_points
from vision_attn.layers.block import Block
from vision_attn.layers.checks import check_images
from vision_attn.layers.patch_embed import ConvStemEmbed, ConvTokenizer, PatchEmbed, ShiftedPatchEmbed
from vision_attn.layers.pooling import SequencePool
from vision_attn.layers.pos_embed import resample_abs_pos_embed, sincos_2d_pos_embed

__all__ = [
    "Attention",
    "AttentionTap",
    "Block",
    "ConvStemEmbed",
    "ConvTokenizer",
    "DropPath",
    "HookPoint",
    "LayerScale",
    "Mlp",
    "PatchEmbed",
    "SequencePool",
    "ShiftedPatchEmbed",
    "attention_hook_points",
    "check_images",
    "resample_abs_pos_embed",
    "sincos_2d_pos_embed",
]
