r"""Universal Logit Distillation: a teacher whose tokenizer (and vocabulary) differs from the student's.

Boizard et al., "Towards Cross-Tokenizer Distillation: the Universal Logit Distillation Loss for
LLMs" (2024, arXiv:2402.12030). Two vocabularies cannot be compared id by id, but the Wasserstein
distance between the two next-token distributions, with every token at the same unit distance from
every other, has a closed form that needs no token mapping: the L1 distance between the
probability vectors sorted in decreasing order. For an aligned position :math:`i` (Section 3),

.. math::

    \mathrm{ULD}_i = \sum_{k=1}^{|V|} \bigl| p_S^{\downarrow}(i)_k - p_T^{\downarrow}(i)_k \bigr|,
    \qquad p_S = \mathrm{softmax}(s_i / \tau_S),\ p_T = \mathrm{softmax}(t_i / \tau_T),

where :math:`p^{\downarrow}` is :math:`p` sorted in decreasing order and the smaller vocabulary is
padded with zeros to :math:`|V| = \max(|V_S|, |V_T|)`. The loss is the mean of :math:`\mathrm{ULD}_i`
over the aligned positions, added to the student's cross-entropy with a weight :math:`\lambda`
(the paper's :math:`\mathcal{L} = \mathcal{L}_{CE} + \lambda\, \mathcal{L}_{ULD}`). It lies in
:math:`[0, 2]` per position and is 0 exactly when the two sorted distributions agree: it transfers
the teacher's *shape* of uncertainty, not which token it prefers.

Which student position faces which teacher position is decided on the text
(:mod:`lightning_kd.language.tokenizer_alignment`); the module
(:class:`~lightning_kd.language.CrossTokenizerDistillationModule`) gathers the teacher's logits at
the partner of every student position into :class:`AlignedTokenOutputs`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_kd.losses.base import StepOutputs, TokenOutputs, checked_temperature
from lightning_kd.losses.token_divergence import TokenTerm, check_token_mask
from lightning_kd.precision import float32_math

__all__ = ["AlignedTokenOutputs", "ULDTerm", "uld_loss", "uld_values"]


@dataclass
class AlignedTokenOutputs(TokenOutputs):
    """:class:`TokenOutputs` of a step whose teacher has another tokenizer.

    ``student_logits``, ``mask`` and ``targets`` are the student's, as in :class:`TokenOutputs`
    (``vocab_size`` is the student's vocabulary); ``teacher_logits`` are ``(N, L, V_t)``: row
    ``[n, i]`` holds the teacher's logits at the position paired with student position ``i``
    (arbitrary where there is none).

    Attributes:
        aligned: ``(N, L)`` bool, True where position ``i`` counts (``mask``) and has a teacher partner.
    """

    aligned: Tensor | None = None


@float32_math
def uld_values(
    student_logits: Tensor,
    teacher_logits: Tensor,
    student_temperature: float = 1.0,
    teacher_temperature: float = 1.0,
) -> Tensor:
    """ULD of every position: ``(..., V_s)`` and ``(..., V_t)`` logits -> ``(...)`` float32 values.

    The sorted probabilities of the smaller vocabulary are padded with zeros (arguments as in
    :func:`uld_loss`, checked there).
    """
    p_s = F.softmax(student_logits / student_temperature, dim=-1).sort(dim=-1, descending=True).values
    p_t = F.softmax(teacher_logits / teacher_temperature, dim=-1).sort(dim=-1, descending=True).values
    size = max(p_s.shape[-1], p_t.shape[-1])
    p_s = F.pad(p_s, (0, size - p_s.shape[-1]))
    p_t = F.pad(p_t, (0, size - p_t.shape[-1]))
    return (p_s - p_t).abs().sum(dim=-1)


@float32_math
def uld_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None = None,
    student_temperature: float = 1.0,
    teacher_temperature: float = 1.0,
) -> Tensor:
    r"""Universal Logit Distillation: mean over counted positions of the sorted-probability L1 distance.

    :math:`\frac{1}{|M|} \sum_{i \in M} \sum_k |p_S^{\downarrow}(i)_k - p_T^{\downarrow}(i)_k|`
    (Boizard et al., 2024; see the module docstring), the smaller vocabulary zero-padded. Computed
    in float32; the gradient reaches the student's logits through the sort (and the teacher's, unless
    detached: detach them yourself).

    Args:
        student_logits: ``(N, L, V_s)`` (any ``(..., V_s)``).
        teacher_logits: ``(N, L, V_t)``: the same positions, any vocabulary size.
        mask: ``(N, L)`` bool, True where the position counts (aligned); ``None``: all count.
        student_temperature: :math:`\tau_S`, finite and > 0.
        teacher_temperature: :math:`\tau_T`, finite and > 0.

    Returns:
        Scalar float32; 0 (connected to the graph, zero gradient) when no position counts.

    Raises:
        ValueError: positions that differ, a mask that is not bool or of another shape, a
            temperature that is not finite and > 0.
    """
    checked_temperature(student_temperature, "student_temperature")
    checked_temperature(teacher_temperature, "teacher_temperature")
    if student_logits.shape[:-1] != teacher_logits.shape[:-1] or student_logits.ndim < 1:
        raise ValueError(
            f"student_logits have shape {tuple(student_logits.shape)} but teacher_logits "
            f"{tuple(teacher_logits.shape)}: ULD compares the same positions (all but the last "
            "dimension equal); gather the teacher's logits at the aligned positions first (the vocabularies "
            "may differ)."
        )
    check_token_mask(mask, tuple(student_logits.shape[:-1]), "student_logits")
    values = uld_values(student_logits, teacher_logits, student_temperature, teacher_temperature)
    if mask is None:
        return values.mean() if values.numel() else values.sum()
    return torch.where(mask, values, 0.0).sum() / mask.sum().clamp_min(1)


class ULDTerm(TokenTerm):
    r"""Universal Logit Distillation between the student and a teacher of any tokenizer, per counted token.

    See :func:`uld_loss`. Reads ``outputs.tokens``: with a teacher of another tokenizer
    (:class:`~lightning_kd.language.CrossTokenizerDistillationModule`), the
    :class:`AlignedTokenOutputs`: the distance summed over the ``aligned`` positions, divided by
    the counted positions (``mask``), i.e. a mean over counted tokens with 0 where a token has no
    teacher partner. That is the unit the module's gradient normalisation counts (the global
    batch's counted tokens, over accumulated micro-batches and processes), so the gradient does not
    depend on how the aligned tokens fall into micro-batches; with a teacher of the student's
    tokenizer (:class:`~lightning_kd.CausalLMDistillationModule`), the same positions and
    ``tokens.mask``, on the full vocabularies. The teacher's logits are detached. Only the plain
    path (the sort needs the full probability vectors).

    Args:
        name: key of the term (``train/loss_<name>``).
        weight: :math:`\lambda`, the factor in the total loss.
        student_temperature: :math:`\tau_S` of the student's softmax.
        teacher_temperature: :math:`\tau_T` of the teacher's softmax.
    """

    #: compares the models without shared token ids (the cross-tokenizer module accepts it)
    across_tokenizers: bool = True

    def __init__(
        self,
        name: str = "uld",
        weight: float = 1.0,
        student_temperature: float = 1.0,
        teacher_temperature: float = 1.0,
    ) -> None:
        super().__init__(name, weight, path="plain")
        self.student_temperature = checked_temperature(student_temperature, "student_temperature")
        self.teacher_temperature = checked_temperature(teacher_temperature, "teacher_temperature")

    def forward(self, outputs: StepOutputs) -> Tensor:
        """ULD of this step's aligned tokens (its counted tokens when both models share the tokenizer)."""
        tokens = self.required_tokens(outputs)
        student = self.required(tokens.student_logits, "the student's logits")
        teacher = self.required(tokens.teacher_logits, "the teacher's logits").detach()
        if not isinstance(
            tokens, AlignedTokenOutputs
        ):  # one tokenizer: the same positions, full vocabularies
            return uld_loss(student, teacher, tokens.mask, self.student_temperature, self.teacher_temperature)
        aligned = self.required(tokens.aligned, "the aligned positions (AlignedTokenOutputs.aligned)")
        mean = uld_loss(student, teacher, aligned, self.student_temperature, self.teacher_temperature)
        # per counted token (0 where no partner): the module's token-mean gradients count tokens.mask
        return mean * (aligned.sum() / tokens.mask.sum().clamp_min(1))

    def extra_repr(self) -> str:
        """Name, weight and temperatures, shown in the module repr."""
        return (
            f"name={self.name!r}, weight={self.weight}, student_temperature={self.student_temperature}, "
            f"teacher_temperature={self.teacher_temperature}"
        )
