"""CC (correlation congruence) against values computed independently in float64."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lightning_kd import CCTerm
from lightning_kd.losses.functional import cc_loss
from tests.helpers import rand, rows, t32


def reference_cc(student: np.ndarray, teacher: np.ndarray, gamma: float = 0.4, order: int = 2) -> float:
    """Peng et al.: order-P Taylor expansion of exp(-gamma ||x_i - x_j||^2) on unit vectors, MSE."""

    def kernel(x: np.ndarray) -> np.ndarray:
        unit = x / np.linalg.norm(x, axis=1, keepdims=True)
        c = unit @ unit.T
        return sum(
            math.exp(-2 * gamma) * (2 * gamma) ** p / math.factorial(p) * c**p for p in range(order + 1)
        )

    return float(np.mean((kernel(rows(student)) - kernel(rows(teacher))) ** 2))


def reference_cc_exact_gaussian(student: np.ndarray, teacher: np.ndarray, gamma: float) -> float:
    """The untruncated Gaussian RBF kernel on unit vectors, MSE over the N^2 entries."""

    def kernel(x: np.ndarray) -> np.ndarray:
        unit = x / np.linalg.norm(x, axis=1, keepdims=True)
        sq = ((unit[:, None, :] - unit[None, :, :]) ** 2).sum(-1)
        return np.exp(-gamma * sq)

    return float(np.mean((kernel(rows(student)) - kernel(rows(teacher))) ** 2))


def test_cc_hand_computed_value() -> None:
    # student rows orthogonal (cosine 0 off the diagonal), teacher rows parallel (cosine 1):
    # only the 2 off-diagonal entries differ, by exp(-2g) (2g + (2g)^2 / 2)
    gamma = 0.4
    gap = math.exp(-2 * gamma) * (2 * gamma + (2 * gamma) ** 2 / 2)
    got = cc_loss(t32([[2.0, 0.0], [0.0, 1.0]]), t32([[1.0, 1.0], [2.0, 2.0]]), gamma=gamma, order=2)
    assert got.item() == pytest.approx(2 * gap**2 / 4, rel=1e-5)


@pytest.mark.parametrize(("gamma", "order"), [(0.4, 2), (1.0, 0), (0.25, 1), (0.7, 5)])
def test_cc_matches_reference(gamma: float, order: int) -> None:
    student, teacher = rand(9, 4, seed=7), rand(9, 6, seed=8)
    got = cc_loss(t32(student), t32(teacher), gamma=gamma, order=order)
    assert got.item() == pytest.approx(reference_cc(student, teacher, gamma, order), rel=1e-5, abs=1e-12)


def test_cc_high_order_tends_to_the_exact_gaussian_kernel() -> None:
    student, teacher = rand(6, 5, seed=9), rand(6, 5, seed=10)
    got = cc_loss(t32(student), t32(teacher), gamma=0.4, order=20)
    assert got.item() == pytest.approx(reference_cc_exact_gaussian(student, teacher, 0.4), rel=1e-5)
    # while order 2 is only an approximation of it
    low = cc_loss(t32(student), t32(teacher), gamma=0.4, order=2).item()
    assert low != pytest.approx(got.item(), rel=1e-3)


@pytest.mark.parametrize(("gamma", "order"), [(0.0, 2), (-1.0, 2), (0.4, -1), (0.4, 1.5), (0.4, True)])
def test_cc_rejects_bad_kernel_settings(gamma: float, order: int) -> None:
    with pytest.raises(ValueError, match="gamma|order"):
        cc_loss(torch.randn(3, 2), torch.randn(3, 2), gamma=gamma, order=order)
    with pytest.raises(ValueError, match="gamma|order"):
        CCTerm("a", "b", gamma=gamma, order=order)
