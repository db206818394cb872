"""PKT against values computed independently in float64."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lightning_kd.losses.functional import pkt_loss
from tests.helpers import rand, rows, t32


def reference_pkt(student: np.ndarray, teacher: np.ndarray, eps: float = 1e-7) -> float:
    """Passalis & Tefas (benchmark form): K = (cos + 1) / 2 with norms + eps, rows to probabilities,
    mean over all N^2 entries of p_t log((p_t + eps) / (p_s + eps))."""

    def conditionals(x: np.ndarray) -> np.ndarray:
        unit = x / (np.linalg.norm(x, axis=1, keepdims=True) + eps)
        k = (unit @ unit.T + 1) / 2
        return k / k.sum(axis=1, keepdims=True)

    p_s, p_t = conditionals(rows(student)), conditionals(rows(teacher))
    return float(np.mean(p_t * np.log((p_t + eps) / (p_s + eps))))


def test_pkt_hand_computed_value() -> None:
    # student rows orthogonal: K rows (1, 1/2) -> (2/3, 1/3); teacher rows parallel: (1/2, 1/2)
    # each row: 1/2 log((1/2)/(2/3)) + 1/2 log((1/2)/(1/3)) = 1/2 log(9/8); mean over 4 entries
    got = pkt_loss(t32([[1.0, 0.0], [0.0, 2.0]]), t32([[1.0, 1.0], [3.0, 3.0]]))
    assert got.item() == pytest.approx(math.log(9 / 8) / 4, rel=1e-5)


def test_pkt_matches_reference() -> None:
    student, teacher = rand(8, 6, seed=5), rand(8, 2, 2, 2, seed=6)
    assert pkt_loss(t32(student), t32(teacher)).item() == pytest.approx(
        reference_pkt(student, teacher), rel=1e-5
    )
