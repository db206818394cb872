"""AB (activation boundaries): values against float64 references, the connector, gradients, the init stage."""

from __future__ import annotations

import warnings
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch import nn

from lightning_kd import (
    ABTerm,
    CrossEntropyTerm,
    DistillationModule,
    DistillationStages,
    Stage,
)
from lightning_kd.losses.ab import make_ab_connector
from lightning_kd.losses.functional import ab_loss
from tests.helpers import RandomDataModule, Snapshots, f64, make_trainer, rand, same, small_net, step, t32


def reference_ab(student: Any, teacher: Any, margin: float = 1.0) -> float:
    """Heo et al. alternative loss, element by element: t <= 0: (s + m)^2 if s > -m; t > 0: (s - m)^2 if
    s <= m; summed, divided by the batch size, times 3 / 1000 (RepDistiller's ABLoss)."""
    s, t = f64(student), f64(teacher)
    total = 0.0
    for s_i, t_i in zip(s.ravel(), t.ravel(), strict=True):
        if t_i <= 0:
            total += (s_i + margin) ** 2 if s_i > -margin else 0.0
        else:
            total += (s_i - margin) ** 2 if s_i <= margin else 0.0
    return total / s.shape[0] * 3 / 1000


def test_ab_loss_every_branch_of_the_mask_on_hand_picked_values() -> None:
    # teacher inactive (t <= 0, t = 0 included): s <= -m costs nothing, -m < s costs (s + m)^2;
    # teacher active (t > 0): s > m costs nothing, s <= m costs (s - m)^2.
    student = t32([[-2.0, -1.0, -0.5, 2.0], [2.0, 1.0, 0.5, -1.0]])
    teacher = t32([[-1.0, 0.0, -3.0, 0.0], [0.5, 2.0, 1e-3, 4.0]])
    costs = [0.0, 0.0, 0.25, 9.0, 0.0, 0.0, 0.25, 4.0]
    expected = sum(costs) / 2 * 3 / 1000  # two samples
    assert ab_loss(student, teacher).item() == pytest.approx(expected, rel=1e-6)
    assert reference_ab(student, teacher) == pytest.approx(expected, rel=1e-12)
    # margin 0.5: -0.5 sits on the boundary (no cost), 1.0 is beyond it, 0.5 on it (cost 0)
    expected_half = (0.0 + 0.0 + 0.0 + 2.5**2 + 0.0 + 0.0 + 0.0 + 1.5**2) / 2 * 3 / 1000
    assert ab_loss(student, teacher, margin=0.5).item() == pytest.approx(expected_half, rel=1e-6)


@pytest.mark.parametrize(("shape", "margin"), [((4, 6), 1.0), ((2, 3, 5), 0.5), ((3, 2, 4, 4), 2.0)])
def test_ab_loss_matches_reference(shape: tuple[int, ...], margin: float) -> None:
    student, teacher = 2 * rand(*shape, seed=1), rand(*shape, seed=2)
    got = ab_loss(t32(student), t32(teacher), margin=margin)
    assert got.dtype == torch.float32 and got.ndim == 0
    assert got.item() == pytest.approx(reference_ab(student, teacher, margin), rel=1e-5)


def test_ab_loss_is_zero_beyond_the_margin_on_the_teachers_side() -> None:
    teacher = t32(rand(4, 3, 5, seed=3))
    student = torch.where(teacher > 0, 1.0 + torch.rand_like(teacher), -1.0 - torch.rand_like(teacher))
    assert ab_loss(student, teacher).item() == 0.0
    assert ab_loss(student, torch.relu(teacher)).item() == 0.0  # only the teacher's sign matters


def test_ab_loss_gradient_matches_the_formula_and_spares_the_teacher() -> None:
    student_np, teacher_np = rand(3, 4, 5, seed=4), rand(3, 4, 5, seed=5)
    student = t32(student_np).requires_grad_()
    teacher = t32(teacher_np).requires_grad_()
    ab_loss(student, teacher.detach()).backward()
    s, t = student_np, teacher_np
    down = (s > -1) & (t <= 0)
    up = (s <= 1) & (t > 0)
    expected = (2 * (s + 1) * down + 2 * (s - 1) * up) / 3 * 3 / 1000
    np.testing.assert_allclose(f64(student.grad), expected, rtol=1e-5, atol=1e-9)
    assert teacher.grad is None


def test_ab_loss_rejects_bad_inputs_naming_both_shapes() -> None:
    with pytest.raises(
        ValueError, match=r"student_pre has shape \(2, 3\) but teacher_pre has shape \(2, 4\)"
    ):
        ab_loss(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="margin must be >= 0"):
        ab_loss(torch.zeros(2, 3), torch.zeros(2, 3), margin=-1.0)
    with pytest.raises(ValueError, match="batch dimension"):
        ab_loss(torch.tensor(1.0), torch.tensor(1.0))


