"""Make a run resumed from an epoch-end checkpoint repeat the uninterrupted run exactly."""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import RandomSampler

__all__ = ["ReproducibleOrder"]

_ORDER, _TRAIN = 0, 1  # two streams: the loader's shuffle, then the training steps' randomness


class ReproducibleOrder(Callback):
    """Derive each epoch's shuffle and random numbers from ``(seed, global_step)``.

    Lightning 2.6 restores the module, optimizers, LR schedulers, loop counters and callbacks'
    ``state_dict`` from a checkpoint, but not the global random state (torch, NumPy, ``random``)
    that a ``DataLoader(shuffle=True)`` draws each epoch's order from and that dropout, CRD's
    negative sampling or augmentations use, so a resumed run sees other batches than the
    uninterrupted one. This callback makes both depend only on the position in the run:

    - at every epoch start it gives the training loader's ``RandomSampler`` a generator seeded
      with ``(seed, 0, global_step)`` (the sampler draws its permutation at the epoch's first
      batch, after this hook, also in a resumed run);
    - before the epoch's first training step it seeds the global torch, NumPy and ``random``
      states with ``(seed, 1, global_step)``.

    Resumed from an epoch-end checkpoint (``ModelCheckpoint(save_last=True, every_n_epochs=1)``
    and ``trainer.fit(..., ckpt_path="last")``), a run killed at any point reaches the same
    weights as the uninterrupted run, bit for bit on the CPU. A mid-epoch checkpoint
    (``every_n_train_steps``) is not enough: Lightning restarts that epoch with a fresh iterator
    (and warns), so some of its batches are trained twice. Other samplers are left alone (a
    ``DistributedSampler`` is already seeded from ``(seed, epoch)``).

    Args:
        seed: base seed of the derived states; a resumed run must use the same one.
    """

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self._first_batch_of_epoch = False

    def _seeds(self, stream: int, step: int) -> tuple[int, int]:
        first, second = np.random.SeedSequence([self.seed, stream, step]).generate_state(2)
        return int(first), int(second)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Seed this epoch's shuffle: the sampler draws its permutation after this hook."""
        torch_seed, _ = self._seeds(_ORDER, trainer.global_step)
        for sampler in _random_samplers(trainer.train_dataloader):
            sampler.generator = torch.Generator().manual_seed(torch_seed)
        self._first_batch_of_epoch = True

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Seed the global random states at the epoch's first step."""
        if self._first_batch_of_epoch:
            torch_seed, numpy_seed = self._seeds(_TRAIN, trainer.global_step)
            torch.manual_seed(torch_seed)
            np.random.seed(numpy_seed)
            random.seed(torch_seed)
            self._first_batch_of_epoch = False

    def state_dict(self) -> dict[str, Any]:
        """The base seed, checked when resuming."""
        return {"seed": self.seed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Check the seed matches the checkpoint's."""
        if state_dict["seed"] != self.seed:
            raise ValueError(
                f"ReproducibleOrder(seed={self.seed}) resumes a run made with seed={state_dict['seed']}; "
                "pass the checkpoint's seed to continue the same sequence of batches."
            )


def _random_samplers(loaders: Any) -> list[RandomSampler]:
    """The ``RandomSampler`` objects of a loader or a list/dict of loaders."""
    if isinstance(loaders, Mapping):
        loaders = list(loaders.values())
    if not isinstance(loaders, (list, tuple)):
        loaders = [loaders]
    found: dict[int, RandomSampler] = {}
    for loader in loaders:
        for sampler in (
            getattr(loader, "sampler", None),
            getattr(getattr(loader, "batch_sampler", None), "sampler", None),
        ):
            if isinstance(sampler, RandomSampler):
                found[id(sampler)] = sampler
    return list(found.values())
