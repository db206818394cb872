"""MNIST-1D, generated offline by the ``mnist1d`` package."""

from __future__ import annotations

import random

import numpy as np
import torch
from torch.utils.data import TensorDataset

from lightning_kd.data.indexed import WithIndex
from lightning_kd.data.splits import SplitsDataModule

__all__ = ["MNIST1DDataModule"]


def generate_mnist1d(train_samples: int, test_samples: int, seed: int) -> dict[str, np.ndarray]:
    """Generate MNIST-1D procedurally (Greydanus & Kobak, 2020) without touching the network.

    Calls ``mnist1d.data.make_dataset`` (never ``get_dataset``, which downloads) and keeps
    the global ``random`` / ``numpy`` RNG states untouched (the package reseeds them).
    Returns ``x`` (train_samples, 40), ``y``, ``x_test`` (test_samples, 40), ``y_test``.
    """
    from mnist1d.data import get_dataset_args, make_dataset

    total = train_samples + test_samples
    if total % 10:
        raise ValueError(
            f"train_samples + test_samples must be a multiple of 10 (one tenth per digit), got {total}."
        )
    args = get_dataset_args()
    args.num_samples = total
    args.train_split = train_samples / total
    args.seed = seed
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        return make_dataset(args)
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


class MNIST1DDataModule(SplitsDataModule):
    """MNIST-1D: 40-sample 1-D signals of the ten digits, 10 classes.

    The package standardises with statistics of the whole dataset, test split included;
    this module re-standardises with the training split's mean and std instead (the
    package's step is a scalar affine map, so the result is as if the raw data had been
    standardised with training statistics). Inputs are ``(1, 40)`` float32 tensors.

    Args:
        train_samples: samples for training and validation.
        test_samples: samples of the test split.
        val_samples: validation samples, held out from the end of the training samples.
        batch_size: batch size of every loader.
        num_workers: dataloader workers (the data sits in memory; 0 is fastest on CPU).
        seed: seed of the data generator (fixes the dataset, not the training).
        return_index: training batches are ``(inputs, labels, sample_index)`` (for CRD's memory
            bank, :class:`~lightning_kd.data.WithIndex`).
    """

    num_classes = 10
    input_shape = (1, 40)

    def __init__(
        self,
        train_samples: int = 5000,
        test_samples: int = 10000,
        val_samples: int = 500,
        batch_size: int = 128,
        num_workers: int = 0,
        seed: int = 42,
        return_index: bool = False,
    ) -> None:
        super().__init__(batch_size, num_workers)
        if not 0 < val_samples < train_samples:
            raise ValueError(f"val_samples must be in [1, train_samples={train_samples}), got {val_samples}.")
        self.save_hyperparameters()
        self.train_samples = train_samples
        self.test_samples = test_samples
        self.val_samples = val_samples
        self.seed = seed
        self.return_index = return_index

    def setup(self, stage: str | None = None) -> None:
        """Generate the data once and build the three splits."""
        if self.datasets:
            return
        data = generate_mnist1d(self.train_samples, self.test_samples, self.seed)
        x, y = data["x"], data["y"]
        n_train = len(x) - self.val_samples
        mean, std = x[:n_train].mean(), x[:n_train].std()

        def dataset(inputs: np.ndarray, labels: np.ndarray) -> TensorDataset:
            inputs = torch.as_tensor((inputs - mean) / std, dtype=torch.float32).unsqueeze(1)
            return TensorDataset(inputs, torch.as_tensor(labels, dtype=torch.long))

        train = dataset(x[:n_train], y[:n_train])
        self.datasets = {
            "train": WithIndex(train) if self.return_index else train,
            "val": dataset(x[n_train:], y[n_train:]),
            "test": dataset(data["x_test"], data["y_test"]),
        }
