"""Attention-augmented convolution: Bello et al. 2019, "Attention Augmented Convolutional Networks" (ICCV).

``AugmentedConv2d(x) = concat[Conv(x), MHSA(x)]``: a convolution with ``out_channels - dv`` outputs next to
multi-head self-attention over all positions with ``dv`` outputs, whose logits carry learned 2-D relative
position terms for height and width (the paper's Sec. 3.2). With ``dk = dv = 0`` it is exactly its plain
convolution, so it is a drop-in for the 3x3 convs of a residual block.
"""

from __future__ import annotations

import math

import torch
from timm.layers import trunc_normal_
from torch import nn

from vision_attn.layers.attention_tap import AttentionTap
from vision_attn.layers.checks import is_tracing, to_2tuple_int

__all__ = ["AugmentedConv2d", "relative_logits_2d"]


def relative_logits_2d(
    q: torch.Tensor, rel_height: torch.Tensor, rel_width: torch.Tensor, size: tuple[int, int]
) -> torch.Tensor:
    """Return relative position logits ``[B, heads, H*W, H*W]`` for queries ``q`` ``[B, heads, H*W, d]``.

    The position terms of Bello et al. 2019, Eq. 3 (pass ``q`` already scaled by ``dk_head ** -0.5``):
    ``logit[i, j] = q_i · r^W[x_j - x_i] + q_i · r^H[y_j - y_i]``. ``rel_height`` is
    ``[2 * max_h - 1, d]`` with offset 0 in its middle row (likewise ``rel_width``); any ``size`` up to
    ``(max_h, max_w)`` uses the central rows, so a table built for a large map also serves smaller ones.
    """
    batch, heads, num_tokens, dim = q.shape
    height, width = size
    max_h, max_w = (rel_height.shape[0] + 1) // 2, (rel_width.shape[0] + 1) // 2
    if torch.jit.is_scripting() or not is_tracing():  # traced graphs carry no value checks
        if num_tokens != height * width:
            raise ValueError(f"q has {num_tokens} tokens but size {height}x{width} has {height * width}")
        if height > max_h or width > max_w:
            raise ValueError(f"size {height}x{width} exceeds the relative position tables' {max_h}x{max_w}")
    rel_h = rel_height[max_h - height : max_h + height - 1]  # 2H-1, d: offsets -(H-1) .. H-1
    rel_w = rel_width[max_w - width : max_w + width - 1]  # 2W-1, d
    q = q.reshape(batch, heads, height, width, dim)
    logits_h = q @ rel_h.transpose(0, 1)  # B, heads, H, W, 2H-1 (query y, x; key offset)
    logits_w = q @ rel_w.transpose(0, 1)  # B, heads, H, W, 2W-1
    # key offset -> key index: column (key - query + size - 1) of the offset axis
    pos_h = torch.arange(height, device=q.device)
    pos_w = torch.arange(width, device=q.device)
    index_h = (pos_h[None, :] - pos_h[:, None] + height - 1)[:, None, :]  # query y, 1, key y'
    index_w = pos_w[None, :] - pos_w[:, None] + width - 1  # query x, key x'
    logits_h = logits_h.gather(-1, index_h.expand(batch, heads, height, width, height))  # B, heads, H, W, H
    logits_w = logits_w.gather(-1, index_w.expand(batch, heads, height, width, width))  # B, heads, H, W, W
    logits = logits_h[..., :, None] + logits_w[..., None, :]  # B, heads, H, W, H, W
    return logits.reshape(batch, heads, num_tokens, num_tokens)


