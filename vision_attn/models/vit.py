"""Vision Transformer (Dosovitskiy et al. 2021) with timm's parameter layout, plus small-data variants.

The same :class:`VisionTransformer` builds every variant by swapping modules:

* plain ViT: :class:`~vision_attn.layers.PatchEmbed` + class token; loads timm ``VisionTransformer`` weights;
* CCT (Hassani et al. 2021): :class:`~vision_attn.layers.ConvTokenizer` + sequence pooling (``global_pool='seq'``);
* SPT + LSA (Lee et al. 2021): :class:`~vision_attn.layers.ShiftedPatchEmbed` + ``Attention`` with a learned
  temperature and diagonal masking;
* ViT_C with sequence pooling: :class:`~vision_attn.layers.ConvStemEmbed` (the convolutional stem of Xiao et al.
  2021) + CCT's sequence pooling — the default model for small data (``configs/default.yaml``).
"""

from collections.abc import Callable
from functools import partial
from typing import Any, Literal

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD
from timm.layers import LayerScale, Mlp, resample_abs_pos_embed, resample_patch_embed, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint_seq, named_apply
from timm.models.vision_transformer import init_weights_vit_timm
from torch import nn

from vision_attn.layers import (
    Attention,
    Block,
    ConvStemEmbed,
    ConvTokenizer,
    PatchEmbed,
    SequencePool,
    ShiftedPatchEmbed,
    check_images,
    sincos_2d_pos_embed,
)
from vision_attn.layers.checks import is_tracing
from vision_attn.models._registry import register_filter_fn, register_model

__all__ = ["VisionTransformer", "checkpoint_filter_fn", "timm_vit_args"]

GLOBAL_POOLS = ("token", "avg", "seq", "")
POS_EMBEDS = ("learn", "sincos", "none")


