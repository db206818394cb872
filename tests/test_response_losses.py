"""DKD, DIST and logit-standardized KD against values computed independently in float64."""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import numpy as np
import pytest
import torch

from lightning_kd import DISTTerm, DKDTerm, KDTerm, StepOutputs
from lightning_kd.losses.functional import dist_loss, dkd_loss, kd_loss

# --------------------------------------------------------------------------------------------
# Independent references (float64 numpy / plain Python), written from the papers' formulas.
# --------------------------------------------------------------------------------------------


def np_softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def np_kl(p: np.ndarray, q: np.ndarray) -> float:
    """sum_i p_i log(p_i / q_i), skipping p_i = 0."""
    mask = p > 0
    return float(np.sum(p[mask] * np.log(p[mask] / q[mask])))


def reference_standardized_kd(student: np.ndarray, teacher: np.ndarray, temperature: float) -> float:
    """Sun et al. 2024: z-score each row (unbiased std + 1e-7), then Hinton KD with T^2."""

    def zscore(z: np.ndarray) -> np.ndarray:
        return (z - z.mean(axis=1, keepdims=True)) / (1e-7 + z.std(axis=1, ddof=1, keepdims=True))

    p_s = np_softmax(zscore(student) / temperature)
    p_t = np_softmax(zscore(teacher) / temperature)
    kls = [np_kl(p_t[n], p_s[n]) for n in range(len(student))]
    return temperature**2 * float(np.mean(kls))


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


def pearson(u: list[float], v: list[float], eps: float = 1e-8) -> float:
    mu, mv = sum(u) / len(u), sum(v) / len(v)
    du, dv = [x - mu for x in u], [y - mv for y in v]
    num = sum(x * y for x, y in zip(du, dv, strict=True))
    den = math.sqrt(sum(x * x for x in du)) * math.sqrt(sum(y * y for y in dv)) + eps
    return num / den


def reference_dist(
    student: list[list[float]], teacher: list[list[float]], beta: float, gamma: float, temperature: float
) -> float:
    """Huang et al. 2022, plain Python: T^2 (beta (1 - mean_n rho_row) + gamma (1 - mean_c rho_col))."""

    def softmax(row: list[float]) -> list[float]:
        exps = [math.exp(v / temperature) for v in row]
        return [e / sum(exps) for e in exps]

    y_s = [softmax(r) for r in student]
    y_t = [softmax(r) for r in teacher]
    inter = 1 - sum(pearson(a, b) for a, b in zip(y_s, y_t, strict=True)) / len(y_s)
    cols_s, cols_t = list(zip(*y_s, strict=True)), list(zip(*y_t, strict=True))
    intra = 1 - sum(pearson(list(a), list(b)) for a, b in zip(cols_s, cols_t, strict=True)) / len(cols_s)
    return temperature**2 * (beta * inter + gamma * intra)


STUDENT = [[1.0, 2.0, 3.0, -0.5], [0.5, -1.0, 0.0, 2.0], [2.0, 1.5, -2.0, 0.0]]
TEACHER = [[3.0, 2.0, 1.0, 0.0], [2.0, 0.0, -2.0, 1.0], [-1.0, 4.0, 0.5, 0.5]]
TARGET = [2, 0, 1]


# --------------------------------------------------------------------------------------------
# kd_loss(standardize=True)
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# dkd_loss
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# dist_loss
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("beta", "gamma", "temperature"), [(1.0, 1.0, 1.0), (2.0, 2.0, 4.0), (1.0, 0.5, 2.0)]
)
def test_dist_matches_reference(beta: float, gamma: float, temperature: float) -> None:
    expected = reference_dist(STUDENT, TEACHER, beta, gamma, temperature)
    got = dist_loss(
        torch.tensor(STUDENT), torch.tensor(TEACHER), beta=beta, gamma=gamma, temperature=temperature
    )
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_dist_separates_inter_and_intra() -> None:
    student, teacher = torch.tensor(STUDENT), torch.tensor(TEACHER)
    inter = dist_loss(student, teacher, beta=1.0, gamma=0.0)
    intra = dist_loss(student, teacher, beta=0.0, gamma=1.0)
    assert inter.item() == pytest.approx(reference_dist(STUDENT, TEACHER, 1.0, 0.0, 1.0), rel=1e-5)
    assert intra.item() == pytest.approx(reference_dist(STUDENT, TEACHER, 0.0, 1.0, 1.0), rel=1e-5)


