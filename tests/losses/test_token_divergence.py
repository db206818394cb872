"""token_divergence against independent float64 values, TRL's and DistiLLM's code, and bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lightning_kd.losses.functional import token_divergence
from lightning_kd.losses.token_divergence import DIVERGENCES, token_values, token_values_and_grads


def np_log_softmax(row: np.ndarray, temperature: float) -> np.ndarray:
    z = row / temperature
    top = z[np.isfinite(z)].max()
    return z - top - math.log(sum(math.exp(v - top) for v in z))  # exp(-inf) = 0


def np_kl(log_a: np.ndarray, log_b: np.ndarray) -> float:
    """sum_v a_v (log a_v - log b_v) over a_v > 0, entry by entry, in log space (no underflow)."""
    return sum(math.exp(la) * (la - lb) for la, lb in zip(log_a, log_b, strict=True) if la > -math.inf)


def np_log_mix(log_a: np.ndarray, log_b: np.ndarray, w: float) -> np.ndarray:
    """log(w a + (1 - w) b)."""
    return np.logaddexp(math.log(w) + log_a, math.log1p(-w) + log_b)


def reference(student, teacher, mask, divergence, temperature=1.0, beta=0.5, skew=0.1) -> float:
    """Mean over counted tokens of the divergence, from the formulas, token by token in float64."""
    s, t = np.asarray(student, dtype=np.float64), np.asarray(teacher, dtype=np.float64)
    values = []
    for n in range(s.shape[0]):
        for i in range(s.shape[1]):
            if mask is not None and not mask[n][i]:
                continue
            ls, lt = np_log_softmax(s[n, i], temperature), np_log_softmax(t[n, i], temperature)
            if divergence == "forward_kl":
                values.append(np_kl(lt, ls))
            elif divergence == "reverse_kl":
                values.append(np_kl(ls, lt))
            elif divergence == "jsd":
                lm = np_log_mix(lt, ls, beta)
                values.append(beta * np_kl(lt, lm) + (1 - beta) * np_kl(ls, lm))
            elif divergence == "tvd":
                values.append(0.5 * sum(abs(math.exp(a) - math.exp(b)) for a, b in zip(lt, ls, strict=True)))
            elif divergence == "skew_forward_kl":
                values.append(np_kl(lt, np_log_mix(lt, ls, skew)))
            else:
                values.append(np_kl(ls, np_log_mix(ls, lt, skew)))
    return sum(values) / len(values)


def logits(seed: int, shape: tuple[int, ...] = (2, 4, 9), scale: float = 3.0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


MASK = torch.tensor([[True, False, True, True], [False, True, True, False]])


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_each_divergence_matches_the_float64_reference(divergence: str, temperature: float) -> None:
    student, teacher = logits(0), logits(1)
    got = token_divergence(student, teacher, MASK, divergence, temperature, beta=0.3, skew=0.2)
    expected = reference(student, teacher, MASK.tolist(), divergence, temperature, beta=0.3, skew=0.2)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(expected, rel=2e-6)


def test_no_mask_counts_every_token_and_no_tau_squared_factor() -> None:
    student, teacher = logits(2), logits(3)
    got = token_divergence(student, teacher, None, "forward_kl", temperature=4.0)
    assert got.item() == pytest.approx(reference(student, teacher, None, "forward_kl", 4.0), rel=2e-6)


def test_jsd_beta_0_and_1_are_forward_and_reverse_kl_as_in_trl() -> None:
    student, teacher = logits(4), logits(5)
    for beta, same_as in ((0.0, "forward_kl"), (1.0, "reverse_kl")):
        got = token_divergence(student, teacher, MASK, "jsd", beta=beta)
        assert got.item() == pytest.approx(reference(student, teacher, MASK.tolist(), same_as), rel=2e-6)
    # the mixture formula itself tends to 0 at both ends: the convention is a jump
    near_zero = token_divergence(student, teacher, MASK, "jsd", beta=1e-6).item()
    assert near_zero == pytest.approx(reference(student, teacher, MASK.tolist(), "jsd", beta=1e-6), rel=1e-4)
    assert near_zero < 1e-4


def test_skew_edge_values() -> None:
    student, teacher = logits(6), logits(7)
    for skewed, plain in (("skew_forward_kl", "forward_kl"), ("skew_reverse_kl", "reverse_kl")):
        at_zero = token_divergence(student, teacher, MASK, skewed, skew=0.0)
        assert at_zero.item() == token_divergence(student, teacher, MASK, plain).item()
        near_one = token_divergence(student, teacher, MASK, skewed, skew=0.999)
        assert near_one.item() == pytest.approx(
            reference(student, teacher, MASK.tolist(), skewed, skew=0.999), rel=1e-3
        )
        assert 0 < near_one.item() < 1e-3


# Stored reference values. Produced on fixed inputs (trl_inputs below) by running, unmodified:
# - TRL 1.16.0 (`pip install --no-deps --target /tmp/trlsite trl`): the source of
#   GKDTrainer.generalized_jsd_loss, taken from trl/experimental/gkd/gkd_trainer.py with `ast`
#   (file sha256 0f4e9f47a2c722fbd925ea006ba3172448ef4d15679883df3400569b49c254cd; its module
#   imports accelerate and datasets, absent here) and executed with only torch and F in scope, on
#   float64 inputs, labels=TRL_LABELS, reduction "batchmean" (mean over labels != -100);
# - DistiLLM (github.com/jongwooko/distillm, commit d47e77ff9d27721783b32213be38c1204230cc0a,
#   distillm/losses.py imported as is) on the float32 inputs, no_model_batch={"label": TRL_LABELS}.
TRL_JSD = {  # (temperature, beta): value
    (1.0, 0.0): 2.5579896526022616,
    (1.0, 0.1): 0.16091096094883695,
    (1.0, 0.5): 0.33932430884910675,
    (1.0, 0.9): 0.12994873767866585,
    (1.0, 1.0): 1.6373905650011973,
    (2.0, 0.0): 0.8246872081892848,
    (2.0, 0.1): 0.06786080549022254,
    (2.0, 0.5): 0.16151920476303167,
    (2.0, 0.9): 0.057463018008555924,
    (2.0, 1.0): 0.6518248087679892,
}
DISTILLM = {
    "forward_kl": 3.9809608459472656,  # their forward_kl is the cross-entropy -sum p_T log p_S
    "reverse_kl": 1.6373906135559082,
    "tv_distance": 0.6643933057785034,
    ("skewed_forward_kl", 0.1): 2.621187925338745,  # -sum p_T log m: the KL plus H(p_T)
    ("skewed_reverse_kl", 0.1): 1.0856050252914429,
    ("skewed_forward_kl", 0.5): 1.7282708883285522,
    ("skewed_reverse_kl", 0.5): 0.37334856390953064,
}
TRL_LABELS = torch.tensor([[5, -100, 2], [0, 6, -100]])


def trl_inputs(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    k = torch.arange(2 * 3 * 7, dtype=dtype)
    return (3 * torch.sin(0.7 * k + 0.3)).reshape(2, 3, 7), (2 * torch.cos(1.3 * k)).reshape(2, 3, 7)


@pytest.mark.parametrize(("temperature", "beta"), sorted(TRL_JSD))
def test_jsd_equals_trl_generalized_jsd_loss(temperature: float, beta: float) -> None:
    student, teacher = trl_inputs(torch.float64)
    got = token_divergence(student, teacher, TRL_LABELS != -100, "jsd", temperature, beta=beta)
    assert got.item() == pytest.approx(TRL_JSD[(temperature, beta)], rel=2e-6)


def test_divergences_equal_distillm_losses() -> None:
    student, teacher = trl_inputs(torch.float32)
    mask = TRL_LABELS != -100
    p_t = torch.softmax(teacher.double(), dim=-1)
    teacher_entropy = (-(p_t * p_t.log()).sum(-1))[mask].mean().item()

    def ours(divergence: str, skew: float = 0.1) -> float:
        return token_divergence(student, teacher, mask, divergence, skew=skew).item()

    assert ours("forward_kl") + teacher_entropy == pytest.approx(DISTILLM["forward_kl"], rel=1e-6)
    assert ours("reverse_kl") == pytest.approx(DISTILLM["reverse_kl"], rel=1e-6)
    assert ours("tvd") == pytest.approx(DISTILLM["tv_distance"], rel=1e-6)
    for lam in (0.1, 0.5):
        skewed_ce = ours("skew_forward_kl", lam) + teacher_entropy
        assert skewed_ce == pytest.approx(DISTILLM[("skewed_forward_kl", lam)], rel=1e-6)
        assert ours("skew_reverse_kl", lam) == pytest.approx(DISTILLM[("skewed_reverse_kl", lam)], rel=1e-6)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_extreme_logits_give_finite_values_and_gradients(divergence: str) -> None:
    student, teacher = logits(8, scale=1e4), logits(9, scale=1e4)
    student[0, 0, 3] = teacher[0, 0, 3] = -math.inf  # a masked vocabulary entry, in both
    student[1, 2, :4] = teacher[1, 2, :4] = -math.inf
    s = student.clone().requires_grad_(True)
    got = token_divergence(s, teacher, MASK, divergence, beta=0.3, skew=0.2)
    got.backward()
    assert math.isfinite(got.item())
    assert torch.isfinite(s.grad).all()
    expected = reference(student, teacher, MASK.tolist(), divergence, beta=0.3, skew=0.2)
    assert got.item() == pytest.approx(expected, rel=1e-5, abs=1e-3)  # values ~1e4: float32 logits


def test_inf_only_in_the_student_makes_kl_inf_but_jsd_finite() -> None:
    student, teacher = logits(10), logits(11)
    student[0, 0, 0] = -math.inf  # the teacher gives this token mass, the student none
    assert token_divergence(student, teacher, MASK, "forward_kl").item() == math.inf
    s = student.clone().requires_grad_(True)
    jsd = token_divergence(s, teacher, MASK, "jsd")
    jsd.backward()
    assert jsd.item() == pytest.approx(reference(student, teacher, MASK.tolist(), "jsd"), rel=2e-6)
    assert torch.isfinite(s.grad).all()


def test_bf16_inputs_are_computed_in_float32() -> None:
    student, teacher = logits(12).bfloat16(), logits(13).bfloat16()
    got = token_divergence(student, teacher, MASK, "jsd")
    assert got.dtype == torch.float32
    expected = reference(student.float(), teacher.float(), MASK.tolist(), "jsd")  # the bf16 values, exactly
    assert got.item() == pytest.approx(expected, rel=2e-6)


def test_no_counted_token_gives_a_connected_zero() -> None:
    s = logits(14).requires_grad_(True)
    got = token_divergence(s, logits(15), torch.zeros(2, 4, dtype=torch.bool), "reverse_kl")
    got.backward()
    assert got.item() == 0.0
    assert torch.equal(s.grad, torch.zeros_like(s))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"divergence": "kl"},
            "Unknown divergence 'kl'; choose one of forward_kl, reverse_kl, jsd, tvd, skew_forward_kl, "
            "skew_reverse_kl.",
        ),
        (
            {"beta": 1.5},
            "beta must be in [0, 1] (the teacher's weight in the generalized JSD's mixture; 0 is forward KL, "
            "1 reverse KL), got 1.5.",
        ),
        (
            {"skew": 1.0},
            "skew must be in [0, 1) (the weight of the first distribution in the skew KL's mixture: 0 is "
            "plain KL, 1 makes the divergence 0 for every student), got 1.0.",
        ),
        ({"skew": -0.1}, "skew must be in [0, 1)"),
        ({"temperature": 0.0}, "temperature must be > 0 and finite, got 0.0."),
        ({"temperature": math.inf}, "temperature must be > 0 and finite, got inf."),
        (
            {"mask": torch.ones(2, 4)},
            "mask must be a bool tensor (True where the token counts), got dtype torch.float32; use "
            "mask = labels != -100.",
        ),
        (
            {"mask": torch.ones(2, 5, dtype=torch.bool)},
            "mask has shape (2, 5) but student_logits has (2, 4) positions: expected one bool per position, "
            "of shape (2, 4).",
        ),
    ],
)
def test_bad_arguments_are_refused_with_the_fix(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError) as error:
        token_divergence(logits(0), logits(1), **kwargs)
    assert str(error.value).startswith(message)


def test_different_vocabularies_are_refused_naming_both_sizes() -> None:
    with pytest.raises(ValueError) as error:
        token_divergence(logits(0), logits(1, shape=(2, 4, 11)))
    assert str(error.value) == (
        "student_logits have a vocabulary of 9 token ids but teacher_logits 11. Teacher and student must "
        "share the token ids: the causal-LM module compares them over the shared vocabulary "
        "(TokenOutputs.vocab_size, logits[..., :vocab_size]); slice both logits to it."
    )
    with pytest.raises(
        ValueError, match=r"student_logits has shape \(2, 4, 9\) but teacher_logits has shape"
    ):
        token_divergence(logits(0), logits(1, shape=(2, 3, 9)))


# ---- the closed-form gradients of the chunked and fused paths


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize(("temperature", "beta", "skew"), [(1.7, 0.3, 0.2), (1.0, 0.0, 0.0), (0.6, 1.0, 0.7)])
def test_closed_form_gradients_equal_autograd_in_float64(
    divergence: str, temperature: float, beta: float, skew: float
) -> None:
    student, teacher = logits(20, (6, 9)).double(), logits(21, (6, 9)).double()
    student[0, 3] = teacher[0, 3] = -math.inf  # a masked vocabulary entry, in both
    student[1, :4] = teacher[1, :4] = -math.inf
    student[2, 0] = student[3, 0] = 40.0  # a near one-hot student row (probabilities down to ~1e-20)
    s = student.clone().requires_grad_(True)
    settings = (divergence, temperature, beta, skew)
    expected_values = token_values.__wrapped__(s, teacher, *settings)  # without the float32 cast
    (expected,) = torch.autograd.grad(expected_values.sum(), s)
    copies = (student.clone(), teacher.clone())
    values, grads = token_values_and_grads(*copies, *settings)  # it overwrites the rows it is given
    assert values.dtype == grads.dtype == torch.float64
    assert torch.allclose(values, expected_values.detach(), rtol=1e-12, atol=1e-15)
    assert torch.allclose(grads, expected, rtol=1e-10, atol=1e-14)
    assert torch.equal(grads[0, 3], torch.zeros((), dtype=torch.float64))  # p = 0: no gradient


# ---- the plain path's closed-form gradient (a custom autograd Function)


def float64_mean(student: torch.Tensor, teacher: torch.Tensor, settings: tuple) -> torch.Tensor:
    """The masked token mean by float64 autograd through the formulas of token_values (no float32 cast)."""
    values = token_values.__wrapped__(student, teacher, *settings)
    return torch.where(MASK, values, 0.0).sum() / MASK.sum()


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize(("temperature", "beta", "skew"), [(1.0, 0.5, 0.1), (1.7, 0.3, 0.2)])
def test_plain_path_values_and_gradients_equal_float64(
    divergence: str, temperature: float, beta: float, skew: float
) -> None:
    student, teacher = logits(30), logits(31)
    student[1, 0] = math.nan  # an uncounted position's logits (e.g. padding): no effect on anything
    s = student.clone().requires_grad_(True)
    settings = (divergence, temperature, beta, skew)
    got = token_divergence(s, teacher, MASK, *settings)
    got.backward()
    expected = reference(student, teacher, MASK.tolist(), *settings)
    assert got.item() == pytest.approx(expected, rel=2e-6)
    s64 = student.nan_to_num(nan=0.0).double().requires_grad_(True)  # its autograd would carry the NaN
    (expected_grad,) = torch.autograd.grad(float64_mean(s64, teacher.double(), settings), s64)
    assert torch.equal(s.grad[1, 0], torch.zeros(9))
    assert torch.allclose(s.grad.double(), expected_grad, rtol=1e-5, atol=1e-7)


def test_plain_path_supports_a_second_backward_and_double_backward() -> None:
    student, teacher = logits(32), logits(33)
    settings = ("jsd", 1.3, 0.3, 0.1)
    s = student.clone().requires_grad_(True)
    loss = token_divergence(s, teacher, MASK, *settings)
    (first,) = torch.autograd.grad(loss, s, retain_graph=True)
    (second,) = torch.autograd.grad(loss, s)
    assert torch.equal(first, second)
    # Hessian-vector product through create_graph=True, against float64 autograd of the formulas
    direction = logits(34)
    (grad,) = torch.autograd.grad(token_divergence(s, teacher, MASK, *settings), s, create_graph=True)
    (hvp,) = torch.autograd.grad((grad * direction).sum(), s)
    s64 = student.double().requires_grad_(True)
    (grad64,) = torch.autograd.grad(float64_mean(s64, teacher.double(), settings), s64, create_graph=True)
    (hvp64,) = torch.autograd.grad((grad64 * direction.double()).sum(), s64)
    assert torch.allclose(grad.double(), grad64, rtol=1e-5, atol=1e-7)
    assert torch.allclose(hvp.double(), hvp64, rtol=1e-4, atol=1e-6)


def test_plain_path_gives_a_teacher_that_requires_grad_its_gradient() -> None:
    student, teacher = logits(35), logits(36)
    s, t = student.clone().requires_grad_(True), teacher.clone().requires_grad_(True)
    token_divergence(s, t, MASK, "skew_reverse_kl").backward()
    s64, t64 = student.double().requires_grad_(True), teacher.double().requires_grad_(True)
    float64_mean(s64, t64, ("skew_reverse_kl", 1.0, 0.5, 0.1)).backward()
    assert torch.allclose(s.grad.double(), s64.grad, rtol=1e-5, atol=1e-7)
    assert torch.allclose(t.grad.double(), t64.grad, rtol=1e-5, atol=1e-7)
