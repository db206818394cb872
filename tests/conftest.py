"""Shared fixtures: small random data, tiny models, a quiet CPU trainer."""

from __future__ import annotations

import os

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

from typing import Any  # noqa: E402

import lightning.pytorch as pl  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, Dataset, TensorDataset  # noqa: E402

NUM_FEATURES = 8
NUM_CLASSES = 4

#: command-line overrides that shrink an MNIST-1D recipe to a few steps of tiny data
TINY_MNIST1D_FIT = [
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=2",
    "--trainer.limit_val_batches=1",
    "--trainer.log_every_n_steps=1",
    "--trainer.enable_progress_bar=false",
    "--data.init_args.train_samples=600",
    "--data.init_args.val_samples=100",
    "--data.init_args.test_samples=200",
]


class RandomDataModule(pl.LightningDataModule):
    """Gaussian inputs with labels from a fixed random linear map (learnable, deterministic)."""

    def __init__(self, n: int = 64, batch_size: int = 16, as_dict: bool = False, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, NUM_FEATURES, generator=generator)
        weight = torch.randn(NUM_FEATURES, NUM_CLASSES, generator=generator)
        self.y = (self.x @ weight).argmax(dim=1)
        self.batch_size = batch_size
        self.as_dict = as_dict

    def _dataset(self) -> Dataset:
        if self.as_dict:
            return DictDataset(self.x, self.y)
        return TensorDataset(self.x, self.y)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self._dataset(), batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self._dataset(), batch_size=self.batch_size)

    test_dataloader = val_dataloader


class DictDataset(Dataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"signal": self.x[i], "label": self.y[i]}


def small_net(hidden: int = 16, num_classes: int = NUM_CLASSES, batchnorm: bool = True) -> nn.Module:
    """A tiny MLP with BatchNorm (so running statistics are exercised)."""
    layers: list[nn.Module] = [nn.Linear(NUM_FEATURES, hidden)]
    if batchnorm:
        layers.append(nn.BatchNorm1d(hidden))
    layers += [nn.ReLU(), nn.Linear(hidden, num_classes)]
    return nn.Sequential(*layers)


def make_trainer(**kwargs: Any) -> pl.Trainer:
    defaults: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


@pytest.fixture
def datamodule() -> RandomDataModule:
    return RandomDataModule()


@pytest.fixture(autouse=True)
def _seed() -> Any:
    pl.seed_everything(0, verbose=False)
    yield
    torch.use_deterministic_algorithms(False)  # Trainer(deterministic=True) leaves it on for the process