def test_dist_known_value_for_anticorrelated_predictions() -> None:
    # two samples, two classes, teacher = student with the classes swapped: every centered
    # probability vector of the student is the negative of the teacher's, so rho = -1 for all rows
    # and columns, and the loss is T^2 (beta * 2 + gamma * 2).
    student = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    teacher = student.flip(-1)
    got = dist_loss(student, teacher, beta=1.0, gamma=0.5, temperature=2.0)
    assert got.item() == pytest.approx(4.0 * (2.0 + 0.5 * 2.0), rel=1e-5)


def test_dist_is_zero_when_logits_agree() -> None:
    logits = torch.randn(8, 10)
    assert dist_loss(logits, logits.clone()).item() == pytest.approx(0.0, abs=1e-5)
    assert dist_loss(logits, logits.clone(), temperature=4.0).item() == pytest.approx(0.0, abs=1e-4)
    assert dist_loss(logits, torch.randn(8, 10)).item() > 0


def test_dist_is_invariant_to_a_per_sample_shift_of_the_logits() -> None:
    # a per-sample shift of the logits does not change the softmax, hence neither relation
    logits, teacher = torch.randn(5, 6), torch.randn(5, 6)
    torch.testing.assert_close(dist_loss(logits + torch.randn(5, 1), teacher), dist_loss(logits, teacher))


def test_dist_single_row_intra_part_is_constant() -> None:
    student = torch.randn(1, 5, requires_grad=True)
    loss = dist_loss(student, torch.randn(1, 5), beta=0.0, gamma=1.0)
    assert loss.item() == pytest.approx(1.0)
    loss.backward()
    assert student.grad.abs().max() == 0


# --------------------------------------------------------------------------------------------
# Terms: gradients, detaching, settings
# --------------------------------------------------------------------------------------------


