"""MNISTDigitsDataModule: splits, normalisation, the crop (no flip), the affine option, bad settings."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.transforms import v2

from lightning_kd.data import MNISTDigitsDataModule
from lightning_kd.data.mnist_digits import MNIST_MEAN, MNIST_STD, DigitImages
from lightning_kd.data.mnist_privileged import load_mnist_5k

BACKGROUND = -MNIST_MEAN / MNIST_STD


def small(**overrides: object) -> MNISTDigitsDataModule:
    settings: dict[str, object] = dict(train_samples=64, val_samples=32, test_samples=100, batch_size=16)
    module = MNISTDigitsDataModule(**{**settings, **overrides})
    module.setup()
    return module


def test_splits_are_disjoint_the_test_split_fixed_and_every_image_normalised_from_the_file() -> None:
    images, labels = load_mnist_5k()
    expected = (images.astype(np.float64) / 255.0 - MNIST_MEAN) / MNIST_STD
    first, other = small(seed=0), small(seed=1)
    test = first.datasets["test"]
    assert len(test) == 100 and torch.bincount(test.labels).tolist() == [10] * 10
    # the test split: the last 10 images of every class, in class order, whatever the seed
    index = np.concatenate([np.flatnonzero(labels == d)[-10:] for d in range(10)])
    assert torch.equal(test.images, other.datasets["test"].images)
    np.testing.assert_allclose(test.images[:, 0].double().numpy(), expected[index], atol=1e-6)
    assert torch.equal(test.labels, torch.from_numpy(labels[index]))

    def rows(dataset: DigitImages) -> set[bytes]:
        return {row.numpy().tobytes() for row in dataset.images.flatten(1)}

    train, val = first.datasets["train"], first.datasets["val"]
    assert (len(train), len(val)) == (64, 32)
    assert not rows(train) & rows(val) and not rows(train) & rows(test) and not rows(val) & rows(test)
    assert rows(train) != rows(other.datasets["train"])  # the seed draws the training images
    image, label = val[0]
    assert image.shape == (1, 28, 28) and image.dtype == torch.float32 and label.dtype == torch.int64


def test_training_images_are_shifted_copies_never_mirrored() -> None:
    module = small(crop_padding=2)
    train = module.datasets["train"]
    assert train.transform is not None and not isinstance(train.transform, v2.Compose)  # crop only
    torch.manual_seed(0)
    shifted = 0
    for n in range(16):
        stored = train.images[n, 0]
        augmented, _ = train[n]
        padded = torch.nn.functional.pad(stored, (2, 2, 2, 2), value=BACKGROUND)
        offsets = [
            (dy, dx)
            for dy in range(5)
            for dx in range(5)
            if torch.equal(padded[dy : dy + 28, dx : dx + 28], augmented[0])
        ]
        assert offsets, f"image {n} is not a 28x28 crop of the padded digit"
        shifted += offsets != [(2, 2)]
        assert not torch.equal(augmented[0], stored.flip(-1)) or torch.equal(stored, stored.flip(-1))
    assert shifted >= 8  # the crop moves most images


def test_without_augment_training_images_are_the_stored_ones_and_the_affine_is_optional() -> None:
    plain = small(augment=False)
    assert plain.datasets["train"].transform is None
    assert torch.equal(plain.datasets["train"][3][0], plain.datasets["train"].images[3])
    rotated = small(rotation=15.0, scale=(0.9, 1.1))
    (crop, affine) = rotated.datasets["train"].transform.transforms
    assert isinstance(crop, v2.RandomCrop) and isinstance(affine, v2.RandomAffine)
    assert affine.degrees == [-15.0, 15.0] and affine.scale == (0.9, 1.1)
    torch.manual_seed(0)
    blank = torch.full((1, 28, 28), BACKGROUND)  # uncovered corners get the background, not 0
    torch.testing.assert_close(rotated.datasets["train"].transform(blank), blank)


def test_batches_carry_the_sample_index_for_crd() -> None:
    module = small(return_index=True)
    images, labels, index = next(iter(module.train_dataloader()))
    assert images.shape == (16, 1, 28, 28) and index.dtype == torch.int64
    assert torch.equal(labels, module.datasets["train"].dataset.labels[index])
    assert len(next(iter(module.val_dataloader()))) == 2  # held-out batches: no index


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"test_samples": 105}, "test_samples must be a multiple of 10"),
        ({"train_samples": 3000, "val_samples": 1500}, "train_samples \\+ val_samples must be at most 4000"),
        ({"crop_padding": -1}, "crop_padding >= 0"),
        ({"scale": (1.1, 0.9)}, "0 < scale\\[0\\] <= scale\\[1\\]"),
    ],
)
def test_bad_settings_are_refused_with_what_to_change(settings: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MNISTDigitsDataModule(**settings)


def test_images_and_labels_of_different_lengths_are_refused() -> None:
    with pytest.raises(ValueError, match="differ in length: 3 and 2"):
        DigitImages(torch.zeros(3, 1, 28, 28), torch.zeros(2, dtype=torch.int64))
