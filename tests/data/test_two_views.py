"""Two-view datasets and datamodules: weak rows first, labels repeated, bad layouts refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import TensorDataset

from lightning_kd.data import (
    CIFAR100TwoViewDataModule,
    MNIST1DTwoViewDataModule,
    TwoViewBatch,
    TwoViews,
    WithIndex,
    collate_two_views,
)
from lightning_kd.data.two_views import SignalShiftNoise
from tests.data.test_cifar100 import fake_cifar100 as fake_cifar100  # the fixture: fake CIFAR-100 files


def test_batches_hold_the_weak_views_then_the_strong_views() -> None:
    x = torch.arange(6.0).reshape(3, 2)
    dataset = TwoViews(TensorDataset(x, torch.tensor([0, 1, 2])), lambda v: v + 100, lambda v: -v)
    batch = collate_two_views([dataset[i] for i in range(3)])
    assert isinstance(batch, TwoViewBatch)
    assert torch.equal(batch.inputs, torch.cat([x + 100, -x]))
    assert torch.equal(batch.targets, torch.tensor([0, 1, 2, 0, 1, 2]))


def test_an_indexed_dataset_is_refused_when_read() -> None:
    dataset = TwoViews(WithIndex(TensorDataset(torch.zeros(2, 1), torch.zeros(2))), None, lambda v: v)
    with pytest.raises(
        TypeError, match="needs a dataset of \\(input, label\\) pairs.*with 3 entries.*cannot have"
    ):
        dataset[0]


def test_mnist1d_two_view_training_batches_and_single_view_validation() -> None:
    data = MNIST1DTwoViewDataModule(
        train_samples=120, val_samples=20, test_samples=20, batch_size=8, strong_noise=0.5
    )
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert isinstance(batch, TwoViewBatch) and batch.inputs.shape == (16, 1, 40)
    assert torch.equal(batch.targets[:8], batch.targets[8:])
    assert not torch.equal(batch.inputs[:8], batch.inputs[8:])  # the strong view differs from the signal
    val_inputs, _ = next(iter(data.val_dataloader()))
    assert val_inputs.shape == (8, 1, 40)


def test_signal_shift_noise_shifts_within_its_bound() -> None:
    signal = torch.arange(10.0).reshape(1, 10)
    torch.manual_seed(0)
    for _ in range(20):
        shifted = SignalShiftNoise(max_shift=2, noise=0.0)(signal)
        assert any(torch.equal(shifted, torch.roll(signal, k, dims=-1)) for k in range(-2, 3))
    with pytest.raises(ValueError, match="max_shift and noise must be >= 0, got -1 and 0.2"):
        SignalShiftNoise(max_shift=-1)


def test_cifar100_strong_view_is_randaugmented_and_normalised() -> None:
    data = CIFAR100TwoViewDataModule(data_dir="unused")
    image = Image.new("RGB", (32, 32), (120, 60, 200))
    view = data.strong_transform()(image)
    assert view.shape == (3, 32, 32) and view.dtype == torch.float32
    with pytest.raises(ValueError, match=r"strong_magnitude must be in \[0, 30\]"):
        CIFAR100TwoViewDataModule(strong_magnitude=31)


def test_cifar100_two_view_batches_from_the_raw_images(fake_cifar100: Path) -> None:
    data = CIFAR100TwoViewDataModule(data_dir=str(fake_cifar100), batch_size=4, num_workers=0)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert isinstance(batch, TwoViewBatch) and batch.inputs.shape == (8, 3, 32, 32)
    assert torch.equal(batch.targets[:4], batch.targets[4:])
    images, labels = next(iter(data.val_dataloader()))
    assert images.shape == (4, 3, 32, 32) and labels.tolist() == [99, 98, 97, 96]
