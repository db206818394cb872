"""DKD against values computed independently in float64, and its bad input."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lightning_kd import DKDTerm
from lightning_kd.losses.functional import dkd_loss, kd_loss
from tests.helpers import STUDENT, TEACHER, make_outputs, np_kl, np_softmax


def reference_dkd(
    student: np.ndarray, teacher: np.ndarray, target: list[int], alpha: float, beta: float, temperature: float
) -> float:
    """Zhao et al. 2022, from the formula: binary (target, rest) KL + renormalized non-target KL."""
    tckd = nckd = 0.0
    for s_row, t_row, g in zip(student, teacher, target, strict=True):
        p_s, p_t = np_softmax(s_row / temperature), np_softmax(t_row / temperature)
        b_s = np.array([p_s[g], 1 - p_s[g]])
        b_t = np.array([p_t[g], 1 - p_t[g]])
        others = [c for c in range(len(s_row)) if c != g]
        q_s = p_s[others] / p_s[others].sum()
        q_t = p_t[others] / p_t[others].sum()
        tckd += np_kl(b_t, b_s)
        nckd += np_kl(q_t, q_s)
    n = len(target)
    return temperature**2 * (alpha * tckd / n + beta * nckd / n)


def reference_dkd_authors_masking(
    student: np.ndarray, teacher: np.ndarray, target: list[int], alpha: float, beta: float, temperature: float
) -> float:
    """The mdistiller formulation: NCKD via softmax of ``z / T - 1000 * onehot(target)``."""
    n, c = student.shape
    onehot = np.zeros((n, c))
    onehot[np.arange(n), target] = 1.0
    p_s, p_t = np_softmax(student / temperature), np_softmax(teacher / temperature)
    b_s = np.stack([(p_s * onehot).sum(1), (p_s * (1 - onehot)).sum(1)], axis=1)
    b_t = np.stack([(p_t * onehot).sum(1), (p_t * (1 - onehot)).sum(1)], axis=1)
    tckd = np.sum(b_t * (np.log(b_t) - np.log(b_s))) / n
    # like F.kl_div(log_softmax(student part), softmax(teacher part)): the student side stays in
    # log-space (about -1000 at the target), the teacher's 0 * log(0) counts as 0
    z_s = student / temperature - 1000.0 * onehot
    log_q_s = z_s - z_s.max(1, keepdims=True)
    log_q_s -= np.log(np.exp(log_q_s).sum(1, keepdims=True))
    q_t = np_softmax(teacher / temperature - 1000.0 * onehot)
    log_q_t = np.log(np.where(q_t > 0, q_t, 1.0))
    nckd = np.sum(q_t * (log_q_t - log_q_s)) / n
    return float(temperature**2 * (alpha * tckd + beta * nckd))


TARGET = [2, 0, 1]


@pytest.mark.parametrize(
    ("alpha", "beta", "temperature"), [(1.0, 8.0, 4.0), (1.0, 1.0, 1.0), (0.5, 2.0, 2.0)]
)
def test_dkd_matches_reference(alpha: float, beta: float, temperature: float) -> None:
    student, teacher = np.array(STUDENT), np.array(TEACHER)
    expected = reference_dkd(student, teacher, TARGET, alpha, beta, temperature)
    # the authors' -1000 masking gives the same value on ordinary logits
    assert reference_dkd_authors_masking(student, teacher, TARGET, alpha, beta, temperature) == pytest.approx(
        expected, rel=1e-9
    )
    got = dkd_loss(
        torch.tensor(STUDENT),
        torch.tensor(TEACHER),
        torch.tensor(TARGET),
        alpha=alpha,
        beta=beta,
        temperature=temperature,
    )
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_dkd_separates_tckd_and_nckd() -> None:
    student, teacher, target = torch.tensor(STUDENT), torch.tensor(TEACHER), torch.tensor(TARGET)
    tckd = dkd_loss(student, teacher, target, alpha=1.0, beta=0.0, temperature=1.0)
    nckd = dkd_loss(student, teacher, target, alpha=0.0, beta=1.0, temperature=1.0)
    both = dkd_loss(student, teacher, target, alpha=2.0, beta=3.0, temperature=1.0)
    torch.testing.assert_close(both, 2 * tckd + 3 * nckd)
    s, t = np.array(STUDENT), np.array(TEACHER)
    assert tckd.item() == pytest.approx(reference_dkd(s, t, TARGET, 1.0, 0.0, 1.0), rel=1e-5)
    assert nckd.item() == pytest.approx(reference_dkd(s, t, TARGET, 0.0, 1.0, 1.0), rel=1e-5)


def test_dkd_two_classes_is_binary_kd_only() -> None:
    # with two classes the non-target distribution is a point mass: NCKD = 0, and TCKD is plain KD
    student, teacher, target = torch.randn(5, 2), torch.randn(5, 2), torch.randint(0, 2, (5,))
    nckd = dkd_loss(student, teacher, target, alpha=0.0, beta=1.0, temperature=2.0)
    assert nckd.item() == pytest.approx(0.0, abs=1e-6)
    tckd = dkd_loss(student, teacher, target, alpha=1.0, beta=0.0, temperature=2.0)
    torch.testing.assert_close(tckd, kd_loss(student, teacher, 2.0))


def test_dkd_is_zero_when_logits_agree_and_positive_otherwise() -> None:
    logits, target = torch.randn(6, 7), torch.randint(0, 7, (6,))
    assert dkd_loss(logits, logits.clone(), target).item() == pytest.approx(0.0, abs=1e-5)
    assert dkd_loss(logits, logits + 3.0, target).item() == pytest.approx(0.0, abs=1e-5)
    assert dkd_loss(logits, torch.randn(6, 7), target).item() > 0


def test_dkd_is_finite_for_extreme_logits() -> None:
    # a confident teacher (probabilities that underflow in float32) must not give inf / NaN
    student = torch.tensor([[0.0, 0.0, 0.0], [50.0, -50.0, 0.0]], requires_grad=True)
    teacher = torch.tensor([[400.0, -400.0, 0.0], [-300.0, 300.0, 0.0]])
    loss = dkd_loss(student, teacher, torch.tensor([0, 1]), temperature=1.0)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(student.grad).all()


def test_dkd_averages_over_all_leading_positions() -> None:
    student, teacher = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    target = torch.randint(0, 5, (2, 3))
    flat = dkd_loss(student.reshape(6, 5), teacher.reshape(6, 5), target.reshape(6))
    torch.testing.assert_close(dkd_loss(student, teacher, target), flat)


def test_dkd_gradient_does_not_reach_the_target_logit_through_nckd() -> None:
    student = torch.randn(4, 6, requires_grad=True)
    target = torch.tensor([0, 3, 5, 2])
    dkd_loss(student, torch.randn(4, 6), target, alpha=0.0, beta=1.0).backward()
    assert torch.all(student.grad[torch.arange(4), target] == 0)
    assert student.grad.abs().sum() > 0


@pytest.mark.parametrize("target_shape", [(3,), (2, 1), ()])
def test_dkd_rejects_target_of_wrong_shape_naming_both(target_shape: tuple[int, ...]) -> None:
    target = torch.zeros(target_shape, dtype=torch.long)
    pattern = rf"target has shape {re.escape(str(target_shape))} but logits have shape \(2, 5\)"
    with pytest.raises(ValueError, match=pattern):
        dkd_loss(torch.randn(2, 5), torch.randn(2, 5), target)


def test_dkd_rejects_float_targets_and_single_class() -> None:
    with pytest.raises(ValueError, match="integer class indices"):
        dkd_loss(torch.randn(2, 5), torch.randn(2, 5), torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="at least 2 classes"):
        dkd_loss(torch.randn(2, 1), torch.randn(2, 1), torch.zeros(2, dtype=torch.long))


def test_dkd_term_needs_targets() -> None:
    outputs, _, _ = make_outputs(with_targets=False)
    with pytest.raises(ValueError, match=r"'dkd'.*needs labels.*no targets"):
        DKDTerm()(outputs)


# --- the authors' code, transcribed literally (float64), from sunshangquan/logit-standardization-KD,
# mdistiller/distillers/DKD.py: normalize, dkd_loss (``size_average=False`` written as reduction="sum"),
# _get_gt_mask, _get_other_mask, cat_mask.
def _ls_normalize(logit):
    mean = logit.mean(dim=-1, keepdims=True)
    stdv = logit.std(dim=-1, keepdims=True)
    return (logit - mean) / (1e-7 + stdv)


def _ls_dkd_loss(logits_student_in, logits_teacher_in, target, alpha, beta, temperature, logit_stand):
    logits_student = _ls_normalize(logits_student_in) if logit_stand else logits_student_in
    logits_teacher = _ls_normalize(logits_teacher_in) if logit_stand else logits_teacher_in
    gt_mask = torch.zeros_like(logits_student).scatter_(1, target.reshape(-1).unsqueeze(1), 1).bool()
    other_mask = torch.ones_like(logits_student).scatter_(1, target.reshape(-1).unsqueeze(1), 0).bool()
    pred_student = F.softmax(logits_student / temperature, dim=1)
    pred_teacher = F.softmax(logits_teacher / temperature, dim=1)

    def cat_mask(t, mask1, mask2):
        t1 = (t * mask1).sum(dim=1, keepdims=True)
        t2 = (t * mask2).sum(1, keepdims=True)
        return torch.cat([t1, t2], dim=1)

    pred_student = cat_mask(pred_student, gt_mask, other_mask)
    pred_teacher = cat_mask(pred_teacher, gt_mask, other_mask)
    log_pred_student = torch.log(pred_student)
    tckd_loss = F.kl_div(log_pred_student, pred_teacher, reduction="sum") * (temperature**2) / target.shape[0]
    pred_teacher_part2 = F.softmax(logits_teacher / temperature - 1000.0 * gt_mask, dim=1)
    log_pred_student_part2 = F.log_softmax(logits_student / temperature - 1000.0 * gt_mask, dim=1)
    nckd_loss = (
        F.kl_div(log_pred_student_part2, pred_teacher_part2, reduction="sum")
        * (temperature**2)
        / target.shape[0]
    )
    return alpha * tckd_loss + beta * nckd_loss


@pytest.mark.parametrize("standardize", [False, True])
def test_dkd_equals_the_logit_standardization_authors_code(standardize: bool) -> None:
    generator = torch.Generator().manual_seed(3)
    student = 3 * torch.randn(6, 9, generator=generator, dtype=torch.float64)
    teacher = 3 * torch.randn(6, 9, generator=generator, dtype=torch.float64)
    target = torch.randint(0, 9, (6,), generator=generator)
    # the authors' DKD+LS setting: alpha 1*9, beta 8*9, base temperature 2 (tools/train.py)
    expected = _ls_dkd_loss(student, teacher, target, 9.0, 72.0, 2.0, standardize)
    got = dkd_loss(
        student.float(),
        teacher.float(),
        target,
        alpha=9.0,
        beta=72.0,
        temperature=2.0,
        standardize=standardize,
    )
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)


def test_dkd_standardized_is_invariant_to_each_models_logit_scale_and_shift() -> None:
    student, teacher = torch.tensor(STUDENT), torch.tensor(TEACHER)
    target = torch.tensor([0, 1, 2])
    plain = dkd_loss(student, teacher, target, temperature=2.0, standardize=True)
    moved = dkd_loss(3 * student + 1, 0.5 * teacher - 2, target, temperature=2.0, standardize=True)
    assert moved.item() == pytest.approx(plain.item(), rel=1e-5)
    assert dkd_loss(3 * student + 1, 0.5 * teacher - 2, target, temperature=2.0).item() != pytest.approx(
        plain.item(), rel=1e-2
    )


def test_dkd_learned_temperature_per_row_matches_float_temperature_rows() -> None:
    student, teacher = torch.tensor(STUDENT), torch.tensor(TEACHER)
    target = torch.tensor([0, 1, 2])
    temperatures = torch.tensor([1.0, 2.0, 5.0])
    got = dkd_loss(student, teacher, target, temperature=temperatures)
    rows = [
        dkd_loss(student[i : i + 1], teacher[i : i + 1], target[i : i + 1], temperature=float(t))
        for i, t in enumerate(temperatures)
    ]
    expected = (
        sum(
            reference_dkd(np.array(STUDENT)[i : i + 1], np.array(TEACHER)[i : i + 1], [g], 1.0, 8.0, float(t))
            for i, (g, t) in enumerate(zip([0, 1, 2], temperatures, strict=True))
        )
        / 3
    )
    assert got.item() == pytest.approx(expected, rel=1e-5)
    assert got.item() == pytest.approx(sum(r.item() for r in rows) / 3, rel=1e-5)
