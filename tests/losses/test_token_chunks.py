"""The chunked and fused LM-head paths against the plain one; the token terms on hand-built steps."""

from __future__ import annotations

import importlib

import pytest
import torch
from torch import Tensor, nn

from lightning_kd import StepOutputs, TokenCrossEntropyTerm, TokenDivergenceTerm
from lightning_kd.losses.base import TokenOutputs
from lightning_kd.losses.functional import (
    token_cross_entropy,
    token_cross_entropy_fused,
    token_divergence,
    token_divergence_chunked,
    token_divergence_fused,
)
from lightning_kd.losses.token_cross_entropy import cross_entropy_values_and_grads
from lightning_kd.losses.token_divergence import DIVERGENCES

N, L, H, HT, V = 2, 5, 6, 4, 11
MASK = torch.tensor([[True, True, False, True, True], [False, True, True, True, False]])
SETTINGS = {"temperature": 1.7, "beta": 0.3, "skew": 0.2}


def randn(*shape: int, seed: int, scale: float = 1.0) -> Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


def rel_err(got: Tensor, expected: Tensor) -> float:
    """max |got - expected| / max |expected|: a gradient's relative error, in its largest entry's units."""
    return ((got - expected).abs().max() / expected.abs().max()).item()


def student_parts() -> list[Tensor]:
    """Hidden states, LM-head weight and bias of a student, leaf tensors that take gradients."""
    return [t.requires_grad_(True) for t in (randn(N, L, H, seed=0), randn(V, H, seed=1), randn(V, seed=2))]


def plain_loss(hidden: Tensor, weight: Tensor, bias: Tensor, teacher: Tensor, divergence: str) -> Tensor:
    return token_divergence(hidden @ weight.T + bias, teacher, MASK, divergence, **SETTINGS)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_chunked_and_fused_gradients_equal_the_plain_path(divergence: str) -> None:
    teacher = randn(N, L, V, seed=3, scale=2.0)
    parts = student_parts()
    plain = plain_loss(*parts, teacher, divergence)
    expected = torch.autograd.grad(plain, parts)

    logits = (parts[0] @ parts[1].T + parts[2]).detach().requires_grad_(True)
    (expected_logits,) = torch.autograd.grad(
        token_divergence(logits, teacher, MASK, divergence, **SETTINGS), logits
    )
    chunked = token_divergence_chunked(logits, teacher, MASK, divergence, chunk_size=3, **SETTINGS)
    (chunked_grad,) = torch.autograd.grad(chunked, logits)
    assert chunked.item() == pytest.approx(plain.item(), rel=1e-6)
    assert rel_err(chunked_grad, expected_logits) <= 1e-5

    fused = token_divergence_fused(
        *parts, teacher_logits=teacher, mask=MASK, divergence=divergence, chunk_size=4, **SETTINGS
    )
    assert fused.item() == pytest.approx(plain.item(), rel=1e-6)
    for got, want in zip(torch.autograd.grad(fused, parts), expected, strict=True):
        assert rel_err(got, want) <= 1e-5


def test_fused_with_the_teachers_head_and_a_padded_vocabulary() -> None:
    # Both heads have V + 3 rows (padded embeddings); the divergence is over the first V token ids.
    parts = [randn(N, L, H, seed=4), randn(V + 3, H, seed=5), randn(V + 3, seed=6)]
    parts = [t.requires_grad_(True) for t in parts]
    t_hidden, t_weight, t_bias = randn(N, L, HT, seed=7), randn(V + 3, HT, seed=8), randn(V + 3, seed=9)
    teacher = (t_hidden @ t_weight.T + t_bias)[..., :V]
    plain = token_divergence((parts[0] @ parts[1].T + parts[2])[..., :V], teacher, MASK, "jsd", **SETTINGS)
    expected = torch.autograd.grad(plain, parts)
    fused = token_divergence_fused(
        *parts,
        teacher_hidden=t_hidden,
        teacher_weight=t_weight,
        teacher_bias=t_bias,
        mask=MASK,
        vocab_size=V,
        divergence="jsd",
        chunk_size=3,
        **SETTINGS,
    )
    assert fused.item() == pytest.approx(plain.item(), rel=1e-6)
    got = torch.autograd.grad(fused, parts)
    for g, want in zip(got, expected, strict=True):
        assert rel_err(g, want) <= 1e-5
    assert torch.equal(got[1][V:], torch.zeros(3, H)) and torch.equal(got[2][V:], torch.zeros(3))


