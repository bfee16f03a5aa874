"""Image-to-token embeddings. Every embed layer returns NHWC tokens ``[B, gh, gw, C]`` so the grid stays known.

* :class:`PatchEmbed` — conv projection of non-overlapping patches (Dosovitskiy et al. 2021), timm's keys.
* :class:`ShiftedPatchEmbed` — Shifted Patch Tokenization (Lee et al. 2021, "Vision Transformer for
  Small-Size Datasets").
* :class:`ConvTokenizer` — convolutional tokenizer of CCT (Hassani et al. 2021, "Escaping the Big Data
  Paradigm with Compact Transformers").
* :class:`ConvStemEmbed` — stages of 3x3 conv-BN-ReLU layers (each starting at stride 2) and a 1x1 projection in
  place of the patchify convolution (Xiao et al. 2021, "Early Convolutions Help Transformers See Better").
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from timm.models.vision_transformer_hybrid import ConvStem
from torch import nn

from vision_attn.layers.checks import to_2tuple_int

__all__ = ["ConvStemEmbed", "ConvTokenizer", "PatchEmbed", "ShiftedPatchEmbed"]


class _PatchGrid(nn.Module):
    """Geometry shared by the non-overlapping patch embeddings: ``img_size``, ``patch_size`` and the token grid."""

    def __init__(self, img_size: int | tuple[int, int], patch_size: int | tuple[int, int]) -> None:
        super().__init__()
        self.img_size = to_2tuple_int(img_size, "img_size")
        self.patch_size = to_2tuple_int(patch_size, "patch_size")
        if self.img_size[0] % self.patch_size[0] or self.img_size[1] % self.patch_size[1]:
            raise ValueError(f"img_size {self.img_size} is not divisible by patch_size {self.patch_size}")
        self.input_divisor = self.patch_size
        self.grid_size = self.dynamic_feat_size(self.img_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]

    def feat_ratio(self) -> tuple[int, int]:
        """Return the spatial reduction (stride) from image pixels to tokens."""
        return self.patch_size

    def dynamic_feat_size(self, img_size: tuple[int, int]) -> tuple[int, int]:
        """Return the token grid ``(gh, gw)`` for an input of ``img_size``."""
        return img_size[0] // self.patch_size[0], img_size[1] // self.patch_size[1]


class PatchEmbed(_PatchGrid):
    """Split an image into ``patch_size`` patches and project each to ``embed_dim``; returns ``[B, gh, gw, C]``."""

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int | tuple[int, int] = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        norm_layer: Callable[[int], nn.Module] | None = None,
        bias: bool = True,
    ) -> None:
        super().__init__(img_size, patch_size)
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size, bias=bias)
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x).permute(0, 2, 3, 1)  # B, C, H, W -> B, gh, gw, D
        return self.norm(x)


class ConvStemEmbed(_PatchGrid):
    """Convolutional stem (Xiao et al. 2021): ``log2(patch_size)`` stages of 3x3 conv-BN-ReLU that each halve the
    resolution, then a 1x1 conv to ``embed_dim``; returns ``[B, gh, gw, embed_dim]`` on the same grid as a
    ``patch_size`` :class:`PatchEmbed`.

    ``stem_chans`` are the stage widths (default: ``embed_dim / 2**k``, doubling towards ``embed_dim``).
    ``stem_depth`` is the number of 3x3 convs per stage: the first has stride 2, the others stride 1 at the reduced
    resolution (a quarter of the cost they would have before the downsampling), so ``stem_depth=2`` doubles the
    stem's depth on the same token grid. Built from timm's ``ConvStem`` (keys ``proj.0`` ... ``proj.N``).
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 64,
        patch_size: int | tuple[int, int] = 8,
        in_chans: int = 3,
        embed_dim: int = 192,
        stem_chans: Sequence[int] | None = None,
        stem_depth: int = 1,
        norm_layer: Callable[[int], nn.Module] | None = None,
        bias: bool = True,
    ) -> None:
        super().__init__(img_size, patch_size)
        if (
            self.patch_size[0] != self.patch_size[1]
            or self.patch_size[0] < 2
            or self.patch_size[0] & (self.patch_size[0] - 1)
        ):
            raise ValueError(f"patch_size {self.patch_size} must be square and a power of 2 (>= 2) for ConvStemEmbed")
        num_stages = self.patch_size[0].bit_length() - 1
        if stem_chans is None:
            stem_chans = [max(8, embed_dim // 2 ** (num_stages - i)) for i in range(num_stages)]
        stem_chans = [int(c) for c in stem_chans]
        if len(stem_chans) != num_stages or min(stem_chans) < 1:
            raise ValueError(
                f"stem_chans {stem_chans} must give {num_stages} positive widths (one per stride-2 stage of "
                f"patch_size {self.patch_size[0]})"
            )
        if isinstance(stem_depth, bool) or not isinstance(stem_depth, int) or stem_depth < 1:
            raise ValueError(f"stem_depth must be an int >= 1 (3x3 convs per stage), got {stem_depth!r}")
        del bias  # the last (1x1) conv has a bias, the others are followed by BatchNorm
        num_convs = num_stages * stem_depth
        self.proj = ConvStem(
            in_chans=in_chans, depth=num_convs + 1,
            channels=(*(c for c in stem_chans for _ in range(stem_depth)), embed_dim),
            kernel_size=(3,) * num_convs + (1,), stride=((2,) + (1,) * (stem_depth - 1)) * num_stages + (1,),
            padding=(1,) * num_convs + (0,),
        )  # fmt: skip
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))  # B, C, H, W -> B, gh, gw, D


