r"""Token-level divergences between a student's and a teacher's next-token distributions.

For every counted position :math:`i` of a causal LM, :math:`p_T` and :math:`p_S` are the softmaxes
of the teacher's and student's logits at temperature :math:`\tau`; the loss is the mean over counted
positions of a divergence :math:`D(p_T, p_S)` summed over the vocabulary (no :math:`\tau^2` factor,
the convention of LLM distillation):

- ``forward_kl``: :math:`\mathrm{KL}(p_T \| p_S)` (word-level KD, Kim & Rush, EMNLP 2016);
- ``reverse_kl``: :math:`\mathrm{KL}(p_S \| p_T)` (MiniLLM, Gu et al., ICLR 2024);
- ``jsd``: the generalized JSD of GKD (Agarwal et al., "On-Policy Distillation of Language
  Models", ICLR 2024, Eq. 1), :math:`\beta \mathrm{KL}(p_T \| m) + (1 - \beta) \mathrm{KL}(p_S \| m)`
  with :math:`m = \beta p_T + (1 - \beta) p_S`; as in TRL's ``GKDTrainer.generalized_jsd_loss``,
  :math:`\beta = 0` *is* forward KL and :math:`\beta = 1` reverse KL (the formula itself tends to 0
  at both ends);
- ``tvd``: :math:`\tfrac12 \sum_v |p_T - p_S|` (Wen et al., "f-Divergence Minimization for
  Sequence-Level Knowledge Distillation", ACL 2023);
- ``skew_forward_kl``: :math:`\mathrm{KL}(p_T \| \alpha p_T + (1 - \alpha) p_S)` and
  ``skew_reverse_kl``: :math:`\mathrm{KL}(p_S \| \alpha p_S + (1 - \alpha) p_T)`, skew :math:`\alpha`
  (DistiLLM, Ko et al., ICML 2024; their ``skewed_forward_kl`` returns the cross-entropy
  :math:`-\sum p_T \log m`, which is this KL plus the teacher's entropy: same gradient).

Three paths compute the same per-token values (:func:`token_values`): the plain one on ``(N, L, V)``
logits, :func:`token_divergence_chunked` (chunks of positions) and :func:`token_divergence_fused`
(logits formed chunk by chunk from the last hidden states and the LM heads, never the student's full
logits); the last two compute each chunk's gradient in forward, in closed form
(:func:`token_values_and_grads`); see :mod:`lightning_kd.losses._token_chunks`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_kd.losses._token_chunks import (
    ALIGNMENT_HINT,
    DEFAULT_CHUNK_SIZE,
    ChunkValues,
    DecodedRows,
    LogitRows,
    Rows,
    checked_chunk_size,
    checked_decoded_rows,
    chunked_token_mean,
    head_parameters,
    head_rows,
)
from lightning_kd.losses._token_gradients import token_values_and_grads
from lightning_kd.losses.base import LossTerm, StepOutputs, TokenOutputs, checked_temperature
from lightning_kd.precision import float32_math

__all__ = [
    "DIVERGENCES",
    "PATHS",
    "TokenDivergenceTerm",
    "TokenTerm",
    "token_divergence",
    "token_divergence_chunked",
    "token_divergence_fused",
    "token_values",
    "token_values_and_grads",
]

#: the divergences :func:`token_divergence` computes.
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tvd", "skew_forward_kl", "skew_reverse_kl")
#: how :class:`TokenDivergenceTerm` and :class:`~lightning_kd.TokenCrossEntropyTerm` compute their loss.
PATHS = ("plain", "chunked", "fused")


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    r""":math:`\sum_v p_v (\log p_v - \log q_v)` over the last dimension; 0 where :math:`p_v = 0`.

    Entries with :math:`\log p_v = -\infty` are left out with their gradient (no ``0 * inf``); where
    :math:`q_v = 0 < p_v` the divergence is ``inf``, as it is.
    """
    support = ~torch.isneginf(log_p)
    log_p = torch.where(support, log_p, 0.0)
    log_q = torch.where(support, log_q, 0.0)
    return torch.where(support, log_p.exp() * (log_p - log_q), 0.0).sum(dim=-1)


def _log_mixture(log_a: Tensor, log_b: Tensor, weight: float) -> Tensor:
    r""":math:`\log(w\, a + (1 - w)\, b)` by ``logsumexp`` of log-probabilities; ``-inf`` where both are 0."""
    if weight == 0.0:
        return log_b
    if weight == 1.0:
        return log_a
    both_zero = torch.isneginf(log_a) & torch.isneginf(log_b)
    stacked = torch.stack([log_a + math.log(weight), log_b + math.log1p(-weight)])
    mixed = torch.logsumexp(torch.where(both_zero, 0.0, stacked), dim=0)
    return torch.where(both_zero, -math.inf, mixed)


@float32_math
def token_values(
    student_logits: Tensor,
    teacher_logits: Tensor,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    skew: float = 0.1,
) -> Tensor:
    """The divergence of every position: ``(..., V)`` logits -> ``(...)`` float32 values.

    The per-token math that all three paths share; arguments as in :func:`token_divergence`
    (checked there, not here).
    """
    log_p_s = F.log_softmax(student_logits / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher_logits / temperature, dim=-1)
    if divergence == "forward_kl" or (divergence == "jsd" and beta == 0.0):
        return _kl(log_p_t, log_p_s)
    if divergence == "reverse_kl" or (divergence == "jsd" and beta == 1.0):
        return _kl(log_p_s, log_p_t)
    if divergence == "jsd":
        log_m = _log_mixture(log_p_t, log_p_s, beta)
        return beta * _kl(log_p_t, log_m) + (1 - beta) * _kl(log_p_s, log_m)
    if divergence == "tvd":
        return 0.5 * (log_p_t.exp() - log_p_s.exp()).abs().sum(dim=-1)
    if divergence == "skew_forward_kl":
        return _kl(log_p_t, _log_mixture(log_p_t, log_p_s, skew))
    return _kl(log_p_s, _log_mixture(log_p_s, log_p_t, skew))  # skew_reverse_kl


def check_divergence_settings(divergence: str, temperature: float, beta: float, skew: float) -> None:
    """A ``ValueError`` that names the fix unless the divergence is known and its settings in range."""
    if divergence not in DIVERGENCES:
        raise ValueError(f"Unknown divergence {divergence!r}; choose one of {', '.join(DIVERGENCES)}.")
    checked_temperature(temperature)
    if not 0.0 <= beta <= 1.0:
        raise ValueError(
            f"beta must be in [0, 1] (the teacher's weight in the generalized JSD's mixture; 0 is forward "
            f"KL, 1 reverse KL), got {beta}."
        )
    if not 0.0 <= skew < 1.0:
        raise ValueError(
            f"skew must be in [0, 1) (the weight of the first distribution in the skew KL's mixture: 0 is "
            f"plain KL, 1 makes the divergence 0 for every student), got {skew}."
        )


def check_token_mask(mask: Tensor | None, positions: tuple[int, ...], what: str) -> None:
    """A ``ValueError`` unless ``mask`` is None or a bool tensor of shape ``positions``."""
    if mask is None:
        return
    if mask.dtype != torch.bool:
        raise ValueError(
            f"mask must be a bool tensor (True where the token counts), got dtype {mask.dtype}; "
            "use mask = labels != -100."
        )
    if tuple(mask.shape) != positions:
        raise ValueError(
            f"mask has shape {tuple(mask.shape)} but {what} has {positions} positions: expected one "
            f"bool per position, of shape {positions}."
        )


def _check_pair(student_logits: Tensor, teacher_logits: Tensor) -> None:
    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise ValueError(
            f"student_logits have a vocabulary of {student_logits.shape[-1]} token ids but teacher_logits "
            f"{teacher_logits.shape[-1]}. {ALIGNMENT_HINT}"
        )
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits has shape {tuple(student_logits.shape)} but teacher_logits has shape "
            f"{tuple(teacher_logits.shape)}: both must hold the same (N, L) positions of one batch."
        )


def _flat_mask(mask: Tensor | None, positions: tuple[int, ...], device: torch.device) -> Tensor:
    count = math.prod(positions)
    return torch.ones(count, dtype=torch.bool, device=device) if mask is None else mask.reshape(count)


class _ClosedFormTokenMean(torch.autograd.Function):
    r"""The plain path's token mean with the closed-form gradient of :func:`token_values_and_grads`.

    The forward computes the per-token values and :math:`\partial D_i / \partial s_i` in one go on
    float32 copies of the ``(P, V)`` logits, masks them and divides by the count; the backward only
    scales that gradient (autograd through :func:`token_values` would save and revisit a dozen
    ``(P, V)`` intermediates: 2-6x the CPU time, most for the JSD and the skew KLs). A second
    backward (``retain_graph=True``) reuses it; a double backward (``create_graph=True``)
    differentiates :func:`token_values` by autograd instead, so the plain path keeps both.
    Uncounted positions get a zero gradient, even where their logits are not finite.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        student_logits: Tensor,
        teacher_logits: Tensor,
        mask: Tensor,
        settings: tuple[str, float, float, float],
    ) -> Tensor:
        vocab_size = student_logits.shape[-1]
        rows = (t.detach().reshape(-1, vocab_size).clone() for t in (student_logits, teacher_logits))
        values, grads = token_values_and_grads(*rows, *settings)  # overwrites the copies
        count = mask.sum().clamp_min(1)
        grads = grads.masked_fill_(~mask[:, None], 0.0).div_(count)
        ctx.grads = grads.view(student_logits.shape)
        ctx.settings = settings
        ctx.save_for_backward(student_logits, teacher_logits, mask)
        return torch.where(mask, values, 0.0).sum() / count

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        if not torch.is_grad_enabled():
            return ctx.grads * grad_output, None, None, None
        student_logits, teacher_logits, mask = ctx.saved_tensors  # double backward: autograd's formula
        values = token_values(student_logits, teacher_logits, *ctx.settings).reshape(mask.shape)
        mean = torch.where(mask, values, 0.0).sum() / mask.sum().clamp_min(1)
        (grads,) = torch.autograd.grad(mean, student_logits, grad_output, create_graph=True)
        return grads, None, None, None


