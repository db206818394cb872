"""Multi-teacher KD: the mixture loss, confidence weights, the term needs an ensemble."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_kd import DistillationModule, KDTerm, MultiTeacherKDTerm, TeacherEnsemble
from lightning_kd.losses import functional
from tests.helpers import _softmax64, small_net


def test_loss_is_kl_from_the_weighted_mixture_float64() -> None:
    torch.manual_seed(0)
    student, teachers = torch.randn(4, 5) * 2, torch.randn(3, 4, 5) * 3
    for weights in (torch.tensor([0.5, 0.3, 0.2]), torch.rand(3, 4).softmax(dim=0)):
        w = weights.double() if weights.ndim == 2 else weights.double()[:, None].expand(3, 4)
        mixture = sum(w[m, :, None] * _softmax64(teachers[m], 3.0) for m in range(3))
        q = _softmax64(student, 3.0)
        expected = 9.0 * (mixture * (mixture.log() - q.log())).sum(dim=1).mean()
        got = functional.multi_teacher_kd_loss(student, teachers, weights, temperature=3.0)
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)


def test_gradient_equals_that_of_the_weighted_per_teacher_losses() -> None:
    torch.manual_seed(1)
    teachers, weights = torch.randn(2, 6, 4), torch.tensor([0.25, 0.75])
    student = torch.randn(6, 4, requires_grad=True)
    (mixed,) = torch.autograd.grad(functional.multi_teacher_kd_loss(student, teachers, weights, 2.0), student)
    separate = sum(w * functional.kd_loss(student, t, 2.0) for w, t in zip(weights, teachers, strict=True))
    (summed,) = torch.autograd.grad(separate, student)
    torch.testing.assert_close(mixed, summed)


def test_confidence_weights_by_hand() -> None:
    # two teachers, one sample, label 0: CE_1 = log 2 (uniform over 2), CE_2 = log(1 + e^-2)
    teachers = torch.tensor([[[0.0, 0.0]], [[2.0, 0.0]]])
    ce = [math.log(2.0), math.log(1 + math.exp(-2.0))]
    soft = [math.exp(c) / (math.exp(ce[0]) + math.exp(ce[1])) for c in ce]
    expected = torch.tensor([[1 - soft[0]], [1 - soft[1]]])  # divided by M - 1 = 1
    got = functional.confidence_weights(teachers, torch.tensor([0]))
    torch.testing.assert_close(got, expected.float())
    assert got[1, 0] > got[0, 0]  # the surer teacher weighs more
    three = functional.confidence_weights(torch.randn(3, 5, 4), torch.randint(0, 4, (5,)))
    torch.testing.assert_close(three.sum(dim=0), torch.ones(5))


def test_bad_shapes_are_named() -> None:
    with pytest.raises(ValueError, match="one \\(N, C\\) tensor per teacher"):
        functional.multi_teacher_kd_loss(torch.randn(4, 5), torch.randn(2, 4, 6), torch.ones(2) / 2)
    with pytest.raises(ValueError, match="weights must have shape"):
        functional.multi_teacher_kd_loss(torch.randn(4, 5), torch.randn(2, 4, 5), torch.ones(3) / 3)


def test_multi_teacher_term_needs_an_ensemble() -> None:
    module = DistillationModule(small_net(), small_net(), losses=[MultiTeacherKDTerm()])
    outputs = module.step_outputs((torch.randn(4, 8), torch.randint(0, 4, (4,))))
    with pytest.raises(ValueError, match="TeacherEnsemble"):
        module.compute_loss(outputs)
    # a plain KDTerm works on an ensemble too, through its mixture log-probabilities
    ensemble = DistillationModule(small_net(), TeacherEnsemble([small_net(), small_net()]), losses=[KDTerm()])
    total, _ = ensemble.compute_loss(ensemble.step_outputs((torch.randn(4, 8), torch.randint(0, 4, (4,)))))
    assert torch.isfinite(total)
