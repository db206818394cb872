"""kd_loss against values computed independently in float64."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_kd.losses.functional import kd_loss


def reference_kd(student: list[list[float]], teacher: list[list[float]], temperature: float) -> float:
    """T^2 * mean_n sum_c p_t log(p_t / p_s), with plain Python floats."""

    def softmax(row: list[float]) -> list[float]:
        exps = [math.exp(v / temperature) for v in row]
        total = sum(exps)
        return [e / total for e in exps]

    kls = []
    for s_row, t_row in zip(student, teacher, strict=True):
        p_s, p_t = softmax(s_row), softmax(t_row)
        kls.append(sum(t * math.log(t / s) for s, t in zip(p_s, p_t, strict=True)))
    return temperature**2 * sum(kls) / len(kls)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_kd_loss_matches_hand_computed_values(temperature: float) -> None:
    student = [[1.0, 2.0, 3.0], [0.5, -1.0, 0.0]]
    teacher = [[3.0, 2.0, 1.0], [2.0, 0.0, -2.0]]
    expected = reference_kd(student, teacher, temperature)
    got = kd_loss(torch.tensor(student), torch.tensor(teacher), temperature=temperature)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_kd_loss_known_value_for_two_classes() -> None:
    # teacher (0.5, 0.5), student (e/(1+e), 1/(1+e)) at T = 1: KL = log((1+e)/(2 sqrt(e)))
    got = kd_loss(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 0.0]]), temperature=1.0)
    assert got.item() == pytest.approx(math.log((1 + math.e) / (2 * math.sqrt(math.e))), rel=1e-6)


def test_kd_loss_is_zero_when_logits_agree_and_positive_otherwise() -> None:
    logits = torch.randn(5, 7)
    assert kd_loss(logits, logits.clone()).item() == pytest.approx(0.0, abs=1e-6)
    assert kd_loss(logits, logits + 10.0).item() == pytest.approx(0.0, abs=1e-5)  # softmax is shift-invariant
    assert kd_loss(logits, torch.randn(5, 7)).item() > 0


def test_kd_loss_gradient_is_temperature_times_probability_gap() -> None:
    # d/ds [T^2 KL(p_t || p_s)] = T (p_s - p_t) / N, computed here in float64 by hand.
    temperature = 3.0
    student = torch.randn(4, 6, dtype=torch.float64)
    teacher = torch.randn(4, 6, dtype=torch.float64)
    s = student.clone().float().requires_grad_(True)
    kd_loss(s, teacher.float(), temperature).backward()
    p_s = torch.softmax(student / temperature, dim=1)
    p_t = torch.softmax(teacher / temperature, dim=1)
    expected = temperature * (p_s - p_t) / student.shape[0]
    torch.testing.assert_close(s.grad.double(), expected, rtol=1e-4, atol=1e-6)


def test_kd_loss_averages_over_all_leading_positions() -> None:
    student, teacher = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    flat = kd_loss(student.reshape(6, 5), teacher.reshape(6, 5))
    torch.testing.assert_close(kd_loss(student, teacher), flat)


def test_kd_loss_rejects_mismatched_shapes_naming_both() -> None:
    with pytest.raises(ValueError, match=r"\(2, 10\).*\(2, 100\).*num_classes"):
        kd_loss(torch.randn(2, 10), torch.randn(2, 100))


@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_kd_loss_rejects_non_positive_temperature(temperature: float) -> None:
    with pytest.raises(ValueError, match="temperature must be > 0"):
        kd_loss(torch.randn(2, 3), torch.randn(2, 3), temperature=temperature)


def test_kd_loss_runs_in_float32_under_bf16_autocast() -> None:
    student, teacher = torch.randn(32, 10), torch.randn(32, 10)
    reference = kd_loss(student, teacher)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = kd_loss(student.bfloat16(), teacher.bfloat16())
    assert got.dtype == torch.float32
    # only the bf16 rounding of the inputs differs: the math itself is float32
    exact_on_rounded = kd_loss(student.bfloat16().float(), teacher.bfloat16().float())
    torch.testing.assert_close(got, exact_on_rounded)
    torch.testing.assert_close(got, reference, rtol=2e-2, atol=1e-3)
