"""Temperature-softened losses at every temperature, against references computed with mpmath (60 digits).

KD, DKD, multi-teacher KD and DIST at T in {1e-3, 1, 4, 1e3, 1e5, 1e8, 1e12} on logits of up to 50
in size, C = 10 and C = 1000. Relative error bounds: 1e-5 on the float32 direct path (0.1 <= T <= 16),
1e-6 outside it (float64 math, a float32 result), 1e-9 for the float64 core itself.
"""

from __future__ import annotations

import mpmath
import pytest
import torch

from lightning_kd.losses._softened import softened_kl
from lightning_kd.losses.dkd import _softened_dkd_parts
from lightning_kd.losses.functional import dist_loss, dkd_loss, kd_loss, multi_teacher_kd_loss
from lightning_kd.losses.lupi import generalized_distillation_loss
from lightning_kd.losses.multi_teacher import _softened_mixture_kl

mpmath.mp.dps = 60
TEMPERATURES = [1e-3, 1.0, 4.0, 1e3, 1e5, 1e8, 1e12]


def bound(temperature: float) -> float:
    """The relative error the test allows: float32 direct path for 0.1 <= T <= 16, float64 math outside."""
    return 1e-5 if 0.1 <= temperature <= 16 else 1e-6


def logits(rows: int, classes: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(rows, classes, generator=generator) * 2 - 1) * 50


def mp_softmax(row: list[float], temperature: float) -> list[mpmath.mpf]:
    scaled = [mpmath.mpf(v) / mpmath.mpf(temperature) for v in row]
    top = max(scaled)
    exps = [mpmath.exp(v - top) for v in scaled]
    total = mpmath.fsum(exps)
    return [e / total for e in exps]


def mp_kl(p: list[mpmath.mpf], q: list[mpmath.mpf]) -> mpmath.mpf:
    return mpmath.fsum(a * mpmath.log(a / b) for a, b in zip(p, q, strict=True) if a > 0)