def make_outputs(with_targets: bool = True) -> tuple[StepOutputs, torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    student = torch.randn(6, 5, requires_grad=True)
    teacher = torch.randn(6, 5, requires_grad=True)  # a co-trained teacher carries gradients
    targets = torch.randint(0, 5, (6,)) if with_targets else None
    return StepOutputs(student_logits=student, targets=targets, teacher_logits=teacher), student, teacher


@pytest.mark.parametrize(
    "term", [KDTerm(standardize=True), DKDTerm(), DISTTerm(), DISTTerm(temperature=4.0)], ids=repr
)
def test_terms_send_gradients_to_the_student_only(term: torch.nn.Module) -> None:
    outputs, student, teacher = make_outputs()
    loss = term(outputs)
    assert loss.ndim == 0
    loss.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


def test_terms_compute_their_functions() -> None:
    outputs, student, teacher = make_outputs()
    s, t, y = student.detach(), teacher.detach(), outputs.targets
    torch.testing.assert_close(KDTerm(temperature=2.0, standardize=True)(outputs), kd_loss(s, t, 2.0, True))
    torch.testing.assert_close(
        DKDTerm(alpha=2.0, beta=4.0, temperature=3.0)(outputs), dkd_loss(s, t, y, 2.0, 4.0, 3.0)
    )
    torch.testing.assert_close(
        DISTTerm(beta=2.0, gamma=0.5, temperature=2.0)(outputs), dist_loss(s, t, 2.0, 0.5, 2.0)
    )


def test_terms_defaults_and_repr() -> None:
    dkd, dist, kd = DKDTerm(), DISTTerm(), KDTerm(standardize=True)
    assert (dkd.name, dkd.weight, dkd.alpha, dkd.beta, dkd.temperature) == ("dkd", 1.0, 1.0, 8.0, 4.0)
    assert (dist.name, dist.weight, dist.beta, dist.gamma, dist.temperature) == ("dist", 1.0, 1.0, 1.0, 1.0)
    assert KDTerm().standardize is False
    assert "standardize=True" in repr(kd)
    assert "alpha=1.0, beta=8.0, temperature=4.0" in repr(dkd)
    assert "beta=1.0, gamma=1.0, temperature=1.0" in repr(dist)
    for term in (dkd, dist, kd):
        assert isinstance(term.temperature, float)


def test_temperature_attribute_is_read_on_every_call() -> None:
    # TemperatureAnnealing sets ``term.temperature``; the next forward must use it
    outputs, student, teacher = make_outputs()
    s, t, y = student.detach(), teacher.detach(), outputs.targets
    for term, expected in (
        (DKDTerm(), dkd_loss(s, t, y, temperature=1.5)),
        (DISTTerm(), dist_loss(s, t, temperature=1.5)),
        (KDTerm(standardize=True), kd_loss(s, t, 1.5, standardize=True)),
    ):
        term.temperature = 1.5
        torch.testing.assert_close(term(outputs), expected)


# --------------------------------------------------------------------------------------------
# Precision
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "loss_fn",
    [
        lambda s, t, y: kd_loss(s, t, 2.0, standardize=True),
        lambda s, t, y: dkd_loss(s, t, y),
        lambda s, t, y: dist_loss(s, t, temperature=2.0),
    ],
    ids=["kd_standardized", "dkd", "dist"],
)
def test_losses_run_in_float32_under_bf16_autocast(loss_fn: Callable[..., torch.Tensor]) -> None:
    torch.manual_seed(2)
    student, teacher, target = torch.randn(32, 10), torch.randn(32, 10), torch.randint(0, 10, (32,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = loss_fn(student.bfloat16(), teacher.bfloat16(), target)
    assert got.dtype == torch.float32
    # only the bf16 rounding of the inputs differs: the math itself is float32
    exact_on_rounded = loss_fn(student.bfloat16().float(), teacher.bfloat16().float(), target)
    torch.testing.assert_close(got, exact_on_rounded)


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


def test_losses_reject_mismatched_shapes_naming_both() -> None:
    s, t = torch.randn(2, 10), torch.randn(2, 100)
    for call in (
        lambda: kd_loss(s, t, standardize=True),
        lambda: dkd_loss(s, t, torch.zeros(2, dtype=torch.long)),
        lambda: dist_loss(s, t),
    ):
        with pytest.raises(ValueError, match=r"\(2, 10\).*\(2, 100\).*num_classes"):
            call()


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


@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_losses_reject_non_positive_temperature(temperature: float) -> None:
    s, t, y = torch.randn(2, 3), torch.randn(2, 3), torch.tensor([0, 1])
    for call in (
        lambda: kd_loss(s, t, temperature, standardize=True),
        lambda: dkd_loss(s, t, y, temperature=temperature),
        lambda: dist_loss(s, t, temperature=temperature),
    ):
        with pytest.raises(ValueError, match="temperature must be > 0"):
            call()
    for term_cls in (DKDTerm, DISTTerm, KDTerm):
        with pytest.raises(ValueError, match="temperature must be > 0"):
            term_cls(temperature=temperature)


def test_dkd_term_needs_targets() -> None:
    outputs, _, _ = make_outputs(with_targets=False)
    with pytest.raises(ValueError, match=r"'dkd'.*needs labels.*no targets"):
        DKDTerm()(outputs)


def test_terms_need_teacher_logits() -> None:
    outputs = StepOutputs(student_logits=torch.randn(4, 3), targets=torch.tensor([0, 1, 2, 0]))
    for term in (DKDTerm(), DISTTerm(), KDTerm()):
        with pytest.raises(ValueError, match="needs the teacher's logits"):
            term(outputs)
