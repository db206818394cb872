"""CrossTokenizerDistillationModule: distil a causal LM from a teacher with another tokenizer.

The teacher reads its own tokens of the same text; the collator
(:class:`~lightning_kd.language.CrossTokenizerCollator`) pairs the student's positions with the
teacher's on the characters (:mod:`lightning_kd.language.tokenizer_alignment`), and the step gathers
the teacher's logits at each student position's partner. Terms that compare the models without
shared token ids (:class:`~lightning_kd.ULDTerm`: Universal Logit Distillation, Boizard et al., 2024)
then read :class:`~lightning_kd.losses.AlignedTokenOutputs`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from lightning_kd.language.causal_lm import CausalLMDistillationModule
from lightning_kd.language.completion import IGNORE_INDEX
from lightning_kd.language.metrics import TokenMean, TokenPerplexity, token_cross_entropy_sum
from lightning_kd.language.token_view import batch_labels, shifted, shifted_targets
from lightning_kd.language.tokenizer_alignment import NO_PARTNER
from lightning_kd.language.vocabulary import output_vocabulary_size, shared_vocabulary, tokenizer_name
from lightning_kd.losses.base import LossTerm, StepOutputs
from lightning_kd.losses.token_cross_entropy import TokenCrossEntropyTerm
from lightning_kd.losses.uld import AlignedTokenOutputs, ULDTerm
from lightning_kd.model_io import logits_of

__all__ = [
    "CrossTokenizerDistillationModule",
    "check_cross_tokenizer_terms",
    "default_cross_tokenizer_losses",
]


def default_cross_tokenizer_losses() -> list[LossTerm]:
    r"""The objective when none is given: next-token cross-entropy + ULD, both weight 1.

    Boizard et al. (2024), :math:`\mathcal{L} = \mathcal{L}_{CE} + \lambda\, \mathcal{L}_{ULD}`
    with :math:`\lambda = 1`.
    """
    return [TokenCrossEntropyTerm("ce", weight=1.0), ULDTerm("uld", weight=1.0)]


def _names(tokenizer: Any, teacher_tokenizer: Any) -> str:
    if tokenizer is None and teacher_tokenizer is None:
        return "the teacher's tokenizer differs from the student's"
    student = tokenizer_name(tokenizer) if tokenizer is not None else "(not given)"
    teacher = tokenizer_name(teacher_tokenizer) if teacher_tokenizer is not None else "(not given)"
    return f"the student's tokenizer is {student} and the teacher's {teacher}"


def check_cross_tokenizer_terms(
    terms: Sequence[LossTerm], tokenizer: Any = None, teacher_tokenizer: Any = None
) -> None:
    """Refuse terms a teacher of another tokenizer cannot serve; the message names both tokenizers.

    A term that reads the teacher must compare the models without shared token ids (its class sets
    ``across_tokenizers = True``, as :class:`~lightning_kd.ULDTerm`); the fused LM-head path is
    not supported (the step forms the logits).

    Raises:
        ValueError: the first term that cannot be used, and what to use instead.
    """
    for term in terms:
        if term.needs_teacher and not getattr(term, "across_tokenizers", False):
            raise ValueError(
                f"Loss term {term.name!r} ({type(term).__name__}) compares the teacher and the student token "
                f"id by id, but {_names(tokenizer, teacher_tokenizer)}: with a teacher of another tokenizer "
                "use ULDTerm (Universal Logit Distillation, which needs no shared ids) beside "
                "TokenCrossEntropyTerm, or distil from a teacher of the student's tokenizer with "
                "CausalLMDistillationModule."
            )
        if term.reads_hidden_states:
            raise ValueError(
                f"Loss term {term.name!r} takes the fused LM-head path (path='fused'), which "
                "CrossTokenizerDistillationModule does not support: it forms the logits to gather the "
                "teacher's at the aligned positions. Use path='plain' or 'chunked'."
            )


def _checked_logits(logits: Tensor, role: str, tokens: tuple[int, ...], key: str) -> Tensor:
    if logits.ndim != 3 or tuple(logits.shape[:2]) != tokens:
        raise ValueError(
            f"The {role}'s logits have shape {tuple(logits.shape)} for its token ids batch[{key!r}] of shape "
            f"{tokens}: a causal LM returns (N, L, V), one next-token distribution per position."
        )
    return logits


class CrossTokenizerDistillationModule(CausalLMDistillationModule):
    """Distil a causal LM from a frozen teacher whose tokenizer differs: aligned tokens, ULD and CE.

    Batches (from :class:`~lightning_kd.language.CrossTokenizerCollator`) hold the student's
    ``input_ids``, ``attention_mask`` and ``labels``, the teacher's own ``teacher_input_ids`` and
    ``teacher_attention_mask`` of the same texts, and ``teacher_positions``: for each of the
    student's ``L_s - 1`` predicting positions, the teacher position predicting the token that
    begins at the same character, -1 where none. The step runs the teacher on its tokens, gathers
    its logits at the partners (``(N, L_s - 1, V_t)``) and hands the terms
    :class:`~lightning_kd.losses.AlignedTokenOutputs`: the student's ``mask`` and ``targets`` for
    the cross-entropy, ``aligned`` (counted and paired) for ULD. The partners are computed on the
    CPU by the collator; the step only gathers (no host-device synchronisation).

    Everything else is :class:`~lightning_kd.CausalLMDistillationModule`'s (token-mean gradients,
    checks, checkpoints). Terms that read the teacher must work without shared token ids
    (:func:`check_cross_tokenizer_terms`); ``TokenOutputs.vocab_size`` is the student's vocabulary.

    Metrics: ``val|test/loss`` and ``val|test/perplexity`` (the student's, over its counted tokens),
    ``val|test/teacher_perplexity`` (the teacher's, over its own tokens: the two perplexities are
    per token of different tokenizers, not comparable) and ``val|test/aligned`` (fraction of the
    student's counted tokens with a teacher partner).

    Args:
        student: the causal LM being trained.
        teacher: the frozen causal LM of another tokenizer.
        losses: the loss terms; default: :func:`default_cross_tokenizer_losses`.
        tokenizer: the student's tokenizer (named in messages; its length must fit the student).
        teacher_tokenizer: the teacher's tokenizer, likewise.
        teacher_input_ids_key: key of the teacher's token ids.
        teacher_attention_mask_key: key of the teacher's attention mask.
        alignment_key: key of the partners (``teacher_positions``).
        **kwargs: the other arguments of :class:`~lightning_kd.CausalLMDistillationModule`
            (``input_key``, ``labels_key``, ``attention_mask_key``, ``teacher_checkpoint``,
            ``optimizer``, ...); ``teacher_mode`` can only be ``"frozen"``.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        losses: Sequence[LossTerm] | None = None,
        tokenizer: Any = None,
        teacher_tokenizer: Any = None,
        teacher_input_ids_key: str = "teacher_input_ids",
        teacher_attention_mask_key: str = "teacher_attention_mask",
        alignment_key: str = "teacher_positions",
        **kwargs: Any,
    ) -> None:
        if teacher is None:
            raise ValueError(
                "CrossTokenizerDistillationModule needs a teacher (the causal LM of the other tokenizer); "
                "to train the student alone use CausalLMDistillationModule without a teacher."
            )
        if kwargs.get("teacher_mode", "frozen") != "frozen":
            raise ValueError(
                f"teacher_mode={kwargs['teacher_mode']!r}: a teacher of another tokenizer is a separate, "
                "frozen model (an EMA teacher is a copy of the student and shares its tokenizer); use "
                "teacher_mode='frozen'."
            )
        losses = list(losses) if losses is not None else default_cross_tokenizer_losses()
        check_cross_tokenizer_terms(losses, tokenizer, teacher_tokenizer)
        self.teacher_input_ids_key = teacher_input_ids_key
        self.teacher_attention_mask_key = teacher_attention_mask_key
        self.alignment_key = alignment_key
        super().__init__(
            student, teacher, losses, tokenizer=tokenizer, teacher_tokenizer=teacher_tokenizer, **kwargs
        )

    def shared_vocabulary_size(self, student_size: int, teacher_size: int | None) -> int:
        """The student's vocabulary (its labels' range); each tokenizer given must fit its model."""
        if teacher_size is not None and self.teacher_tokenizer is not None:
            shared_vocabulary(teacher_size, None, self.teacher_tokenizer)
        return shared_vocabulary(student_size, None, self.tokenizer)

    def build_metrics(self) -> nn.ModuleDict:
        """Loss, the student's and the teacher's perplexities and the aligned fraction, per held-out stage."""
        metrics: dict[str, nn.Module] = {}
        for stage in ("val", "test"):
            metrics[f"{stage}_loss"] = TokenMean()
            metrics[f"{stage}_perplexity"] = TokenPerplexity()
            metrics[f"{stage}_teacher_perplexity"] = TokenPerplexity()
            metrics[f"{stage}_aligned"] = TokenMean()
        return nn.ModuleDict(metrics)

    # ----------------------------------------------------------------- batches
    def teacher_inputs(self, batch: Any, inputs: Any) -> Any:
        """The teacher's own tokens: ``{"input_ids", "attention_mask"}`` from the teacher's keys."""
        return {
            "input_ids": batch[self.teacher_input_ids_key],
            "attention_mask": batch[self.teacher_attention_mask_key],
        }

    def _teacher_tokens(self, batch: Any) -> tuple[Tensor, Tensor]:
        ids, mask = batch_labels(batch, None, self.teacher_attention_mask_key, self.teacher_input_ids_key)
        assert mask is not None
        return ids, mask

    def _partners(self, batch: Any, positions: tuple[int, ...]) -> Tensor:
        """``batch[alignment_key]``, its shape and dtype checked (no value read)."""
        fix = "build batches with CrossTokenizerCollator, which pairs the positions on the text"
        if self.alignment_key not in batch:
            raise KeyError(
                f"The batch has keys {list(batch)} but no {self.alignment_key!r} (the teacher position "
                f"paired with each student position): {fix}."
            )
        partners = batch[self.alignment_key]
        if (
            not isinstance(partners, Tensor)
            or partners.is_floating_point()
            or tuple(partners.shape) != positions
        ):
            shape = tuple(partners.shape) if isinstance(partners, Tensor) else type(partners).__name__
            raise ValueError(
                f"batch[{self.alignment_key!r}] must be an integer tensor of shape {positions} (one teacher "
                f"position per predicting student position, -1 where none), got {shape}: {fix}."
            )
        return partners

    def check_batch(self, batch: Any, stage: str) -> None:
        """The student's labels, the teacher's tokens and the partners, checked on the host.

        Shapes always; on the CPU also the values: the teacher's ids inside its vocabulary and
        every partner in ``[-1, L_t - 1)``.
        """
        super().check_batch(batch, stage)
        ids, _ = self._teacher_tokens(batch)
        labels, _ = batch_labels(batch, self.labels_key, self.attention_mask_key)
        n, length = labels.shape
        if ids.shape[0] != n:
            raise ValueError(
                f"batch[{self.teacher_input_ids_key!r}] holds {ids.shape[0]} rows but the student's "
                f"tokens {n}: both are tokenizations of the same texts."
            )
        partners = self._partners(batch, (n, length - 1))
        if partners.device.type != "cpu":
            return
        outside = (partners < NO_PARTNER) | (partners >= ids.shape[1] - 1)
        if outside.any():
            value = int(partners[outside][0])
            raise ValueError(
                f"batch[{self.alignment_key!r}] holds {value}, outside [-1, {ids.shape[1] - 1}): the teacher "
                "has that many predicting positions. Pair the positions of these very tokenizations "
                "(CrossTokenizerCollator)."
            )
        size = output_vocabulary_size(self.teacher)
        if size is not None and ((ids < 0) | (ids >= size)).any():
            raise ValueError(
                f"batch[{self.teacher_input_ids_key!r}] holds token ids outside [0, {size}), the teacher's "
                f"vocabulary: tokenize the teacher's side with the teacher's tokenizer "
                f"({_names(self.tokenizer, self.teacher_tokenizer)})."
            )

    # ----------------------------------------------------------------- steps
    def step_outputs(self, batch: Any, teacher_output: Any = None) -> StepOutputs:
        """Teacher on its tokens, student on its own; the teacher's logits gathered at the partners.

        ``tokens`` is :class:`~lightning_kd.losses.AlignedTokenOutputs`; ``teacher_logits`` of the
        result are the gathered ``(N, L_s - 1, V_t)`` logits. A training step counts the student's
        tokens for the token-mean gradients.
        """
        inputs, _ = self.unpack_batch(batch)
        labels, attention_mask = batch_labels(batch, self.labels_key, self.attention_mask_key)
        mask, targets = shifted_targets(labels, attention_mask)
        teacher_ids, _ = self._teacher_tokens(batch)
        partners = self._partners(batch, tuple(mask.shape))
        teacher_output, _, student_output = self.call_models(batch, inputs, teacher_output)
        student = shifted(
            _checked_logits(logits_of(student_output), "student", tuple(labels.shape), "input_ids")
        )
        shape = tuple(teacher_ids.shape)
        teacher = shifted(
            _checked_logits(logits_of(teacher_output), "teacher", shape, self.teacher_input_ids_key)
        ).detach()
        if self.vocab_size is None:  # models without get_output_embeddings: known from the first logits
            self.vocab_size = self.shared_vocabulary_size(student.shape[-1], teacher.shape[-1])
        index = partners.clamp_min(0).to(teacher.device)
        gathered = teacher.gather(1, index[..., None].expand(-1, -1, teacher.shape[-1]))
        tokens = AlignedTokenOutputs(
            mask,
            targets,
            self.vocab_size,
            student_logits=student,
            teacher_logits=gathered,
            aligned=mask & (partners != NO_PARTNER),
        )
        return self.token_step_outputs(batch, tokens, teacher_output, student_output)

    def evaluate(self, batch: Any, stage: str) -> None:
        """Student CE and perplexity, the teacher's perplexity on its tokens, the aligned fraction."""
        outputs = self.step_outputs(batch)
        tokens = outputs.tokens
        assert isinstance(tokens, AlignedTokenOutputs) and tokens.aligned is not None
        student = tokens.student_logits[..., : tokens.vocab_size]
        counted = self.log_student_perplexity(student, tokens.targets, tokens.mask, stage)
        teacher_ids, teacher_mask = self._teacher_tokens(batch)
        teacher_mask_counted, teacher_targets = shifted_targets(
            teacher_ids.masked_fill(~teacher_mask.bool(), IGNORE_INDEX), teacher_mask
        )
        teacher_counted = teacher_mask_counted.sum()
        teacher = shifted(logits_of(outputs.teacher_output)).float()
        teacher_nll = token_cross_entropy_sum(teacher, teacher_targets) / teacher_counted.clamp_min(1)
        self.metrics[f"{stage}_teacher_perplexity"].update(teacher_nll, teacher_counted)
        self.log(f"{stage}/teacher_perplexity", self.metrics[f"{stage}_teacher_perplexity"])
        self.metrics[f"{stage}_aligned"].update(tokens.aligned.sum() / counted.clamp_min(1), counted)
        self.log(f"{stage}/aligned", self.metrics[f"{stage}_aligned"])
