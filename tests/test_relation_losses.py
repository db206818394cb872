"""SP, RKD, PKT, CC, AT and NST against values computed independently in float64 from the formulas."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch

from lightning_kd import ATTerm, CCTerm, NSTTerm, PKTTerm, RKDTerm, SPTerm, StepOutputs
from lightning_kd.losses.base import LossTerm
from lightning_kd.losses.functional import at_loss, cc_loss, nst_loss, pkt_loss, rkd_loss, sp_loss

# --------------------------------------------------------------------------------------------
# Independent references (float64 numpy / plain Python), written from the formulas.
# --------------------------------------------------------------------------------------------


def rows(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float64).reshape(len(x), -1)


def reference_sp(student: np.ndarray, teacher: np.ndarray) -> float:
    """Tung & Mori: || rownorm(Q_t Q_t^T) - rownorm(Q_s Q_s^T) ||_F^2 / N^2."""

    def similarity(q: np.ndarray) -> np.ndarray:
        g = q @ q.T
        return g / np.linalg.norm(g, axis=1, keepdims=True)

    s, t = rows(student), rows(teacher)
    return float(np.sum((similarity(t) - similarity(s)) ** 2) / len(s) ** 2)


def huber(x: float) -> float:
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


def reference_rkd(student: np.ndarray, teacher: np.ndarray, w_d: float = 25.0, w_a: float = 50.0) -> float:
    """Park et al.: Huber on mean-normalised distances (mean over N^2) and on cosines at the anchor
    i between x_j and x_k (mean over N^3; a zero difference vector counts as cosine 0)."""
    s, t = rows(student), rows(teacher)
    n = len(s)

    def distances(x: np.ndarray) -> np.ndarray:
        d = np.array([[np.linalg.norm(x[i] - x[j]) for j in range(n)] for i in range(n)])
        return d / (d.sum() / (n * (n - 1)))

    def cosine(x: np.ndarray, i: int, j: int, k: int) -> float:
        u, v = x[j] - x[i], x[k] - x[i]
        nu, nv = np.linalg.norm(u), np.linalg.norm(v)
        if nu == 0 or nv == 0:
            return 0.0
        return float(u @ v / (nu * nv))

    d_s, d_t = distances(s), distances(t)
    loss_d = sum(huber(d_s[i, j] - d_t[i, j]) for i in range(n) for j in range(n)) / n**2
    loss_a = (
        sum(
            huber(cosine(s, i, j, k) - cosine(t, i, j, k))
            for i in range(n)
            for j in range(n)
            for k in range(n)
        )
        / n**3
    )
    return w_d * loss_d + w_a * loss_a


def reference_pkt(student: np.ndarray, teacher: np.ndarray, eps: float = 1e-7) -> float:
    """Passalis & Tefas (benchmark form): K = (cos + 1) / 2 with norms + eps, rows to probabilities,
    mean over all N^2 entries of p_t log((p_t + eps) / (p_s + eps))."""

    def conditionals(x: np.ndarray) -> np.ndarray:
        unit = x / (np.linalg.norm(x, axis=1, keepdims=True) + eps)
        k = (unit @ unit.T + 1) / 2
        return k / k.sum(axis=1, keepdims=True)

    p_s, p_t = conditionals(rows(student)), conditionals(rows(teacher))
    return float(np.mean(p_t * np.log((p_t + eps) / (p_s + eps))))


def reference_cc(student: np.ndarray, teacher: np.ndarray, gamma: float = 0.4, order: int = 2) -> float:
    """Peng et al.: order-P Taylor expansion of exp(-gamma ||x_i - x_j||^2) on unit vectors, MSE."""

    def kernel(x: np.ndarray) -> np.ndarray:
        unit = x / np.linalg.norm(x, axis=1, keepdims=True)
        c = unit @ unit.T
        return sum(
            math.exp(-2 * gamma) * (2 * gamma) ** p / math.factorial(p) * c**p for p in range(order + 1)
        )

    return float(np.mean((kernel(rows(student)) - kernel(rows(teacher))) ** 2))


def reference_cc_exact_gaussian(student: np.ndarray, teacher: np.ndarray, gamma: float) -> float:
    """The untruncated Gaussian RBF kernel on unit vectors, MSE over the N^2 entries."""

    def kernel(x: np.ndarray) -> np.ndarray:
        unit = x / np.linalg.norm(x, axis=1, keepdims=True)
        sq = ((unit[:, None, :] - unit[None, :, :]) ** 2).sum(-1)
        return np.exp(-gamma * sq)

    return float(np.mean((kernel(rows(student)) - kernel(rows(teacher))) ** 2))


def block_mean(f: np.ndarray, h: int, w: int) -> np.ndarray:
    """Average pooling of (N, C, H, W) to (N, C, h, w) when h | H and w | W."""
    n, c, big_h, big_w = f.shape
    return f.reshape(n, c, h, big_h // h, w, big_w // w).mean(axis=(3, 5))


def reference_at(student: np.ndarray, teacher: np.ndarray, p: float = 2.0) -> float:
    """Zagoruyko & Komodakis (benchmark form): mean over N*HW of the squared difference of the
    L2-normalised channel means of |f|^p; the larger map is first mean-pooled to the smaller."""
    s, t = np.asarray(student, np.float64), np.asarray(teacher, np.float64)
    h, w = min(s.shape[2], t.shape[2]), min(s.shape[3], t.shape[3])
    s, t = block_mean(s, h, w), block_mean(t, h, w)

    def attention(f: np.ndarray) -> np.ndarray:
        q = (np.abs(f) ** p).mean(axis=1).reshape(len(f), -1)
        return q / np.linalg.norm(q, axis=1, keepdims=True)

    return float(np.mean((attention(s) - attention(t)) ** 2))


def reference_nst(student: np.ndarray, teacher: np.ndarray) -> float:
    """Huang & Wang: per sample, squared MMD between the L2-normalised channel vectors with the
    kernel k(x, y) = (x . y)^2, averaged over the batch."""
    s, t = np.asarray(student, np.float64), np.asarray(teacher, np.float64)
    h, w = min(s.shape[2], t.shape[2]), min(s.shape[3], t.shape[3])
    s, t = block_mean(s, h, w), block_mean(t, h, w)
    total = 0.0
    for f_s, f_t in zip(s, t, strict=True):
        a = f_s.reshape(len(f_s), -1)
        b = f_t.reshape(len(f_t), -1)
        a = a / np.linalg.norm(a, axis=1, keepdims=True)
        b = b / np.linalg.norm(b, axis=1, keepdims=True)

        def k(x: np.ndarray, y: np.ndarray) -> float:
            return float(np.mean([(xi @ yj) ** 2 for xi in x for yj in y]))

        total += k(b, b) + k(a, a) - 2 * k(a, b)
    return total / len(s)


def t32(x: np.ndarray) -> torch.Tensor:
    return torch.tensor(np.asarray(x), dtype=torch.float32)


def rand(*shape: int, seed: int = 0, positive: bool = False) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal(shape)
    return np.abs(x) if positive else x


# --------------------------------------------------------------------------------------------
# Values
# --------------------------------------------------------------------------------------------


def test_sp_hand_computed_value() -> None:
    # student rows orthogonal: G_s = I; teacher rows equal: G_t rows (1, 1) / sqrt(2)
    # sum of squares: 2 (1 - 1/sqrt 2)^2 + 2 (1/2) = 4 - 2 sqrt 2, divided by N^2 = 4
    got = sp_loss(t32([[1.0, 0.0], [0.0, 1.0]]), t32([[1.0, 0.0], [1.0, 0.0]]))
    assert got.dtype == torch.float32 and got.ndim == 0
    assert got.item() == pytest.approx(1 - math.sqrt(2) / 2, rel=1e-6)


def test_sp_matches_reference_on_feature_maps_of_different_sizes() -> None:
    student, teacher = rand(6, 4, 3, 3, seed=1), rand(6, 8, 2, 2, seed=2)
    got = sp_loss(t32(student), t32(teacher))
    assert got.item() == pytest.approx(reference_sp(student, teacher), rel=1e-5)


def test_rkd_two_samples_have_no_relational_difference() -> None:
    # with N = 2 both normalised distances are 1 and every angle is degenerate or 1: loss 0
    got = rkd_loss(t32([[0.0, 0.0], [3.0, 4.0]]), t32([[1.0, 1.0, 1.0], [-2.0, 0.0, 5.0]]))
    assert got.item() == pytest.approx(0.0, abs=1e-6)


def test_rkd_hand_computed_right_triangle_against_degenerate_line() -> None:
    # student: (0,0), (1,0), (0,1): distances 1, 1, sqrt 2; teacher: (0,0), (1,0), (2,0): 1, 1, 2.
    student = [[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]
    teacher = [[0.0, 0.0], [1.0, 0.0], [2.0, 0.0]]
    mu_s, mu_t = (2 + math.sqrt(2)) / 3, 4 / 3
    d_s = [1 / mu_s, 1 / mu_s, math.sqrt(2) / mu_s]  # pairs (0,1), (0,2), (1,2)
    d_t = [1 / mu_t, 2 / mu_t, 1 / mu_t]
    loss_d = 2 * sum(huber(a - b) for a, b in zip(d_s, d_t, strict=True)) / 9
    # non-degenerate angles (i, j, k), j != k != i: cos at each vertex, each counted twice (j, k swapped)
    # student: at 0: 0; at 1: cos 45 = 1/sqrt 2; at 2: 1/sqrt 2; teacher: at 0: 1; at 1: -1; at 2: 1
    cos_s = [0.0, 1 / math.sqrt(2), 1 / math.sqrt(2)]
    cos_t = [1.0, -1.0, 1.0]
    # entries j == k != i: cos 1 for both models, no difference
    loss_a = 2 * sum(huber(a - b) for a, b in zip(cos_s, cos_t, strict=True)) / 27
    expected = 25 * loss_d + 50 * loss_a
    got = rkd_loss(t32(student), t32(teacher))
    assert got.item() == pytest.approx(expected, rel=1e-5)
    assert expected == pytest.approx(reference_rkd(np.array(student), np.array(teacher)), rel=1e-12)


@pytest.mark.parametrize(("distance_weight", "angle_weight"), [(25.0, 50.0), (1.0, 0.0), (0.0, 1.0)])
def test_rkd_matches_reference(distance_weight: float, angle_weight: float) -> None:
    student, teacher = rand(7, 5, seed=3), rand(7, 3, 2, seed=4)
    got = rkd_loss(t32(student), t32(teacher), distance_weight=distance_weight, angle_weight=angle_weight)
    expected = reference_rkd(student, teacher, distance_weight, angle_weight)
    assert got.item() == pytest.approx(expected, rel=1e-5)


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


def test_cc_hand_computed_value() -> None:
    # student rows orthogonal (cosine 0 off the diagonal), teacher rows parallel (cosine 1):
    # only the 2 off-diagonal entries differ, by exp(-2g) (2g + (2g)^2 / 2)
    gamma = 0.4
    gap = math.exp(-2 * gamma) * (2 * gamma + (2 * gamma) ** 2 / 2)
    got = cc_loss(t32([[2.0, 0.0], [0.0, 1.0]]), t32([[1.0, 1.0], [2.0, 2.0]]), gamma=gamma, order=2)
    assert got.item() == pytest.approx(2 * gap**2 / 4, rel=1e-5)


@pytest.mark.parametrize(("gamma", "order"), [(0.4, 2), (1.0, 0), (0.25, 1), (0.7, 5)])
def test_cc_matches_reference(gamma: float, order: int) -> None:
    student, teacher = rand(9, 4, seed=7), rand(9, 6, seed=8)
    got = cc_loss(t32(student), t32(teacher), gamma=gamma, order=order)
    assert got.item() == pytest.approx(reference_cc(student, teacher, gamma, order), rel=1e-5, abs=1e-12)


def test_cc_high_order_tends_to_the_exact_gaussian_kernel() -> None:
    student, teacher = rand(6, 5, seed=9), rand(6, 5, seed=10)
    got = cc_loss(t32(student), t32(teacher), gamma=0.4, order=20)
    assert got.item() == pytest.approx(reference_cc_exact_gaussian(student, teacher, 0.4), rel=1e-5)
    # while order 2 is only an approximation of it
    low = cc_loss(t32(student), t32(teacher), gamma=0.4, order=2).item()
    assert low != pytest.approx(got.item(), rel=1e-3)


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


@pytest.mark.parametrize(
    ("student_shape", "teacher_shape"),
    [((2, 3, 8, 8), (2, 5, 4, 4)), ((2, 3, 4, 4), (2, 5, 8, 8)), ((2, 3, 8, 4), (2, 5, 4, 8))],
)
def test_at_and_nst_pool_the_larger_map_to_the_smaller(
    student_shape: tuple[int, ...], teacher_shape: tuple[int, ...]
) -> None:
    student = rand(*student_shape, seed=13, positive=True)
    teacher = rand(*teacher_shape, seed=14, positive=True)
    assert at_loss(t32(student), t32(teacher)).item() == pytest.approx(
        reference_at(student, teacher), rel=1e-5
    )
    assert nst_loss(t32(student), t32(teacher)).item() == pytest.approx(
        reference_nst(student, teacher), rel=1e-5
    )


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


# --------------------------------------------------------------------------------------------
# Invariances and minima
# --------------------------------------------------------------------------------------------

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

RELATION_LOSSES: dict[str, Loss] = {"sp": sp_loss, "rkd": rkd_loss, "pkt": pkt_loss, "cc": cc_loss}
MAP_LOSSES: dict[str, Loss] = {"at": at_loss, "nst": nst_loss}
ALL_LOSSES: dict[str, Loss] = {**RELATION_LOSSES, **MAP_LOSSES}


@pytest.mark.parametrize("name", sorted(ALL_LOSSES))
def test_loss_is_zero_when_student_equals_teacher(name: str) -> None:
    feature = torch.randn(6, 4, 3, 3)
    assert ALL_LOSSES[name](feature, feature.clone()).item() == pytest.approx(0.0, abs=1e-6)
    assert ALL_LOSSES[name](feature, torch.randn(6, 4, 3, 3)).item() > 1e-6


@pytest.mark.parametrize("name", sorted(ALL_LOSSES))
@pytest.mark.parametrize(("student_scale", "teacher_scale"), [(3.0, 3.0), (0.5, 1.0), (1.0, 7.0)])
def test_loss_is_invariant_to_positive_scaling(name: str, student_scale: float, teacher_scale: float) -> None:
    # SP: row-normalised Gram matrix; RKD: distances over their mean, angles; PKT, CC: cosines;
    # AT: normalised attention map; NST: normalised channel vectors
    student, teacher = torch.randn(6, 4, 3, 3), torch.randn(6, 5, 3, 3)
    loss = ALL_LOSSES[name]
    reference = loss(student, teacher)
    scaled = loss(student * student_scale, teacher * teacher_scale)
    torch.testing.assert_close(scaled, reference, rtol=1e-4, atol=1e-7)


def test_rkd_is_invariant_to_translation() -> None:
    student, teacher = torch.randn(6, 5), torch.randn(6, 3)
    shifted = rkd_loss(student + torch.randn(5), teacher - 2.0)
    torch.testing.assert_close(shifted, rkd_loss(student, teacher), rtol=1e-4, atol=1e-6)


def test_at_p2_is_the_square_of_the_features_including_negative_values() -> None:
    # |f|^2 == f^2: AT at p = 2 does not depend on the sign of the activations
    student, teacher = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(at_loss(-student, teacher), at_loss(student, teacher))


# --------------------------------------------------------------------------------------------
# Terms: gradients reach the student only, defaults follow the benchmark
# --------------------------------------------------------------------------------------------

TERMS: dict[str, tuple[Callable[..., LossTerm], tuple[int, ...], tuple[int, ...]]] = {
    "sp": (SPTerm, (6, 4, 3, 3), (6, 8, 2, 2)),
    "rkd": (RKDTerm, (6, 10), (6, 12)),
    "pkt": (PKTTerm, (6, 10), (6, 12)),
    "cc": (CCTerm, (6, 10), (6, 12)),
    "at": (ATTerm, (6, 4, 4, 4), (6, 8, 2, 2)),
    "nst": (NSTTerm, (6, 4, 4, 4), (6, 8, 2, 2)),
}


def step_outputs(student: torch.Tensor, teacher: torch.Tensor) -> StepOutputs:
    return StepOutputs(
        student_logits=torch.zeros(len(student), 3),
        student_features={"block": student},
        teacher_features={"stage.2": teacher},
    )


@pytest.mark.parametrize("name", sorted(TERMS))
def test_term_gradient_reaches_the_student_and_never_the_teacher(name: str) -> None:
    term_cls, student_shape, teacher_shape = TERMS[name]
    term = term_cls("block", "stage.2")
    student = torch.randn(*student_shape).abs().requires_grad_(True)
    teacher = torch.randn(*teacher_shape).abs().requires_grad_(True)
    loss = term(step_outputs(student, teacher))
    assert loss.ndim == 0 and loss.dtype == torch.float32
    loss.backward()
    assert student.grad is not None
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0
    assert teacher.grad is None


@pytest.mark.parametrize("name", sorted(TERMS))
def test_term_equals_its_functional(name: str) -> None:
    term_cls, student_shape, teacher_shape = TERMS[name]
    student, teacher = torch.randn(*student_shape), torch.randn(*teacher_shape)
    term = term_cls("block", "stage.2")
    torch.testing.assert_close(term(step_outputs(student, teacher)), ALL_LOSSES[name](student, teacher))


def test_terms_default_to_the_benchmark_names_and_weights_cc_excepted() -> None:
    expected = {"sp": 3000.0, "rkd": 1.0, "pkt": 30000.0, "cc": 100.0, "at": 1000.0, "nst": 50.0}
    for name, (term_cls, _, _) in TERMS.items():
        term = term_cls("a", "b")
        assert (term.name, term.weight) == (name, expected[name])
        assert (term.student_layers, term.teacher_layers) == (("a",), ("b",))
    rkd = RKDTerm("a", "b")
    assert (rkd.distance_weight, rkd.angle_weight) == (25.0, 50.0)
    assert ATTerm("a", "b").p == 2.0
    cc = CCTerm("a", "b")
    assert (cc.gamma, cc.order) == (0.4, 2)


def test_term_settings_reach_the_loss() -> None:
    student, teacher = torch.randn(5, 6), torch.randn(5, 4)
    outputs = step_outputs(student, teacher)
    torch.testing.assert_close(
        RKDTerm("block", "stage.2", distance_weight=1.0, angle_weight=0.0)(outputs),
        rkd_loss(student, teacher, distance_weight=1.0, angle_weight=0.0),
    )
    torch.testing.assert_close(
        CCTerm("block", "stage.2", gamma=1.0, order=4)(outputs), cc_loss(student, teacher, gamma=1.0, order=4)
    )
    maps_s, maps_t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(
        ATTerm("block", "stage.2", p=1.0)(step_outputs(maps_s, maps_t)), at_loss(maps_s, maps_t, p=1.0)
    )


# --------------------------------------------------------------------------------------------
# Precision
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(ALL_LOSSES))
def test_loss_runs_in_float32_under_bf16_autocast(name: str) -> None:
    loss = ALL_LOSSES[name]
    student, teacher = torch.randn(8, 4, 4, 4), torch.randn(8, 6, 2, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = loss(student.bfloat16(), teacher.bfloat16())
    assert got.dtype == torch.float32
    # only the bf16 rounding of the inputs differs: the math itself is float32
    torch.testing.assert_close(got, loss(student.bfloat16().float(), teacher.bfloat16().float()))


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(ALL_LOSSES))
def test_batch_size_mismatch_raises_naming_both_shapes(name: str) -> None:
    with pytest.raises(ValueError, match=r"\(4, 3, 2, 2\).*\(5, 3, 2, 2\).*batch size"):
        ALL_LOSSES[name](torch.randn(4, 3, 2, 2), torch.randn(5, 3, 2, 2))


@pytest.mark.parametrize("name", sorted(MAP_LOSSES))
def test_map_losses_reject_non_4d_features_naming_both_shapes(name: str) -> None:
    with pytest.raises(ValueError, match=r"\(4, 16\).*\(4, 3, 2, 2\).*\(N, C, H, W\)"):
        MAP_LOSSES[name](torch.randn(4, 16), torch.randn(4, 3, 2, 2))


def test_rkd_rejects_a_single_sample() -> None:
    with pytest.raises(ValueError, match=r"at least 2 samples.*\(1, 3\).*\(1, 5\)"):
        rkd_loss(torch.randn(1, 3), torch.randn(1, 5))


@pytest.mark.parametrize(("gamma", "order"), [(0.0, 2), (-1.0, 2), (0.4, -1), (0.4, 1.5), (0.4, True)])
def test_cc_rejects_bad_kernel_settings(gamma: float, order: int) -> None:
    with pytest.raises(ValueError, match="gamma|order"):
        cc_loss(torch.randn(3, 2), torch.randn(3, 2), gamma=gamma, order=order)
    with pytest.raises(ValueError, match="gamma|order"):
        CCTerm("a", "b", gamma=gamma, order=order)


def test_bad_exponents_and_eps_are_rejected() -> None:
    with pytest.raises(ValueError, match="p must be > 0"):
        at_loss(torch.randn(2, 3, 2, 2), torch.randn(2, 3, 2, 2), p=0.0)
    with pytest.raises(ValueError, match="p must be > 0"):
        ATTerm("a", "b", p=-1.0)
    with pytest.raises(ValueError, match="eps must be > 0"):
        pkt_loss(torch.randn(2, 3), torch.randn(2, 3), eps=0.0)
    with pytest.raises(ValueError, match="eps must be > 0"):
        PKTTerm("a", "b", eps=0.0)


def test_at_and_nst_on_1d_maps_pool_the_longer_sequence() -> None:
    rng = np.random.default_rng(3)
    student = rng.normal(size=(2, 3, 4))
    teacher = rng.normal(size=(2, 5, 2))
    pooled = student.reshape(2, 3, 2, 2).mean(axis=3)  # length 4 -> 2, as adaptive average pooling

    def attention(f: np.ndarray) -> np.ndarray:
        a = (np.abs(f) ** 2).mean(axis=1)
        return a / np.linalg.norm(a, axis=1, keepdims=True)

    expected_at = ((attention(pooled) - attention(teacher)) ** 2).mean()
    got = at_loss(torch.tensor(student, dtype=torch.float32), torch.tensor(teacher, dtype=torch.float32))
    assert got.item() == pytest.approx(expected_at, rel=1e-5)

    def unit(f: np.ndarray) -> np.ndarray:
        return f / np.linalg.norm(f, axis=2, keepdims=True)

    def kernel_mean(a: np.ndarray, b: np.ndarray) -> float:
        return float((np.einsum("nil,njl->nij", a, b) ** 2).mean())

    s, t = unit(pooled), unit(teacher)
    expected_nst = kernel_mean(t, t) + kernel_mean(s, s) - 2 * kernel_mean(s, t)
    got = nst_loss(torch.tensor(student, dtype=torch.float32), torch.tensor(teacher, dtype=torch.float32))
    assert got.item() == pytest.approx(expected_nst, rel=1e-5)


def test_maps_of_different_rank_are_rejected() -> None:
    with pytest.raises(ValueError, match=r"\(2, 3, 4\).*\(2, 3, 4, 4\)"):
        at_loss(torch.randn(2, 3, 4), torch.randn(2, 3, 4, 4))
