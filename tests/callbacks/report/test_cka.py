"""linear_cka (the CKAReport measure) against the HSIC form, its invariances and bad input."""

from __future__ import annotations

import pytest
import torch

from lightning_kd.losses.functional import linear_cka
from tests.helpers import _hsic_cka


@pytest.mark.parametrize(
    ("n", "shape_x", "shape_y"),
    [(64, (3,), (5,)), (6, (40,), (2, 15))],  # feature-space form, then the Gram form (N < widths)
)
def test_linear_cka_matches_hsic_form(n: int, shape_x: tuple[int, ...], shape_y: tuple[int, ...]) -> None:
    x = torch.randn(n, *shape_x)
    shared = x.flatten(1)[:, 0].reshape(n, *[1] * len(shape_y))
    y = torch.randn(n, *shape_y) + 0.5 * shared  # some shared signal
    assert linear_cka(x, y).item() == pytest.approx(_hsic_cka(x, y), rel=1e-5)


def test_linear_cka_invariances() -> None:
    x = torch.randn(50, 8)
    y = torch.randn(50, 6) + x[:, :6]
    reference = linear_cka(x, y).item()
    assert 0.05 < reference < 0.95
    rotation, _ = torch.linalg.qr(torch.randn(8, 8))
    assert linear_cka(x @ rotation, y).item() == pytest.approx(reference, rel=1e-5)
    assert linear_cka(3.7 * x, y / 5).item() == pytest.approx(reference, rel=1e-5)
    assert linear_cka(x + 10.0, y).item() == pytest.approx(reference, rel=1e-5)  # centred
    assert linear_cka(x, x).item() == pytest.approx(1.0, rel=1e-6)
    # not invariant to a non-isotropic scaling
    stretch = torch.tensor([20.0, 1, 1, 1, 1, 1, 1, 1])
    assert abs(linear_cka(x * stretch, y).item() - reference) > 0.01


def test_linear_cka_bad_input() -> None:
    with pytest.raises(ValueError, match="same number of samples"):
        linear_cka(torch.randn(10, 3), torch.randn(9, 3))
    with pytest.raises(ValueError, match="at least 2 samples"):
        linear_cka(torch.randn(1, 3), torch.randn(1, 3))