@float32_math
def token_divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None = None,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    skew: float = 0.1,
) -> Tensor:
    r"""Mean over counted tokens of a divergence between teacher and student next-token distributions.

    See the module docstring for the divergences and their papers. Both logits are softmaxed at
    ``temperature`` (no :math:`\tau^2` factor), the divergence is summed over the vocabulary and
    averaged over the positions where ``mask`` is True. Computed in float32 in log space: entries of
    ``-inf`` logits (a masked vocabulary) have probability 0 and add nothing; a KL whose second
    distribution is 0 where the first is not is ``inf``, as it is (JSD, TVD and the skew KLs stay
    finite).

    Args:
        student_logits: ``(N, L, V)`` (any ``(..., V)``).
        teacher_logits: the same shape (detach it yourself: the gradient reaches both).
        mask: ``(N, L)`` bool, True where the token counts; ``None``: all count.
        divergence: one of :data:`DIVERGENCES`.
        temperature: softmax temperature, finite and > 0.
        beta: the teacher's weight in ``jsd``'s mixture, in ``[0, 1]``.
        skew: :math:`\alpha` of the skew KLs, in ``[0, 1)``.

    Returns:
        Scalar float32; 0 (connected to the graph, zero gradient) when no token counts.

    Raises:
        ValueError: unknown divergence, settings out of range, vocabulary sizes or shapes that differ,
            a mask that is not bool or of another shape.
    """
    check_divergence_settings(divergence, temperature, beta, skew)
    _check_pair(student_logits, teacher_logits)
    positions = tuple(student_logits.shape[:-1])
    check_token_mask(mask, positions, "student_logits")
    settings = (divergence, temperature, beta, skew)
    if torch.is_grad_enabled() and student_logits.requires_grad and not teacher_logits.requires_grad:
        flat_mask = _flat_mask(mask, positions, student_logits.device)
        return _ClosedFormTokenMean.apply(student_logits, teacher_logits, flat_mask, settings)
    values = token_values(student_logits, teacher_logits, *settings)
    if mask is None:
        return values.mean() if values.numel() else values.sum()
    return torch.where(mask, values, 0.0).sum() / mask.sum().clamp_min(1)