class AugmentedConv2d(nn.Module):
    """Attention-augmented convolution (Bello et al. 2019): ``[B, C_in, H, W] -> [B, C_out, H/stride, W/stride]``.

    The first ``out_channels - dv`` output channels are ``Conv2d(in_channels, ., kernel_size, stride,
    padding=kernel_size // 2)``; the last ``dv`` are multi-head self-attention (``num_heads`` heads, query/key
    depth ``dk``, value depth ``dv``, 2-D relative logits, a 1x1 output projection). With ``stride > 1`` the
    attention runs on the ``stride``-average-pooled input (our choice; it keeps the attention cheap and its grid
    equal to the conv's output grid). ``feat_size`` is the largest input ``(H, W)`` the relative position tables
    cover; smaller inputs work too. ``dk = dv = 0`` gives a plain convolution with no attention parameters.

    Probabilities ``[B, heads, N, N]`` (N = output H*W) pass through ``attn_tap`` (an ``AttentionTap``). There is
    no fused SDPA path: the explicit softmax is cheap at CNN resolutions and is where the probabilities exist.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        dk: int = 0,
        dv: int = 0,
        num_heads: int = 8,
        feat_size: int | tuple[int, int] | None = None,
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        for arg, value in (("in_channels", in_channels), ("out_channels", out_channels), ("stride", stride)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{arg} must be a positive int, got {value!r}")
        if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd int, got {kernel_size!r}")
        if not isinstance(dk, int) or not isinstance(dv, int) or dk < 0 or dv < 0 or (dk == 0) != (dv == 0):
            raise ValueError(
                f"dk and dv must be both 0 (plain convolution) or both positive ints, got dk={dk!r}, dv={dv!r}"
            )
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride = kernel_size, stride
        self.dk, self.dv, self.num_heads = dk, dv, num_heads

        conv_channels = out_channels - dv
        if conv_channels < 0:
            raise ValueError(f"dv={dv} exceeds out_channels={out_channels}; the attention can give at most all of them")
        self.conv = (
            nn.Conv2d(in_channels, conv_channels, kernel_size, stride, padding=kernel_size // 2, bias=bias, **dd)
            if conv_channels > 0
            else None
        )
        if dv == 0:
            return

        if not isinstance(num_heads, int) or num_heads < 1 or dk % num_heads or dv % num_heads:
            raise ValueError(f"num_heads={num_heads!r} must be a positive int dividing dk={dk} and dv={dv}")
        if feat_size is None:
            raise ValueError("feat_size (the largest input H, W) is required when dv > 0: it sizes the position tables")
        height, width = to_2tuple_int(feat_size, "feat_size")
        self.feat_size = (height, width)
        attn_h, attn_w = math.ceil(height / stride), math.ceil(width / stride)
        self.dim_head = dk // num_heads
        self.scale = self.dim_head**-0.5
        self.pool = (
            nn.AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False) if stride > 1 else nn.Identity()
        )
        self.qkv = nn.Conv2d(in_channels, 2 * dk + dv, 1, bias=bias, **dd)
        self.rel_height = nn.Parameter(torch.empty(2 * attn_h - 1, self.dim_head, **dd))
        self.rel_width = nn.Parameter(torch.empty(2 * attn_w - 1, self.dim_head, **dd))
        self.attn_tap = AttentionTap("attention")
        self.proj = nn.Conv2d(dv, dv, 1, bias=bias, **dd)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise the attention weights (qkv fan-in, position tables ~ N(0, dk_head^-1)); returns nothing."""
        if self.dv == 0:
            return
        trunc_normal_(self.qkv.weight, std=self.qkv.weight.shape[1] ** -0.5)
        trunc_normal_(self.rel_height, std=self.scale)
        trunc_normal_(self.rel_width, std=self.scale)

    def extra_repr(self) -> str:
        return f"dk={self.dk}, dv={self.dv}, num_heads={self.num_heads}, stride={self.stride}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``concat[conv(x), attention(x)]`` of shape ``[B, out_channels, ceil(H/stride), ceil(W/stride)]``."""
        if self.dv == 0:
            return self.conv(x)
        batch, _, height, width = x.shape
        if (torch.jit.is_scripting() or not is_tracing()) and (height > self.feat_size[0] or width > self.feat_size[1]):
            raise ValueError(
                f"x has spatial size {height}x{width}, larger than this AugmentedConv2d's feat_size "
                f"{self.feat_size[0]}x{self.feat_size[1]} (the largest input its relative position tables cover); "
                "build it (or the model, via img_size) for the larger size"
            )
        xa = self.pool(x)
        attn_h, attn_w = xa.shape[-2:]
        num_tokens = attn_h * attn_w
        q, k, v = self.qkv(xa).split([self.dk, self.dk, self.dv], dim=1)
        q = q.reshape(batch, self.num_heads, self.dim_head, num_tokens).transpose(-1, -2) * self.scale  # B, h, N, dkh
        k = k.reshape(batch, self.num_heads, self.dim_head, num_tokens)  # B, h, dkh, N
        v = v.reshape(batch, self.num_heads, self.dv // self.num_heads, num_tokens).transpose(-1, -2)  # B, h, N, dvh
        attn = q @ k + relative_logits_2d(q, self.rel_height, self.rel_width, (attn_h, attn_w))  # B, h, N, N
        attn = self.attn_tap(attn.softmax(dim=-1))
        out = (attn @ v).transpose(-1, -2).reshape(batch, self.dv, attn_h, attn_w)  # B, h, N, dvh -> B, dv, H', W'
        out = self.proj(out)
        if self.conv is None:
            return out
        return torch.cat([self.conv(x), out], dim=1)