def test_chunked_path_keeps_bf16_logits_and_their_gradient_in_bf16() -> None:
    logits = randn(N, L, V, seed=10).bfloat16().requires_grad_(True)
    teacher = randn(N, L, V, seed=11).bfloat16()
    chunked = token_divergence_chunked(logits, teacher, MASK, "reverse_kl", chunk_size=4)
    (grad,) = torch.autograd.grad(chunked, logits)
    exact = logits.detach().float().requires_grad_(True)  # the bf16 values, in float32
    plain = token_divergence(exact, teacher.float(), MASK, "reverse_kl")
    (expected,) = torch.autograd.grad(plain, exact)
    assert chunked.dtype == torch.float32 and chunked.item() == pytest.approx(plain.item(), rel=1e-6)
    assert grad.dtype == torch.bfloat16
    assert rel_err(grad.float(), expected) <= 2**-8  # the float32 gradient, rounded once to bf16


def test_no_counted_token_gives_a_connected_zero_on_every_path() -> None:
    none = torch.zeros(N, L, dtype=torch.bool)
    parts = student_parts()
    teacher = randn(N, L, V, seed=12)
    fused = token_divergence_fused(*parts, teacher_logits=teacher, mask=none, divergence="tvd")
    logits = randn(N, L, V, seed=13).requires_grad_(True)
    chunked = token_divergence_chunked(logits, teacher, none, "tvd")
    for loss, inputs in ((fused, parts), (chunked, [logits])):
        assert loss.item() == 0.0
        assert all(torch.equal(g, torch.zeros_like(g)) for g in torch.autograd.grad(loss, inputs))


def test_cross_entropy_paths_equal_torch_cross_entropy() -> None:
    targets = torch.randint(0, V, (N, L), generator=torch.Generator().manual_seed(14))
    targets[0, 0] = -100  # a token without a label: left out, as one outside the mask
    parts = student_parts()
    logits = parts[0] @ parts[1].T + parts[2]
    counted = MASK & (targets != -100)
    expected_value = nn.functional.cross_entropy(logits[counted], targets[counted])
    expected = torch.autograd.grad(expected_value, parts, retain_graph=True)
    plain = token_cross_entropy(logits, targets, MASK)
    chunked = token_cross_entropy(logits, targets, MASK, path="chunked", chunk_size=3)
    fused = token_cross_entropy_fused(*parts, targets, MASK, chunk_size=4)
    for loss in (plain, chunked, fused):
        assert loss.item() == pytest.approx(expected_value.item(), rel=1e-6)
        for got, want in zip(torch.autograd.grad(loss, parts, retain_graph=True), expected, strict=True):
            assert rel_err(got, want) <= 1e-5


def test_cross_entropy_closed_form_gradient_equals_autograd_in_float64() -> None:
    student = randn(6, V, seed=30, scale=3.0).double()
    targets = torch.tensor([0, 10, -100, 4, 4, -100])
    s = student.clone().requires_grad_(True)
    expected_values = nn.functional.cross_entropy(s, targets, reduction="none", ignore_index=-100)
    (expected,) = torch.autograd.grad(expected_values.sum(), s)
    values, grads = cross_entropy_values_and_grads(student.clone(), targets)  # it overwrites the logits
    assert torch.allclose(values, expected_values.detach(), rtol=1e-12, atol=0.0)
    assert torch.allclose(grads, expected, rtol=1e-12, atol=1e-16)
    assert torch.equal(grads[2], torch.zeros(V, dtype=torch.float64))  # no target: no gradient


