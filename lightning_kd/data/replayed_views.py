"""Training batches of replayable views: each item says which sample and which view it is.

:class:`ViewSampler` draws, every epoch, one view per sample (``"cycle"`` or ``"random"``) and
yields ``(index, view)`` keys; :class:`ReplayedViews` turns a key into the augmented item with
its index, view and the view's parameters, so a teacher-output cache of views
(:class:`~lightning_kd.teachers.view_cache.TeacherViewCache`) serves exactly the view the
student trains on. :class:`ReplayedViewsDataModule` wraps any :class:`SplitsDataModule`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from lightning_kd.data.replayable import ReplayableAugmentation
from lightning_kd.data.splits import SplitsDataModule

__all__ = ["ReplayedViews", "ReplayedViewsDataModule", "ViewSampler"]

ViewDraw = Literal["cycle", "random"]


class ViewSampler(Sampler[tuple[int, int]]):
    """Yields ``(sample index, view)`` once per sample and epoch; Lightning calls :meth:`set_epoch`.

    - ``draw="cycle"``: sample ``i`` gets view ``(epoch + i) mod views``, so ``views`` epochs see
      every view of every sample once;
    - ``draw="random"``: views drawn uniformly, from a generator seeded with ``(seed, epoch)``.

    With ``shuffle`` the order is a permutation seeded with ``(seed, epoch)``. Both are
    functions of the epoch only, so a run that restarts an epoch sees the same keys.

    Args:
        num_samples: the training set's length.
        views: stored views per sample.
        draw: ``"cycle"`` or ``"random"``.
        seed: seed of the order and of the random draw.
        shuffle: visit the samples in a random order.
    """

    #: its order and views are functions of the epoch only: a resumed loader fast-forwards it
    #: (:class:`~lightning_kd.callbacks.ExactResume` uses it as it is)
    order_set_by_epoch = True

    def __init__(
        self, num_samples: int, views: int, draw: ViewDraw = "cycle", seed: int = 0, shuffle: bool = True
    ) -> None:
        if num_samples < 1 or views < 1:
            raise ValueError(f"num_samples and views must be >= 1, got {num_samples} and {views}.")
        if draw not in ("cycle", "random"):
            raise ValueError(f"draw must be 'cycle' or 'random', got {draw!r}.")
        self.num_samples, self.views, self.draw, self.seed, self.shuffle = (
            num_samples,
            views,
            draw,
            seed,
            shuffle,
        )
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose keys :meth:`__iter__` yields next."""
        self.epoch = epoch

    def _generator(self, stream: int) -> torch.Generator:
        state = np.random.SeedSequence([self.seed, self.epoch, stream]).generate_state(1, np.uint64)[0]
        return torch.Generator().manual_seed(int(state))

    def views_of_epoch(self) -> Tensor:
        """The view of every sample in this epoch, ``(num_samples,)`` int64."""
        if self.draw == "cycle":
            return (torch.arange(self.num_samples) + self.epoch) % self.views
        return torch.randint(self.views, (self.num_samples,), generator=self._generator(1))

    def __iter__(self) -> Iterator[tuple[int, int]]:
        views = self.views_of_epoch().tolist()
        order = (
            torch.randperm(self.num_samples, generator=self._generator(0)).tolist()
            if self.shuffle
            else range(self.num_samples)
        )
        return iter([(index, views[index]) for index in order])

    def __len__(self) -> int:
        return self.num_samples


