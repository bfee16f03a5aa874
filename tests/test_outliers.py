"""Context-only training images (``data.context_outliers``): blanking, the batches, the loss, bad values."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.nn import functional as F
from train_helpers import fit_args

from vision_attn.data import ImageDataModule
from vision_attn.data.outliers import OUTLIER_LABEL, ContextOutliers, blank
from vision_attn.training import ImageClassifier
from vision_attn.training.cli import main
from vision_attn.training.loss import classification_loss


def test_blank_keeps_the_object_or_its_context() -> None:
    images = np.full((2, 6, 8), 200, dtype=np.uint8)
    boxes = np.array([[1, 2, 4, 5], [0, 0, 8, 6]])  # x_min, y_min, x_max, y_max (max exclusive)
    obj = blank(images, boxes, "object")
    ctx = blank(images, boxes, "context")
    assert obj.dtype == np.uint8
    assert (obj[0, 2:5, 1:4] == 200).all()
    assert obj[0].sum() == 9 * 200
    assert (ctx[0, 2:5, 1:4] == 0).all()
    assert ctx[0].sum() == (48 - 9) * 200
    assert (obj[1] == 200).all()
    assert (ctx[1] == 0).all()
    colour = blank(np.full((2, 6, 8, 3), 200, dtype=np.uint8), boxes, "context")  # channels last: every channel
    np.testing.assert_array_equal(colour, np.repeat(ctx[..., None], 3, axis=-1))
    with pytest.raises(ValueError, match="keep must be 'object' or 'context'"):
        blank(images, boxes, "box")
    with pytest.raises(ValueError, match=r"boxes \[N, 4\]"):
        blank(images, boxes[:1], "context")


def _data(**kwargs: object) -> ImageDataModule:
    """The embedded dataset without augmentation, so a batch's images can be compared pixel for pixel."""
    args = dict(batch_size=6, num_workers=0, crop_scale=None, translate=0.0, hflip=0.0, val_fraction=0.1)
    data = ImageDataModule(**{**args, **kwargs})
    data.setup("fit")
    return data


def test_batches_end_with_the_context_only_images_of_their_first_items() -> None:
    data = _data(context_outliers=2)
    assert isinstance(data.train_set, ContextOutliers)
    images, targets = next(iter(data.train_dataloader()))
    assert images.shape == (8, 1, 64, 64)
    assert targets[6:].tolist() == [OUTLIER_LABEL] * 2
    assert (targets[:6] >= 0).all()
    # the outliers are the first two images with the box at the background value, the same everywhere else
    background = (0.0 - data.mean[0]) / data.std[0]
    sampler_order = list(iter(data.train_dataloader().sampler))[:2]
    for k, (index, _seed) in enumerate(sampler_order):
        x0, y0, x1, y1 = data.train_set.base.boxes[data.train_set.indices[index]]
        inside = torch.zeros(64, 64, dtype=torch.bool)
        inside[y0:y1, x0:x1] = True
        outlier, original = images[6 + k, 0], images[k, 0]
        torch.testing.assert_close(outlier[~inside], original[~inside])
        torch.testing.assert_close(outlier[inside], torch.full_like(outlier[inside], background))
        assert not torch.allclose(original[inside], outlier[inside])  # there was an object to blank
    assert not isinstance(_data().train_set, ContextOutliers)  # off by default
    later = ImageDataModule(batch_size=6, num_workers=0, context_outliers=2)
    later.setup("test")  # a test before the fit: the fit still gets its outliers
    assert not isinstance(later.train_set, ContextOutliers)
    later.setup("fit")
    assert isinstance(later.train_set, ContextOutliers)
    _, val_targets = next(iter(data.val_dataloader()))  # validation and test never get outliers
    assert (val_targets >= 0).all()


def test_outlier_batches_are_reproducible() -> None:
    first = next(iter(_data(context_outliers=2, translate=0.125, hflip=0.5).train_dataloader()))
    again = next(iter(_data(context_outliers=2, translate=0.125, hflip=0.5).train_dataloader()))
    torch.testing.assert_close(first[0], again[0])


def test_bad_context_outliers_values(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"context_outliers must be in \[0, batch_size=4\].*got 5"):
        ImageDataModule(batch_size=4, context_outliers=5)
    with pytest.raises(ValueError, match=r"context_outliers must be in \[0, batch_size=4\].*got -1"):
        ImageDataModule(batch_size=4, context_outliers=-1)
    folder = tmp_path / "folder" / "train"
    for name in ("a", "b"):
        (folder / name).mkdir(parents=True)
        for k in range(3):
            Image.fromarray(np.full((8, 8), 40 * k, dtype=np.uint8)).save(folder / name / f"{k}.png")
    data = ImageDataModule("image_folder", data_dir=str(tmp_path / "folder"), batch_size=2, num_workers=0,
                           context_outliers=1, img_size=8, val_fraction=0.0)  # fmt: skip
    data.setup("predict")  # test/predict never read the train set: the boxes are needed only to train
    assert type(data.train_set) is not ContextOutliers
    assert len(data.test_set) > 0
    with pytest.raises(ValueError, match=r"data.context_outliers=1 needs object boxes.*'image_folder' has none"):
        data.setup("fit")


def test_classification_loss_asks_for_a_uniform_prediction_on_outliers() -> None:
    torch.manual_seed(0)
    logits = torch.randn(5, 4, requires_grad=True)
    targets = torch.tensor([0, 3, OUTLIER_LABEL, 1, OUTLIER_LABEL])
    loss = classification_loss(logits, targets, label_smoothing=0.1)
    known = targets >= 0
    expected = (
        F.cross_entropy(logits[known], targets[known], label_smoothing=0.1, reduction="sum")
        + F.cross_entropy(logits[~known], torch.full((2, 4), 0.25), reduction="sum")
    ) / 5
    torch.testing.assert_close(loss, expected)
    plain = torch.tensor([0, 3, 2, 1, 0])
    torch.testing.assert_close(
        classification_loss(logits, plain, 0.1), F.cross_entropy(logits, plain, label_smoothing=0.1)
    )
    # a uniform prediction is the minimum on an outlier: zero gradient there
    flat = torch.zeros(1, 4, requires_grad=True)
    classification_loss(flat, torch.tensor([OUTLIER_LABEL])).backward()
    assert flat.grad.abs().max() < 1e-7


def test_mixup_refuses_outliers() -> None:
    module = ImageClassifier("va_vit_tiny_patch4_32", model_args={"depth": 1}, num_classes=3, in_chans=3,
                             img_size=32, mixup_alpha=0.2)  # fmt: skip
    batch = (torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, OUTLIER_LABEL]))
    with pytest.raises(ValueError, match="cannot mix context outliers"):
        module.training_step(batch, 0)


def test_mixup_with_context_outliers_fails_before_training(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"cannot mix the context outliers of data.context_outliers=2"):
        main(fit_args(tmp_path, "--model.mixup_alpha=0.2"))  # the default config has context outliers
    assert not list(tmp_path.rglob("*.ckpt"))
