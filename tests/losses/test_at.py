"""AT (attention transfer) against values computed independently in float64."""

from __future__ import annotations

import pytest
import torch

from lightning_kd.losses.functional import at_loss
from tests.helpers import rand, reference_at, t32


def test_at_hand_computed_value() -> None:
    # student attention (1, 0, 0, 0); teacher (1, 1, 1, 1) / 2: squared gaps 1/4 + 3/4, mean over 4
    student = t32([[[[1.0, 0.0], [0.0, 0.0]]]])
    teacher = t32([[[[3.0, 3.0], [3.0, 3.0]]]])
    assert at_loss(student, teacher).item() == pytest.approx(0.25, rel=1e-6)


@pytest.mark.parametrize("p", [2.0, 1.0, 3.0])
def test_at_matches_reference_with_channel_mismatch(p: float) -> None:
    student, teacher = rand(3, 4, 4, 4, seed=11), rand(3, 6, 4, 4, seed=12)
    got = at_loss(t32(student), t32(teacher), p=p)
    assert got.item() == pytest.approx(reference_at(student, teacher, p), rel=1e-5)


def test_at_p2_is_the_square_of_the_features_including_negative_values() -> None:
    # |f|^2 == f^2: AT at p = 2 does not depend on the sign of the activations
    student, teacher = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(at_loss(-student, teacher), at_loss(student, teacher))


def test_maps_of_different_rank_are_rejected() -> None:
    with pytest.raises(ValueError, match=r"\(2, 3, 4\).*\(2, 3, 4, 4\)"):
        at_loss(torch.randn(2, 3, 4), torch.randn(2, 3, 4, 4))
