"""VID: values against float64 references, the regressor and variance, gradients, settings."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from lightning_kd import VIDTerm
from lightning_kd.losses.functional import vid_loss
from tests.helpers import block_mean, f64, outputs_of, per_channel, pointwise, rand, t32


def reference_vid(mean: np.ndarray, teacher: np.ndarray, alpha: np.ndarray, eps: float = 1e-5) -> float:
    """Ahn et al. (benchmark form): var_c = log(1 + exp(alpha_c)) + eps,
    mean over all elements of 0.5 * ((mu - t)^2 / var + log var)."""
    mean, teacher = f64(mean), f64(teacher)
    var = per_channel(np.log1p(np.exp(f64(alpha))) + eps, teacher.ndim)
    return float(np.mean(0.5 * ((mean - teacher) ** 2 / var + np.log(var))))


@pytest.mark.parametrize("shape", [(4, 3, 5, 5), (6, 7), (3, 2, 9)])
def test_vid_loss_matches_reference(shape: tuple[int, ...]) -> None:
    mean, teacher, alpha = rand(*shape, seed=1), rand(*shape, seed=2), rand(shape[1], seed=3) * 2
    got = vid_loss(t32(mean), t32(teacher), t32(alpha))
    assert got.dtype == torch.float32 and got.ndim == 0
    assert got.item() == pytest.approx(reference_vid(mean, teacher, alpha), rel=1e-5)
    got_eps = vid_loss(t32(mean), t32(teacher), t32(alpha), eps=0.3)
    assert got_eps.item() == pytest.approx(reference_vid(mean, teacher, alpha, eps=0.3), rel=1e-5)


def test_vid_loss_hand_computed_value() -> None:
    # alpha = log(e - 1): softplus 1, var = 1 + eps; residuals 0 and 2: 0.5 * (4 / var) / 2 + 0.5 log var
    var = 1 + 1e-5
    got = vid_loss(t32([[0.0], [2.0]]), t32([[0.0], [0.0]]), t32([math.log(math.e - 1)]))
    assert got.item() == pytest.approx(0.5 * (4 / var) / 2 + 0.5 * math.log(var), rel=1e-6)


def test_vid_loss_is_smallest_at_the_teacher_mean() -> None:
    teacher = torch.randn(3, 4, 2, 2)
    mean = teacher.clone().requires_grad_(True)
    alpha = torch.randn(4)
    loss = vid_loss(mean, teacher, alpha)
    loss.backward()
    torch.testing.assert_close(mean.grad, torch.zeros_like(mean))
    assert vid_loss(teacher + 0.1 * torch.randn_like(teacher), teacher, alpha) > loss


def test_vid_variance_gradient_points_to_the_mean_squared_residual() -> None:
    # d loss / d var_c = (var_c - r_c) / (2 var_c^2 * #elements of c), r_c = mean squared residual
    # of channel c, and softplus is increasing: alpha moves toward var_c = r_c
    teacher = torch.zeros(8, 3, 2, 2)
    residual = torch.tensor([0.5, 1.0, 2.0]).reshape(1, 3, 1, 1)
    mean = residual.expand_as(teacher)  # r_c = residual_c^2: 0.25, 1, 4
    r = residual.flatten() ** 2
    eps = 1e-5

    def alpha_grad(variance: torch.Tensor) -> torch.Tensor:
        alpha = torch.log(torch.expm1(variance - eps)).requires_grad_(True)
        vid_loss(mean, teacher, alpha, eps=eps).backward()
        return alpha.grad

    assert (alpha_grad(r * 2) > 0).all()  # variance too large: gradient descent lowers it
    assert (alpha_grad(r / 2) < 0).all()  # too small: raises it
    torch.testing.assert_close(alpha_grad(r), torch.zeros(3), atol=1e-7, rtol=0)


def test_vid_loss_rejects_bad_shapes_naming_both() -> None:
    with pytest.raises(ValueError, match=r"\(2, 3, 4, 4\).*\(2, 5, 4, 4\)"):
        vid_loss(torch.randn(2, 3, 4, 4), torch.randn(2, 5, 4, 4), torch.zeros(5))
    with pytest.raises(ValueError, match=r"log_scale has shape \(3,\).*\(2, 5, 4, 4\)"):
        vid_loss(torch.randn(2, 5, 4, 4), torch.randn(2, 5, 4, 4), torch.zeros(3))
    with pytest.raises(ValueError, match="eps must be >= 0"):
        vid_loss(torch.randn(2, 5), torch.randn(2, 5), torch.zeros(5), eps=-1.0)


def test_vid_term_builds_the_benchmark_regressor_and_variance_and_matches_reference() -> None:
    student, teacher = rand(2, 4, 8, 8, seed=7), rand(2, 6, 4, 4, seed=8)
    term = VIDTerm("s", "t")
    assert term.needs_build and (term.name, term.weight) == ("vid", 1.0)
    term.build(outputs_of(t32(student), t32(teacher)))
    assert not term.needs_build
    convs = [m for m in term.regressor if isinstance(m, nn.Conv2d)]
    assert [tuple(c.weight.shape) for c in convs] == [(6, 4, 1, 1), (6, 6, 1, 1), (6, 6, 1, 1)]
    assert all(c.bias is None for c in convs)
    assert [type(m) for m in term.regressor] == [nn.Conv2d, nn.ReLU, nn.Conv2d, nn.ReLU, nn.Conv2d]
    variance = torch.nn.functional.softplus(term.log_scale) + 1e-5
    torch.testing.assert_close(variance, torch.full((6,), 5.0))

    got = term(outputs_of(t32(student), t32(teacher)))
    pooled = block_mean(student, 4, 4)  # the larger (student) map is pooled before the regressor
    hidden = np.maximum(pointwise(pooled, convs[0].weight), 0)
    hidden = np.maximum(pointwise(hidden, convs[1].weight), 0)
    mean = pointwise(hidden, convs[2].weight)
    assert got.item() == pytest.approx(reference_vid(mean, teacher, term.log_scale), rel=1e-5)


def test_vid_term_pools_the_teacher_when_it_is_larger_and_uses_linear_layers_for_vectors() -> None:
    term = VIDTerm("s", "t", mid_channels=5)
    student, teacher = rand(2, 3, 2, 2, seed=9), rand(2, 4, 4, 4, seed=10)
    term.build(outputs_of(t32(student), t32(teacher)))
    convs = [m for m in term.regressor if isinstance(m, nn.Conv2d)]
    assert [tuple(c.weight.shape) for c in convs] == [(5, 3, 1, 1), (5, 5, 1, 1), (4, 5, 1, 1)]
    mean = pointwise(
        np.maximum(pointwise(np.maximum(pointwise(student, convs[0].weight), 0), convs[1].weight), 0),
        convs[2].weight,
    )
    expected = reference_vid(mean, block_mean(teacher, 2, 2), term.log_scale)
    assert term(outputs_of(t32(student), t32(teacher))).item() == pytest.approx(expected, rel=1e-5)

    vectors = VIDTerm("s", "t", init_pred_var=2.0)
    vectors.build(outputs_of(torch.randn(5, 3), torch.randn(5, 7)))
    linears = [m for m in vectors.regressor if isinstance(m, nn.Linear)]
    assert [tuple(m.weight.shape) for m in linears] == [(7, 3), (7, 7), (7, 7)]
    torch.testing.assert_close(torch.nn.functional.softplus(vectors.log_scale) + 1e-5, torch.full((7,), 2.0))


def test_vid_term_gradients_reach_student_regressor_and_variance_never_the_teacher() -> None:
    term = VIDTerm("s", "t")
    student = torch.randn(3, 4, 4, 4, requires_grad=True)
    teacher = torch.randn(3, 6, 4, 4, requires_grad=True)
    term.build(outputs_of(student.detach(), teacher.detach()))
    loss = term(outputs_of(student, teacher))
    assert loss.ndim == 0 and loss.dtype == torch.float32
    loss.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in term.parameters())
    assert {name for name, _ in term.named_parameters()} >= {"log_scale", "regressor.0.weight"}
    assert teacher.grad is None


def test_vid_term_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="init_pred_var"):
        VIDTerm("s", "t", init_pred_var=0.0)
    with pytest.raises(ValueError, match="eps"):
        VIDTerm("s", "t", eps=-1.0)
    with pytest.raises(RuntimeError, match="builds them in setup"):
        VIDTerm("s", "t")(outputs_of(torch.randn(2, 3), torch.randn(2, 3)))
