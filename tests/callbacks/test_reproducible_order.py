"""ReproducibleOrder: the epoch order is a function of seed and step; resuming with another seed fails."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_kd.callbacks import ReproducibleOrder


def test_epoch_order_is_a_function_of_seed_and_step() -> None:
    dataset = TensorDataset(torch.arange(10.0))
    loaders = {"a": DataLoader(dataset, shuffle=True), "b": DataLoader(dataset)}
    trainer = SimpleNamespace(train_dataloader=loaders, global_step=6)
    callback = ReproducibleOrder(seed=3)
    orders = []
    for _ in range(2):
        torch.manual_seed(len(orders))  # the global state must not matter
        callback.on_train_epoch_start(trainer, None)  # type: ignore[arg-type]
        orders.append(list(loaders["a"].sampler))
    seed = int(np.random.SeedSequence([3, 0, 6]).generate_state(2)[0])
    assert (
        orders[0] == orders[1] == torch.randperm(10, generator=torch.Generator().manual_seed(seed)).tolist()
    )
    assert loaders["b"].sampler.__class__.__name__ == "SequentialSampler"


def test_resuming_with_another_seed_is_an_error() -> None:
    ReproducibleOrder(seed=1).load_state_dict({"seed": 1})
    with pytest.raises(ValueError, match="seed=2.*seed=1"):
        ReproducibleOrder(seed=2).load_state_dict(ReproducibleOrder(seed=1).state_dict())