def test_ab_connector_follows_the_benchmark() -> None:
    assert isinstance(make_ab_connector((2, 8, 4, 4), (2, 8, 4, 4)), nn.Identity)  # equal shapes
    conv, bn = make_ab_connector((2, 4, 4, 4), (2, 8, 4, 4))
    assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and conv.bias is not None
    assert isinstance(bn, nn.BatchNorm2d) and bn.num_features == 8
    conv, _ = make_ab_connector((2, 4, 8, 8), (2, 8, 4, 4))
    assert conv.kernel_size == (3, 3) and conv.stride == (2, 2)  # ConvReg: twice the teacher's size
    conv, bn = make_ab_connector((2, 4, 10), (2, 8, 10))
    assert isinstance(conv, nn.Conv1d) and isinstance(bn, nn.BatchNorm1d)
    linear, bn = make_ab_connector((2, 4), (2, 8))
    assert isinstance(linear, nn.Linear) and isinstance(bn, nn.BatchNorm1d)
    assert not any(isinstance(m, nn.ReLU) for m in make_ab_connector((2, 4, 4, 4), (2, 8, 4, 4)).modules())


def test_ab_term_value_and_gradients_reach_student_and_connector_never_the_teacher() -> None:
    term = ABTerm("s", "t", margin=0.5)
    student = torch.randn(4, 3, 5, requires_grad=True)
    teacher = torch.randn(4, 6, 5, requires_grad=True)
    outputs = step({"s": student}, {"t": teacher})
    term.build(outputs)
    value = term(outputs)
    assert value.item() == pytest.approx(reference_ab(term.connector(student), teacher, 0.5), rel=1e-5)
    value.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert all(p.grad is not None for p in term.connector.parameters())
    assert teacher.grad is None

    same = ABTerm("s", "t")  # equal shapes: identity connector, nothing to train
    outputs = step({"s": student.detach()}, {"t": student.detach() + 0.1})
    same.build(outputs)
    assert isinstance(same.connector, nn.Identity) and not list(same.parameters()) and not same.needs_build
    assert same(outputs).item() == pytest.approx(reference_ab(student, student + 0.1), rel=1e-5)


def test_ab_term_rejects_bad_shapes_and_settings() -> None:
    with pytest.raises(ValueError, match=r"'ab'.*\(2, 3\).*\(2, 3, 4\)"):
        ABTerm("s", "t").build(step({"s": torch.zeros(2, 3)}, {"t": torch.zeros(2, 3, 4)}))
    with pytest.raises(ValueError, match="margin must be >= 0"):
        ABTerm("s", "t", margin=-0.1)
    with pytest.raises(RuntimeError, match="no connector yet"):
        ABTerm("s", "t")(step({"s": torch.zeros(2, 3)}, {"t": torch.zeros(2, 3)}))


def test_ab_term_warns_once_when_the_student_feature_was_overwritten_in_place() -> None:
    term = ABTerm("s", "t", connector=nn.Identity())
    clean = step({"s": torch.randn(2, 3)}, {"t": torch.randn(2, 3).relu_()})  # teacher: only its sign matters
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        term(clean)
    overwritten = step({"s": torch.randn(2, 3).relu_()}, {"t": torch.randn(2, 3)})
    with pytest.warns(UserWarning, match="modified in place"):
        term(overwritten)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        term(overwritten)  # once


def test_ab_init_stage_trains_the_feature_layers_and_connector_then_ce_the_student() -> None:
    pl.seed_everything(0, verbose=False)
    losses = [CrossEntropyTerm(), ABTerm("1", "1")]  # small_net: "1" is the BatchNorm before the ReLU
    module = DistillationModule(small_net(hidden=16), small_net(hidden=32), losses=losses)
    stages = DistillationStages(
        [
            Stage(epochs=2, weights={"ab": 1.0}, trainable=["student.0", "student.1", "loss_terms.ab"]),
            Stage(weights={"ce": 1.0}, trainable=["student"]),
        ]
    )
    paths = {"features": "student.0", "head": "student.3", "connector": "loss_terms.ab"}
    snapshots = Snapshots(paths)
    make_trainer(max_epochs=4, callbacks=[stages, snapshots]).fit(module, datamodule=RandomDataModule())
    start, epochs = snapshots.initial, snapshots.epochs
    assert isinstance(module.loss_terms["ab"].connector[0], nn.Linear)
    for epoch in (0, 1):
        assert same(epochs[epoch]["head"], start["head"])  # the classifier waits for the main stage
        assert not same(epochs[epoch]["features"], (epochs[epoch - 1] if epoch else start)["features"])
        assert not same(epochs[epoch]["connector"], (epochs[epoch - 1] if epoch else start)["connector"])
    for epoch in (2, 3):
        assert same(epochs[epoch]["connector"], epochs[1]["connector"])  # unused and fixed (BN in eval)
        assert not same(epochs[epoch]["head"], epochs[epoch - 1]["head"])
