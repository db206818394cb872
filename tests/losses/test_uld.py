"""ULD (Boizard et al., 2024): the sorted-probability L1 distance against hand and float64 values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lightning_kd.losses import AlignedTokenOutputs, StepOutputs, ULDTerm
from lightning_kd.losses.base import TokenOutputs
from lightning_kd.losses.functional import uld_loss


def reference(student: np.ndarray, teacher: np.ndarray, tau_s: float = 1.0, tau_t: float = 1.0) -> np.ndarray:
    """Per-row ULD in float64 from the formula: softmax, sort decreasing, zero-pad, L1."""

    def sorted_probabilities(logits: np.ndarray, tau: float) -> np.ndarray:
        z = np.exp(logits / tau - (logits / tau).max(axis=-1, keepdims=True))
        return -np.sort(-(z / z.sum(axis=-1, keepdims=True)), axis=-1)

    p_s, p_t = sorted_probabilities(student, tau_s), sorted_probabilities(teacher, tau_t)
    size = max(p_s.shape[-1], p_t.shape[-1])
    pad = [(0, 0)] * (p_s.ndim - 1)
    p_s = np.pad(p_s, [*pad, (0, size - p_s.shape[-1])])
    p_t = np.pad(p_t, [*pad, (0, size - p_t.shape[-1])])
    return np.abs(p_s - p_t).sum(axis=-1)


def test_hand_value_with_vocabularies_of_three_and_two() -> None:
    # student p = (1/6, 2/6, 3/6) -> sorted (1/2, 1/3, 1/6); teacher (1/2, 1/2) -> padded (1/2, 1/2, 0)
    student = torch.log(torch.tensor([[1.0, 2.0, 3.0]]))
    teacher = torch.zeros(1, 2)
    assert uld_loss(student, teacher).item() == pytest.approx(0 + 1 / 6 + 1 / 6, abs=1e-6)
    # the order of the ids does not matter, only the sorted values: a permuted teacher gives the same
    assert uld_loss(student, torch.log(torch.tensor([[3.0, 1.0, 2.0]]))).item() == pytest.approx(0, abs=1e-6)
    # one-hot against uniform over 4: |1 - 1/4| + 3 * 1/4 = 1.5
    one_hot = torch.tensor([[0.0, -math.inf, -math.inf, -math.inf]])
    assert uld_loss(one_hot, torch.zeros(1, 4)).item() == pytest.approx(1.5, abs=1e-6)


def test_temperatures_soften_each_side_separately() -> None:
    # at tau_s = 2 the student's logits log(1), log(4) give p proportional to (1, 2): (1/3, 2/3);
    # the teacher's log(1), log(2) at tau_t = 1 give the same: the loss is 0
    student = torch.log(torch.tensor([[1.0, 4.0]]))
    teacher = torch.log(torch.tensor([[1.0, 2.0]]))
    assert uld_loss(student, teacher, student_temperature=2.0).item() == pytest.approx(0, abs=1e-6)
    # at tau_s = 1: (1/5, 4/5) vs (1/3, 2/3): 2 * (4/5 - 2/3) = 4/15
    assert uld_loss(student, teacher).item() == pytest.approx(4 / 15, abs=1e-6)
    assert uld_loss(student, teacher, teacher_temperature=0.5).item() == pytest.approx(
        float(reference(student.double().numpy(), teacher.double().numpy(), 1.0, 0.5)[0]), abs=1e-7
    )


def test_masked_mean_and_gradient_match_float64() -> None:
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(2, 3, 7, generator=generator, dtype=torch.float64) * 2
    teacher = torch.randn(2, 3, 5, generator=generator, dtype=torch.float64) * 2
    mask = torch.tensor([[True, False, True], [True, True, False]])
    per_row = reference(student.numpy(), teacher.numpy(), 1.5, 0.8)
    expected = per_row[mask.numpy()].mean()
    leaf = student.float().requires_grad_()
    value = uld_loss(leaf, teacher.float(), mask, student_temperature=1.5, teacher_temperature=0.8)
    assert value.item() == pytest.approx(expected, abs=1e-6)
    value.backward()
    # d/dp_s[v] = sign(p_s[v] - p_t sorted at v's rank); through softmax/tau: p * (g - <g, p>) / tau
    s = student.numpy() / 1.5
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    t = teacher.numpy() / 0.8
    q = np.exp(t - t.max(-1, keepdims=True))
    q = -np.sort(-q / q.sum(-1, keepdims=True), axis=-1)
    q = np.pad(q, [(0, 0), (0, 0), (0, 2)])
    ranks = np.argsort(np.argsort(-p, axis=-1), axis=-1)
    g = np.sign(p - np.take_along_axis(q, ranks, axis=-1))
    grad = p * (g - (g * p).sum(-1, keepdims=True)) / 1.5
    grad = grad * mask.numpy()[..., None] / mask.sum().item()
    np.testing.assert_allclose(leaf.grad.double().numpy(), grad, atol=1e-6)


def test_no_counted_position_gives_zero_connected_to_the_graph() -> None:
    student = torch.randn(1, 2, 4, requires_grad=True)
    value = uld_loss(student, torch.randn(1, 2, 6), torch.zeros(1, 2, dtype=torch.bool))
    value.backward()
    assert value.item() == 0 and torch.equal(student.grad, torch.zeros_like(student))


def test_bf16_inputs_are_computed_in_float32() -> None:
    student = torch.log(torch.tensor([[1.0, 2.0, 3.0]])).bfloat16()
    value = uld_loss(student, torch.zeros(1, 2, dtype=torch.bfloat16))
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(1 / 3, abs=1e-2)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"teacher_logits": torch.zeros(2, 4, 5)},
            r"student_logits have shape \(2, 3, 5\) but teacher_logits \(2, 4, 5\): ULD compares the same "
            r"positions",
        ),
        ({"mask": torch.ones(2, 3)}, r"mask must be a bool tensor"),
        ({"mask": torch.ones(2, 4, dtype=torch.bool)}, r"mask has shape \(2, 4\) but student_logits has"),
        ({"student_temperature": 0.0}, r"student_temperature must be > 0 and finite, got 0.0"),
        ({"teacher_temperature": math.nan}, r"teacher_temperature must be > 0 and finite, got nan"),
    ],
)
def test_bad_inputs_name_the_fix(kwargs: dict, message: str) -> None:
    arguments = {"student_logits": torch.zeros(2, 3, 5), "teacher_logits": torch.zeros(2, 3, 9), **kwargs}
    with pytest.raises(ValueError, match=message):
        uld_loss(**arguments)


def test_term_reads_the_aligned_positions_or_the_mask_with_one_tokenizer() -> None:
    generator = torch.Generator().manual_seed(1)
    student = torch.randn(1, 3, 6, generator=generator)
    teacher = torch.randn(1, 3, 4, generator=generator)
    mask = torch.tensor([[True, True, True]])
    aligned = torch.tensor([[True, False, True]])
    per_row = reference(student.double().numpy(), teacher.double().numpy(), 2.0, 1.0)[0]
    term = ULDTerm("uld", student_temperature=2.0)
    tokens = AlignedTokenOutputs(
        mask, torch.zeros(1, 3, dtype=torch.long), 6, student, teacher, aligned=aligned
    )
    value = term(StepOutputs(student, tokens=tokens))
    # summed over the aligned positions, per counted token (the unaligned one counts 0)
    assert value.item() == pytest.approx((per_row[0] + per_row[2]) / 3, abs=1e-6)
    plain = TokenOutputs(mask, torch.zeros(1, 3, dtype=torch.long), 6, student, teacher)
    assert term(StepOutputs(student, tokens=plain)).item() == pytest.approx(per_row.mean(), abs=1e-6)
    with pytest.raises(ValueError, match=r"Loss term 'uld' reads the shifted tokens of a causal-LM step"):
        term(StepOutputs(student))
    with pytest.raises(ValueError, match=r"teacher_temperature must be > 0 and finite, got -1"):
        ULDTerm(teacher_temperature=-1)


def test_the_terms_token_sums_over_micro_batches_make_the_global_batchs_mean_over_counted_tokens() -> None:
    # the module backpropagates value * counted tokens of each micro-batch and divides by the global
    # count: with aligned fractions that differ between micro-batches, that must be the float64 sum
    # of the aligned distances over the counted tokens of the whole batch
    generator = torch.Generator().manual_seed(3)
    student, teacher = torch.randn(4, 5, 6, generator=generator), torch.randn(4, 5, 4, generator=generator)
    mask = torch.rand(4, 5, generator=generator) < 0.9
    aligned = mask & (torch.rand(4, 5, generator=generator) < torch.tensor([[0.2], [0.9], [0.5], [1.0]]))
    term = ULDTerm("uld")
    token_sums = 0.0
    for rows in (slice(0, 1), slice(1, 4)):  # micro-batches of 1 and 3 rows
        tokens = AlignedTokenOutputs(
            mask[rows],
            torch.zeros_like(mask[rows], dtype=torch.long),
            6,
            student[rows],
            teacher[rows],
            aligned=aligned[rows],
        )
        token_sums += term(StepOutputs(student[rows], tokens=tokens)).double() * mask[rows].sum()
    per_position = reference(student.double().numpy(), teacher.double().numpy(), 1.0, 1.0)
    expected = per_position[aligned.numpy()].sum() / mask.sum().item()
    assert float(token_sums / mask.sum()) == pytest.approx(expected, abs=1e-6)
