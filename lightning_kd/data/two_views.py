"""Two augmented views of every training sample (a weak and a strong one), for MLKD.

Jin, Wang, Lin, "Multi-Level Logit Distillation", CVPR 2023, distils on a weakly and a strongly
augmented view of each image. A :class:`TwoViews` dataset yields ``(weak, strong, label)``;
:func:`collate_two_views` stacks a batch of them into one :class:`TwoViewBatch`
``(inputs, targets)`` whose ``inputs`` hold the ``N`` weak views followed by the ``N`` strong
views (``2N`` rows) and whose ``targets`` repeat the labels, so both models see both views in one
forward pass and every term reads the usual ``(inputs, targets)`` layout.
:class:`~lightning_kd.losses.MLKDTerm` splits the rows back into the two views and refuses any
other batch. :class:`CIFAR100TwoViewDataModule` and :class:`MNIST1DTwoViewDataModule` serve such
training batches (validation and test batches stay single-view).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, default_collate

from lightning_kd.data.cifar100 import CIFAR100_MEAN, CIFAR100_STD, CIFAR100DataModule
from lightning_kd.data.mnist1d import MNIST1DDataModule
from lightning_kd.model_io import TwoViewBatch

__all__ = [
    "CIFAR100TwoViewDataModule",
    "MNIST1DTwoViewDataModule",
    "SignalShiftNoise",
    "TwoViewBatch",
    "TwoViews",
    "collate_two_views",
]


class TwoViews(Dataset):
    """``(weak(x), strong(x), y)`` for every ``(x, y)`` of ``dataset``.

    Args:
        dataset: a map-style dataset of ``(x, y)`` pairs (``x`` un-augmented: a PIL image, a tensor).
        weak: the weak augmentation (``None``: ``x`` as it is).
        strong: the strong augmentation.

    Raises:
        TypeError: (when an item is read) the item is not an ``(x, y)`` pair.
    """

    def __init__(
        self, dataset: Dataset, weak: Callable[[Any], Any] | None, strong: Callable[[Any], Any]
    ) -> None:
        self.dataset = dataset
        self.weak = weak
        self.strong = strong

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Any, Any, Any]:
        item = self.dataset[index]
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            entries = f" with {len(item)} entries" if isinstance(item, (tuple, list)) else ""
            raise TypeError(
                f"TwoViews needs a dataset of (input, label) pairs, got an item of type {type(item).__name__}"
                f"{entries}; an indexed dataset (WithIndex, return_index=True) cannot have two views."
            )
        x, y = item
        return (self.weak(x) if self.weak is not None else x), self.strong(x), y


def collate_two_views(samples: Sequence[tuple[Any, Any, Any]]) -> TwoViewBatch:
    """``(weak, strong, label)`` samples -> :class:`TwoViewBatch` (weak rows first, labels repeated)."""
    weak, strong, labels = default_collate(list(samples))
    return TwoViewBatch(torch.cat([weak, strong]), torch.cat([labels, labels]))


class SignalShiftNoise:
    """A strong view of a 1-D signal ``(channels, length)``: a random circular shift, then Gaussian noise.

    Our choice for MNIST-1D (the MLKD authors only define the CIFAR/ImageNet views): the shift is
    uniform in ``[-max_shift, max_shift]`` positions, the noise has standard deviation ``noise``
    (the signals are standardized to unit variance).

    Args:
        max_shift: largest shift, in positions (>= 0).
        noise: standard deviation of the added noise (>= 0).

    Raises:
        ValueError: a negative ``max_shift`` or ``noise``.
    """

    def __init__(self, max_shift: int = 4, noise: float = 0.2) -> None:
        if max_shift < 0 or not noise >= 0:
            raise ValueError(f"max_shift and noise must be >= 0, got {max_shift} and {noise}.")
        self.max_shift = int(max_shift)
        self.noise = float(noise)

    def __call__(self, signal: Tensor) -> Tensor:
        """The shifted, noisy copy of ``signal``."""
        shift = int(torch.randint(-self.max_shift, self.max_shift + 1, ()))
        return torch.roll(signal, shift, dims=-1) + self.noise * torch.randn_like(signal)


def _two_view_loader(datamodule: Any) -> DataLoader:
    if not datamodule.datasets:
        raise RuntimeError("Call setup() before asking for a dataloader.")
    return DataLoader(
        datamodule.datasets["train"],
        batch_size=datamodule.batch_size,
        shuffle=True,
        collate_fn=collate_two_views,
        num_workers=datamodule.num_workers,
        persistent_workers=datamodule.num_workers > 0,
    )


class CIFAR100TwoViewDataModule(CIFAR100DataModule):
    """CIFAR-100 whose training batches are :class:`TwoViewBatch` es: the MLKD authors' two views.

    As ``get_cifar100_train_transform_strong`` in ``mdistiller/dataset/cifar100.py`` of
    ``Jin-Ying/Multi-Level-Logit-Distillation``: the weak view is the usual ``RandomCrop(32,
    padding=4)`` + ``RandomHorizontalFlip()``, the strong view the same followed by RandAugment
    with 2 operations (here torchvision's :class:`~torchvision.transforms.RandAugment`
    ``(num_ops=2, magnitude=strong_magnitude)``; the authors use their own FixMatch-style
    RandAugment with a random Cutout), both then ``ToTensor`` and ``Normalize``. Validation and
    test batches are the usual single-view ``(images, labels)``. ``batch_size`` counts samples:
    a training batch holds ``2 * batch_size`` images (the authors' 64 per view).

    Args:
        data_dir: see :class:`CIFAR100DataModule`.
        batch_size: samples per training batch (each gives two rows).
        num_workers: dataloader workers.
        download: see :class:`CIFAR100DataModule`.
        strong_magnitude: RandAugment's magnitude (0-30; 10 in the authors' ``RandAugment(2, 10)``).

    Raises:
        ValueError: ``strong_magnitude`` outside ``[0, 30]``.
    """

    def __init__(
        self,
        data_dir: str = "data/cifar100",
        batch_size: int = 64,
        num_workers: int = 2,
        download: bool = False,
        strong_magnitude: int = 10,
    ) -> None:
        if not 0 <= strong_magnitude <= 30:
            raise ValueError(
                f"strong_magnitude must be in [0, 30] (RandAugment's bins), got {strong_magnitude}."
            )
        super().__init__(data_dir, batch_size, num_workers, download, augment=True, return_index=False)
        self.strong_magnitude = strong_magnitude

    def strong_transform(self) -> Callable[[Any], Tensor]:
        """The strong view: crop, flip, RandAugment(2, ``strong_magnitude``), tensor, normalisation."""
        from torchvision import transforms as T

        return T.Compose(
            [
                T.RandomCrop(32, padding=4),
                T.RandomHorizontalFlip(),
                T.RandAugment(num_ops=2, magnitude=self.strong_magnitude),
                T.ToTensor(),
                T.Normalize(CIFAR100_MEAN, CIFAR100_STD),
            ]
        )

    def setup(self, stage: str | None = None) -> None:
        """The CIFAR-100 splits, the training split serving both views of each raw image."""
        if self.datasets:
            return
        super().setup(stage)
        raw = copy.copy(self.datasets["train"])
        raw.transform = None  # the PIL image: each view augments it on its own
        self.datasets["train"] = TwoViews(raw, self.train_transform(), self.strong_transform())

    def train_dataloader(self) -> DataLoader:
        """Shuffled :class:`TwoViewBatch` es."""
        return _two_view_loader(self)


class MNIST1DTwoViewDataModule(MNIST1DDataModule):
    """MNIST-1D whose training batches are :class:`TwoViewBatch` es, for MLKD on the embedded data.

    The weak view is the signal as it is (the MNIST-1D recipes do not augment); the strong view a
    :class:`SignalShiftNoise` copy. Validation and test batches are single-view.

    Args:
        train_samples: see :class:`MNIST1DDataModule`.
        test_samples: see :class:`MNIST1DDataModule`.
        val_samples: see :class:`MNIST1DDataModule`.
        batch_size: samples per training batch (each gives two rows).
        num_workers: dataloader workers.
        seed: see :class:`MNIST1DDataModule`.
        strong_shift: largest circular shift of the strong view.
        strong_noise: noise standard deviation of the strong view.
    """

    def __init__(
        self,
        train_samples: int = 5000,
        test_samples: int = 10000,
        val_samples: int = 500,
        batch_size: int = 128,
        num_workers: int = 0,
        seed: int = 42,
        strong_shift: int = 4,
        strong_noise: float = 0.2,
    ) -> None:
        self.strong = SignalShiftNoise(strong_shift, strong_noise)
        super().__init__(
            train_samples, test_samples, val_samples, batch_size, num_workers, seed, return_index=False
        )

    def setup(self, stage: str | None = None) -> None:
        """The MNIST-1D splits, the training split serving two views of each signal."""
        if self.datasets:
            return
        super().setup(stage)
        self.datasets["train"] = TwoViews(self.datasets["train"], None, self.strong)

    def train_dataloader(self) -> DataLoader:
        """Shuffled :class:`TwoViewBatch` es."""
        return _two_view_loader(self)