class VisionTransformer(nn.Module):
    """Vision Transformer whose state dict matches timm's ``VisionTransformer`` for the same arguments.

    ``forward(x: [B, in_chans, H, W]) -> [B, num_classes]``.

    Args (timm's names and meanings unless noted):
        img_size, patch_size, in_chans: input geometry; H and W must be multiples of the embed layer's stride.
        num_classes: classifier outputs (0: no head, ``forward`` returns pooled features).
        global_pool: ``'token'`` (class token), ``'avg'`` (mean of patch tokens), ``'seq'`` (CCT sequence
            pooling) or ``''`` (no pooling).
        embed_dim, depth, num_heads, mlp_ratio, qkv_bias, qk_norm: transformer width, blocks, heads, MLP size.
        init_values: LayerScale initial value (None disables LayerScale).
        class_token, reg_tokens: prefix tokens (``num_prefix_tokens = class_token + reg_tokens``).
        pos_embed: ``'learn'``, ``'sincos'`` (fixed 2-D sin-cos) or ``'none'``.
        no_embed_class: position embeddings cover patch tokens only (DeiT-3 style).
        fc_norm: norm after pooling instead of before (default: only for ``'avg'``).
        dynamic_img_size: accept any (divisible) input size, resampling position embeddings on the fly.
        drop_rate, pos_drop_rate, proj_drop_rate, attn_drop_rate, drop_path_rate: dropout and stochastic depth.
        embed_layer, embed_args: tokenizer class (``PatchEmbed``, ``ShiftedPatchEmbed``, ``ConvTokenizer``) and
            its extra keyword arguments (vision_attn addition, YAML-friendly).
        norm_layer, act_layer, attn_layer, block_fn, mlp_layer: module constructors to swap parts.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int | tuple[int, int] = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: Literal["token", "avg", "seq", ""] = "token",
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        init_values: float | None = None,
        class_token: bool = True,
        reg_tokens: int = 0,
        pos_embed: Literal["learn", "sincos", "none"] = "learn",
        no_embed_class: bool = False,
        fc_norm: bool | None = None,
        dynamic_img_size: bool = False,
        drop_rate: float = 0.0,
        pos_drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        embed_layer: Callable[..., nn.Module] = PatchEmbed,
        embed_args: dict[str, Any] | None = None,
        norm_layer: Callable[[int], nn.Module] | None = None,
        act_layer: Callable[..., nn.Module] | None = None,
        attn_layer: Callable[..., nn.Module] = Attention,
        block_fn: Callable[..., nn.Module] = Block,
        mlp_layer: Callable[..., nn.Module] = Mlp,
    ) -> None:
        super().__init__()
        _check_args(global_pool, class_token, pos_embed, in_chans, num_classes, depth, reg_tokens,
                    drop_rate=drop_rate, pos_drop_rate=pos_drop_rate, proj_drop_rate=proj_drop_rate,
                    attn_drop_rate=attn_drop_rate, drop_path_rate=drop_path_rate)  # fmt: skip
        norm_layer = norm_layer or partial(nn.LayerNorm, eps=1e-6)
        act_layer = act_layer or nn.GELU
        use_fc_norm = global_pool == "avg" if fc_norm is None else fc_norm

        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.has_class_token = class_token
        self.num_reg_tokens = reg_tokens
        self.num_prefix_tokens = int(class_token) + reg_tokens
        self.no_embed_class = no_embed_class
        self.dynamic_img_size = dynamic_img_size
        self.pos_embed_type = pos_embed
        self.grad_checkpointing = False

        self.patch_embed = embed_layer(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, **(embed_args or {})
        )
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, reg_tokens, embed_dim)) if reg_tokens else None
        embed_len = num_patches if no_embed_class else num_patches + self.num_prefix_tokens
        if pos_embed == "none":
            self.pos_embed = None
        else:  # a fixed sin-cos table is a frozen parameter so the state dict keeps timm's keys
            self.pos_embed = nn.Parameter(torch.zeros(1, embed_len, embed_dim), requires_grad=pos_embed == "learn")
        self.pos_drop = nn.Dropout(pos_drop_rate)

        dpr = torch.linspace(0, drop_path_rate, depth).tolist()  # stochastic depth decay rule
        self.blocks = nn.Sequential(
            *[
                block_fn(
                    dim=embed_dim,
                    num_heads=num_heads,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    qk_norm=qk_norm,
                    init_values=init_values,
                    proj_drop=proj_drop_rate,
                    attn_drop=attn_drop_rate,
                    drop_path=dpr[i],
                    norm_layer=norm_layer,
                    act_layer=act_layer,
                    attn_layer=attn_layer,
                    mlp_layer=mlp_layer,
                )
                for i in range(depth)
            ]
        )
        reduction = self.patch_embed.feat_ratio()[0]
        self.feature_info = [dict(module=f"blocks.{i}", num_chs=embed_dim, reduction=reduction) for i in range(depth)]
        self.norm = norm_layer(embed_dim) if not use_fc_norm else nn.Identity()

        self.attn_pool = SequencePool(embed_dim) if global_pool == "seq" else None
        self.fc_norm = norm_layer(embed_dim) if use_fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights()

    def init_weights(self) -> None:
        """Initialise as timm does: truncated-normal linears and position embeddings, near-zero tokens."""
        if self.pos_embed is not None:
            if self.pos_embed_type == "sincos":
                with torch.no_grad():
                    self.pos_embed.copy_(self._sincos_table(self.patch_embed.grid_size))
            else:
                trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        if self.reg_token is not None:
            nn.init.normal_(self.reg_token, std=1e-6)
        named_apply(init_weights_vit_timm, self)

    @torch.jit.unused  # timm's sin-cos builder does not script; scripted sin-cos models take their img_size only
    def _sincos_table(self, grid_size: tuple[int, int]) -> torch.Tensor:
        table = sincos_2d_pos_embed(grid_size, self.embed_dim)
        if not self.no_embed_class and self.num_prefix_tokens:
            table = torch.cat([table.new_zeros(1, self.num_prefix_tokens, self.embed_dim), table], dim=1)
        return table

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Return the parameter names that should not be weight-decayed."""
        return {"pos_embed", "cls_token", "reg_token"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Return regexes grouping parameters into stem and blocks (for layer-wise LR decay)."""
        return dict(stem=r"^cls_token|reg_token|pos_embed|patch_embed", blocks=[(r"^blocks\.(\d+)", None)])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Enable or disable activation checkpointing of the blocks."""
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        """Return the classifier head."""
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the head with a new one for ``num_classes`` (0 removes it), optionally changing the pooling."""
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        if global_pool is not None:
            if global_pool not in GLOBAL_POOLS:
                raise ValueError(f"global_pool {global_pool!r} is not one of {GLOBAL_POOLS}")
            if global_pool == "token" and not self.has_class_token:
                raise ValueError("global_pool 'token' needs class_token=True")
            if (global_pool == "seq") != (self.attn_pool is not None):
                raise ValueError("switching to or from global_pool 'seq' would add or drop weights; build a new model")
            self.global_pool = global_pool
        self.num_classes = num_classes
        device = self.head.weight.device if isinstance(self.head, nn.Linear) else None
        self.head = nn.Linear(self.embed_dim, num_classes, device=device) if num_classes > 0 else nn.Identity()

    @torch.jit.unused  # eager-only validation; forward skips it when scripting or tracing
    def check_input(self, x: torch.Tensor) -> None:
        """Raise ``TypeError``/``ValueError`` unless ``x`` is a float ``[B, in_chans, H, W]`` batch this model takes."""
        check_images(
            x,
            in_chans=self.in_chans,
            img_size=None if self.dynamic_img_size else self.patch_embed.img_size,
            divisor=self.patch_embed.input_divisor,
        )

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        B, gh, gw, C = x.shape
        x = x.reshape(B, gh * gw, C)  # B, gh, gw, C -> B, N, C
        prefix: list[torch.Tensor] = []
        if self.cls_token is not None:
            prefix.append(self.cls_token.expand(B, -1, -1))
        if self.reg_token is not None:
            prefix.append(self.reg_token.expand(B, -1, -1))

        pos_embed = self.pos_embed
        if pos_embed is None:
            x = torch.cat(prefix + [x], dim=1)  # noqa: RUF005 (TorchScript has no [*a, b])
        else:
            if self.dynamic_img_size:  # fixed-size models are checked at the input, so their table always fits
                pos_embed = self._resize_pos_embed(pos_embed, gh, gw)
            if self.no_embed_class:
                x = torch.cat(prefix + [x + pos_embed], dim=1)  # noqa: RUF005
            else:
                x = torch.cat(prefix + [x], dim=1) + pos_embed  # noqa: RUF005
        return self.pos_drop(x)

    def _resize_pos_embed(self, pos_embed: torch.Tensor, gh: int, gw: int) -> torch.Tensor:
        """Return the position table for a ``gh x gw`` token grid (resampled or, for sin-cos, rebuilt)."""
        old_size = self.patch_embed.grid_size
        if self.pos_embed_type == "sincos":
            if gh == old_size[0] and gw == old_size[1]:
                return pos_embed
            return self._sincos_table((gh, gw)).to(pos_embed)
        num_prefix_tokens = 0 if self.no_embed_class else self.num_prefix_tokens
        # timm returns the table itself for the same size, except under torch.export (no size specialization)
        return resample_abs_pos_embed(pos_embed, [gh, gw], [old_size[0], old_size[1]], num_prefix_tokens)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Return normalised tokens ``[B, num_prefix_tokens + gh * gw, embed_dim]``."""
        if not torch.jit.is_scripting() and not is_tracing():
            self.check_input(x)
        x = self._pos_embed(self.patch_embed(x))
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return self.norm(x)

    def pool(self, x: torch.Tensor, pool_type: str | None = None) -> torch.Tensor:
        """Pool tokens ``[B, N, C] -> [B, C]`` (or return them unpooled for ``''``)."""
        pool_type = self.global_pool if pool_type is None else pool_type
        if pool_type == "seq":
            if self.attn_pool is None:
                raise ValueError("pool_type 'seq' needs a model built with global_pool='seq' (sequence pooling)")
            return self.attn_pool(x[:, self.num_prefix_tokens :])
        if pool_type == "avg":
            return x[:, self.num_prefix_tokens :].mean(dim=1)
        if pool_type == "token":
            return x[:, 0]
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool, normalise and classify tokens; ``pre_logits=True`` returns the pooled features ``[B, C]``."""
        x = self.head_drop(self.fc_norm(self.pool(x)))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Return ``(final_tokens, intermediates)`` or only the intermediates (block outputs).

        ``indices``: last n blocks if an int, all if None, else those listed. Intermediates are ``[B, C, gh, gw]``
        for ``output_fmt='NCHW'`` and ``[B, gh * gw, C]`` for ``'NLC'`` (prefix tokens split off; returned as
        ``(tokens, prefix)`` pairs with ``return_prefix_tokens``).
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt {output_fmt!r} is not one of ('NCHW', 'NLC')")
        if not is_tracing():
            self.check_input(x)
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        tokens = self.patch_embed(x)
        B, gh, gw, _ = tokens.shape
        x = self._pos_embed(tokens)
        blocks = self.blocks[: max_index + 1] if stop_early else self.blocks
        intermediates = []
        for i, blk in enumerate(blocks):
            x = blk(x)
            if i in take_indices:
                intermediates.append(self.norm(x) if norm else x)

        prefix = [y[:, : self.num_prefix_tokens] for y in intermediates]
        intermediates = [y[:, self.num_prefix_tokens :] for y in intermediates]
        if output_fmt == "NCHW":
            intermediates = [y.reshape(B, gh, gw, -1).permute(0, 3, 1, 2).contiguous() for y in intermediates]
        if return_prefix_tokens and self.num_prefix_tokens:
            intermediates = list(zip(intermediates, prefix, strict=True))
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop blocks after the last of ``indices`` (and optionally the norm and head); returns the kept indices."""
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[: max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.fc_norm = nn.Identity()
            self.attn_pool = None
            self.global_pool = ""
            self.head = nn.Identity()
            self.num_classes = 0
        return take_indices


def _check_args(
    global_pool: str,
    class_token: bool,
    pos_embed: str,
    in_chans: int,
    num_classes: int,
    depth: int,
    reg_tokens: int,
    **rates: float,
) -> None:
    if global_pool not in GLOBAL_POOLS:
        raise ValueError(f"global_pool {global_pool!r} is not one of {GLOBAL_POOLS}")
    if global_pool == "token" and not class_token:
        raise ValueError("global_pool 'token' needs class_token=True; use 'avg' or 'seq' without a class token")
    if pos_embed not in POS_EMBEDS:
        raise ValueError(f"pos_embed {pos_embed!r} is not one of {POS_EMBEDS}")
    for name, value in dict(in_chans=in_chans, depth=depth).items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    for name, value in dict(num_classes=num_classes, reg_tokens=reg_tokens).items():
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    for name, value in rates.items():
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {value!r}")


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: VisionTransformer) -> dict[str, torch.Tensor]:
    """Adapt a timm/vision_attn ViT state dict to ``model``: resample position embeddings to its grid and patch
    projections to its patch size. Returns the new state dict."""
    state_dict = state_dict.get("model", state_dict)
    out = {}
    for key, value in state_dict.items():
        if key == "patch_embed.proj.weight" and value.ndim == 4:
            target = model.patch_embed.proj.weight
            if value.shape[-2:] != target.shape[-2:]:
                value = resample_patch_embed(value, list(target.shape[-2:]))
        elif key == "pos_embed" and model.pos_embed is not None and value.shape != model.pos_embed.shape:
            num_prefix = 0 if model.no_embed_class else model.num_prefix_tokens
            value = resample_abs_pos_embed(
                value, new_size=model.patch_embed.grid_size, num_prefix_tokens=num_prefix, verbose=True
            )
        out[key] = value
    return out


register_filter_fn(VisionTransformer, checkpoint_filter_fn)


TIMM_VIT_BY_WIDTH = {192: "vit_tiny_patch16_224", 384: "vit_small_patch16_224", 768: "vit_base_patch16_224",
                     1024: "vit_large_patch16_224"}  # fmt: skip


def timm_vit_args(model: nn.Module) -> tuple[str, dict[str, Any]] | None:
    """Return ``(timm_model_name, kwargs)`` building timm's own ``VisionTransformer`` with ``model``'s state dict
    and logits, or None when ``model`` uses a part timm's ViT lacks (CCT tokenizer or sequence pooling, SPT, LSA,
    sin-cos tables resampled at run time, other layers). The kwargs set every architecture argument, so the name
    only picks the timm entrypoint."""
    if not isinstance(model, VisionTransformer) or type(model.patch_embed) is not PatchEmbed:
        return None
    if model.attn_pool is not None or model.global_pool not in ("token", "avg", ""):
        return None
    if model.pos_embed_type == "sincos" and model.dynamic_img_size:
        return None
    if not isinstance(model.patch_embed.norm, nn.Identity) or model.patch_embed.proj.bias is None:
        return None
    first = model.blocks[0]

    def plain(block: nn.Module) -> bool:
        attn, mlp = block.attn, block.mlp
        norms = [block.norm1, block.norm2] + ([attn.q_norm, attn.k_norm] if not isinstance(attn.q_norm, nn.Identity)
                                               else [])  # fmt: skip
        return (
            type(block) is Block and type(attn) is Attention and type(mlp) is Mlp
            and attn.log_temperature is None and not attn.diagonal_mask
            and all(type(n) is nn.LayerNorm and n.eps == 1e-6 for n in norms)
            and type(mlp.act) is nn.GELU and mlp.act.approximate == "none"
            and attn.num_heads == first.attn.num_heads and mlp.fc1.out_features == first.mlp.fc1.out_features
            and type(block.ls1) is type(first.ls1)
        )  # fmt: skip

    if not all(plain(block) for block in model.blocks):
        return None
    kwargs = dict(
        img_size=list(model.patch_embed.img_size),
        patch_size=list(model.patch_embed.patch_size),
        in_chans=model.in_chans,
        num_classes=model.num_classes,
        global_pool=model.global_pool,
        embed_dim=model.embed_dim,
        depth=len(model.blocks),
        num_heads=first.attn.num_heads,
        mlp_ratio=first.mlp.fc1.out_features / model.embed_dim,
        qkv_bias=first.attn.qkv.bias is not None,
        qk_norm=not isinstance(first.attn.q_norm, nn.Identity),
        init_values=1e-5 if isinstance(first.ls1, LayerScale) else None,  # LayerScale on; its weights are loaded
        class_token=model.has_class_token,
        reg_tokens=model.num_reg_tokens,
        pos_embed="none" if model.pos_embed is None else "learn",  # a sin-cos table is stored like a learned one
        no_embed_class=model.no_embed_class,
        fc_norm=not isinstance(model.fc_norm, nn.Identity),
        dynamic_img_size=model.dynamic_img_size,
    )
    return TIMM_VIT_BY_WIDTH.get(model.embed_dim, "vit_base_patch16_224"), kwargs


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    out_indices = kwargs.pop("out_indices", 3)
    return build_model_with_cfg(
        VisionTransformer,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **kwargs,
    )


def _cfg(
    input_size: tuple[int, int, int],
    num_classes: int,
    mean: tuple[float, ...] = IMAGENET_INCEPTION_MEAN,  # (0.5, 0.5, 0.5), as timm's augreg ViT weights
    std: tuple[float, ...] = IMAGENET_INCEPTION_STD,
    **kw: Any,
) -> dict[str, Any]:
    cfg = dict(
        input_size=input_size,
        num_classes=num_classes,
        mean=mean,
        std=std,
        pool_size=None,
        crop_pct=1.0 if input_size[-1] <= 64 else 0.9,
        interpolation="bilinear" if input_size[-1] <= 64 else "bicubic",  # small: as our eval pipeline resizes
        fixed_input_size=True,  # unless built with dynamic_img_size=True (timm reads that from the model)
        first_conv="patch_embed.proj",
        classifier="head",
        license="apache-2.0",
    )
    return {**cfg, **kw}


CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)

