"""ExactResume: a fit resumed from any checkpoint, mid-epoch too, repeats the uninterrupted run."""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import warnings
import zlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.fabric.utilities.types import _Stateful
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.combined_loader import CombinedLoader
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    DistributedSampler,
    IterableDataset,
    RandomSampler,
    Sampler,
    SequentialSampler,
    get_worker_info,
)
from torchdata.stateful_dataloader import StatefulDataLoader

from lightning_kd.dataloader_settings import worker_settings
from lightning_kd.step_monitor import StepMonitor

__all__ = ["EpochShuffle", "ExactResume", "SeededFetches", "default_exact_resume", "resumable_loader"]

# the streams of random numbers a seed is derived for (the first word after the run's seed)
_STEP, _FETCH, _ORDER = 0, 1, 2
_LOADER_STATES = "combined_loader"  # where Lightning's fit loop keeps the training loaders' states


def derived_seeds(*words: int) -> tuple[int, int]:
    """Two 32-bit seeds drawn from ``numpy.random.SeedSequence(words)`` (independent for other words)."""
    first, second = np.random.SeedSequence(list(words)).generate_state(2)
    return int(first), int(second)


def seed_global_generators(*words: int) -> None:
    """Seed the global torch (CPU and CUDA), NumPy and ``random`` generators from ``words``.

    The CPU generator and, once CUDA is initialised, the CUDA ones (``torch.manual_seed`` also
    visits every other backend: about 90 us a call against 15 us for all of this).
    """
    torch_seed, numpy_seed = derived_seeds(*words)
    torch.default_generator.manual_seed(torch_seed)
    if torch.cuda.is_initialized():
        torch.cuda.manual_seed_all(torch_seed)
    np.random.seed(numpy_seed)
    random.seed(torch_seed)


@contextlib.contextmanager
def seeded_read(*words: int) -> Iterator[None]:
    """Read data under global generators seeded from ``words``; the main process's states come back after.

    In a worker process the generators stay seeded (the worker draws nothing else). In the main
    process the global torch, NumPy and ``random`` states are restored after the read, so that
    what the process draws outside the training steps (a loss term's random initial memory, built
    on a probe batch) stays the same on every DDP process.
    """
    if get_worker_info() is not None:
        seed_global_generators(*words)
        yield
        return
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    states = torch.get_rng_state(), np.random.get_state(), random.getstate()
    seed_global_generators(*words)
    try:
        yield
    finally:
        torch.set_rng_state(states[0])
        np.random.set_state(states[1])
        random.setstate(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def batch_words(indices: Sequence[Any]) -> list[int]:
    """Four 32-bit words of a BLAKE2b digest of a batch's indices (int64 bytes; others: their ``repr``).

    A batch of 128 indices costs about 10 us this way, where a ``SeedSequence`` fed the indices
    themselves takes about 150 us (a tenth of a small model's step).
    """
    data = repr(list(indices)).encode()  # other keys, or ints beyond 64 bits
    if all(isinstance(i, int) and -(2**63) <= i < 2**63 for i in indices):
        data = np.asarray(indices, dtype="<i8").tobytes()
    return np.frombuffer(hashlib.blake2b(data, digest_size=16).digest(), dtype="<u4").tolist()


class SeededFetches(Dataset):
    """A map-style dataset whose every batch is read under global generators seeded for that batch.

    Before a loader reads a batch (``__getitems__``, in the process that reads it: a worker or the main
    process), the global torch, NumPy and ``random`` generators are seeded from ``(seed, rank, epoch, a
    digest of the batch's indices)`` (:func:`batch_words`): ordinary random transforms (torchvision's,
    NumPy's) give a batch the same random numbers whichever process reads it and however often its
    loader was restarted, so a resumed run repeats them bit for bit (two batches of the same indices in
    one epoch, which only a sampler with replacement makes, get the same numbers). The epoch lives in
    shared memory, so that worker processes, persistent ones too, read the epoch the main process sets.
    Items read one by one (``dataset[i]``, as a cache's fingerprint does) are read as the wrapped
    dataset gives them; other attributes are the wrapped dataset's.

    Args:
        dataset: the map-style dataset to read.
        seed: the run's seed.
        rank: the process's rank (DDP processes draw other numbers).
    """

    #: a wrapper that changes no item: fingerprints of the training set look through it
    fingerprint_transparent = True

    def __init__(self, dataset: Dataset, seed: int, rank: int = 0) -> None:
        self.dataset = dataset
        self.seed = seed
        self.rank = rank
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    @property
    def epoch(self) -> int:
        """The epoch whose batches are read."""
        return int(self._epoch)

    @epoch.setter
    def epoch(self, epoch: int) -> None:
        self._epoch.fill_(epoch)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: Any) -> Any:
        return self.dataset[index]

    def __getitems__(self, indices: list[Any]) -> list[Any]:
        """The items of one batch, read under generators seeded for this batch."""
        with seeded_read(self.seed, _FETCH, self.rank, self.epoch, *batch_words(indices)):
            read_batch = getattr(self.dataset, "__getitems__", None)
            return list(read_batch(indices)) if read_batch is not None else [self.dataset[i] for i in indices]

    def __getattr__(self, name: str) -> Any:
        """Other attributes (``classes``, ``transform``, ``state_dict``...) are the wrapped dataset's."""
        if name in ("dataset", "_epoch") or name.startswith("__"):  # not set yet (unpickling), or special
            raise AttributeError(name)
        return getattr(self.dataset, name)