class ShiftedPatchEmbed(_PatchGrid):
    """Shifted Patch Tokenization (Lee et al. 2021): concatenate the image with four copies shifted by half a
    patch diagonally, then patch-flatten, LayerNorm and project. Returns ``[B, gh, gw, embed_dim]``."""

    def __init__(
        self,
        img_size: int | tuple[int, int] = 32,
        patch_size: int | tuple[int, int] = 4,
        in_chans: int = 3,
        embed_dim: int = 192,
        norm_layer: Callable[[int], nn.Module] | None = None,
        bias: bool = True,
    ) -> None:
        super().__init__(img_size, patch_size)
        patch_dim = 5 * in_chans * self.patch_size[0] * self.patch_size[1]
        self.patch_norm = nn.LayerNorm(patch_dim)
        self.proj = nn.Linear(patch_dim, embed_dim, bias=bias)
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        (ph, pw), (sh, sw) = self.patch_size, (self.patch_size[0] // 2, self.patch_size[1] // 2)
        padded = F.pad(x, (sw, sw, sh, sh))
        shifts = [
            padded[..., :H, :W],  # the four diagonal half-patch shifts
            padded[..., :H, 2 * sw : 2 * sw + W],
            padded[..., 2 * sh : 2 * sh + H, :W],
            padded[..., 2 * sh : 2 * sh + H, 2 * sw : 2 * sw + W],
        ]
        x = torch.cat([x] + shifts, dim=1)  # noqa: RUF005 (TorchScript has no [a, *b]); B, 5C, H, W
        gh, gw = H // ph, W // pw
        x = x.reshape(B, 5 * C, gh, ph, gw, pw).permute(0, 2, 4, 3, 5, 1).reshape(B, gh, gw, -1)
        return self.norm(self.proj(self.patch_norm(x)))


class ConvTokenizer(nn.Module):
    """CCT convolutional tokenizer (Hassani et al. 2021): ``num_conv_layers`` x [conv k, ReLU, max-pool 3/2].

    ``patch_size`` is accepted for interface compatibility and ignored; the grid follows from the convs.
    Returns ``[B, gh, gw, embed_dim]``.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 32,
        patch_size: int | tuple[int, int] | None = None,
        in_chans: int = 3,
        embed_dim: int = 256,
        kernel_size: int = 3,
        num_conv_layers: int = 1,
        hidden_chans: int = 64,
        norm_layer: Callable[[int], nn.Module] | None = None,
        bias: bool = True,
    ) -> None:
        super().__init__()
        del patch_size, bias  # the CCT tokenizer convs have no bias
        if num_conv_layers < 1:
            raise ValueError(f"num_conv_layers must be >= 1, got {num_conv_layers}")
        self.img_size = to_2tuple_int(img_size, "img_size")
        self.input_divisor = (1, 1)
        self.kernel_size = kernel_size
        self.conv_stride = max(1, kernel_size // 2 - 1)
        self.conv_padding = max(1, kernel_size // 2)
        chans = [in_chans] + [hidden_chans] * (num_conv_layers - 1) + [embed_dim]
        self.convs = nn.Sequential(
            *[
                nn.Sequential(
                    nn.Conv2d(c_in, c_out, kernel_size, self.conv_stride, self.conv_padding, bias=False),
                    nn.ReLU(inplace=True),
                    nn.MaxPool2d(3, 2, 1),
                )
                for c_in, c_out in itertools.pairwise(chans)
            ]
        )
        self.num_conv_layers = num_conv_layers
        self.grid_size = self.dynamic_feat_size(self.img_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.patch_size = self.feat_ratio()
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)

    def feat_ratio(self) -> tuple[int, int]:
        """Return the spatial reduction (stride) from image pixels to tokens."""
        stride = (self.conv_stride * 2) ** self.num_conv_layers
        return stride, stride

    def dynamic_feat_size(self, img_size: tuple[int, int]) -> tuple[int, int]:
        """Return the token grid ``(gh, gw)`` for an input of ``img_size``."""
        size = list(img_size)
        for _ in range(self.num_conv_layers):
            size = [(s + 2 * self.conv_padding - self.kernel_size) // self.conv_stride + 1 for s in size]
            size = [(s + 2 - 3) // 2 + 1 for s in size]
        return size[0], size[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.convs(x).permute(0, 2, 3, 1))  # B, D, gh, gw -> B, gh, gw, D