default_cfgs = generate_default_cfgs(
    {
        "va_vit_tiny_patch4_32": _cfg((3, 32, 32), 10, CIFAR_MEAN, CIFAR_STD),
        "va_vit_small_patch4_32": _cfg((3, 32, 32), 10, CIFAR_MEAN, CIFAR_STD),
        "va_vit_tiny_patch8_64": _cfg((3, 64, 64), 10),
        "va_cct_2_3x2_32": _cfg((3, 32, 32), 10, CIFAR_MEAN, CIFAR_STD, first_conv="patch_embed.convs.0.0"),
        "va_cct_7_3x1_32": _cfg((3, 32, 32), 10, CIFAR_MEAN, CIFAR_STD, first_conv="patch_embed.convs.0.0"),
        "va_vitc_seq_tiny_patch8_64": _cfg((3, 64, 64), 10, first_conv="patch_embed.proj.0.conv"),
        "va_vitc2_seq_tiny_patch8_64": _cfg((3, 64, 64), 10, first_conv="patch_embed.proj.0.conv"),
        "va_vit_spt_lsa_tiny_patch4_32": _cfg((3, 32, 32), 10, CIFAR_MEAN, CIFAR_STD, first_conv="patch_embed.proj"),
        # timm's ImageNet weights load through timm's normal pretrained path (hf hub) when a network is there
        "va_vit_tiny_patch16_224.augreg_in21k_ft_in1k": _cfg(
            (3, 224, 224), 1000, hf_hub_id="timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k"
        ),
        "va_vit_small_patch16_224.augreg_in21k_ft_in1k": _cfg(
            (3, 224, 224), 1000, hf_hub_id="timm/vit_small_patch16_224.augreg_in21k_ft_in1k"
        ),
        "va_vit_base_patch16_224.augreg2_in21k_ft_in1k": _cfg(
            (3, 224, 224), 1000, hf_hub_id="timm/vit_base_patch16_224.augreg2_in21k_ft_in1k"
        ),
        "va_vit_base_patch16_224.untrained": _cfg((3, 224, 224), 1000, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
    }
)


def _lsa_attention(*args: Any, **kwargs: Any) -> Attention:
    return Attention(*args, learned_temperature=True, diagonal_mask=True, **kwargs)


@register_model
def va_vit_tiny_patch4_32(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT-Tiny for 32x32 images (CIFAR): patch 4 (8x8 grid), dim 192, depth 6, 3 heads, MLP ratio 2."""
    args = dict(img_size=32, patch_size=4, embed_dim=192, depth=6, num_heads=3, mlp_ratio=2.0, num_classes=10)
    return _create("va_vit_tiny_patch4_32", pretrained, **{**args, **kwargs})


@register_model
def va_vit_small_patch4_32(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT-Small for 32x32 images: patch 4, dim 384, depth 7, 6 heads, MLP ratio 2."""
    args = dict(img_size=32, patch_size=4, embed_dim=384, depth=7, num_heads=6, mlp_ratio=2.0, num_classes=10)
    return _create("va_vit_small_patch4_32", pretrained, **{**args, **kwargs})


@register_model
def va_vit_tiny_patch8_64(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT-Tiny for 64x64 images: patch 8 (8x8 grid), dim 192, depth 6, 3 heads, MLP ratio 2."""
    args = dict(img_size=64, patch_size=8, embed_dim=192, depth=6, num_heads=3, mlp_ratio=2.0, num_classes=10)
    return _create("va_vit_tiny_patch8_64", pretrained, **{**args, **kwargs})


@register_model
def va_cct_2_3x2_32(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """CCT-2/3x2 (Hassani et al. 2021): 2 conv layers of kernel 3, dim 128, depth 2, 2 heads, sequence pooling."""
    args = dict(
        img_size=32, embed_dim=128, depth=2, num_heads=2, mlp_ratio=1.0, num_classes=10, class_token=False,
        global_pool="seq", embed_layer=ConvTokenizer, embed_args=dict(kernel_size=3, num_conv_layers=2),
    )  # fmt: skip
    return _create("va_cct_2_3x2_32", pretrained, **{**args, **kwargs})


@register_model
def va_cct_7_3x1_32(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """CCT-7/3x1 (Hassani et al. 2021): 1 conv layer of kernel 3 (16x16 tokens), dim 256, depth 7, 4 heads,
    MLP ratio 2, sequence pooling, stochastic depth 0.1."""
    args = dict(
        img_size=32, embed_dim=256, depth=7, num_heads=4, mlp_ratio=2.0, num_classes=10, class_token=False,
        global_pool="seq", drop_path_rate=0.1, embed_layer=ConvTokenizer,
        embed_args=dict(kernel_size=3, num_conv_layers=1),
    )  # fmt: skip
    return _create("va_cct_7_3x1_32", pretrained, **{**args, **kwargs})


@register_model
def va_vitc2_seq_tiny_patch8_64(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT_C-Tiny with a two-conv-per-stage stem and sequence pooling for 64x64 images, the default model
    (``configs/default.yaml``).

    The stem (Xiao et al. 2021, "Early Convolutions Help Transformers See Better") has three stages of two 3x3
    conv-BN-ReLU layers (16, 32 and 64 channels; the first of each at stride 2) and a 1x1 projection to an 8x8 token
    grid; two transformer blocks (dim 96, 3 heads, MLP ratio 2) mix it, and CCT's sequence pooling (Hassani et al.
    2021) reads it out, so no class token is needed and the pooling weights say which tokens the classifier uses.
    Against :func:`va_vitc_seq_tiny_patch8_64` (one conv per stage, wider, three blocks) it learns more per epoch on
    small data at about the same cost per image; chosen by measurement in a 4-minute CPU time box (docs/training.md).
    """
    args = dict(
        img_size=64, patch_size=8, embed_dim=96, depth=2, num_heads=3, mlp_ratio=2.0, num_classes=10,
        class_token=False, global_pool="seq", embed_layer=ConvStemEmbed,
        embed_args=dict(stem_chans=(16, 32, 64), stem_depth=2),
    )  # fmt: skip
    return _create("va_vitc2_seq_tiny_patch8_64", pretrained, **{**args, **kwargs})


@register_model
def va_vitc_seq_tiny_patch8_64(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT_C-Tiny with sequence pooling for 64x64 images (the default model before
    :func:`va_vitc2_seq_tiny_patch8_64`).

    A convolutional stem (Xiao et al. 2021, "Early Convolutions Help Transformers See Better": three 3x3 stride-2
    conv-BN-ReLU layers of 32, 64 and 128 channels and a 1x1 projection) makes an 8x8 token grid, three transformer
    blocks (dim 96, 3 heads, MLP ratio 2; 337k parameters with one input channel) mix it, and CCT's sequence pooling
    (Hassani et al. 2021) reads it out, so no class token is needed and the pooling weights say which tokens the
    classifier uses. The size was chosen by measurement in a 4-minute CPU time box (docs/training.md).
    """
    args = dict(
        img_size=64, patch_size=8, embed_dim=96, depth=3, num_heads=3, mlp_ratio=2.0, num_classes=10,
        class_token=False, global_pool="seq", embed_layer=ConvStemEmbed, embed_args=dict(stem_chans=(32, 64, 128)),
    )  # fmt: skip
    return _create("va_vitc_seq_tiny_patch8_64", pretrained, **{**args, **kwargs})


@register_model
def va_vit_spt_lsa_tiny_patch4_32(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT-Tiny with Shifted Patch Tokenization and Locality Self-Attention (Lee et al. 2021) for 32x32 images."""
    args = dict(
        img_size=32, patch_size=4, embed_dim=192, depth=6, num_heads=3, mlp_ratio=2.0, num_classes=10,
        embed_layer=ShiftedPatchEmbed, attn_layer=_lsa_attention,
    )  # fmt: skip
    return _create("va_vit_spt_lsa_tiny_patch4_32", pretrained, **{**args, **kwargs})


@register_model
def va_vit_tiny_patch16_224(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT-Ti/16 (224x224); same layout as timm's ``vit_tiny_patch16_224`` and loads its weights."""
    args = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3)
    return _create("va_vit_tiny_patch16_224", pretrained, **{**args, **kwargs})


@register_model
def va_vit_small_patch16_224(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT-S/16 (224x224); same layout as timm's ``vit_small_patch16_224`` and loads its weights."""
    args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6)
    return _create("va_vit_small_patch16_224", pretrained, **{**args, **kwargs})


@register_model
def va_vit_base_patch16_224(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT-B/16 (224x224); same layout as timm's ``vit_base_patch16_224`` and loads its weights."""
    args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12)
    return _create("va_vit_base_patch16_224", pretrained, **{**args, **kwargs})