def test_fused_path_keeps_bf16_hidden_states_and_head_and_their_gradients_in_bf16() -> None:
    parts = [
        randn(N, L, H, seed=31).bfloat16(),
        randn(V, H, seed=32).bfloat16(),
        randn(V, seed=33).bfloat16(),
    ]
    parts = [t.requires_grad_(True) for t in parts]
    teacher = randn(N, L, V, seed=34).bfloat16()
    fused = token_divergence_fused(*parts, teacher_logits=teacher, mask=MASK, divergence="jsd", chunk_size=4)
    got = torch.autograd.grad(fused, parts)
    exact = [t.detach().float().requires_grad_(True) for t in parts]  # the bf16 values, in float32
    plain = token_divergence(exact[0] @ exact[1].T + exact[2], teacher.float(), MASK, "jsd")
    assert fused.dtype == torch.float32 and fused.item() == pytest.approx(plain.item(), rel=1e-6)
    for g, want in zip(got, torch.autograd.grad(plain, exact), strict=True):
        assert g.dtype == torch.bfloat16
        assert rel_err(g.float(), want) <= 2**-8  # the float32 gradient, rounded once to bf16


def test_fused_gradients_follow_the_outer_gradient_and_skip_frozen_and_teacher_tensors() -> None:
    hidden, weight = randn(N, L, H, seed=35).requires_grad_(True), randn(V, H, seed=36)  # a frozen head
    t_hidden, t_weight = randn(N, L, HT, seed=37).requires_grad_(True), randn(V, HT, seed=38)
    teacher = t_hidden.detach() @ t_weight.T
    plain = token_divergence(hidden @ weight.T, teacher, MASK, "reverse_kl", **SETTINGS)
    (expected,) = torch.autograd.grad(plain, hidden)
    fused = token_divergence_fused(
        hidden,
        weight,
        teacher_hidden=t_hidden,
        teacher_weight=t_weight,
        mask=MASK,
        divergence="reverse_kl",
        chunk_size=3,
        **SETTINGS,
    )
    (2.5 * fused + hidden.sum()).backward()  # scaled, and beside another use of the hidden states
    assert rel_err(hidden.grad, 2.5 * expected + 1.0) <= 1e-5
    assert t_hidden.grad is None and weight.grad is None


def test_a_second_backward_or_a_double_backward_is_refused_with_the_fix() -> None:
    logits, teacher = randn(N, L, V, seed=39).requires_grad_(True), randn(N, L, V, seed=40)
    (expected,) = torch.autograd.grad(token_divergence(logits, teacher, MASK, "tvd"), logits)
    loss = token_divergence_chunked(logits, teacher, MASK, "tvd", chunk_size=3)
    (first,) = torch.autograd.grad(loss, logits, retain_graph=True)
    assert rel_err(first, expected) <= 1e-5  # the first backward is served
    with pytest.raises(RuntimeError) as error:
        torch.autograd.grad(loss, logits)
    assert str(error.value) == (
        "The chunked and fused token losses compute their gradients in forward and hand them over once: "
        "this is a second backward through the same loss (retain_graph=True). Compute the loss again, or "
        "use path='plain', to differentiate it twice."
    )
    parts = student_parts()
    targets = torch.zeros(N, L, dtype=torch.long)
    with pytest.raises(RuntimeError, match=r"do not support double backward \(create_graph=True\)"):
        torch.autograd.grad(token_cross_entropy_fused(*parts, targets), parts, create_graph=True)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_chunked_path_leaves_the_logits_as_they_were_keeps_a_counted_nan_and_ignores_a_padded_one(
    divergence: str,
) -> None:
    logits, teacher = randn(N, L, V, seed=42).requires_grad_(True), randn(N, L, V, seed=43)
    before = (logits.detach().clone(), teacher.clone())
    loss = token_divergence_chunked(logits, teacher, MASK, divergence, chunk_size=3, **SETTINGS)
    torch.autograd.grad(loss, logits)
    assert torch.equal(logits.detach(), before[0]) and torch.equal(teacher, before[1])  # rows are copies
    nan_logits = before[0].clone()
    nan_logits[0, 1, 2] = float("nan")  # a counted position
    nan_logits.requires_grad_(True)
    plain = token_divergence(nan_logits, teacher, MASK, divergence, **SETTINGS)
    chunked = token_divergence_chunked(nan_logits, teacher, MASK, divergence, chunk_size=3, **SETTINGS)
    assert plain.isnan() and chunked.isnan()
    assert torch.autograd.grad(chunked, nan_logits)[0][0, 1].isnan().all()
    padded = before[0].clone()
    padded[0, 2] = float("nan")  # an uncounted position: its NaN changes nothing on the chunked path
    padded.requires_grad_(True)
    chunked = token_divergence_chunked(padded, teacher, MASK, divergence, chunk_size=3, **SETTINGS)
    (got,) = torch.autograd.grad(chunked, padded)
    expected = token_divergence(before[0].requires_grad_(True), teacher, MASK, divergence, **SETTINGS)
    assert chunked.item() == pytest.approx(expected.item(), rel=1e-6)
    assert rel_err(got, torch.autograd.grad(expected, before[0])[0]) <= 1e-5