class SeededItems(SeededFetches):
    """:class:`SeededFetches` for a loader without ``batch_size``, each of whose items is a whole batch.

    Every item is read under global generators seeded from ``(seed, rank, epoch, index)``.
    """

    def __getitem__(self, index: Any) -> Any:
        words = [index] if isinstance(index, int) and index >= 0 else [zlib.crc32(repr(index).encode())]
        with seeded_read(self.seed, _FETCH, self.rank, self.epoch, *words):
            return self.dataset[index]


class EpochShuffle(Sampler[int]):
    """A random permutation of the dataset drawn from ``(seed, epoch)`` alone.

    As a ``DistributedSampler``, the order of an epoch depends on nothing but its number (Lightning
    calls ``set_epoch`` at every epoch start), not on how many times a loader was iterated: a
    resumed loader fast-forwards the same permutation. Every process draws the same permutation,
    so that Lightning's distributed sampler wrapper gives each process its own disjoint part. The
    permutation is drawn at the first item.

    Args:
        data_source: the dataset (its length).
        seed: the run's seed.
        epoch: the first epoch.
    """

    def __init__(self, data_source: Any, seed: int, epoch: int = 0) -> None:
        self.data_source = data_source
        self.seed, self.epoch = seed, epoch

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose permutation the next iteration gives."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.data_source)

    def __iter__(self) -> Any:
        generator = torch.Generator().manual_seed(derived_seeds(self.seed, _ORDER, self.epoch)[0])
        yield from torch.randperm(len(self.data_source), generator=generator).tolist()


