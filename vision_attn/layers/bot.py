"""BoT multi-head self-attention: Srinivas et al. 2021, "Bottleneck Transformers for Visual Recognition" (CVPR).

Reuses timm's ``BottleneckAttn`` (same parameters and state-dict keys: ``qkv``, ``pos_embed.height_rel``,
``pos_embed.width_rel``) and adds what this package needs: a clear error when the input does not have the fixed
feature size of the relative position tables, and an ``AttentionTap`` on the probabilities.
"""

from __future__ import annotations

import torch
from timm.layers.bottleneck_attn import BottleneckAttn

from vision_attn.layers.attention_tap import AttentionTap
from vision_attn.layers.checks import is_tracing, to_2tuple_int

__all__ = ["BotAttention"]


class BotAttention(BottleneckAttn):
    """MHSA with 2-D relative position logits over a fixed ``feat_size`` grid (Srinivas et al. 2021, Fig. 4).

    ``[B, dim, H, W] -> [B, dim_out, H/stride, W/stride]`` with ``(H, W) == feat_size`` required; ``stride=2``
    average-pools the attention output (as the paper's first block of c5). Probabilities ``[B, heads, N, N]``
    pass through ``attn_tap``. Always the explicit softmax path (timm's module has no fused one either).
    """

    def __init__(
        self,
        dim: int,
        dim_out: int | None = None,
        feat_size: int | tuple[int, int] | None = None,
        stride: int = 1,
        num_heads: int = 4,
        dim_head: int | None = None,
        qk_ratio: float = 1.0,
        qkv_bias: bool = False,
        scale_pos_embed: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if feat_size is None:
            raise ValueError("feat_size (the fixed input H, W) is required: it sizes the relative position tables")
        feat_size = to_2tuple_int(feat_size, "feat_size")
        dim_out = dim_out or dim
        if not isinstance(num_heads, int) or num_heads < 1 or dim_out % num_heads:
            raise ValueError(f"num_heads={num_heads!r} must be a positive int dividing dim_out={dim_out}")
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride!r}")
        if stride == 2 and (feat_size[0] % 2 or feat_size[1] % 2):
            raise ValueError(f"feat_size {feat_size[0]}x{feat_size[1]} must be even for stride 2 (2x2 average pool)")
        super().__init__(
            dim,
            dim_out,
            feat_size=feat_size,
            stride=stride,
            num_heads=num_heads,
            dim_head=dim_head,
            qk_ratio=qk_ratio,
            qkv_bias=qkv_bias,
            scale_pos_embed=scale_pos_embed,
            device=device,
            dtype=dtype,
        )
        self.feat_size = feat_size
        self.attn_tap = AttentionTap("attention")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``[B, dim_out, H/stride, W/stride]``; timm's forward with a size check and tapped probabilities."""
        batch, _, height, width = x.shape
        if (torch.jit.is_scripting() or not is_tracing()) and (height, width) != self.feat_size:
            raise ValueError(
                f"x has feature size {height}x{width} but this BotAttention was built for feat_size "
                f"{self.feat_size[0]}x{self.feat_size[1]} (fixed relative position tables); "
                "build the model with img_size matching the input"
            )
        num_tokens = height * width
        q, k, v = torch.split(self.qkv(x), [self.dim_out_qk, self.dim_out_qk, self.dim_out_v], dim=1)
        q = q.reshape(batch * self.num_heads, self.dim_head_qk, num_tokens).transpose(-1, -2)  # B*h, N, dqk
        k = k.reshape(batch * self.num_heads, self.dim_head_qk, num_tokens)  # B*h, dqk, N
        v = v.reshape(batch * self.num_heads, self.dim_head_v, num_tokens).transpose(-1, -2)  # B*h, N, dv
        if self.scale_pos_embed:
            attn = (q @ k + self.pos_embed(q)) * self.scale
        else:
            attn = (q @ k) * self.scale + self.pos_embed(q)
        attn = attn.softmax(dim=-1).reshape(batch, self.num_heads, num_tokens, num_tokens)
        attn = self.attn_tap(attn).reshape(batch * self.num_heads, num_tokens, num_tokens)
        out = (attn @ v).transpose(-1, -2).reshape(batch, self.dim_out_v, height, width)
        return self.pool(out)
