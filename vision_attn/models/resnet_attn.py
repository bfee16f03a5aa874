"""ResNets with an attention module chosen by name, built on timm's ``ResNet`` / ``BasicBlock`` / ``Bottleneck``.

``attn_layer`` picks what is added to the blocks of ``attn_stages``:

* ``'se'``, ``'eca'``, ``'cbam'``, ``'coord'``, ``'nonlocal'``: timm's modules (via
  :mod:`vision_attn.layers.cnn_attn`) in the block's attention slot ``block.se``, the slot timm's
  ``block_args=dict(attn_layer=...)`` fills (after the last BN of the residual branch), so timm SE-ResNet weights
  load;
* ``'aa'``: every 3x3 conv of the block becomes an :class:`AugmentedConv2d` (Bello et al. 2019) with
  ``dk = dk_ratio * C_out``, ``dv = dv_ratio * C_out`` (the paper's κ=0.2, υ=0.1 by default), ``num_heads`` 8;
* ``'bot'``: the block's stride-1 3x3 conv in ``Bottleneck`` (the only one; it carries the stride) or the second
  one in ``BasicBlock`` becomes :class:`BotAttention` (Srinivas et al. 2021), ``num_heads`` 4. Its position
  tables are fixed to the feature size of ``img_size``, so BoT networks accept only that input size;
* ``'none'``: plain ResNet (the baseline).

``stem='small'`` (3x3 stride-1 conv, no max-pool; overall stride 8, for 32x32 inputs such as CIFAR) or
``'imagenet'`` (timm's 7x7 stride-2 conv + max-pool; overall stride 32).

Registered names ``va_resnet{18,50}[_{se,eca,cbam,coord,nonlocal,aa,bot}]_{32,224}`` (32: small stem, 10 classes,
CIFAR-10 mean/std; 224: ImageNet stem, 1000 classes). ``features_only=True`` and ``forward_intermediates`` come
from timm's ``ResNet``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs
from timm.models._manipulate import checkpoint_seq
from timm.models.resnet import BasicBlock, Bottleneck, ResNet
from torch import nn

from vision_attn.layers.aa_conv import AugmentedConv2d
from vision_attn.layers.bot import BotAttention
from vision_attn.layers.checks import check_images, is_tracing, to_2tuple_int
from vision_attn.layers.cnn_attn import CNN_GATES
from vision_attn.models._registry import register_model

__all__ = ["ATTN_LAYERS", "AttnResNet"]

ATTN_LAYERS = ("none", "se", "eca", "cbam", "coord", "nonlocal", "aa", "bot")
STEMS = ("imagenet", "small")
# Default stages (1-4) per kind: channel gates everywhere (as SE/ECA/CBAM/coord papers); non-local at res4
# (Wang et al. 2018 add it to res4 for images); AA off the highest-resolution stage to keep attention affordable;
# BoT in the last stage (Srinivas et al. 2021, c5).
DEFAULT_STAGES = {
    "none": (),
    "se": (1, 2, 3, 4),
    "eca": (1, 2, 3, 4),
    "cbam": (1, 2, 3, 4),
    "coord": (1, 2, 3, 4),
    "nonlocal": (3,),
    "aa": (2, 3, 4),
    "bot": (4,),
}
DEFAULT_HEADS = {"aa": 8, "bot": 4}


def _heads_multiple(value: float, num_heads: int) -> int:
    """Round ``value`` to the nearest positive multiple of ``num_heads``."""
    return max(num_heads, round(value / num_heads) * num_heads)


class AttnResNet(ResNet):
    """timm ``ResNet`` with ``attn_layer`` in the blocks of ``attn_stages``: ``[B, C, H, W] -> [B, num_classes]``.

    Args (besides timm ``ResNet``'s ``block``, ``layers``, ``num_classes``, ``in_chans``, ...):
        attn_layer: one of :data:`ATTN_LAYERS` (see the module docstring for the papers and placement).
        attn_stages: stages 1-4 that get it; default per kind (:data:`DEFAULT_STAGES`).
        img_size: input size; sizes the relative position tables of ``'aa'`` (largest input) and ``'bot'``
            (the only input size). Other kinds accept any size of at least the network stride.
        stem: ``'imagenet'`` (stride 4 before ``layer1``) or ``'small'`` (stride 1, for 32x32 inputs).
        num_heads: attention heads for ``'aa'`` / ``'bot'`` (default 8 / 4, as in the papers).
        dk_ratio, dv_ratio: AA key and value depths as fractions of each conv's output channels.
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: Sequence[int],
        attn_layer: str = "none",
        attn_stages: Sequence[int] | None = None,
        img_size: int | tuple[int, int] = 224,
        stem: str = "imagenet",
        num_heads: int | None = None,
        dk_ratio: float = 0.2,
        dv_ratio: float = 0.1,
        **kwargs: Any,
    ) -> None:
        if not isinstance(attn_layer, str) or attn_layer not in ATTN_LAYERS:
            raise ValueError(f"unknown attn_layer {attn_layer!r}; known: {', '.join(ATTN_LAYERS)}")
        if stem not in STEMS:
            raise ValueError(f"unknown stem {stem!r}; known: {', '.join(STEMS)}")
        if stem == "small" and kwargs.get("stem_type"):
            raise ValueError(f"stem='small' replaces the stem; stem_type must be '', got {kwargs['stem_type']!r}")
        if kwargs.get("output_stride", 32) != 32:
            raise ValueError(f"output_stride must be 32 (no dilated variants here), got {kwargs['output_stride']!r}")
        stages = DEFAULT_STAGES[attn_layer] if attn_stages is None else tuple(attn_stages)
        if attn_layer == "none" and stages:
            raise ValueError(f"attn_stages must be empty for attn_layer='none', got {stages}")
        if not all(isinstance(s, int) and 1 <= s <= 4 for s in stages):
            raise ValueError(f"attn_stages must be ints in 1..4, got {attn_stages!r}")
        for arg, ratio in (("dk_ratio", dk_ratio), ("dv_ratio", dv_ratio)):
            if not 0 < ratio <= 1:
                raise ValueError(f"{arg} must be in (0, 1], got {ratio!r}")
        num_heads = DEFAULT_HEADS.get(attn_layer, 1) if num_heads is None else num_heads
        if not isinstance(num_heads, int) or num_heads < 1:
            raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
        self.img_size = to_2tuple_int(img_size, "img_size")
        self.net_stride = 8 if stem == "small" else 32
        if attn_layer == "bot" and (self.img_size[0] % self.net_stride or self.img_size[1] % self.net_stride):
            raise ValueError(
                f"img_size {self.img_size[0]}x{self.img_size[1]} must be divisible by the network stride "
                f"{self.net_stride} for attn_layer='bot' (its 2x2 pooling needs even feature sizes)"
            )
        zero_init_last = kwargs.get("zero_init_last", True)
        super().__init__(block, tuple(layers), **kwargs)
        self.attn_layer, self.attn_stages, self.stem = attn_layer, stages, stem
        self.num_heads, self.dk_ratio, self.dv_ratio = num_heads, dk_ratio, dv_ratio

        if stem == "small":
            self.conv1 = nn.Conv2d(self.in_chans, self.bn1.num_features, 3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
            self.feature_info[0]["reduction"] = 1
            for info in self.feature_info[1:]:
                info["reduction"] //= 4
            size = self.img_size
        else:
            size = tuple(math.ceil(s / 4) for s in self.img_size)  # after the stride-2 conv and stride-2 max-pool
        for stage_idx in range(1, 5):
            for block_module in getattr(self, f"layer{stage_idx}"):
                if stage_idx in stages:
                    self._add_attention(block_module, size)
                size = tuple(math.ceil(s / block_module.stride) for s in size)
        self.init_weights(zero_init_last=zero_init_last)

    def _add_attention(self, block: BasicBlock | Bottleneck, size: tuple[int, int]) -> None:
        """Put ``self.attn_layer`` into ``block``, whose input has spatial ``size``."""
        kind, stride = self.attn_layer, block.stride
        out_size = tuple(math.ceil(s / stride) for s in size)
        if kind in CNN_GATES:
            last_bn = block.bn2 if isinstance(block, BasicBlock) else block.bn3
            block.se = CNN_GATES[kind](last_bn.num_features)
        elif kind == "aa":
            if isinstance(block, BasicBlock):
                block.conv1 = self._augmented(block.conv1, size)
                block.conv2 = self._augmented(block.conv2, out_size)
            else:
                block.conv2 = self._augmented(block.conv2, size)
        elif kind == "bot":
            conv = block.conv2
            if isinstance(block, BasicBlock):  # conv1 keeps the stride, conv2 (stride 1) becomes MHSA
                block.conv2 = BotAttention(conv.in_channels, conv.out_channels, out_size, 1, self.num_heads)
            else:  # as the paper: MHSA replaces the 3x3, 2x2 average pool after it in the first (strided) block
                block.conv2 = BotAttention(conv.in_channels, conv.out_channels, size, stride, self.num_heads)

    def _augmented(self, conv: nn.Conv2d, size: tuple[int, int]) -> AugmentedConv2d:
        """Return an ``AugmentedConv2d`` standing in for the 3x3 ``conv`` whose input has spatial ``size``."""
        out = conv.out_channels
        return AugmentedConv2d(
            conv.in_channels,
            out,
            kernel_size=conv.kernel_size[0],
            stride=conv.stride[0],
            dk=_heads_multiple(self.dk_ratio * out, self.num_heads),
            dv=_heads_multiple(self.dv_ratio * out, self.num_heads),
            num_heads=self.num_heads,
            feat_size=size,
        )

    @torch.jit.ignore
    def init_weights(self, zero_init_last: bool = True) -> None:
        """timm's ResNet init (Kaiming convs, zeroed last BN per block), then the attention layers' own init."""
        super().init_weights(zero_init_last=zero_init_last)
        for module in self.modules():
            if isinstance(module, (AugmentedConv2d, BotAttention)):
                module.reset_parameters()

    @torch.jit.unused  # eager-only validation; forward skips it when scripting or tracing
    def check_input(self, x: torch.Tensor) -> None:
        """Raise a ``TypeError``/``ValueError`` naming what is wrong unless ``x`` fits this network; returns nothing."""
        check_images(x, in_chans=self.in_chans, min_size=(self.net_stride, self.net_stride))
        height, width = x.shape[-2:]
        want_h, want_w = self.img_size
        if self.attn_layer == "bot" and (height, width) != self.img_size:
            raise ValueError(
                f"x has spatial size {height}x{width}; this BoT network's relative position tables are fixed to "
                f"img_size {want_h}x{want_w}; create the model with img_size=({height}, {width})"
            )
        if self.attn_layer == "aa" and (height > want_h or width > want_w):
            raise ValueError(
                f"x has spatial size {height}x{width}, larger than img_size {want_h}x{want_w} (the largest input "
                "the attention-augmented convs' relative position tables cover); create the model with a larger "
                "img_size"
            )

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Return the last stage's feature map ``[B, num_features, H/stride, W/stride]`` after checking ``x``."""
        if not torch.jit.is_scripting() and not is_tracing():
            self.check_input(x)
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))  # timm's ResNet body (TorchScript has no super())
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq([self.layer1, self.layer2, self.layer3, self.layer4], x, flatten=True)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward_intermediates(
        self, x: torch.Tensor, *args: Any, **kwargs: Any
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """timm's ``forward_intermediates`` (stem + 4 stage maps ``[B, C_i, H/r_i, W/r_i]``) after checking ``x``."""
        if not is_tracing():
            self.check_input(x)
        return super().forward_intermediates(x, *args, **kwargs)


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> AttnResNet:
    return build_model_with_cfg(AttnResNet, variant, pretrained, **kwargs)


CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
_DEPTHS = {18: (BasicBlock, (2, 2, 2, 2)), 50: (Bottleneck, (3, 4, 6, 3))}
_SIZES = {32: "small", 224: "imagenet"}


def _name(depth: int, attn_layer: str, size: int) -> str:
    kind = "" if attn_layer == "none" else f"_{attn_layer}"
    return f"va_resnet{depth}{kind}_{size}"


def _cfg(size: int, attn_layer: str) -> dict[str, Any]:
    small = size == 32
    return dict(
        url="",
        num_classes=10 if small else 1000,
        input_size=(3, size, size),
        pool_size=(size // 8, size // 8) if small else (size // 32, size // 32),
        crop_pct=1.0 if small else 0.875,
        interpolation="bilinear",
        mean=CIFAR_MEAN if small else IMAGENET_DEFAULT_MEAN,
        std=CIFAR_STD if small else IMAGENET_DEFAULT_STD,
        fixed_input_size=attn_layer == "bot",
        first_conv="conv1",
        classifier="fc",
        license="mit",
    )


_VARIANTS = [(d, a, s) for s in _SIZES for d in _DEPTHS for a in ATTN_LAYERS]
default_cfgs = generate_default_cfgs({_name(d, a, s): _cfg(s, a) for d, a, s in _VARIANTS})


def _register(depth: int, attn_layer: str, size: int) -> None:
    """Register the entrypoint ``va_resnet{depth}[_{attn_layer}]_{size}`` with timm (and ``list_models``)."""
    name = _name(depth, attn_layer, size)
    block, layers = _DEPTHS[depth]

    def entrypoint(pretrained: bool = False, **kwargs: Any) -> AttnResNet:
        model_args = dict(block=block, layers=layers, attn_layer=attn_layer, img_size=size, stem=_SIZES[size])
        return _create(name, pretrained=pretrained, **dict(model_args, **kwargs))

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__doc__ = f"ResNet-{depth}, attn_layer={attn_layer!r}, {_SIZES[size]} stem, {size}x{size} inputs."
    globals()[name] = register_model(entrypoint)


for _variant in _VARIANTS:
    _register(*_variant)