def stateful_loader(*args: Any, **kwargs: Any) -> StatefulDataLoader:
    """A ``StatefulDataLoader`` built without torchdata 0.11's warning about ``torch.set_vital``.

    Its constructor calls the deprecated ``torch.set_vital``, a warning users can do nothing about.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*set_vital.* is deprecated")
        return StatefulDataLoader(*args, **kwargs)


def resumable_loader(loader: Any, seed: int, rank: int = 0, epoch: int = 0) -> tuple[Any, str | None]:
    """``loader`` rebuilt as a ``StatefulDataLoader`` that resumes exactly, or ``(loader, why not)``.

    A ``torch.utils.data.DataLoader`` over a map-style dataset with a random, sequential or
    distributed sampler becomes a :class:`~torchdata.stateful_dataloader.StatefulDataLoader`
    with the same batch size, workers, collate function and options, over :class:`SeededFetches`
    of its dataset (:class:`SeededItems` without ``batch_size``: each item is a batch); a
    ``RandomSampler`` (without replacement) becomes an :class:`EpochShuffle` (seeded
    from its generator's seed, if it has one, else from ``seed``). A loader that already has a state
    (``state_dict`` / ``load_state_dict``) is returned as it is.

    Returns:
        the loader to train on, and ``None`` or the reason it is not resumed exactly (what to change).
    """
    if isinstance(loader, _Stateful):
        return loader, None
    if type(loader) is not DataLoader:
        return loader, (
            f"it is a {type(loader).__name__}, not a torch DataLoader, and has no "
            "state_dict/load_state_dict. "
            "Return a torch.utils.data.DataLoader (it is rebuilt as a torchdata StatefulDataLoader), or a "
            "loader with state_dict/load_state_dict (its position in the epoch and its random state)"
        )
    dataset = loader.dataset
    common = worker_settings(loader)
    if isinstance(dataset, IterableDataset):
        if not isinstance(dataset, _Stateful):
            return loader, (
                f"its dataset, a {type(dataset).__name__}, is an IterableDataset without state_dict/"
                "load_state_dict, so a resumed run restarts its stream. Give the dataset state_dict/"
                "load_state_dict (its position and random state), or use a map-style dataset"
            )
        return stateful_loader(
            dataset, batch_size=loader.batch_size, drop_last=loader.drop_last, **common
        ), None
    batch_sampler, sampler = loader.batch_sampler, loader.sampler
    if batch_sampler is None:  # each item is a batch
        items = dataset if isinstance(dataset, SeededItems) else SeededItems(dataset, seed, rank)
        sampler, problem = _resumable_sampler(sampler, items, seed, epoch)
        if problem is not None:
            return loader, problem
        return stateful_loader(items, batch_size=None, sampler=sampler, **common), None
    wrapped = dataset if isinstance(dataset, SeededFetches) else SeededFetches(dataset, seed, rank)
    if type(batch_sampler) is not BatchSampler:
        if not isinstance(batch_sampler, _Stateful):
            return loader, (
                f"its batch_sampler, a {type(batch_sampler).__name__}, has no state_dict/load_state_dict. "
                "Give it state_dict/load_state_dict (its position in the epoch and its random state), or "
                "use batch_size with shuffle=True"
            )
        return stateful_loader(wrapped, batch_sampler=batch_sampler, **common), None
    sampler, problem = _resumable_sampler(sampler, wrapped, seed, epoch)
    if problem is not None:
        return loader, problem
    return stateful_loader(
        wrapped,
        batch_size=batch_sampler.batch_size,
        drop_last=batch_sampler.drop_last,
        sampler=sampler,
        **common,
    ), None


def _resumable_sampler(sampler: Any, dataset: Dataset, seed: int, epoch: int) -> tuple[Any, str | None]:
    """A sampler of ``dataset`` whose epoch order a resumed loader repeats, or ``(None, why not)``."""
    if type(sampler) is RandomSampler and not sampler.replacement and sampler._num_samples is None:
        if sampler.generator is not None:
            seed = sampler.generator.initial_seed()
        return EpochShuffle(dataset, seed, epoch), None
    if type(sampler) is SequentialSampler:
        return SequentialSampler(dataset), None
    if isinstance(sampler, (DistributedSampler, _Stateful)) or getattr(sampler, "order_set_by_epoch", False):
        return sampler, None  # a resumed loader fast-forwards the epoch's order
    kind = f"a {type(sampler).__name__}"
    if type(sampler) is RandomSampler:
        kind = "a RandomSampler with replacement or num_samples"
    return None, (
        f"its sampler, {kind}, has no state_dict/load_state_dict. Give it "
        "state_dict/load_state_dict (its position in the epoch and its random state), set "
        "order_set_by_epoch = True on it if its order depends on set_epoch's epoch alone, or use "
        "shuffle=True (a DistributedSampler is resumed too)"
    )


def default_exact_resume(trainer: pl.Trainer | None) -> list[Callback]:
    """``[ExactResume()]`` for a module's ``configure_callbacks``, or ``[]`` when the Trainer has one.

    A user's own ``ExactResume`` (an explicit seed) is kept: a callback a module returns replaces the
    Trainer's callbacks of its type.
    """
    if trainer is not None and any(isinstance(c, ExactResume) for c in trainer.callbacks):
        return []
    return [ExactResume()]


class ExactResume(Callback):
    """Make a fit resumed from any checkpoint (epoch-end or mid-epoch) repeat the uninterrupted run.

    Lightning restores the module, optimizers, schedulers, loop counters and callbacks, and the
    position of training loaders that have a state (``state_dict`` / ``load_state_dict``, such
    as torchdata's ``StatefulDataLoader``), but not the global random generators, and a plain
    ``DataLoader`` restarts its epoch in another order. This callback, which every training module
    of the package installs (``configure_callbacks``), closes both gaps:

    - every training ``DataLoader`` is rebuilt by :func:`resumable_loader` when the Trainer asks
      for it (also when it reloads loaders): the same batches, a state Lightning saves in every
      checkpoint, and batches read under generators seeded per batch (:class:`SeededFetches`),
      in workers and in the main process;
    - before every training batch the global torch (CPU and CUDA), NumPy and ``random``
      generators are seeded from ``(seed, rank, epoch, batch)``: dropout, CRD's negatives and
      any other random numbers of a step depend only on the step;
    - on resume the loaders' saved states are loaded once the Trainer has built its loaders
      (also when ``trainer.estimated_stepping_batches`` built them before the checkpoint was read,
      Lightning issue #20550), and a checkpoint written after an epoch's last batch starts the
      next epoch (Lightning would skip it).

    A loader that cannot be made exact (an ``IterableDataset`` or a sampler without a state, a
    ``DataLoader`` subclass) is used as it is, with one warning at the start of the fit that names it
    and what to change.

    Args:
        seed: the run's seed; by default Lightning's ``seed_everything`` seed (``PL_GLOBAL_SEED``),
            else torch's initial seed. A resumed fit takes the checkpoint's seed; passing another
            one is refused.
    """

    def __init__(self, seed: int | None = None) -> None:
        self.seed = seed
        self._run_seed: int | None = None
        self._datasets: list[SeededFetches] = []
        self._pending_states: list[dict[str, Any]] | None = None
        self._after_last_batch = False
        self._warned: set[str] = set()
        self._trainer: pl.Trainer | None = None
        self._monitor: StepMonitor | None = None
        self._pending_counts: list[list[int]] | None = None

    @property
    def run_seed(self) -> int:
        """The seed this fit derives its random numbers from."""
        if self._run_seed is None:
            raise RuntimeError("ExactResume has no seed before the Trainer sets it up.")
        return self._run_seed

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Choose the run's seed and rebuild the training loaders the Trainer asks for."""
        if stage != "fit":
            return
        seed = self.seed
        if seed is None:
            seed = int(os.environ.get("PL_GLOBAL_SEED", torch.initial_seed()))
            seed = int(trainer.strategy.broadcast(seed))  # the processes of an unseeded run agree
        self._run_seed = seed
        self._datasets, self._pending_states, self._after_last_batch = [], None, False
        self._trainer, self._pending_counts = trainer, None
        monitor = getattr(pl_module, "monitor", None)
        self._monitor = monitor if isinstance(monitor, StepMonitor) else None
        source = trainer.fit_loop._data_source
        request = source.dataloader
        if getattr(request, "_exact_resume", None) is self:
            return
        describe = _source_name(source.instance)

        def resumable(*args: Any, **kwargs: Any) -> Any:
            return self._resumable(trainer, request(*args, **kwargs), describe)

        resumable._exact_resume = self  # type: ignore[attr-defined]
        source.dataloader = resumable  # the fit loop's one door to the training loaders

    def _resumable(self, trainer: pl.Trainer, loaders: Any, describe: str) -> CombinedLoader:
        combined = (
            loaders if isinstance(loaders, CombinedLoader) else CombinedLoader(loaders, "max_size_cycle")
        )
        names = _loader_names(combined)
        rebuilt = []
        self._datasets = []
        for name, loader in zip(names, combined.flattened, strict=True):
            new, problem = resumable_loader(loader, self.run_seed, trainer.global_rank, trainer.current_epoch)
            if problem is not None and name not in self._warned:
                self._warned.add(name)
                rank_zero_warn(
                    f"The training loader{name} of {describe} is not resumed exactly: {problem}. Until "
                    "then a run resumed from a checkpoint (mid-epoch above all) sees other batches or random "
                    "numbers than the uninterrupted run."
                )
            if isinstance(getattr(new, "dataset", None), SeededFetches):
                new.dataset.epoch = trainer.current_epoch
                self._datasets.append(new.dataset)
            rebuilt.append(new)
        combined.flattened = rebuilt
        return combined

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Take the loaders' states out of the checkpoint: they are loaded at the train start.

        Lightning would load them only if it builds the loaders after reading the checkpoint,
        which ``trainer.estimated_stepping_batches`` (the default cosine schedule) prevents.
        """
        if trainer.state.fn != "fit":
            return
        fit_loop = checkpoint.get("loops", {}).get("fit_loop", {})
        self._pending_states = fit_loop.get("state_dict", {}).pop(_LOADER_STATES, None)
        batches = fit_loop.get("epoch_loop.batch_progress", {})
        current = batches.get("current", {})
        # written after an epoch's last batch, before the epoch ended: Lightning starts the next epoch
        self._after_last_batch = bool(batches.get("is_last_batch")) and current.get("ready") == current.get(
            "processed"
        )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Load the saved loaders' states and start the resumed epoch's batches from them."""
        states, self._pending_states = self._pending_states, None
        if self._after_last_batch:  # the counts are those of the epoch that ended: the next starts at 0
            self._pending_counts = None
            # Lightning starts the next epoch as a restarted one, without its on_train_epoch_start hooks
            # (a stage change, an epoch-interval schedule): let it start as an ordinary epoch
            trainer.fit_loop.reset_restart_stage()
        fit_loop = trainer.fit_loop
        combined = fit_loop._combined_loader
        if not states or combined is None:
            return
        if self._after_last_batch:  # the epoch's batches were all trained: the loader starts a new epoch
            states = [{**state, "_iterator_finished": True} for state in states]
        self._stamp_epoch(trainer)
        for loader in combined.flattened:
            _set_sampler_epoch(loader, trainer.current_epoch)
        combined._load_state_dicts(states)
        iter(fit_loop._data_fetcher)  # a new iterator from the loaded states (the old one was not used)
        self._stamp_epoch(trainer)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Give the datasets the epoch before its batches are read."""
        self._stamp_epoch(trainer)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Seed the global generators for this batch (after a resume: restore the epoch's counts first)."""
        if self._pending_counts is not None and self._monitor is not None:
            correct, seen = self._pending_counts[trainer.global_rank]
            self._monitor.correct = torch.tensor(correct, device=pl_module.device)
            self._monitor.seen = seen
        self._pending_counts = None
        seed_global_generators(self.run_seed, _STEP, trainer.global_rank, trainer.current_epoch, batch_idx)

    def _stamp_epoch(self, trainer: pl.Trainer) -> None:
        for dataset in self._datasets:
            dataset.epoch = trainer.current_epoch

    def state_dict(self) -> dict[str, Any]:
        """The run's seed and, in a fit, every process's count of correct predictions in the epoch so far.

        The counts (read from the module's :class:`~lightning_kd.step_monitor.StepMonitor`, gathered
        from every process) make the epoch's ``train/acc`` of a run resumed mid-epoch the uninterrupted
        run's.
        """
        if self._run_seed is None:
            return {}
        state: dict[str, Any] = {"seed": self._run_seed}
        trainer, monitor = self._trainer, self._monitor
        if trainer is not None and monitor is not None and trainer.state.fn == "fit":
            device = trainer.strategy.root_device
            correct = monitor.correct if monitor.correct is not None else torch.zeros((), dtype=torch.long)
            counts = torch.stack([correct.to(device), torch.tensor(monitor.seen, device=device)])
            gathered = trainer.strategy.all_gather(counts).reshape(-1, 2)  # one row per process
            state["epoch_counts"] = gathered.tolist()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Take the checkpoint's seed (refuse another one passed explicitly) and the epoch's counts."""
        saved = state_dict.get("seed")
        if saved is None:
            return
        if self.seed is not None and self.seed != saved:
            raise ValueError(
                f"{type(self).__name__}(seed={self.seed}) resumes a run made with seed={saved}; pass the "
                f"checkpoint's seed ({saved}), or none, to continue the same sequence of batches."
            )
        self._run_seed = saved
        counts = state_dict.get("epoch_counts")
        world = self._trainer.world_size if self._trainer is not None else 1
        self._pending_counts = counts if counts is not None and len(counts) == world else None


def _set_sampler_epoch(loader: Any, epoch: int) -> None:
    """``set_epoch`` on a loader's samplers (as Lightning does at each epoch start)."""
    batch_sampler = getattr(loader, "batch_sampler", None)
    for sampler in (getattr(loader, "sampler", None), batch_sampler, getattr(batch_sampler, "sampler", None)):
        set_epoch: Callable[[int], None] | None = getattr(sampler, "set_epoch", None)
        if set_epoch is not None:
            set_epoch(epoch)


def _source_name(instance: Any) -> str:
    if isinstance(instance, pl.LightningDataModule):
        return f"{type(instance).__name__}.train_dataloader()"
    if isinstance(instance, pl.LightningModule):
        return f"{type(instance).__name__}.train_dataloader()"
    return "the train_dataloaders given to Trainer.fit"


def _loader_names(combined: CombinedLoader) -> list[str]:
    """``''`` for a single training loader, else each one's position (``' #1'``)."""
    count = len(combined.flattened)
    return [""] if count == 1 else [f" #{i}" for i in range(count)]
