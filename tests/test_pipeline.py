"""The training pipeline's cheap paths keep what they replace: reproducible, per-item random augmentation."""

from __future__ import annotations

import torch

from vision_attn.data import ImageDataModule


def _epoch_batches(dm: ImageDataModule, count: int = 3) -> list[torch.Tensor]:
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(1)
    out = []
    for i, (images, _) in enumerate(loader):
        out.append(images)
        if i + 1 == count:
            break
    return out


def test_batched_loading_is_reproducible_and_random_per_item() -> None:
    kwargs = dict(batch_size=16, num_workers=0, crop_scale=(0.5, 1.0), translate=0.1, hflip=0.5, seed=7)
    first, second = ImageDataModule(**kwargs), ImageDataModule(**kwargs)
    first.setup("fit")
    second.setup("fit")
    a, b = _epoch_batches(first), _epoch_batches(second)
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y)
    # the same image twice in one batch gets two different random crops (one seed per batch, drawn in order)
    dataset = first.train_set
    twice = dataset.__getitems__([(0, 123), (0, 456)])
    assert not torch.equal(twice[0][0], twice[1][0])
    # and the batch path gives what the one-item path gives for the batch's first item
    torch.testing.assert_close(dataset[(5, 99)][0], dataset.__getitems__([(5, 99), (6, 1)])[0][0])


def test_grid_image_draws_cells_boxes_and_titles() -> None:
    import numpy as np

    from vision_attn.explain.plot import grid_image, overlay

    images = torch.rand(2, 1, 16, 16)
    maps = {"rollout": torch.rand(2, 16, 16)}
    rgb = grid_image(images, maps, row_titles=["a / b", "c / d"], boxes=torch.tensor([[2, 2, 10, 10]] * 2), scale=2)
    gap, band = 2, 12
    assert rgb.dtype == np.uint8
    assert rgb.shape == (band + 2 * (32 + band + gap), 2 * (32 + gap) + gap, 3)
    top, left = 2 * band, gap + 32 + gap  # first row, overlay column
    expected = (overlay(images[0], maps["rollout"][0]) * 255).round()
    cell = rgb[top : top + 32, left : left + 32].astype(float)
    assert np.abs(cell[9:18:2, 9:18:2] - expected[4:9, 4:9]).max() <= 1  # inside the box outline
    assert tuple(rgb[top + 4, left + 4]) == (0, 255, 0)  # the box's top-left corner, scaled by 2
    assert rgb[band : 2 * band].min() < 128  # the row title is written in its band
