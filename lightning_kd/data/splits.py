"""Base class: a datamodule whose setup() fills train / val / test datasets."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
from torch.utils.data import DataLoader, Dataset

__all__ = ["SplitsDataModule"]


class SplitsDataModule(pl.LightningDataModule):
    """Loaders over ``self.datasets["train" | "val" | "test"]``, which subclasses fill in ``setup``.

    Args:
        batch_size: batch size of every loader.
        num_workers: dataloader workers (persistent when > 0).
    """

    def __init__(self, batch_size: int, num_workers: int) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.datasets: dict[str, Dataset] = {}
        #: how samples become a batch (e.g. a tokenizer); ``None``: PyTorch's default collation
        self.collate_fn: Callable[[list[Any]], Any] | None = None

    def _loader(self, split: str, shuffle: bool = False) -> DataLoader:
        if not self.datasets:
            raise RuntimeError("Call setup() before asking for a dataloader.")
        return DataLoader(
            self.datasets[split],
            batch_size=self.batch_size,
            shuffle=shuffle,
            collate_fn=self.collate_fn,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches."""
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """Validation batches."""
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        """Test batches."""
        return self._loader("test")
