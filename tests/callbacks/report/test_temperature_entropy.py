"""Soft-label entropy and non-argmax probability (TemperatureEntropyReport) by hand."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_kd.losses.functional import non_argmax_probability, soft_label_entropy


def test_soft_label_entropy_by_hand() -> None:
    assert soft_label_entropy(torch.zeros(4, 10)).item() == pytest.approx(math.log(10))
    assert soft_label_entropy(torch.tensor([[50.0, 0.0, 0.0]])).item() == pytest.approx(0.0, abs=1e-6)
    # p = (1/4, 3/4) at T = 1; at T = 2 the logits halve: p proportional to (1, sqrt(3))
    logits = torch.tensor([[0.0, math.log(3.0)]])
    assert soft_label_entropy(logits).item() == pytest.approx(
        -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    )
    p = 1 / (1 + math.sqrt(3))
    assert soft_label_entropy(logits, 2.0).item() == pytest.approx(
        -(p * math.log(p) + (1 - p) * math.log(1 - p))
    )
    teacher = torch.randn(32, 10) * 4
    values = [soft_label_entropy(teacher, t).item() for t in (0.5, 1, 2, 4, 8, 16)]
    assert all(a < b for a, b in zip(values, values[1:], strict=False)) and values[-1] < math.log(10)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        soft_label_entropy(teacher, 0.0)


def test_non_argmax_probability_by_hand() -> None:
    assert non_argmax_probability(torch.log(torch.tensor([[0.5, 0.3, 0.2]]))).item() == pytest.approx(0.25)
    assert non_argmax_probability(torch.zeros(3, 5)).item() == pytest.approx(0.2)
    assert non_argmax_probability(torch.tensor([[60.0, 0.0]])).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="at least 2 classes"):
        non_argmax_probability(torch.zeros(3, 1))
