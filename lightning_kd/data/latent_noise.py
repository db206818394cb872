"""Training batches of latent noise for data-free distillation; evaluation on a real datamodule."""

from __future__ import annotations

from collections.abc import Iterator

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

__all__ = ["LatentNoise", "LatentNoiseDataModule"]


class LatentNoise(IterableDataset):
    """``batches`` batches of standard Gaussian noise ``(batch_size, latent_dim)`` per pass.

    Every pass (epoch) draws fresh noise from a generator seeded with ``(seed, rank, pass)``,
    so runs are reproducible and DDP processes draw different noise. Its ``state_dict`` (the pass
    and the batches given in it) lets a ``StatefulDataLoader`` resume in the middle of a pass.

    Args:
        latent_dim: size of one noise vector.
        batch_size: noise vectors per batch.
        batches: batches per pass.
        seed: seed of the noise.
        rank: process rank (mixed into the seed).
    """

    def __init__(self, latent_dim: int, batch_size: int, batches: int, seed: int = 0, rank: int = 0) -> None:
        super().__init__()
        for name, value in (("latent_dim", latent_dim), ("batch_size", batch_size), ("batches", batches)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}.")
        self.latent_dim = latent_dim
        self.batch_size = batch_size
        self.batches = batches
        self.seed = seed
        self.rank = rank
        self.passes = 0  # passes started
        self.position = 0  # batches given in the current pass
        self._resume_at: int | None = None

    def __len__(self) -> int:
        return self.batches

    def __iter__(self) -> Iterator[Tensor]:
        if self._resume_at is not None:  # the pass a loaded state was in, from where it was
            index, start, self._resume_at = self.passes - 1, self._resume_at, None
        else:
            index, start = self.passes, 0
            self.passes, self.position = self.passes + 1, 0
        return self._pass(index, start)

    def _pass(self, index: int, start: int) -> Iterator[Tensor]:
        generator = torch.Generator().manual_seed(hash((self.seed, self.rank, index)) % 2**63)
        for batch in range(self.batches):
            noise = torch.randn(self.batch_size, self.latent_dim, generator=generator)
            if batch >= start:
                self.position = batch + 1
                yield noise

    def state_dict(self) -> dict[str, int]:
        """The passes started and the batches given in the current one."""
        return {"passes": self.passes, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """The next iteration goes on with the saved pass, after its given batches."""
        self.passes, self.position = state["passes"], state["position"]
        self._resume_at = self.position if self.passes > 0 else None


class LatentNoiseDataModule(pl.LightningDataModule):
    """Latent noise for training, a real datamodule's validation and test splits for evaluation.

    Data-free distillation (e.g. :class:`~lightning_kd.paradigms.data_free.DataFreeDistillationModule`)
    trains on samples a generator makes from noise, so its training batches are noise
    ``(batch_size, latent_dim)``. ``datamodule`` only provides ``val_dataloader`` /
    ``test_dataloader``: its ``train_dataloader`` is never called.

    Args:
        datamodule: the real data, for evaluation only.
        latent_dim: size of one noise vector; must equal the generator's ``latent_dim``.
        batch_size: noise vectors (generated samples) per training step.
        batches_per_epoch: training steps per epoch.
        seed: seed of the noise.
    """

    def __init__(
        self,
        datamodule: pl.LightningDataModule,
        latent_dim: int = 100,
        batch_size: int = 256,
        batches_per_epoch: int = 50,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.datamodule = datamodule
        self.latent_dim = latent_dim
        self.batch_size = batch_size
        self.batches_per_epoch = batches_per_epoch
        self.seed = seed
        self._noise: LatentNoise | None = None

    def prepare_data(self) -> None:
        """Prepare the real data (download, if it does)."""
        self.datamodule.prepare_data()

    def setup(self, stage: str) -> None:
        """Set up the real data for evaluation only: its ``validate`` stage when fitting."""
        self.datamodule.trainer = self.trainer
        self.datamodule.setup("validate" if stage == "fit" else stage)

    def train_dataloader(self) -> DataLoader:
        """Batches of noise; ``batches_per_epoch`` per epoch, fresh every epoch."""
        if self._noise is None:
            rank = self.trainer.global_rank if self.trainer is not None else 0
            self._noise = LatentNoise(
                self.latent_dim, self.batch_size, self.batches_per_epoch, self.seed, rank
            )
        return DataLoader(self._noise, batch_size=None)

    def val_dataloader(self) -> DataLoader:
        """The real datamodule's validation batches."""
        return self.datamodule.val_dataloader()

    def test_dataloader(self) -> DataLoader:
        """The real datamodule's test batches."""
        return self.datamodule.test_dataloader()
