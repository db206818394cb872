"""ExactResume's parts: epoch-seeded shuffles, batch reads seeded by (epoch, indices), fingerprints."""

from __future__ import annotations

import hashlib
import random
import struct

import numpy as np
import torch
from lightning.fabric.utilities.distributed import DistributedSamplerWrapper
from torch.utils.data import DataLoader, Dataset
from torchdata.stateful_dataloader import StatefulDataLoader

from lightning_kd.callbacks.exact_resume import EpochShuffle, SeededFetches, resumable_loader
from lightning_kd.teachers.fingerprints import dataset_fingerprint


def _reference_seeds(*words: int) -> tuple[int, int]:
    first, second = np.random.SeedSequence(list(words)).generate_state(2)
    return int(first), int(second)


class RandomViews(Dataset):
    """Item ``i``: ``i`` plus a draw from each of torch, NumPy and ``random``."""

    def __len__(self) -> int:
        return 12

    def __getitem__(self, index: int) -> torch.Tensor:
        draws = [torch.rand(()).item(), float(np.random.rand()), random.random()]
        return torch.tensor([float(index), *draws], dtype=torch.float64)


def test_the_epoch_order_is_a_function_of_seed_and_epoch_only() -> None:
    sampler = EpochShuffle(range(10), seed=3)
    sampler.set_epoch(2)
    torch.manual_seed(0)
    first = list(sampler)
    torch.manual_seed(1)  # the global state does not matter
    assert list(sampler) == first
    expected = torch.randperm(10, generator=torch.Generator().manual_seed(_reference_seeds(3, 2, 2)[0]))
    assert first == expected.tolist()
    sampler.set_epoch(3)
    assert list(sampler) != first and sorted(sampler) == list(range(10))


def test_every_process_draws_the_same_order_so_distributed_parts_are_disjoint() -> None:
    # Lightning wraps the sampler in a DistributedSamplerWrapper that gives each rank every
    # world_size-th item of the order: the parts are disjoint only if every rank has the same order.
    parts = []
    for rank in (0, 1):
        wrapper = DistributedSamplerWrapper(
            EpochShuffle(range(10), seed=3), num_replicas=2, rank=rank, shuffle=False
        )
        wrapper.set_epoch(1)
        parts.append(list(wrapper))
    assert sorted(parts[0] + parts[1]) == list(range(10))


def test_a_batch_is_read_under_generators_seeded_by_epoch_and_indices_in_any_worker() -> None:
    dataset = SeededFetches(RandomViews(), seed=5, rank=0)
    dataset.epoch = 4
    batch = dataset.__getitems__([7, 2])
    digest = hashlib.blake2b(struct.pack("<2q", 7, 2), digest_size=16).digest()
    torch_seed, numpy_seed = _reference_seeds(5, 1, 0, 4, *struct.unpack("<4I", digest))
    torch.manual_seed(torch_seed)
    np.random.seed(numpy_seed)
    random.seed(torch_seed)
    expected = [RandomViews()[7], RandomViews()[2]]
    assert all(torch.equal(a, b) for a, b in zip(batch, expected, strict=True))

    def batches(workers: int) -> list[torch.Tensor]:
        loader = DataLoader(RandomViews(), batch_size=4, shuffle=True, num_workers=workers)
        rebuilt, problem = resumable_loader(loader, seed=5)
        assert problem is None
        return list(rebuilt)

    assert all(
        torch.equal(a, b) for a, b in zip(batches(0), batches(2), strict=True)
    )  # workers do not matter


def test_fingerprints_of_the_training_set_look_through_the_wrapper() -> None:
    from torch.utils.data import TensorDataset

    data = TensorDataset(torch.arange(12.0).reshape(6, 2), torch.arange(6))
    assert dataset_fingerprint(SeededFetches(data, seed=0)) == dataset_fingerprint(data)


def test_a_loader_of_whole_batches_is_rebuilt_and_resumes_where_it_stopped() -> None:
    batches = [torch.full((2,), float(i)) for i in range(6)]
    loader, problem = resumable_loader(DataLoader(batches, batch_size=None, shuffle=True), seed=7)
    assert problem is None and isinstance(loader, StatefulDataLoader)
    iterator = iter(loader)
    first = [next(iterator) for _ in range(2)]
    state = loader.state_dict()
    rest = list(iterator)
    assert sorted(float(b[0]) for b in first + rest) == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    resumed, _ = resumable_loader(DataLoader(batches, batch_size=None, shuffle=True), seed=7)
    resumed.load_state_dict(state)
    assert [float(b[0]) for b in resumed] == [float(b[0]) for b in rest]