class ReplayedViews(Dataset):
    """Items of ``dataset`` with their input replaced by view ``v`` of a :class:`ReplayableAugmentation`.

    Read with ``(index, view)`` keys (:class:`ViewSampler`). Tuple items ``(x, y, ...)``
    become ``(x_view, y, ..., index, view, params)`` (for ``(x, y)`` items: the index at 2, the
    view at 3, the parameters at 4); dict items get
    ``"index"``, ``"view"`` and ``"view_params"``, with the view of ``item[input_key]``.

    Args:
        dataset: a map-style dataset.
        augmentation: the replayable augmentation of the input.
        views: views per sample (keys with another view are refused).
        input_key: where the input is in an item (a position or a key).
    """

    def __init__(
        self, dataset: Dataset, augmentation: ReplayableAugmentation, views: int, input_key: int | str = 0
    ) -> None:
        if views < 1:
            raise ValueError(f"views must be >= 1, got {views}.")
        self.dataset, self.augmentation, self.views, self.input_key = dataset, augmentation, views, input_key

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        if not isinstance(key, (tuple, list)) or len(key) != 2:
            raise TypeError(
                f"ReplayedViews is read with (sample index, view) keys, got {key!r}: give its DataLoader "
                "sampler=ViewSampler(len(dataset), views) (ReplayedViewsDataModule does)."
            )
        index, view = int(key[0]), int(key[1])
        if not 0 <= view < self.views:
            raise IndexError(f"view {view} is outside the {self.views} views of ReplayedViews.")
        item = self.dataset[index]
        if isinstance(item, Mapping):
            augmented, params = self.augmentation(item[self.input_key], index, view)
            return {**item, self.input_key: augmented, "index": index, "view": view, "view_params": params}
        if not isinstance(item, (tuple, list)) or not isinstance(self.input_key, int):
            raise TypeError(
                "ReplayedViews needs tuple items with an integer input_key, or dict items with a key; got "
                f"a {type(item).__name__} item and input_key={self.input_key!r}."
            )
        augmented, params = self.augmentation(item[self.input_key], index, view)
        item = list(item)
        item[self.input_key] = augmented
        return (*item, index, view, params)


class ReplayedViewsDataModule(SplitsDataModule):
    """A :class:`SplitsDataModule` whose training split is replayed views (validation, test unchanged).

    Training batches are ``(x_view, y, index, view, params)`` for tuple datasets, so a
    :class:`~lightning_kd.teachers.view_cache.TeacherViewCache` reads ``index_key=2``,
    ``view_key=3``, ``params_key=4`` (its defaults).

    Args:
        datamodule: the datamodule whose splits are used (its batch size and workers too).
        augmentation: the replayable augmentation of the training inputs.
        views: views per sample.
        draw: how each epoch picks a sample's view (:class:`ViewSampler`).
        seed: seed of the shuffling and of ``draw="random"``.
        input_key: where the input is in a training item.
    """

    def __init__(
        self,
        datamodule: SplitsDataModule,
        augmentation: ReplayableAugmentation,
        views: int = 4,
        draw: ViewDraw = "cycle",
        seed: int = 0,
        input_key: int | str = 0,
    ) -> None:
        super().__init__(datamodule.batch_size, datamodule.num_workers)
        self.datamodule, self.augmentation = datamodule, augmentation
        self.views, self.draw, self.seed, self.input_key = views, draw, seed, input_key
        ViewSampler(1, views, draw, seed)  # checks the settings now

    def setup(self, stage: str | None = None) -> None:
        """Set up the wrapped datamodule; wrap its training split."""
        self.datamodule.setup(stage)
        self.collate_fn = self.datamodule.collate_fn
        self.datasets = dict(self.datamodule.datasets)
        self.datasets["train"] = ReplayedViews(
            self.datamodule.datasets["train"], self.augmentation, self.views, self.input_key
        )

    def train_dataloader(self) -> DataLoader:
        """Batches of replayed views, one view per sample and epoch, drawn by a :class:`ViewSampler`."""
        if not self.datasets:
            raise RuntimeError("Call setup() before asking for a dataloader.")
        train = self.datasets["train"]
        return DataLoader(
            train,
            batch_size=self.batch_size,
            sampler=ViewSampler(len(train), self.views, self.draw, self.seed),
            collate_fn=self.collate_fn,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )
