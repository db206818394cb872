"""KD (Hinton) and logit-standardized KD against values computed independently in float64."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lightning_kd import DistillationModule
from lightning_kd.losses.functional import kd_loss
from tests.helpers import STUDENT, TEACHER, np_kl, np_softmax, small_net


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


def test_kd_term_under_bf16_autocast_agrees_with_float32() -> None:
    module = DistillationModule(small_net(batchnorm=False), small_net(batchnorm=False))
    batch = (torch.randn(64, 8), torch.randint(0, 4, (64,)))
    reference = module.compute_loss(module.step_outputs(batch))[1]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = module.step_outputs(batch)
        assert outputs.student_logits.dtype == torch.bfloat16  # the models ran in bf16
        mixed = module.compute_loss(outputs)[1]
    for name in ("ce", "kd"):
        assert mixed[name].dtype == torch.float32
        torch.testing.assert_close(mixed[name], reference[name], rtol=3e-2, atol=3e-3)


def reference_standardized_kd(student: np.ndarray, teacher: np.ndarray, temperature: float) -> float:
    """Sun et al. 2024: z-score each row (unbiased std + 1e-7), then Hinton KD with T^2."""

    def zscore(z: np.ndarray) -> np.ndarray:
        return (z - z.mean(axis=1, keepdims=True)) / (1e-7 + z.std(axis=1, ddof=1, keepdims=True))

    p_s = np_softmax(zscore(student) / temperature)
    p_t = np_softmax(zscore(teacher) / temperature)
    kls = [np_kl(p_t[n], p_s[n]) for n in range(len(student))]
    return temperature**2 * float(np.mean(kls))


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_standardized_kd_matches_reference(temperature: float) -> None:
    expected = reference_standardized_kd(np.array(STUDENT), np.array(TEACHER), temperature)
    got = kd_loss(torch.tensor(STUDENT), torch.tensor(TEACHER), temperature=temperature, standardize=True)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_standardized_kd_known_value_for_two_classes() -> None:
    # Two classes: the z-score of (x, y), x > y, is (1/sqrt(2), -1/sqrt(2)) for any x, y (unbiased std
    # of two values is |x - y| / sqrt(2)). Student (2, 1) and teacher (0, 5) thus become +-1/sqrt(2)
    # with opposite signs: p_s = (a, 1-a), p_t = (1-a, a), a = sigmoid(sqrt(2)), at T = 1.
    a = 1 / (1 + math.exp(-math.sqrt(2)))
    expected = (1 - a) * math.log((1 - a) / a) + a * math.log(a / (1 - a))
    got = kd_loss(torch.tensor([[2.0, 1.0]]), torch.tensor([[0.0, 5.0]]), temperature=1.0, standardize=True)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_standardize_false_keeps_plain_kd() -> None:
    student, teacher = torch.randn(6, 5), torch.randn(6, 5)
    torch.testing.assert_close(
        kd_loss(student, teacher, 3.0, standardize=False), kd_loss(student, teacher, 3.0)
    )
    assert not torch.allclose(
        kd_loss(student, teacher, 3.0, standardize=True), kd_loss(student, teacher, 3.0)
    )


@pytest.mark.parametrize(("scale", "shift"), [(0.1, 0.0), (3.0, -2.0), (25.0, 7.0)])
def test_standardized_kd_is_invariant_to_per_sample_scale_and_shift(scale: float, shift: float) -> None:
    torch.manual_seed(0)
    student, teacher = torch.randn(8, 10), torch.randn(8, 10)
    # per-sample factors and offsets, different for every row
    scales = scale * (0.5 + torch.rand(8, 1))
    shifts = shift * torch.randn(8, 1)
    reference = kd_loss(student, teacher, 2.0, standardize=True)
    moved_student = kd_loss(scales * student + shifts, teacher, 2.0, standardize=True)
    moved_teacher = kd_loss(student, scales * teacher + shifts, 2.0, standardize=True)
    torch.testing.assert_close(moved_student, reference, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(moved_teacher, reference, rtol=1e-4, atol=1e-6)
    # plain KD is not invariant to scaling
    assert not torch.allclose(
        kd_loss(scales * student + shifts, teacher, 2.0), kd_loss(student, teacher, 2.0)
    )


def test_standardized_kd_rejects_a_single_class() -> None:
    with pytest.raises(ValueError, match="at least 2 classes"):
        kd_loss(torch.randn(3, 1), torch.randn(3, 1), standardize=True)
