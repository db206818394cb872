"""Hide a datamodule's labels from training: batches of inputs only, for self-supervised distillation."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from torch.utils.data import DataLoader, Dataset

from lightning_kd.dataloader_settings import worker_settings
from lightning_kd.model_io import BatchKey, select

__all__ = ["InputsOnly", "UnlabelledDataModule"]


class InputsOnly(Dataset):
    """``dataset[i][input_key]``: each sample's inputs without its label.

    Args:
        dataset: a map-style dataset of tuples or mappings.
        input_key: where the inputs are in a sample (index or key).
    """

    def __init__(self, dataset: Dataset, input_key: BatchKey = 0) -> None:
        self.dataset = dataset
        self.input_key = input_key

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        return select(self.dataset[index], self.input_key, "input_key")


def inputs_only_loader(loader: DataLoader, input_key: BatchKey) -> DataLoader:
    """A DataLoader like ``loader`` (same sampler, batching, workers) over :class:`InputsOnly`.

    Rebuilt from the loader's public attributes, as Lightning itself re-instantiates loaders to
    insert a ``DistributedSampler`` (which it can still do with this one: it is a plain DataLoader).
    """
    if not isinstance(loader, DataLoader):
        raise TypeError(
            f"UnlabelledDataModule needs the wrapped datamodule to return DataLoaders, got "
            f"{type(loader).__name__}; strip the labels in your own datamodule instead."
        )
    batching: dict[str, Any] = (
        {"batch_size": loader.batch_size, "sampler": loader.sampler, "drop_last": loader.drop_last}
        if loader.batch_size is not None
        else {"batch_sampler": loader.batch_sampler}
    )
    return DataLoader(
        InputsOnly(loader.dataset, input_key),
        **batching,
        generator=loader.generator,
        **worker_settings(loader),
    )


class UnlabelledDataModule(pl.LightningDataModule):
    """Any datamodule with its labels taken away: every loader yields the inputs alone.

    For self-supervised distillation (SEED, Fang et al., ICLR 2021): the student learns from
    the teacher on unlabelled data, so the training (and validation / test) batches that reach the
    module are bare input tensors (for tuple samples ``(x, y)``: ``x``); give the module
    ``input_key=None``. The labels stay reachable for evaluation only, through
    :meth:`labelled_dataloader` (e.g. by :class:`~lightning_kd.callbacks.KNNProbe`, which
    reports the k-NN accuracy of the student's embeddings).

    Args:
        datamodule: the labelled datamodule (its ``prepare_data`` / ``setup`` run as usual).
        input_key: where the inputs are in one sample of its datasets (index or key).
    """

    def __init__(self, datamodule: pl.LightningDataModule, input_key: BatchKey = 0) -> None:
        super().__init__()
        self.datamodule = datamodule
        self.input_key = input_key

    def prepare_data(self) -> None:
        """The wrapped datamodule's."""
        self.datamodule.prepare_data()

    def setup(self, stage: str) -> None:
        """The wrapped datamodule's."""
        self.datamodule.setup(stage)

    def labelled_dataloader(self, split: str) -> DataLoader:
        """The wrapped datamodule's ``train`` / ``val`` / ``test`` loader, labels included."""
        if split not in ("train", "val", "test"):
            raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}.")
        return getattr(self.datamodule, f"{split}_dataloader")()

    def train_dataloader(self) -> DataLoader:
        """Training batches of inputs only (the wrapped loader's sampler, so shuffled if it was)."""
        return inputs_only_loader(self.labelled_dataloader("train"), self.input_key)

    def val_dataloader(self) -> DataLoader:
        """Validation batches of inputs only."""
        return inputs_only_loader(self.labelled_dataloader("val"), self.input_key)

    def test_dataloader(self) -> DataLoader:
        """Test batches of inputs only."""
        return inputs_only_loader(self.labelled_dataloader("test"), self.input_key)
