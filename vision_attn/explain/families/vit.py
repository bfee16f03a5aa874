"""Plain ViTs (ours and timm's ViT, DeiT, DeiT-III, BEiT, EVA, DINOv2, CLIP, SigLIP, relpos/RoPE ViTs, FlexiViT,
NaFlexViT, hybrid ViTs, CCT), their heads (class token, distillation token, average, CCT sequence pooling,
attention pooling), and TNT.

Every block attends globally over one token set: prefix tokens then the patch grid of ``patch_embed``. The readout is
the rows the head pools; an attention-pool head (timm ``AttentionPoolLatent``, ``global_pool='map'``: SigLIP,
Perception Encoder, NaFlexViT) reads its latent query's attention over the tokens, the mean over heads and latents.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from vision_attn.explain._common import NotApplicableError
from vision_attn.explain.families.base import Capture, FamilyAdapter, FeatureLayout, register_adapter
from vision_attn.explain.flow import TokenFlow, TokenGrid, attention_mix, merge_mix
from vision_attn.explain.rollout import token_pool_weights

__all__ = ["TNTAdapter", "ViTAdapter"]


def _attention_pools() -> tuple[type, ...]:
    from timm.layers.attention_pool import AttentionPoolLatent

    return (AttentionPoolLatent,)


def _self_attention_pools() -> tuple[type, ...]:
    try:
        from timm.layers.attention_pool import AttentionPoolPrr
    except ImportError:  # older timm
        return ()
    return (AttentionPoolPrr,)


def _legacy_owners(model: nn.Module) -> bool:
    return any(
        hasattr(m, "fused_attn") and isinstance(getattr(m, "attn_drop", None), nn.Module) for m in model.modules()
    )


def _square(count: int, name: str) -> tuple[int, int]:
    side = math.isqrt(count)
    if side * side != count:
        raise NotApplicableError(
            f"model {name} has {count} patch tokens, which fit no square grid, and declares no token grid "
            f"(patch_embed.grid_size); pass grid_size=(gh, gw) with gh * gw == {count}"
        )
    return side, side


def _backbone(model: nn.Module) -> nn.Module:
    """The module holding ``patch_embed`` and ``blocks``: the model, or its ``encoder`` (timm's DeepSeek, Gemma 4
    and Qwen3 vision encoders wrapped in a classifier)."""
    encoder = getattr(model, "encoder", None)
    if not hasattr(model, "blocks") and isinstance(encoder, nn.Module) and hasattr(encoder, "blocks"):
        return encoder
    return model


class ViTAdapter(FamilyAdapter):
    """Global self-attention over ``num_prefix_tokens`` + the patch grid in every block (the fallback adapter: any
    model with ours or timm's ``Attention`` modules that no other adapter claims)."""

    family = "ViT"

    def matches(self, model: nn.Module) -> bool:
        pool = getattr(model, "attn_pool", None)
        return _legacy_owners(model) or isinstance(pool, _attention_pools() + _self_attention_pools())

    def problem(self, model: nn.Module) -> str:
        from vision_attn.explain.tokens import token_pool

        try:
            token_pool(model)
        except NotApplicableError as err:
            return str(err)
        return ""

    def owners(self, model: nn.Module) -> dict[str, nn.Module]:
        pool = getattr(model, "attn_pool", None)
        if isinstance(pool, _attention_pools() + _self_attention_pools()):
            return {"attn_pool": pool}
        return {}

    def pools(self, model: nn.Module) -> dict[str, nn.Module]:
        pool = getattr(model, "attn_pool", None)
        return {"attn_pool": pool} if isinstance(pool, _attention_pools()) else {}

    def tokens(self, model: nn.Module, capture: Capture, count: int) -> TokenGrid:
        """The token set every block attends over (checked against the attention's ``count``)."""
        from vision_attn.explain.tokens import token_layout

        prefix, grid = token_layout(model, capture.image_size, capture.num_prefix_tokens, capture.grid_size)
        backbone = _backbone(model)
        if grid is None and backbone is not model:
            prefix, grid = token_layout(backbone, capture.image_size, capture.num_prefix_tokens, capture.grid_size)
        if grid is None:
            grid = _square(count - prefix, type(model).__name__)
        tokens = TokenGrid(prefix, grid)
        if tokens.num_tokens != count:
            raise NotApplicableError(
                f"model {type(model).__name__} attends over {count} tokens, but its layout is {prefix} prefix tokens "
                f"and a {grid[0]}x{grid[1]} grid ({tokens.num_tokens} tokens)"
            )
        return tokens

    def describe(
        self, model: nn.Module, events: list[tuple[str, str, Any]], weights: list[torch.Tensor], capture: Capture
    ) -> TokenFlow:
        from vision_attn.explain.tokens import token_pool

        name = type(model).__name__
        pools = self.pools(model)
        pool_name = next(iter(self.owners(model)), None)
        blocks = [(n, weights[i]) for kind, n, i in events if kind == "attention" and n != pool_name]
        pool_maps = [weights[i] for kind, n, i in events if kind == "attention" and n == pool_name]
        if not blocks:
            raise NotApplicableError(f"model {name} ran no token attention")
        count = blocks[0][1].shape[-1]
        shapes = sorted({tuple(w.shape[-3:]) for _, w in blocks})
        if shapes != [(1, count, count)]:
            raw = sorted({(w.shape[0], *w.shape[-3:]) for _, w in blocks})
            raise NotApplicableError(
                f"model {name} has attention of shapes [B, windows, q, k] {raw} for {capture.batch} images: not one "
                f"global [B, heads, N, N] map over one token set in every block ({self.family} adapter); its family "
                "has no adapter that places these maps on the token grid; use a Grad-CAM method or attnlrp"
            )
        tokens = self.tokens(model, capture, count)
        mixes = [attention_mix(n, tokens, w) for n, w in blocks]
        pool = token_pool(model)
        if pool in ("map", "prr"):
            return self._attention_pool(model, mixes, tokens, pool_maps, latent=bool(pools))
        readout = token_pool_weights(pool, count, tokens.num_prefix_tokens, capture.pool_weights)
        return TokenFlow(mixes, readout, family=self.family)

    def _attention_pool(
        self, model: nn.Module, mixes: list, tokens: TokenGrid, pool_maps: list[torch.Tensor], latent: bool
    ) -> TokenFlow:
        name = type(model).__name__
        if len(pool_maps) != 1:
            raise NotApplicableError(f"model {name}'s attention pool ran {len(pool_maps)} times in one forward pass")
        pool_map = pool_maps[0]  # B, 1, q, k (heads reduced)
        pool_map = pool_map if pool_map.ndim == 4 else pool_map.mean(dim=1)
        include_prefix = pool_map.shape[-1] == tokens.num_tokens
        if not include_prefix and pool_map.shape[-1] != tokens.num_patches:
            raise NotApplicableError(
                f"model {name}'s attention pool attends over {pool_map.shape[-1]} tokens; expected {tokens.num_tokens} "
                f"or the {tokens.num_patches} patch tokens"
            )
        keys = tokens if include_prefix else TokenGrid(0, tokens.grid)
        if not include_prefix and tokens.num_prefix_tokens:  # the pool reads the patch tokens only
            sources = [[tokens.num_prefix_tokens + i] for i in range(tokens.num_patches)]
            mixes = [*mixes, merge_mix("attn_pool (patch tokens)", tokens, keys, sources)]
        if latent:  # AttentionPoolLatent: the latent queries' attention is the readout
            readout = pool_map.mean(dim=(1, 2))  # B, k: mean over windows (1) and latents
            return TokenFlow(mixes, readout, pool=True, family=self.family)
        # AttentionPoolPrr: self-attention of the tokens without a residual path, then the class or average row
        mixes = [*mixes, attention_mix("attn_pool", keys, pool_maps[0], residual=False)]
        row = model.attn_pool.pool
        readout = torch.zeros(keys.num_tokens)
        if row == "token":
            readout[0] = 1.0
        else:
            readout[:] = 1.0 / keys.num_tokens
        return TokenFlow(mixes, readout, family=self.family)

    def embedding(self, model: nn.Module) -> nn.Module | None:
        backbone = _backbone(model)
        module = getattr(backbone, "patch_embed", None)
        embeds = getattr(model, "embeds", None)  # NaFlexViT: a linear projection of the patchified image
        if module is None and isinstance(getattr(embeds, "proj", None), nn.Module):
            module = embeds.proj
        return module if isinstance(module, nn.Module) else None

    def cam_layer(self, model: nn.Module) -> tuple[nn.Module, FeatureLayout] | None:
        """The last block's ``norm1``: its input tokens (the usual choice for ViTs; a class-token head reads nothing
        of the last block's patch outputs)."""
        from vision_attn.explain.tokens import declared_prefix

        backbone = _backbone(model)
        blocks = getattr(backbone, "blocks", None)
        if isinstance(blocks, (nn.Sequential, nn.ModuleList)) and len(blocks) > 0:
            last = blocks[-1]
            layer = last.norm1 if isinstance(getattr(last, "norm1", None), nn.Module) else last
            return layer, FeatureLayout("tokens", declared_prefix(backbone))
        return None


class TNTAdapter(ViTAdapter):
    """TNT (Han et al. 2021, "Transformer in Transformer"): the outer attention over the class token and the patch
    tokens is a ViT; the inner attention runs among the pixels of one patch and moves nothing between patches, so it
    is left out (at patch resolution it is the identity)."""

    family = "TNT"

    @staticmethod
    def _block_class() -> tuple[type, ...]:
        from timm.models.tnt import Block

        return (Block,)

    def matches(self, model: nn.Module) -> bool:
        return any(isinstance(m, self._block_class()) for m in model.modules())

    def owners(self, model: nn.Module) -> dict[str, nn.Module]:
        return {f"{n}.attn_out": m.attn_out for n, m in model.named_modules() if isinstance(m, self._block_class())}

    def skipped(self, model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
        return {
            f"{n}.attn_in": (m.attn_in, "attention among the pixels of one patch (identity between patches)")
            for n, m in model.named_modules()
            if isinstance(m, self._block_class())
        }

    def tokens(self, model: nn.Module, capture: Capture, count: int) -> TokenGrid:
        grid = getattr(model.pixel_embed, "grid_size", None)
        if grid is None:
            grid = _square(count - 1, type(model).__name__)
        return TokenGrid(1, tuple(grid))

    def embedding(self, model: nn.Module) -> nn.Module | None:
        return None

    def cam_layer(self, model: nn.Module) -> tuple[nn.Module, FeatureLayout] | None:
        last = model.blocks[-1]
        return last.norm_out, FeatureLayout("tokens", 1, tuple(model.pixel_embed.grid_size))


register_adapter(TNTAdapter())
register_adapter(ViTAdapter(), fallback=True)
