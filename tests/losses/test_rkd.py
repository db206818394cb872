"""RKD against values computed independently in float64."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lightning_kd.losses.functional import rkd_loss
from tests.helpers import rand, rows, t32


def huber(x: float) -> float:
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


def reference_rkd(student: np.ndarray, teacher: np.ndarray, w_d: float = 25.0, w_a: float = 50.0) -> float:
    """Park et al.: Huber on mean-normalised distances (mean over N^2) and on cosines at the anchor
    i between x_j and x_k (mean over N^3; a zero difference vector counts as cosine 0)."""
    s, t = rows(student), rows(teacher)
    n = len(s)

    def distances(x: np.ndarray) -> np.ndarray:
        d = np.array([[np.linalg.norm(x[i] - x[j]) for j in range(n)] for i in range(n)])
        return d / (d.sum() / (n * (n - 1)))

    def cosine(x: np.ndarray, i: int, j: int, k: int) -> float:
        u, v = x[j] - x[i], x[k] - x[i]
        nu, nv = np.linalg.norm(u), np.linalg.norm(v)
        if nu == 0 or nv == 0:
            return 0.0
        return float(u @ v / (nu * nv))

    d_s, d_t = distances(s), distances(t)
    loss_d = sum(huber(d_s[i, j] - d_t[i, j]) for i in range(n) for j in range(n)) / n**2
    loss_a = (
        sum(
            huber(cosine(s, i, j, k) - cosine(t, i, j, k))
            for i in range(n)
            for j in range(n)
            for k in range(n)
        )
        / n**3
    )
    return w_d * loss_d + w_a * loss_a


def test_rkd_two_samples_have_no_relational_difference() -> None:
    # with N = 2 both normalised distances are 1 and every angle is degenerate or 1: loss 0
    got = rkd_loss(t32([[0.0, 0.0], [3.0, 4.0]]), t32([[1.0, 1.0, 1.0], [-2.0, 0.0, 5.0]]))
    assert got.item() == pytest.approx(0.0, abs=1e-6)


def test_rkd_hand_computed_right_triangle_against_degenerate_line() -> None:
    # student: (0,0), (1,0), (0,1): distances 1, 1, sqrt 2; teacher: (0,0), (1,0), (2,0): 1, 1, 2.
    student = [[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]
    teacher = [[0.0, 0.0], [1.0, 0.0], [2.0, 0.0]]
    mu_s, mu_t = (2 + math.sqrt(2)) / 3, 4 / 3
    d_s = [1 / mu_s, 1 / mu_s, math.sqrt(2) / mu_s]  # pairs (0,1), (0,2), (1,2)
    d_t = [1 / mu_t, 2 / mu_t, 1 / mu_t]
    loss_d = 2 * sum(huber(a - b) for a, b in zip(d_s, d_t, strict=True)) / 9
    # non-degenerate angles (i, j, k), j != k != i: cos at each vertex, each counted twice (j, k swapped)
    # student: at 0: 0; at 1: cos 45 = 1/sqrt 2; at 2: 1/sqrt 2; teacher: at 0: 1; at 1: -1; at 2: 1
    cos_s = [0.0, 1 / math.sqrt(2), 1 / math.sqrt(2)]
    cos_t = [1.0, -1.0, 1.0]
    # entries j == k != i: cos 1 for both models, no difference
    loss_a = 2 * sum(huber(a - b) for a, b in zip(cos_s, cos_t, strict=True)) / 27
    expected = 25 * loss_d + 50 * loss_a
    got = rkd_loss(t32(student), t32(teacher))
    assert got.item() == pytest.approx(expected, rel=1e-5)
    assert expected == pytest.approx(reference_rkd(np.array(student), np.array(teacher)), rel=1e-12)


@pytest.mark.parametrize(("distance_weight", "angle_weight"), [(25.0, 50.0), (1.0, 0.0), (0.0, 1.0)])
def test_rkd_matches_reference(distance_weight: float, angle_weight: float) -> None:
    student, teacher = rand(7, 5, seed=3), rand(7, 3, 2, seed=4)
    got = rkd_loss(t32(student), t32(teacher), distance_weight=distance_weight, angle_weight=angle_weight)
    expected = reference_rkd(student, teacher, distance_weight, angle_weight)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_rkd_is_invariant_to_translation() -> None:
    student, teacher = torch.randn(6, 5), torch.randn(6, 3)
    shifted = rkd_loss(student + torch.randn(5), teacher - 2.0)
    torch.testing.assert_close(shifted, rkd_loss(student, teacher), rtol=1e-4, atol=1e-6)


def test_rkd_rejects_a_single_sample() -> None:
    with pytest.raises(ValueError, match=r"at least 2 samples.*\(1, 3\).*\(1, 5\)"):
        rkd_loss(torch.randn(1, 3), torch.randn(1, 5))
