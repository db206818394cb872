"""DIST against values computed independently in float64."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_kd.losses.functional import dist_loss
from tests.helpers import STUDENT, TEACHER


def pearson(u: list[float], v: list[float], eps: float = 1e-8) -> float:
    mu, mv = sum(u) / len(u), sum(v) / len(v)
    du, dv = [x - mu for x in u], [y - mv for y in v]
    num = sum(x * y for x, y in zip(du, dv, strict=True))
    den = math.sqrt(sum(x * x for x in du)) * math.sqrt(sum(y * y for y in dv)) + eps
    return num / den


def reference_dist(
    student: list[list[float]], teacher: list[list[float]], beta: float, gamma: float, temperature: float
) -> float:
    """Huang et al. 2022, plain Python: T^2 (beta (1 - mean_n rho_row) + gamma (1 - mean_c rho_col))."""

    def softmax(row: list[float]) -> list[float]:
        exps = [math.exp(v / temperature) for v in row]
        return [e / sum(exps) for e in exps]

    y_s = [softmax(r) for r in student]
    y_t = [softmax(r) for r in teacher]
    inter = 1 - sum(pearson(a, b) for a, b in zip(y_s, y_t, strict=True)) / len(y_s)
    cols_s, cols_t = list(zip(*y_s, strict=True)), list(zip(*y_t, strict=True))
    intra = 1 - sum(pearson(list(a), list(b)) for a, b in zip(cols_s, cols_t, strict=True)) / len(cols_s)
    return temperature**2 * (beta * inter + gamma * intra)


@pytest.mark.parametrize(
    ("beta", "gamma", "temperature"), [(1.0, 1.0, 1.0), (2.0, 2.0, 4.0), (1.0, 0.5, 2.0)]
)
def test_dist_matches_reference(beta: float, gamma: float, temperature: float) -> None:
    expected = reference_dist(STUDENT, TEACHER, beta, gamma, temperature)
    got = dist_loss(
        torch.tensor(STUDENT), torch.tensor(TEACHER), beta=beta, gamma=gamma, temperature=temperature
    )
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_dist_separates_inter_and_intra() -> None:
    student, teacher = torch.tensor(STUDENT), torch.tensor(TEACHER)
    inter = dist_loss(student, teacher, beta=1.0, gamma=0.0)
    intra = dist_loss(student, teacher, beta=0.0, gamma=1.0)
    assert inter.item() == pytest.approx(reference_dist(STUDENT, TEACHER, 1.0, 0.0, 1.0), rel=1e-5)
    assert intra.item() == pytest.approx(reference_dist(STUDENT, TEACHER, 0.0, 1.0, 1.0), rel=1e-5)


def test_dist_known_value_for_anticorrelated_predictions() -> None:
    # two samples, two classes, teacher = student with the classes swapped: every centered
    # probability vector of the student is the negative of the teacher's, so rho = -1 for all rows
    # and columns, and the loss is T^2 (beta * 2 + gamma * 2).
    student = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    teacher = student.flip(-1)
    got = dist_loss(student, teacher, beta=1.0, gamma=0.5, temperature=2.0)
    assert got.item() == pytest.approx(4.0 * (2.0 + 0.5 * 2.0), rel=1e-5)


def test_dist_is_zero_when_logits_agree() -> None:
    logits = torch.randn(8, 10)
    assert dist_loss(logits, logits.clone()).item() == pytest.approx(0.0, abs=1e-5)
    assert dist_loss(logits, logits.clone(), temperature=4.0).item() == pytest.approx(0.0, abs=1e-4)
    assert dist_loss(logits, torch.randn(8, 10)).item() > 0


def test_dist_is_invariant_to_a_per_sample_shift_of_the_logits() -> None:
    # a per-sample shift of the logits does not change the softmax, hence neither relation
    logits, teacher = torch.randn(5, 6), torch.randn(5, 6)
    torch.testing.assert_close(dist_loss(logits + torch.randn(5, 1), teacher), dist_loss(logits, teacher))


def test_dist_single_row_intra_part_is_constant() -> None:
    student = torch.randn(1, 5, requires_grad=True)
    loss = dist_loss(student, torch.randn(1, 5), beta=0.0, gamma=1.0)
    assert loss.item() == pytest.approx(1.0)
    loss.backward()
    assert student.grad.abs().max() == 0