def test_without_grad_mode_only_the_value_is_computed(monkeypatch: pytest.MonkeyPatch) -> None:
    parts, teacher = student_parts(), randn(N, L, V, seed=41)
    with_grad = token_divergence_fused(
        *parts, teacher_logits=teacher, mask=MASK, divergence="skew_forward_kl"
    )

    def no_gradients(*args: object) -> None:
        raise AssertionError("gradients computed without grad mode")

    module = importlib.import_module("lightning_kd.losses.token_divergence")
    monkeypatch.setattr(module, "token_values_and_grads", no_gradients)
    with torch.no_grad():
        without = token_divergence_fused(
            *parts, teacher_logits=teacher, mask=MASK, divergence="skew_forward_kl"
        )
    assert without.grad_fn is None and without.item() == pytest.approx(with_grad.item(), rel=1e-6)


def test_path_arguments_are_checked() -> None:
    logits, teacher = randn(N, L, V, seed=15), randn(N, L, V, seed=16)
    with pytest.raises(ValueError, match=r"^chunk_size must be a whole number >= 1 \(positions per chunk"):
        token_divergence_chunked(logits, teacher, chunk_size=0)
    parts = student_parts()
    with pytest.raises(
        ValueError, match=r"^Give the teacher's logits, or its hidden states and LM-head weight"
    ):
        token_divergence_fused(*parts)
    with pytest.raises(ValueError) as error:
        token_divergence_fused(*parts, teacher_logits=randn(N, L, V + 1, seed=17))
    assert str(error.value).startswith(
        "The student's LM head has a vocabulary of 11 token ids but the teacher's 12. Teacher and student"
    )
    assert str(error.value).endswith("(here: pass vocab_size).")
    with pytest.raises(
        ValueError, match=r"hidden states have shape \(2, 5, 6\) but its LM head weight \(11, 7\)"
    ):
        token_divergence_fused(parts[0], randn(V, 7, seed=18), teacher_logits=teacher)
    with pytest.raises(ValueError, match=r"^Unknown path 'fused' for logits; choose plain or chunked"):
        token_cross_entropy(logits, torch.zeros(N, L, dtype=torch.long), path="fused")
    with pytest.raises(
        ValueError, match=r"^targets have shape \(2, 5\) and dtype torch.float32: expected integer"
    ):
        token_cross_entropy(logits, torch.zeros(N, L))


# ---- the terms, on hand-built steps


