"""Pictures of attention maps: heatmap overlays and image x method grids, saved as PNG.

Computing stays in :mod:`vision_attn.explain`; this module only draws. :func:`method_grid` uses matplotlib's object
API (``Figure`` + Agg canvas), never ``pyplot``'s global state, so it is safe in training callbacks and threads;
:func:`grid_image` composes the same grid as a plain RGB array (numpy + PIL), ~100x faster, for per-epoch images.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from vision_attn._io import atomic_open

__all__ = ["grid_image", "method_grid", "overlay", "save_overlay", "to_display_image"]


def to_display_image(
    image: torch.Tensor, mean: Sequence[float] | None = None, std: Sequence[float] | None = None
) -> np.ndarray:
    """Return ``image`` ``[C, H, W]`` as an RGB float array ``[H, W, 3]`` in [0, 1].

    ``mean``/``std`` undo the input normalization; one channel is repeated to three; without ``mean``/``std``
    values outside [0, 1] are min-max scaled.
    """
    if not isinstance(image, torch.Tensor) or image.ndim != 3 or image.shape[0] not in (1, 3):
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"image must be a [C, H, W] tensor with C in (1, 3), got {shape}")
    img = image.detach().float().cpu()
    if mean is not None and std is not None:
        img = img * torch.as_tensor(std, dtype=torch.float32)[:, None, None]
        img = img + torch.as_tensor(mean, dtype=torch.float32)[:, None, None]
    elif img.min() < 0 or img.max() > 1:
        img = (img - img.min()) / (img.max() - img.min()).clamp(min=1e-12)
    img = img.clamp(0, 1).expand(3, -1, -1) if img.shape[0] == 1 else img.clamp(0, 1)
    return img.permute(1, 2, 0).numpy()


def overlay(
    image: torch.Tensor,
    saliency: torch.Tensor,
    cmap: str = "jet",
    alpha: float = 0.5,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> np.ndarray:
    """Blend the colormapped ``saliency`` ``[H, W]`` (values in [0, 1]) over ``image`` ``[C, H, W]``.

    Returns an RGB float array ``[H, W, 3]`` in [0, 1]: ``(1 - alpha) * image + alpha * cmap(saliency)``.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    if not isinstance(saliency, torch.Tensor) or saliency.ndim != 2:
        raise ValueError(f"saliency must be a 2-D [H, W] tensor, got {getattr(saliency, 'shape', type(saliency))}")
    rgb = to_display_image(image, mean, std)
    if saliency.shape != rgb.shape[:2]:
        raise ValueError(f"saliency has shape {tuple(saliency.shape)}, but the image is {rgb.shape[0]}x{rgb.shape[1]}")
    heat = colormaps[cmap](saliency.detach().float().clamp(0, 1).cpu().numpy())[..., :3]
    return (1 - alpha) * rgb + alpha * heat


def save_overlay(path: str | os.PathLike, image: torch.Tensor, saliency: torch.Tensor, **kwargs: object) -> None:
    """Write :func:`overlay` of ``image`` and ``saliency`` (``kwargs`` as there) to the PNG ``path`` (atomically)."""
    from matplotlib.image import imsave

    rgb = np.clip(overlay(image, saliency, **kwargs), 0, 1)  # type: ignore[arg-type]
    with atomic_open(path, "wb") as f:
        imsave(f, rgb, format="png")