def _chunk_values(divergence: str, temperature: float, beta: float, skew: float) -> ChunkValues:
    """The chunked and fused paths' per-chunk function: values, and their closed-form gradients if asked."""

    def values(student_rows: Tensor, teacher_rows: Tensor, with_grads: bool) -> tuple[Tensor, Tensor | None]:
        settings = (divergence, temperature, beta, skew)
        if with_grads:
            return token_values_and_grads(student_rows, teacher_rows, *settings)
        return token_values(student_rows, teacher_rows, *settings), None

    return values


def token_divergence_chunked(
    student_logits: Tensor,
    teacher_logits: Tensor | DecodedRows,
    mask: Tensor | None = None,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    skew: float = 0.1,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Tensor:
    """:func:`token_divergence`, ``chunk_size`` positions at a time, the gradient computed in forward.

    Same value and gradient (up to float32 rounding); apart from the inputs and the student logits'
    gradient (filled in forward, in the logits' dtype), only one chunk's float32 ``(chunk_size, V)``
    intermediates are alive at once (bf16 logits are cast chunk by chunk). The teacher's logits
    receive no gradient. One backward per call: no ``retain_graph`` second backward, no double
    backward (both raise a ``RuntimeError``; see :mod:`lightning_kd.losses._token_chunks`).

    ``teacher_logits`` may instead be :class:`~lightning_kd.losses._token_chunks.DecodedRows` of the
    same positions (flattened) and vocabulary, decoded one chunk at a time: the teacher's full
    ``(N, L, V)`` tensor is then never formed.
    """
    check_divergence_settings(divergence, temperature, beta, skew)
    checked_chunk_size(chunk_size)
    positions = tuple(student_logits.shape[:-1])
    vocab_size = student_logits.shape[-1]
    if isinstance(teacher_logits, DecodedRows):
        teacher: Rows = checked_decoded_rows(teacher_logits, positions, vocab_size)
    else:
        _check_pair(student_logits, teacher_logits)
        teacher = LogitRows(teacher_logits.detach().reshape(-1, vocab_size), vocab_size)
    check_token_mask(mask, positions, "student_logits")
    return chunked_token_mean(
        _chunk_values(divergence, temperature, beta, skew),
        LogitRows(student_logits.reshape(-1, vocab_size), vocab_size),
        teacher,
        _flat_mask(mask, positions, student_logits.device),
        chunk_size,
    )


def token_divergence_fused(
    student_hidden: Tensor,
    student_weight: Tensor,
    student_bias: Tensor | None = None,
    *,
    teacher_logits: Tensor | None = None,
    teacher_hidden: Tensor | None = None,
    teacher_weight: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    mask: Tensor | None = None,
    vocab_size: int | None = None,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    skew: float = 0.1,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Tensor:
    r""":func:`token_divergence` of the logits :math:`h W^\top + b`, never forming the student's full logits.

    The student's logits (and the teacher's, given its hidden states and head instead of logits) are
    computed once, ``chunk_size`` positions at a time, in float32, with each chunk's gradient, which
    is carried into ``student_hidden``, ``student_weight`` and ``student_bias`` at once (rows past
    ``vocab_size`` get 0; tensors that do not require grad get none; returned in their dtypes).
    One backward per call: no ``retain_graph`` second backward, no double backward (both raise a
    ``RuntimeError``).

    Args:
        student_hidden: ``(N, L, H_s)`` last hidden states.
        student_weight: ``(V_s, H_s)`` LM-head weight.
        student_bias: ``(V_s,)`` LM-head bias, or None.
        teacher_logits: ``(N, L, V_t)``; or, instead, the three next (detached here).
        teacher_hidden: ``(N, L, H_t)`` the teacher's last hidden states.
        teacher_weight: ``(V_t, H_t)`` the teacher's LM-head weight.
        teacher_bias: ``(V_t,)`` or None.
        mask: ``(N, L)`` bool, True where the token counts; ``None``: all count.
        vocab_size: the shared token ids, compared over ``[:vocab_size]``; ``None``: both vocabularies
            must have the same size.
        divergence: as in :func:`token_divergence`.
        temperature: as in :func:`token_divergence`.
        beta: as in :func:`token_divergence`.
        skew: as in :func:`token_divergence`.
        chunk_size: positions per chunk.

    Raises:
        ValueError: as :func:`token_divergence`, and: neither or both teacher inputs, hidden states
            that do not fit their head, a vocabulary smaller than ``vocab_size``.
    """
    check_divergence_settings(divergence, temperature, beta, skew)
    checked_chunk_size(chunk_size)
    if (teacher_logits is None) == (teacher_hidden is None or teacher_weight is None):
        raise ValueError(
            "Give the teacher's logits, or its hidden states and LM-head weight (teacher_hidden and "
            "teacher_weight), not both and not neither."
        )
    teacher_vocab = teacher_logits.shape[-1] if teacher_logits is not None else teacher_weight.shape[0]
    if vocab_size is None:
        if teacher_vocab != student_weight.shape[0]:
            raise ValueError(
                f"The student's LM head has a vocabulary of {student_weight.shape[0]} token ids but the "
                f"teacher's {teacher_vocab}. {ALIGNMENT_HINT} (here: pass vocab_size)."
            )
        vocab_size = teacher_vocab
    student = head_rows(student_hidden, student_weight, student_bias, vocab_size, "student")
    positions = tuple(student_hidden.shape[:-1])
    teacher: Rows
    if teacher_logits is not None:
        if tuple(teacher_logits.shape[:-1]) != positions or teacher_vocab < vocab_size:
            raise ValueError(
                f"teacher_logits have shape {tuple(teacher_logits.shape)} but the student's hidden states "
                f"{tuple(student_hidden.shape)} and vocab_size is {vocab_size}: expected (N, L, >= "
                "vocab_size) logits of the same positions."
            )
        teacher = LogitRows(teacher_logits.detach().reshape(-1, teacher_vocab), vocab_size)
    else:
        if tuple(teacher_hidden.shape[:-1]) != positions:
            raise ValueError(
                f"teacher_hidden has shape {tuple(teacher_hidden.shape)} but student_hidden "
                f"{tuple(student_hidden.shape)}: both must hold the same (N, L) positions."
            )
        bias = None if teacher_bias is None else teacher_bias.detach()
        teacher = head_rows(teacher_hidden.detach(), teacher_weight.detach(), bias, vocab_size, "teacher")
    check_token_mask(mask, positions, "student_hidden")
    return chunked_token_mean(
        _chunk_values(divergence, temperature, beta, skew),
        student,
        teacher,
        _flat_mask(mask, positions, student_hidden.device),
        chunk_size,
    )


def checked_path(path: str) -> str:
    """``path`` if it is one of :data:`PATHS`; a ``ValueError`` listing them otherwise."""
    if path not in PATHS:
        raise ValueError(f"Unknown path {path!r}; choose one of {', '.join(PATHS)}.")
    return path


class TokenTerm(LossTerm):
    """What the token-level terms share: the step's :class:`TokenOutputs`, the path, and its inputs.

    Args:
        name: key of the term.
        weight: factor in the total loss.
        path: ``"plain"`` (the ``(N, L, V)`` logits), ``"chunked"`` (the logits, ``chunk_size`` positions
            at a time, gradients computed in forward) or ``"fused"`` (from the last hidden states and the LM
            heads: the causal-LM module then never forms the full logits; sets
            :attr:`~LossTerm.reads_hidden_states`).
        chunk_size: positions per chunk of the chunked and fused paths.
    """

    def __init__(
        self, name: str, weight: float = 1.0, path: str = "plain", chunk_size: int = DEFAULT_CHUNK_SIZE
    ) -> None:
        super().__init__(name, weight)
        self.path = checked_path(path)
        self.chunk_size = checked_chunk_size(chunk_size)
        self.reads_hidden_states = path == "fused"

    def required_tokens(self, outputs: StepOutputs) -> TokenOutputs:
        """The step's token view; a ``ValueError`` saying which module gives it when there is none."""
        if outputs.tokens is None:
            raise ValueError(
                f"Loss term {self.name!r} reads the shifted tokens of a causal-LM step (StepOutputs.tokens), "
                "but this step has none: train it with the causal-LM distillation module "
                "(lightning_kd.language), which fills them."
            )
        return outputs.tokens

    def required(self, value: Any, what: str) -> Any:
        """``value``; a ``ValueError`` naming ``what`` the path needs when it is None."""
        if value is None:
            fix = (
                "the causal-LM module fills hidden states and LM heads for terms with reads_hidden_states"
                if self.path == "fused"
                else "the causal-LM module fills logits unless every term reads hidden states"
            )
            raise ValueError(
                f"Loss term {self.name!r} (path={self.path!r}) needs {what}, but the step has none: {fix}."
            )
        return value

    def vocab_logits(self, logits: Tensor, tokens: TokenOutputs, role: str) -> Tensor:
        """``logits[..., :vocab_size]``; a ``ValueError`` when the logits have fewer token ids."""
        if logits.shape[-1] < tokens.vocab_size:
            raise ValueError(
                f"The {role}'s logits have {logits.shape[-1]} token ids but TokenOutputs.vocab_size is "
                f"{tokens.vocab_size}. {ALIGNMENT_HINT}"
            )
        return logits[..., : tokens.vocab_size]

    def student_head_inputs(self, tokens: TokenOutputs) -> tuple[Tensor, Tensor, Tensor | None]:
        """The fused path's student hidden states, head weight and bias."""
        hidden = self.required(tokens.student_hidden, "the student's hidden states")
        weight, bias = head_parameters(self.required(tokens.student_head, "the student's LM head"), "student")
        return hidden, weight, bias

    def extra_repr(self) -> str:
        """Name, weight and path, shown in the module repr."""
        return f"{super().extra_repr()}, path={self.path!r}, chunk_size={self.chunk_size}"


class TokenDivergenceTerm(TokenTerm):
    r"""A divergence between the teacher's and the student's next-token distributions, per counted token.

    See :func:`lightning_kd.losses.functional.token_divergence` (and the module docstring for the
    divergences). Reads ``outputs.tokens`` (:class:`TokenOutputs`), compares over
    ``[..., :vocab_size]`` and averages over ``tokens.mask``; the teacher's values are detached.

    Args:
        name: key of the term (``train/loss_<name>``).
        weight: factor in the total loss.
        divergence: one of :data:`DIVERGENCES`.
        temperature: softmax temperature (no :math:`\tau^2` factor);
            :class:`~lightning_kd.callbacks.TemperatureAnnealing` changes it during training.
        beta: the teacher's weight in ``jsd``'s mixture, in ``[0, 1]``.
        skew: the skew KLs' :math:`\alpha`, in ``[0, 1)``.
        path: ``"plain"``, ``"chunked"`` or ``"fused"`` (see :class:`TokenTerm`).
        chunk_size: positions per chunk of the chunked and fused paths.
    """

    def __init__(
        self,
        name: str = "token_kd",
        weight: float = 1.0,
        divergence: str = "forward_kl",
        temperature: float = 1.0,
        beta: float = 0.5,
        skew: float = 0.1,
        path: str = "plain",
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> None:
        super().__init__(name, weight, path, chunk_size)
        check_divergence_settings(divergence, temperature, beta, skew)
        self.divergence = divergence
        self.temperature = float(temperature)
        self.beta = float(beta)
        self.skew = float(skew)

    def forward(self, outputs: StepOutputs) -> Tensor:
        """The divergence of this step's tokens, on the term's path."""
        tokens = self.required_tokens(outputs)
        settings = {
            "divergence": self.divergence,
            "temperature": self.temperature,
            "beta": self.beta,
            "skew": self.skew,
        }
        if self.path == "fused":
            hidden, weight, bias = self.student_head_inputs(tokens)
            if tokens.teacher_hidden is not None and tokens.teacher_head is not None:
                teacher_weight, teacher_bias = head_parameters(tokens.teacher_head, "teacher")
                teacher = {
                    "teacher_hidden": tokens.teacher_hidden.detach(),
                    "teacher_weight": teacher_weight.detach(),
                    "teacher_bias": None if teacher_bias is None else teacher_bias.detach(),
                }
            else:
                logits = self.required(
                    tokens.teacher_logits, "the teacher's hidden states and LM head (or logits)"
                )
                teacher = {"teacher_logits": logits.detach()}
            return token_divergence_fused(
                hidden,
                weight,
                bias,
                **teacher,
                mask=tokens.mask,
                vocab_size=tokens.vocab_size,
                chunk_size=self.chunk_size,
                **settings,
            )
        student = self.vocab_logits(
            self.required(tokens.student_logits, "the student's logits"), tokens, "student"
        )
        if self.path == "chunked" and tokens.teacher_logits is None and tokens.teacher_rows is not None:
            return token_divergence_chunked(
                student, tokens.teacher_rows, tokens.mask, chunk_size=self.chunk_size, **settings
            )
        teacher_logits = self.required(tokens.teacher_logits, "the teacher's logits").detach()
        teacher_logits = self.vocab_logits(teacher_logits, tokens, "teacher")
        if self.path == "chunked":
            return token_divergence_chunked(
                student, teacher_logits, tokens.mask, chunk_size=self.chunk_size, **settings
            )
        return token_divergence(student, teacher_logits, tokens.mask, **settings)

    def extra_repr(self) -> str:
        """Name, weight and settings, shown in the module repr."""
        return (
            f"{super().extra_repr()}, divergence={self.divergence!r}, temperature={self.temperature}, "
            f"beta={self.beta}, skew={self.skew}"
        )
