"""CTKD against float64 references: its formulas, and the authors' code transcribed."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd import Function

from lightning_kd import (
    CrossEntropyTerm,
    CTKDTerm,
    DistillationModule,
    DKDTerm,
    KDTerm,
    ReversalStrengthSchedule,
)
from lightning_kd.losses.base import StepOutputs
from lightning_kd.losses.functional import ctkd_temperature, dkd_loss, gradient_reversal, kd_loss
from tests.helpers import RandomDataModule, make_trainer, np_softmax, small_net


# --- the authors' code, transcribed literally (float64), from zhengli97/CTKD: models/temp_global.py
# (Global_T, GradientReversalFunction, GradientReversal), train_student.py (CosineDecay and
# ``temp = opt.t_start + opt.t_end * torch.sigmoid(temp)`` of helper/loops.py train_distill) and
# distiller_zoo/KD.py (DistillKL, without its ``.cuda()``).
class GradientReversalFunction(Function):
    @staticmethod
    def forward(ctx, x, lambda_):
        ctx.lambda_ = lambda_
        return x.clone()

    @staticmethod
    def backward(ctx, grads):
        lambda_ = ctx.lambda_
        lambda_ = grads.new_tensor(lambda_)
        dx = lambda_ * grads
        return dx, None


class GradientReversal(torch.nn.Module):
    def forward(self, x, lambda_):
        return GradientReversalFunction.apply(x, lambda_)


class Global_T(nn.Module):
    def __init__(self):
        super().__init__()
        self.global_T = nn.Parameter(torch.ones(1, dtype=torch.float64), requires_grad=True)
        self.grl = GradientReversal()

    def forward(self, fake_input1, fake_input2, lambda_):
        return self.grl(self.global_T, lambda_)


class CosineDecay:
    def __init__(self, max_value, min_value, num_loops):
        self._max_value = max_value
        self._min_value = min_value
        self._num_loops = num_loops

    def get_value(self, i):
        if i < 0:
            i = 0
        if i >= self._num_loops:
            i = self._num_loops
        value = (math.cos(i * math.pi / self._num_loops) + 1.0) * 0.5
        value = value * (self._max_value - self._min_value) + self._min_value
        return value


class DistillKL(nn.Module):
    def forward(self, y_s, y_t, temp):
        T = temp
        KD_loss = 0
        KD_loss += (
            nn.KLDivLoss(reduction="batchmean")(F.log_softmax(y_s / T, dim=1), F.softmax(y_t / T, dim=1))
            * T
            * T
        )
        return KD_loss


def logits(n: int = 6, c: int = 7, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    student = 2 * torch.randn(n, c, generator=generator, dtype=torch.float64)
    teacher = 2 * torch.randn(n, c, generator=generator, dtype=torch.float64)
    return student, teacher, torch.randint(0, c, (n,), generator=generator)


@pytest.mark.parametrize("epoch", [1, 4, 12])
def test_global_ctkd_with_kd_equals_the_authors_code(epoch: int) -> None:
    student, teacher, _ = logits(seed=epoch)
    # the authors: decay_value from CosineDecay(max 0, min -1, loops 10) at their (1-based) epoch
    decay_value = CosineDecay(max_value=0, min_value=-1, num_loops=10).get_value(epoch)
    mlp = Global_T()
    s_ref = student.clone().requires_grad_(True)
    temp = mlp(teacher, s_ref, decay_value)
    temp = 1 + 20 * torch.sigmoid(temp)
    expected = DistillKL()(s_ref, teacher, temp)
    expected.backward()
    # ours: the strength is the magnitude of their decay value
    term = CTKDTerm(KDTerm(), strength=-decay_value)
    s_ours = student.float().requires_grad_(True)
    got = term(StepOutputs(student_logits=s_ours, teacher_logits=teacher.float()))
    got.backward()
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    # d loss / d tau at tau ~ 15.6 cancels to ~1e-3 of its parts: float32 keeps ~3 digits of it
    assert term.global_temperature.grad.item() == pytest.approx(mlp.global_T.grad.item(), rel=1e-2)
    np.testing.assert_allclose(s_ours.grad.numpy(), s_ref.grad.numpy(), rtol=1e-4, atol=1e-7)
    assert term.last_temperature.item() == pytest.approx(temp.item(), rel=1e-6)


def test_curriculum_is_the_authors_cosine_decay_in_magnitude() -> None:
    schedule = ReversalStrengthSchedule()
    authors = CosineDecay(max_value=0, min_value=-1, num_loops=10)
    for epoch in range(13):
        assert schedule.value_at(epoch, schedule.total) == pytest.approx(-authors.get_value(epoch), abs=1e-12)


def test_gradient_reversal_is_identity_forward_and_minus_strength_backward() -> None:
    x = torch.tensor([0.5, -2.0], requires_grad=True)
    y = gradient_reversal(x, 0.25)
    assert torch.equal(y, x.detach())
    (y * torch.tensor([3.0, 5.0])).sum().backward()
    assert torch.equal(x.grad, torch.tensor([-0.75, -1.25]))


def test_temperature_range_and_per_row_kd_match_the_formula() -> None:
    raw = torch.tensor([-30.0, 0.0, 30.0])
    assert torch.allclose(ctkd_temperature(raw, 1.0), torch.tensor([1.0, 11.0, 21.0]))
    student, teacher, _ = logits(n=3, c=4, seed=5)
    temperatures = np.array([1.5, 4.0, 9.0])
    expected = np.mean(
        [
            t**2 * np.sum(np_softmax(b / t) * np.log(np_softmax(b / t) / np_softmax(a / t)))
            for a, b, t in zip(student.numpy(), teacher.numpy(), temperatures, strict=True)
        ]
    )
    got = kd_loss(student.float(), teacher.float(), torch.tensor(temperatures).float())
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_ctkd_with_dkd_is_dkd_at_the_learned_temperature() -> None:
    student, teacher, target = logits(seed=2)
    term = CTKDTerm(DKDTerm(alpha=1.0, beta=2.0, standardize=True), strength=0.5)
    got = term(StepOutputs(student_logits=student.float(), teacher_logits=teacher.float(), targets=target))
    temperature = 1 + 20 * 1 / (1 + math.exp(-1.0))  # the global raw value starts at 1
    expected = dkd_loss(student.float(), teacher.float(), target, 1.0, 2.0, temperature, standardize=True)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)


def test_instance_temperature_gives_one_temperature_per_sample_and_trains_adversarially() -> None:
    student, teacher, _ = logits(n=8, c=5, seed=4)
    term = CTKDTerm(KDTerm(), temperature="instance", strength=1.0, top_k=3)
    outputs = StepOutputs(student_logits=student.float(), teacher_logits=teacher.float())
    assert term.needs_build
    term.build(outputs)
    temperature = term.learned_temperature(outputs)
    assert temperature.shape == (8,) and torch.allclose(
        temperature, torch.full((8,), 11.0)
    )  # zero-initialised
    term(outputs).backward()
    bias = term.instance_temperature.net[-1].bias
    # d loss / d bias without reversal, in float64 from the per-row formula: reversed here
    b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    t = 1 + 20 * torch.sigmoid(b.expand(8))
    rows = F.kl_div(
        F.log_softmax(student / t[:, None], -1),
        F.log_softmax(teacher / t[:, None], -1),
        reduction="none",
        log_target=True,
    ).sum(-1)
    (rows * t**2).mean().backward()
    assert bias.grad.item() == pytest.approx(-b.grad.item(), rel=1e-4)


def test_ctkd_refuses_a_term_without_a_temperature_and_bad_settings() -> None:
    with pytest.raises(TypeError, match="has no loss_at_temperature.*wrap KDTerm or DKDTerm"):
        CTKDTerm(CrossEntropyTerm())
    with pytest.raises(ValueError, match="temperature must be 'global' or 'instance', got 'local'"):
        CTKDTerm(KDTerm(), temperature="local")
    with pytest.raises(ValueError, match="t_range must be > 0 and finite, got 0.0"):
        CTKDTerm(KDTerm(), t_range=0.0)
    with pytest.raises(ValueError, match="strength must be a finite number >= 0, got -1.0"):
        CTKDTerm(KDTerm(), strength=-1.0)
    with pytest.raises(ValueError, match=r"learned temperature of shape \(2,\) does not fit 6 rows"):
        kd_loss(torch.zeros(6, 3), torch.zeros(6, 3), torch.ones(2))


def test_curriculum_names_the_missing_term() -> None:
    module = nn.Module()
    module.loss_terms = nn.ModuleDict({"kd": KDTerm()})
    with pytest.raises(ValueError, match=r"no CTKD term named 'ctkd'.*CTKD terms: \[\], all terms: \['kd'\]"):
        ReversalStrengthSchedule().apply(module, 0.5)
    with pytest.raises(ValueError, match="start must be >= 0"):
        ReversalStrengthSchedule(start=-0.1)


def _fit_ctkd(end: float) -> CTKDTerm:
    term = CTKDTerm(KDTerm(), "ctkd", weight=0.9)
    module = DistillationModule(
        small_net(),
        small_net(hidden=32),
        losses=[CrossEntropyTerm("ce", weight=0.1), term],
        optimizer=lambda params: torch.optim.SGD(params, lr=0.5),
    )
    schedule = ReversalStrengthSchedule("ctkd", end=end, interval="step", total=4)
    make_trainer(max_steps=4, callbacks=[schedule]).fit(module, RandomDataModule(n=64, batch_size=16))
    assert "loss_terms.ctkd.global_temperature" in module.state_dict()
    return term


def test_fit_trains_the_temperature_only_through_the_curriculums_reversal() -> None:
    term = _fit_ctkd(end=1.0)
    assert term.strength == pytest.approx(0.5 * (1 - math.cos(math.pi * 3 / 4)))  # set before the 4th step
    assert term.global_temperature.item() != 1.0  # in the optimizer, moved by the reversed gradient
    assert _fit_ctkd(end=0.0).global_temperature.item() == 1.0  # strength 0: no gradient reaches it
