"""Shared fixtures: the default datamodule, the seed and deterministic-mode reset, W&B offline.

Helpers (tiny models, datamodules, a quiet CPU trainer) live in ``tests/helpers.py``.
"""

from __future__ import annotations

import os

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

from typing import Any  # noqa: E402

import lightning.pytorch as pl  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from lightning_kd.data import MNISTPrivilegedDataModule  # noqa: E402
from tests.helpers import RandomDataModule  # noqa: E402


@pytest.fixture
def datamodule() -> RandomDataModule:
    return RandomDataModule()


@pytest.fixture(autouse=True)
def _seed() -> Any:
    pl.seed_everything(0, verbose=False)
    yield
    torch.use_deterministic_algorithms(False)  # Trainer(deterministic=True) leaves it on for the process


@pytest.fixture(scope="module")
def small_mnist() -> MNISTPrivilegedDataModule:
    datamodule = MNISTPrivilegedDataModule(train_samples=48, val_samples=16, test_samples=100, batch_size=16)
    datamodule.setup()
    return datamodule
