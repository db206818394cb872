"""SP (similarity preserving) against values computed independently in float64."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lightning_kd.losses.functional import sp_loss
from tests.helpers import rand, rows, t32


def reference_sp(student: np.ndarray, teacher: np.ndarray) -> float:
    """Tung & Mori: || rownorm(Q_t Q_t^T) - rownorm(Q_s Q_s^T) ||_F^2 / N^2."""

    def similarity(q: np.ndarray) -> np.ndarray:
        g = q @ q.T
        return g / np.linalg.norm(g, axis=1, keepdims=True)

    s, t = rows(student), rows(teacher)
    return float(np.sum((similarity(t) - similarity(s)) ** 2) / len(s) ** 2)


def test_sp_hand_computed_value() -> None:
    # student rows orthogonal: G_s = I; teacher rows equal: G_t rows (1, 1) / sqrt(2)
    # sum of squares: 2 (1 - 1/sqrt 2)^2 + 2 (1/2) = 4 - 2 sqrt 2, divided by N^2 = 4
    got = sp_loss(t32([[1.0, 0.0], [0.0, 1.0]]), t32([[1.0, 0.0], [1.0, 0.0]]))
    assert got.dtype == torch.float32 and got.ndim == 0
    assert got.item() == pytest.approx(1 - math.sqrt(2) / 2, rel=1e-6)


def test_sp_matches_reference_on_feature_maps_of_different_sizes() -> None:
    student, teacher = rand(6, 4, 3, 3, seed=1), rand(6, 8, 2, 2, seed=2)
    got = sp_loss(t32(student), t32(teacher))
    assert got.item() == pytest.approx(reference_sp(student, teacher), rel=1e-5)
