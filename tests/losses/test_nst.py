"""NST against values computed independently in float64."""

from __future__ import annotations

import pytest

from lightning_kd.losses.functional import nst_loss
from tests.helpers import rand, reference_nst, t32


def test_nst_hand_computed_value() -> None:
    # student: one channel x; teacher: channels x and y with y orthogonal to x
    # K_tt mean (1 + 0 + 0 + 1) / 4 = 1/2, K_ss = 1, K_st mean (1 + 0) / 2 = 1/2: 1/2 + 1 - 1 = 1/2
    student = t32([[[[2.0, 0.0]]]])
    teacher = t32([[[[1.0, 0.0]], [[0.0, 5.0]]]])
    assert nst_loss(student, teacher).item() == pytest.approx(0.5, rel=1e-6)


def test_nst_matches_reference() -> None:
    student, teacher = rand(3, 4, 3, 3, seed=15), rand(3, 7, 3, 3, seed=16)
    assert nst_loss(t32(student), t32(teacher)).item() == pytest.approx(
        reference_nst(student, teacher), rel=1e-5
    )