def method_grid(
    images: torch.Tensor,
    maps: Mapping[str, torch.Tensor],
    path: str | os.PathLike | None = None,
    row_titles: Sequence[str] | None = None,
    boxes: torch.Tensor | None = None,
    cmap: str = "jet",
    alpha: float = 0.5,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    cell_inches: float = 1.6,
) -> Figure:
    """Draw an image x method grid: one row per image, the image then one overlay per method in ``maps``.

    ``images`` ``[B, C, H, W]``; ``maps`` ``{method: [B, H, W] in [0, 1]}``; ``boxes`` ``[B, 4]``
    (x_min, y_min, x_max, y_max) are outlined on every cell (a row whose box holds NaN gets none); a ``:`` in a
    method name breaks its title line. Returns the ``Figure``; also saves it as PNG (atomically) when ``path`` is
    given.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be [B, C, H, W], got shape {tuple(images.shape)}")
    for method, m in maps.items():
        if m.shape != (images.shape[0], *images.shape[-2:]):
            raise ValueError(f"maps[{method!r}] has shape {tuple(m.shape)}; expected [B, H, W] = "
                             f"{(images.shape[0], *images.shape[-2:])}")  # fmt: skip
    rows, cols = images.shape[0], 1 + len(maps)
    fig = Figure(figsize=(cell_inches * cols, cell_inches * rows + 0.3), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    for r in range(rows):
        cells = [to_display_image(images[r], mean, std)]
        cells += [overlay(images[r], m[r], cmap=cmap, alpha=alpha, mean=mean, std=std) for m in maps.values()]
        for c, cell in enumerate(cells):
            ax = axes[r][c]
            ax.imshow(np.clip(cell, 0, 1), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if boxes is not None and bool(torch.isfinite(torch.as_tensor(boxes[r])).all()):
                x0, y0, x1, y1 = (float(v) for v in boxes[r])
                ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, ec="lime", lw=1))
            if r == 0:
                ax.set_title(["image", *maps][c].replace(":", "\n"), fontsize=8)
        if row_titles is not None:
            axes[r][0].set_ylabel(row_titles[r], fontsize=8)
    fig.tight_layout(pad=0.3)
    if path is not None:
        with atomic_open(path, "wb") as f:
            fig.savefig(f, format="png")
    return fig


def grid_image(
    images: torch.Tensor,
    maps: Mapping[str, torch.Tensor],
    row_titles: Sequence[str] | None = None,
    boxes: torch.Tensor | None = None,
    cmap: str = "jet",
    alpha: float = 0.5,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    scale: int = 2,
) -> np.ndarray:
    """Compose the image x method grid of :func:`method_grid` as an RGB ``uint8`` array ``[H', W', 3]``.

    One row per image (its ``row_titles`` entry written above it), the image then one overlay per method (names in
    a header line); each cell is enlarged ``scale`` times (nearest neighbour) and ``boxes`` ``[B, 4]`` are outlined.
    """
    from PIL import Image, ImageDraw

    if images.ndim != 4:
        raise ValueError(f"images must be [B, C, H, W], got shape {tuple(images.shape)}")
    if not isinstance(scale, int) or scale < 1:
        raise ValueError(f"scale must be a positive int, got {scale!r}")
    rows, (height, width) = images.shape[0], images.shape[-2:]
    for method, m in maps.items():
        if m.shape != (rows, height, width):
            raise ValueError(
                f"maps[{method!r}] has shape {tuple(m.shape)}; expected [B, H, W] = {(rows, height, width)}"
            )
    cols, gap, band = 1 + len(maps), 2, 12
    cell_h, cell_w = height * scale, width * scale
    canvas = Image.new("RGB", (cols * (cell_w + gap) + gap, band + rows * (cell_h + band + gap)), "white")
    draw = ImageDraw.Draw(canvas)
    for c, name in enumerate(["image", *maps]):
        draw.text((gap + c * (cell_w + gap), 0), name[: cell_w // 6], fill="black")
    for r in range(rows):
        top = band + r * (cell_h + band + gap) + band
        if row_titles is not None:
            draw.text((gap, top - band), str(row_titles[r])[: cols * cell_w // 6], fill="black")
        cells = [to_display_image(images[r], mean, std)]
        cells += [overlay(images[r], m[r], cmap=cmap, alpha=alpha, mean=mean, std=std) for m in maps.values()]
        for c, cell in enumerate(cells):
            left = gap + c * (cell_w + gap)
            pixels = (np.clip(cell, 0, 1) * 255).round().astype(np.uint8).repeat(scale, 0).repeat(scale, 1)
            canvas.paste(Image.fromarray(pixels), (left, top))
            if boxes is not None:
                x0, y0, x1, y1 = (float(v) * scale for v in boxes[r])
                draw.rectangle((left + x0, top + y0, left + x1 - 1, top + y1 - 1), outline=(0, 255, 0))
    return np.asarray(canvas)
