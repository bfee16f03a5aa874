"""timm's CNN attention modules with their maps made readable: each is a thin subclass adding an ``AttentionTap``.

The subclasses keep timm's parameters and state-dict keys (timm SE-ResNet weights load unchanged) and change no
arithmetic; they only route the gate / attention map through an :class:`AttentionTap`, the single capture
mechanism (see :mod:`vision_attn.layers.attention_tap`). Papers: SE, Hu et al. 2018 ("Squeeze-and-Excitation
Networks"); ECA, Wang et al. 2020 ("ECA-Net"); CBAM, Woo et al. 2018; coordinate attention, Hou et al. 2021
("Coordinate Attention for Efficient Mobile Network Design"); non-local, Wang et al. 2018 ("Non-local Neural
Networks").
"""

from __future__ import annotations

from typing import Any

import torch
from timm.layers import EcaModule, NonLocalAttn, SEModule
from timm.layers.cbam import CbamModule
from timm.layers.coord_attn import CoordAttn
from torch import nn

from vision_attn.layers.attention_tap import AttentionTap

__all__ = ["CNN_GATES", "TappedCbam", "TappedCoordAttn", "TappedEca", "TappedNonLocal", "TappedSE"]


def _tap_after(gate: nn.Module, kind: str) -> nn.Sequential:
    """Return ``gate`` followed by an ``AttentionTap(kind)`` (the gate has no parameters, so no key moves)."""
    return nn.Sequential(gate, AttentionTap(kind))


class TappedSE(SEModule):
    """timm ``SEModule`` (Hu et al. 2018): ``x * sigmoid(fc2(relu(fc1(avgpool(x)))))``, ``[B, C, H, W]`` kept.

    Tap: ``gate.1`` (kind ``channel``) sees the gate ``[B, C, 1, 1]``.
    """

    def __init__(self, channels: int, **kwargs: Any) -> None:
        super().__init__(channels, **kwargs)
        self.gate = _tap_after(self.gate, "channel")


class TappedEca(EcaModule):
    """timm ``EcaModule`` (Wang et al. 2020): channel gate from a 1-D conv across pooled channels; shape kept.

    Tap: ``attn_tap`` (kind ``channel``) sees the gate ``[B, C, 1, 1]``.
    """

    def __init__(self, channels: int, **kwargs: Any) -> None:
        super().__init__(channels, **kwargs)
        self.attn_tap = AttentionTap("channel")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``x * gate``, ``[B, C, H, W]``; timm's forward with the gate tapped."""
        y = x.mean((2, 3)).view(x.shape[0], 1, -1)  # B, 1, C for the 1-D conv across channels
        y = self.conv(y)
        if self.conv2 is not None:
            y = self.conv2(self.act(y))
        gate = self.attn_tap(self.gate(y).view(x.shape[0], -1, 1, 1))  # B, C, 1, 1
        return x * gate


class TappedCbam(CbamModule):
    """timm ``CbamModule`` (Woo et al. 2018): channel gate then spatial gate; ``[B, C, H, W]`` kept.

    Taps: ``channel.gate.1`` (kind ``channel``, ``[B, C, 1, 1]``) and ``spatial.gate.1`` (kind ``spatial``,
    ``[B, 1, H, W]``), in that (forward) order.
    """

    def __init__(self, channels: int, **kwargs: Any) -> None:
        super().__init__(channels, **kwargs)
        self.channel.gate = _tap_after(self.channel.gate, "channel")
        self.spatial.gate = _tap_after(self.spatial.gate, "spatial")


class TappedCoordAttn(CoordAttn):
    """timm ``CoordAttn`` (Hou et al. 2021): ``x * a_h * a_w`` with gates along height and width; shape kept.

    Tap: ``attn_tap`` (kind ``spatial``) sees the combined gate ``a_h * a_w`` ``[B, C, H, W]``.
    """

    def __init__(self, channels: int, **kwargs: Any) -> None:
        super().__init__(channels, **kwargs)
        self.attn_tap = AttentionTap("spatial")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``x * a_h * a_w`` (plus ``x`` with ``has_skip``), ``[B, C, H, W]``; timm's forward, gate tapped."""
        _, _, height, width = x.shape
        x_h = x.mean(3, keepdim=True)  # B, C, H, 1
        x_w = x.mean(2, keepdim=True).transpose(-1, -2)  # B, C, W, 1
        y = self.act(self.bn1(self.conv1(torch.cat([x_h, x_w], dim=2))))
        y_h, y_w = torch.split(y, [height, width], dim=2)
        a_h = self.gate(self.conv_h(y_h))  # B, C, H, 1
        a_w = self.gate(self.conv_w(y_w.transpose(-1, -2)))  # B, C, 1, W
        out = x * self.attn_tap(a_h * a_w)
        return out + x if self.has_skip else out


class TappedNonLocal(NonLocalAttn):
    """timm ``NonLocalAttn`` (Wang et al. 2018), embedded-Gaussian non-local block with residual; shape kept.

    Tap: ``attn_tap`` (kind ``attention``) sees the softmax affinities ``[B, 1, H*W, H*W]``.
    """

    def __init__(self, channels: int, **kwargs: Any) -> None:
        super().__init__(channels, **kwargs)
        self.attn_tap = AttentionTap("attention")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``x + BN(z(softmax(theta^T phi) g))``, ``[B, C, H, W]``; timm's forward with the map tapped."""
        batch, _, height, width = x.shape
        t = self.t(x).flatten(2).transpose(1, 2)  # B, N, C'
        p = self.p(x).flatten(2)  # B, C', N
        g = self.g(x).flatten(2).transpose(1, 2)  # B, N, C'
        attn = ((t @ p) * self.scale).softmax(dim=-1)  # B, N, N
        attn = self.attn_tap(attn.unsqueeze(1)).squeeze(1)
        y = (attn @ g).transpose(1, 2).reshape(batch, -1, height, width)  # B, C', H, W
        return self.norm(self.z(y)) + x


CNN_GATES: dict[str, type[nn.Module]] = {
    "se": TappedSE,
    "eca": TappedEca,
    "cbam": TappedCbam,
    "coord": TappedCoordAttn,
    "nonlocal": TappedNonLocal,
}