def ref_kd(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> float:
    kls = [
        mp_kl(mp_softmax(t, temperature), mp_softmax(s, temperature))
        for s, t in zip(student.tolist(), teacher.tolist(), strict=True)
    ]
    return float(mpmath.mpf(temperature) ** 2 * mpmath.fsum(kls) / len(kls))


def ref_dkd(student: torch.Tensor, teacher: torch.Tensor, target: list[int], temperature: float) -> float:
    total = mpmath.mpf(0)
    for s, t, g in zip(student.tolist(), teacher.tolist(), target, strict=True):
        p, q = mp_softmax(t, temperature), mp_softmax(s, temperature)
        tckd = mp_kl([p[g], 1 - p[g]], [q[g], 1 - q[g]])
        rest_p = [v / (1 - p[g]) for c, v in enumerate(p) if c != g]
        rest_q = [v / (1 - q[g]) for c, v in enumerate(q) if c != g]
        total += 1.0 * tckd + 8.0 * mp_kl(rest_p, rest_q)
    return float(mpmath.mpf(temperature) ** 2 * total / len(target))


def ref_multi(
    student: torch.Tensor, teachers: torch.Tensor, weights: list[float], temperature: float
) -> float:
    kls = []
    for n, s in enumerate(student.tolist()):
        members = [mp_softmax(teachers[m, n].tolist(), temperature) for m in range(len(weights))]
        mixture = [
            mpmath.fsum(mpmath.mpf(w) * p[c] for w, p in zip(weights, members, strict=True))
            for c in range(len(s))
        ]
        kls.append(mp_kl(mixture, mp_softmax(s, temperature)))
    return float(mpmath.mpf(temperature) ** 2 * mpmath.fsum(kls) / len(kls))


def mp_mean_pearson(a: list[list[mpmath.mpf]], b: list[list[mpmath.mpf]]) -> mpmath.mpf:
    total = mpmath.mpf(0)
    for u, v in zip(a, b, strict=True):
        mu, mv = mpmath.fsum(u) / len(u), mpmath.fsum(v) / len(v)
        u, v = [x - mu for x in u], [x - mv for x in v]
        norm = mpmath.sqrt(mpmath.fsum(x * x for x in u)) * mpmath.sqrt(mpmath.fsum(x * x for x in v))
        total += mpmath.fsum(x * y for x, y in zip(u, v, strict=True)) / (norm + mpmath.mpf("1e-8"))
    return total / len(a)


def ref_dist(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> float:
    y_s = [mp_softmax(row, temperature) for row in student.tolist()]
    y_t = [mp_softmax(row, temperature) for row in teacher.tolist()]
    inter = 1 - mp_mean_pearson(y_s, y_t)
    intra = 1 - mp_mean_pearson(
        [list(c) for c in zip(*y_s, strict=True)], [list(c) for c in zip(*y_t, strict=True)]
    )
    return float(mpmath.mpf(temperature) ** 2 * (inter + intra))


@pytest.mark.parametrize("classes", [10, 1000])
@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_kd_loss_matches_high_precision_reference(temperature: float, classes: int) -> None:
    student, teacher = logits(2, classes, 0), logits(2, classes, 1)
    expected = ref_kd(student, teacher, temperature)
    assert kd_loss(student, teacher, temperature).item() == pytest.approx(expected, rel=bound(temperature))
    core = softened_kl(student, teacher, temperature).mean().item()
    assert core == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("classes", [10, 1000])
@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_dkd_loss_matches_high_precision_reference(temperature: float, classes: int) -> None:
    student, teacher = logits(3, classes, 2), logits(3, classes, 3)
    target = [0, 4, 9]
    expected = ref_dkd(student, teacher, target, temperature)
    got = dkd_loss(student, teacher, torch.tensor(target), alpha=1.0, beta=8.0, temperature=temperature)
    assert got.item() == pytest.approx(expected, rel=bound(temperature))


@pytest.mark.parametrize("classes", [10, 1000])
@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_multi_teacher_kd_loss_matches_high_precision_reference(temperature: float, classes: int) -> None:
    student = logits(2, classes, 4)
    teachers = torch.stack([logits(2, classes, 5), logits(2, classes, 6), logits(2, classes, 7)])
    weights = [0.5, 0.3, 0.2]
    expected = ref_multi(student, teachers, weights, temperature)
    got = multi_teacher_kd_loss(student, teachers, torch.tensor(weights), temperature)
    assert got.item() == pytest.approx(expected, rel=bound(temperature))


@pytest.mark.parametrize("classes", [10, 1000])
@pytest.mark.parametrize("temperature", [1.0, 4.0, 1e3, 1e5, 1e8, 1e12])
def test_dist_loss_matches_high_precision_reference(temperature: float, classes: int) -> None:
    student, teacher = logits(3, classes, 8), logits(3, classes, 9)
    expected = ref_dist(student, teacher, temperature)
    got = dist_loss(student, teacher, beta=1.0, gamma=1.0, temperature=temperature)
    assert got.item() == pytest.approx(expected, rel=bound(temperature))


@pytest.mark.parametrize("temperature", [1e5, 1e8, 1e12])
def test_lupi_soft_term_is_accurate_at_large_temperatures(temperature: float) -> None:
    # no T^2 factor and no cancellation: the soft cross-entropy tends to the student's mean log-loss
    student, teacher = logits(2, 10, 10), logits(2, 10, 11)
    expected = 0.0
    for s, t in zip(student.tolist(), teacher.tolist(), strict=True):
        p, q = mp_softmax(t, temperature), mp_softmax(s, 1.0)
        expected += float(-mpmath.fsum(a * mpmath.log(b) for a, b in zip(p, q, strict=True))) / 2
    got = generalized_distillation_loss(student, teacher, None, temperature=temperature, imitation=1.0)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_kd_loss_tends_to_half_the_uniform_variance_of_the_gap() -> None:
    # T^2 KL = Var_u(t - s) / 2 + O(1 / T), Var_u the population variance over the classes.
    student, teacher = logits(4, 10, 12), logits(4, 10, 13)
    limit = ((teacher - student).double().var(dim=-1, correction=0) / 2).mean().item()
    assert kd_loss(student, teacher, 1e12).item() == pytest.approx(limit, rel=1e-6)
    assert kd_loss(student, teacher, 1e300).item() == pytest.approx(limit, rel=1e-6)
    assert abs(kd_loss(student, teacher, 1e5).item() - limit) / limit < 1e-2


@pytest.mark.parametrize("temperature", [1e3, 1e5, 1e8, 1e12])
def test_softened_kl_gradient_passes_gradcheck_in_float64(temperature: float) -> None:
    student = (logits(2, 6, 14) / 5).double().requires_grad_(True)
    teacher = (logits(2, 6, 15) / 5).double().requires_grad_(True)
    # eps 1e-4: the finite differences of a value that carries T^2 * 1e-16 of rounding
    assert torch.autograd.gradcheck(lambda s, t: softened_kl(s, t, temperature), (student, teacher), eps=1e-4)


@pytest.mark.parametrize("temperature", [4.0, 1e3, 1e5, 1e8, 1e12])
def test_kd_loss_float32_gradient_matches_the_high_precision_one(temperature: float) -> None:
    # d/ds [T^2 KL(p || q)] = T (q - p) / N
    student, teacher = logits(2, 10, 16), logits(2, 10, 17)
    s = student.clone().requires_grad_(True)
    kd_loss(s, teacher, temperature).backward()
    for n in range(2):
        p = mp_softmax(teacher[n].tolist(), temperature)
        q = mp_softmax(student[n].tolist(), temperature)
        expected = [float(mpmath.mpf(temperature) * (b - a) / 2) for a, b in zip(p, q, strict=True)]
        scale = max(abs(e) for e in expected)
        assert max(abs(g - e) for g, e in zip(s.grad[n].tolist(), expected, strict=True)) < 1e-5 * scale


def test_tiny_temperature_stays_finite_with_a_correct_gradient() -> None:
    student, teacher = logits(2, 10, 18), logits(2, 10, 19)
    s = student.clone().requires_grad_(True)
    loss = kd_loss(s, teacher, 1e-3)
    loss.backward()
    assert loss.item() == pytest.approx(ref_kd(student, teacher, 1e-3), rel=1e-5)
    assert torch.isfinite(s.grad).all()
    one_hot_gap = torch.nn.functional.one_hot(student.argmax(-1), 10) - torch.nn.functional.one_hot(
        teacher.argmax(-1), 10
    )
    torch.testing.assert_close(s.grad, 1e-3 * one_hot_gap.float() / 2)


@pytest.mark.parametrize("temperature", [1e3, 1e8])
def test_dkd_and_mixture_float64_paths_pass_gradcheck(temperature: float) -> None:
    student = (logits(3, 5, 20) / 5).double().requires_grad_(True)
    teacher = (logits(3, 5, 21) / 5).double()
    teachers = torch.stack([teacher, (logits(3, 5, 22) / 5).double()])
    target = torch.tensor([0, 2, 4])

    def dkd(s: torch.Tensor) -> torch.Tensor:
        return torch.stack(_softened_dkd_parts(s, teacher, target, temperature))

    def mixture(s: torch.Tensor) -> torch.Tensor:
        return _softened_mixture_kl(
            s, teachers, torch.tensor([[0.7, 0.5, 0.1], [0.3, 0.5, 0.9]]), temperature
        )

    assert torch.autograd.gradcheck(dkd, (student,), eps=1e-4)
    assert torch.autograd.gradcheck(mixture, (student,), eps=1e-4)