def token_step(fused: bool) -> tuple[StepOutputs, list[Tensor], Tensor, Tensor, nn.Linear]:
    """A step with V + 2 student logits (a padded embedding), V + 1 teacher logits, vocab_size V."""
    s_hidden = randn(N, L, H, seed=20).requires_grad_(True)
    s_head, t_head = nn.Linear(H, V + 2), nn.Linear(HT, V + 1)
    t_hidden = randn(N, L, HT, seed=21)
    targets = torch.where(
        MASK, torch.randint(0, V, (N, L), generator=torch.Generator().manual_seed(22)), -100
    )
    student_logits, teacher_logits = s_head(s_hidden), t_head(t_hidden)
    tokens = TokenOutputs(
        mask=MASK,
        targets=targets,
        vocab_size=V,
        student_logits=None if fused else student_logits,
        teacher_logits=None if fused else teacher_logits,
        student_hidden=s_hidden if fused else None,
        teacher_hidden=t_hidden if fused else None,
        student_head=s_head if fused else None,
        teacher_head=t_head if fused else None,
    )
    outputs = StepOutputs(student_logits=torch.zeros(0), tokens=tokens)
    student_parts = [s_hidden, s_head.weight, s_head.bias]
    return outputs, student_parts, student_logits[..., :V], teacher_logits[..., :V], t_head


@pytest.mark.parametrize("path", ["plain", "chunked", "fused"])
def test_divergence_term_on_every_path_equals_the_function_on_the_shared_vocabulary(path: str) -> None:
    outputs, parts, student, teacher, t_head = token_step(fused=path == "fused")
    term = TokenDivergenceTerm(
        divergence="skew_reverse_kl", temperature=2.0, skew=0.3, path=path, chunk_size=3
    )
    assert term.reads_hidden_states == (path == "fused") and term.needs_teacher
    expected_value = token_divergence(student, teacher.detach(), MASK, "skew_reverse_kl", 2.0, skew=0.3)
    expected = torch.autograd.grad(expected_value, parts, retain_graph=True)
    got = term(outputs)
    assert got.item() == pytest.approx(expected_value.item(), rel=1e-6)
    *grads, teacher_grad = torch.autograd.grad(got, [*parts, t_head.weight], allow_unused=True)
    for g, want in zip(grads, expected, strict=True):
        assert rel_err(g, want) <= 1e-5
    assert teacher_grad is None  # the teacher's values are detached


@pytest.mark.parametrize("path", ["plain", "chunked", "fused"])
def test_cross_entropy_term_on_every_path(path: str) -> None:
    outputs, _, student, _, _ = token_step(fused=path == "fused")
    term = TokenCrossEntropyTerm(path=path, chunk_size=4)
    assert not term.needs_teacher and term.reads_hidden_states == (path == "fused")
    targets = outputs.tokens.targets
    expected = nn.functional.cross_entropy(student[MASK], targets[MASK])
    assert term(outputs).item() == pytest.approx(expected.item(), rel=1e-6)


def test_terms_without_tokens_or_inputs_say_what_to_do() -> None:
    with pytest.raises(ValueError) as error:
        TokenDivergenceTerm()(StepOutputs(student_logits=torch.zeros(2, 3)))
    assert str(error.value) == (
        "Loss term 'token_kd' reads the shifted tokens of a causal-LM step (StepOutputs.tokens), but this "
        "step has none: train it with the causal-LM distillation module (lightning_kd.language), which "
        "fills them."
    )
    plain_step, *_ = token_step(fused=False)
    with pytest.raises(ValueError) as error:
        TokenCrossEntropyTerm(path="fused")(plain_step)
    assert str(error.value) == (
        "Loss term 'token_ce' (path='fused') needs the student's hidden states, but the step has none: the "
        "causal-LM module fills hidden states and LM heads for terms with reads_hidden_states."
    )
    plain_step.tokens.vocab_size = V + 2  # more shared ids than the teacher's V + 1 logits
    with pytest.raises(
        ValueError, match=r"^The teacher's logits have 12 token ids but TokenOutputs.vocab_size is 13"
    ):
        TokenDivergenceTerm()(plain_step)
    with pytest.raises(ValueError, match=r"^Unknown path 'fast'; choose one of plain, chunked, fused\.$"):
        TokenDivergenceTerm(path="fast")
    with pytest.raises(ValueError, match=r"^Unknown divergence 'kl'"):
        TokenDivergenceTerm(divergence="kl")
