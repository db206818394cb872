"""The shared set-up of the training modules: the default schedule and the DDP batch-count check."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lightning_kd import DistillationModule
from lightning_kd.module_setup import CosineToZeroLR, check_equal_training_batches, default_optimizer
from tests.helpers import RandomDataModule, make_trainer, small_net


def test_the_default_schedule_is_the_closed_form_cosine_and_stays_at_zero() -> None:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = CosineToZeroLR(optimizer, total_steps=10)
    for step in range(16):  # past its end CosineAnnealingLR climbs back; the default stays at 0
        expected = 0.1 * (1 + math.cos(math.pi * min(step, 10) / 10)) / 2
        assert scheduler.get_last_lr()[0] == pytest.approx(expected, rel=1e-12, abs=1e-15)
        optimizer.step()
        scheduler.step()


def test_a_replan_follows_the_cosine_of_the_new_length_from_the_current_step() -> None:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = CosineToZeroLR(optimizer, total_steps=10)
    for _ in range(4):
        optimizer.step()
        scheduler.step()
    scheduler.replan(20)
    for step in range(4, 21):
        expected = 0.1 * (1 + math.cos(math.pi * step / 20)) / 2
        assert scheduler.get_last_lr()[0] == pytest.approx(expected, rel=1e-12, abs=1e-15)
        assert optimizer.param_groups[0]["lr"] == scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()


def test_a_cosine_annealing_state_of_earlier_versions_loads_as_its_plan() -> None:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    earlier = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=10)
    for _ in range(3):
        optimizer.step()
        earlier.step()
    scheduler = CosineToZeroLR(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1), total_steps=30)
    scheduler.load_state_dict(earlier.state_dict())
    assert (scheduler.total_steps, scheduler.last_epoch) == (10, 3)


def test_a_run_without_an_end_is_refused_the_default_cosine() -> None:
    trainer = make_trainer(max_epochs=-1, max_steps=-1)
    with pytest.raises(
        ValueError, match="this run has no end.*set max_epochs or max_steps, or pass cosine_decay=False"
    ):
        trainer.fit(DistillationModule(small_net()), datamodule=RandomDataModule())


def gathering(counts: list[float]) -> SimpleNamespace:
    """A trainer of rank 0 whose all-gather returns every process's ``num_training_batches``."""
    strategy = SimpleNamespace(
        root_device=torch.device("cpu"),
        all_gather=lambda mine: torch.tensor([[c if math.isfinite(c) else -1] for c in counts]),
    )
    return SimpleNamespace(world_size=len(counts), num_training_batches=counts[0], strategy=strategy)


def test_ddp_processes_with_unequal_batch_counts_are_refused_naming_each() -> None:
    with pytest.raises(
        ValueError,
        match=r"different numbers of training batches per epoch \(rank 0: 4, rank 1: 3, rank 2: unknown\).*"
        r"a DistributedSampler .*drop_last=True.*equal shards of an IterableDataset",
    ):
        check_equal_training_batches(gathering([4, 3, math.inf]))
    check_equal_training_batches(gathering([4, 4]))  # equal: no error
    check_equal_training_batches(gathering([math.inf, math.inf]))  # lengths unknown on all: not comparable


def test_the_default_optimizer_is_fused_adam_and_steps_as_the_per_parameter_loop() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    looped = copy.deepcopy(model)
    fused = default_optimizer(list(model.parameters()))
    reference = torch.optim.Adam(looped.parameters(), lr=1e-3)  # the per-parameter loop on the CPU
    assert fused.defaults["fused"] is True and fused.defaults["lr"] == 1e-3
    inputs = torch.randn(8, 6)
    for _ in range(3):
        for net, optimizer in ((model, fused), (looped, reference)):
            optimizer.zero_grad()
            net(inputs).square().mean().backward()
            optimizer.step()
    for a, b in zip(model.parameters(), looped.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_the_default_optimizer_falls_back_to_the_loop_for_parameters_without_the_fused_kernel() -> None:
    on_meta = [nn.Parameter(torch.zeros(3, device="meta"))]  # a device without the kernel
    assert not default_optimizer(on_meta).defaults["fused"]
    assert default_optimizer(on_meta).defaults["lr"] == 1e-3
