"""CausalLMDistillationModule: distil a causal language model token by token."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_kd.language.lm_head import (
    check_head_reproduces_logits,
    check_no_logit_transform,
    hidden_state_call,
    last_hidden_state,
    output_head,
)
from lightning_kd.language.metrics import TokenMean, TokenPerplexity, token_cross_entropy_sum
from lightning_kd.language.token_mean import TokenMeanGradients
from lightning_kd.language.token_view import batch_labels, check_label_values, shifted, shifted_targets
from lightning_kd.language.vocabulary import output_vocabulary_size, shared_vocabulary
from lightning_kd.losses.base import LossTerm, StepOutputs, TokenOutputs
from lightning_kd.losses.token_cross_entropy import TokenCrossEntropyTerm
from lightning_kd.losses.token_divergence import TokenDivergenceTerm
from lightning_kd.model_io import call_model, logits_of
from lightning_kd.module import DistillationModule
from lightning_kd.module_setup import hparams_given_by_cli
from lightning_kd.teachers.roles import TEACHER_MODES

__all__ = ["CausalLMDistillationModule", "default_causal_lm_losses"]


def default_causal_lm_losses(teacher: nn.Module | None) -> list[LossTerm]:
    """The objective when none is given: next-token cross-entropy 0.5 + forward KL to the teacher 0.5 (T = 1).

    Word-level KD (Kim & Rush, "Sequence-Level Knowledge Distillation", EMNLP 2016, Eq. 3-4):
    the labels' cross-entropy interpolated with the teacher's next-token distribution. Without a
    teacher: the cross-entropy alone (a baseline student).
    """
    if teacher is None:
        return [TokenCrossEntropyTerm("ce", weight=1.0)]
    return [
        TokenCrossEntropyTerm("ce", weight=0.5),
        TokenDivergenceTerm("kd", weight=0.5, divergence="forward_kl", temperature=1.0),
    ]


def _checked_logits(logits: Tensor, role: str, tokens: tuple[int, ...]) -> Tensor:
    """``(N, L, V)`` logits of one batch of ``tokens = (N, L)`` ids, or an error naming the fix."""
    if logits.ndim != 3 or tuple(logits.shape[:2]) != tokens:
        raise ValueError(
            f"The {role}'s logits have shape {tuple(logits.shape)} for token ids of shape {tokens}: a causal "
            "LM returns (N, L, V), one next-token distribution per position (e.g. AutoModelForCausalLM), "
            "not one per sequence."
        )
    return logits


class CausalLMDistillationModule(DistillationModule):
    """Distil a causal language model: token-level terms on next-token distributions, token-mean gradients.

    Teacher and student are causal LMs (Hugging Face ``AutoModelForCausalLM`` models, or any model
    called as ``model(input_ids=..., attention_mask=...)`` whose output carries ``(N, L, V)``
    logits). Batches are dicts of ``(N, L)`` tensors: ``input_ids``, ``attention_mask`` and
    ``labels`` (the input ids, -100 where a token does not count: padding, and prompts in
    completion-only training, see :func:`~lightning_kd.language.completion_only_labels`). The models
    are called without labels; the step shifts once (position ``t`` predicts token ``t + 1``) and
    hands the terms :class:`~lightning_kd.losses.TokenOutputs` as ``outputs.tokens``. A token
    counts where its label is not -100 and it and its predecessor are inside the attention mask.

    **Fused LM head.** When a term sets ``reads_hidden_states``, the models' bases (``base_model``)
    run and the terms get the last hidden states and output heads instead of the logits; the
    student's ``(N, L, V)`` logits are formed only if another term may read them (one that does
    not set it). A model whose config soft-caps or scales its logits is refused when the module is
    built, and on the first training batch ``head(last hidden state)`` is compared with each
    model's real logits on a few tokens (:mod:`lightning_kd.language.lm_head`): a difference stops
    the run.

    **Normalisation.** Every term is a mean over its micro-batch's counted tokens; the gradient of
    an optimizer step is the gradient of the mean over ALL counted tokens of its global batch,
    whatever ``accumulate_grad_batches`` and the number of DDP processes
    (:class:`~lightning_kd.language.TokenMeanGradients`). The training step therefore returns
    the token SUM of the loss (what ``on_train_batch_end`` sees as ``outputs["loss"]``, divided by
    ``accumulate_grad_batches``); ``train/loss`` and ``train/loss_<name>`` log the token means.

    **Vocabularies** (:func:`~lightning_kd.language.shared_vocabulary`): the models' output sizes are
    read from ``get_output_embeddings()`` when the module is built (else from the first batch's
    logits). Equal sizes share every id. Different sizes are accepted only for one tokenizer with a
    padded embedding: pass ``tokenizer`` (its length must fit into both); the models are then
    compared on the shared ids with a warning naming both sizes. Different tokenizers
    (``tokenizer`` and ``teacher_tokenizer`` with different vocabularies) stop the run.

    Metrics: ``val|test/loss`` (the student's next-token cross-entropy, mean over counted tokens),
    ``val|test/perplexity`` and ``val|test/teacher_perplexity``
    (:class:`~lightning_kd.language.TokenPerplexity` over the shared ids) and
    ``val|test/agreement`` (fraction of counted tokens where the student's and the teacher's most
    likely next token agree).

    Args:
        student: the causal LM being trained.
        teacher: the causal LM teaching it (``None``: next-token training alone, or
            ``teacher_mode="ema"``).
        losses: the loss terms (token terms read ``outputs.tokens``); default:
            :func:`default_causal_lm_losses`.
        teacher_mode: ``"frozen"`` or ``"ema"``.
        tokenizer: the student's tokenizer (``len()`` and ``get_vocab()``), needed only when the
            models' output sizes differ; it is not saved in checkpoints (pass it again to
            ``load_from_checkpoint``).
        teacher_tokenizer: the teacher's tokenizer, if it is another object (compared with ``tokenizer``).
        input_key: the batch keys passed to both models as keyword arguments.
        labels_key: key of the labels; ``None``: every real token counts (labels = input ids).
        attention_mask_key: key of the attention mask; ``None``: nothing is padded.
        **kwargs: the other arguments of :class:`~lightning_kd.DistillationModule`
            (``teacher_checkpoint``, ``save_teacher``, ``ema_decay``, ``optimizer``,
            ``lr_scheduler``, ``check_finite``, ...).
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None = None,
        losses: Sequence[LossTerm] | None = None,
        teacher_mode: Literal["frozen", "ema"] = "frozen",
        tokenizer: Any = None,
        teacher_tokenizer: Any = None,
        input_key: Sequence[str] = ("input_ids", "attention_mask"),
        labels_key: str | None = "labels",
        attention_mask_key: str | None = "attention_mask",
        **kwargs: Any,
    ) -> None:
        role = TEACHER_MODES.get(teacher_mode)
        if role is None or role.receives_gradients:
            raise ValueError(
                f"teacher_mode must be 'frozen' or 'ema' for causal-LM distillation, got {teacher_mode!r}."
            )
        for name, why in (
            ("target_key", "the labels are read from labels_key"),
            ("num_classes", "the vocabulary is read from the models"),
            (
                "teacher_cache",
                "a cache of (N, L, V) logits per sample is not supported; the teacher runs each step",
            ),
        ):
            if kwargs.get(name) is not None:
                raise ValueError(f"CausalLMDistillationModule takes no {name}: {why}. Remove it.")
        keys = list(input_key) if not isinstance(input_key, str) else [input_key]
        if "input_ids" not in keys:
            raise ValueError(
                f"input_key must name the token ids 'input_ids' (and the attention mask), got {keys}."
            )
        kwargs = {k: v for k, v in kwargs.items() if k not in ("target_key", "num_classes", "teacher_cache")}
        super().__init__(
            student,
            teacher,
            losses=list(losses) if losses is not None else default_causal_lm_losses(teacher),
            teacher_mode=teacher_mode,
            input_key=keys,
            target_key=None,
            **kwargs,
        )
        ignored = [
            "student",
            "teacher",
            "losses",
            "optimizer",
            "lr_scheduler",
            "tokenizer",
            "teacher_tokenizer",
        ]
        self.save_hyperparameters(ignore=None if hparams_given_by_cli() else ignored)
        self.labels_key = labels_key
        self.attention_mask_key = attention_mask_key
        self.tokenizer = tokenizer
        self.teacher_tokenizer = teacher_tokenizer
        #: the micro-batches' token counts, for token-mean gradients
        self.token_mean = TokenMeanGradients()
        for which, model in (("student", self.student), ("teacher", self.teacher)):
            if self.fused_terms and model is not None:  # the fused path needs each model's output head
                output_head(model, which, self.fused_terms)
                check_no_logit_transform(model, which)
        #: the token ids both models share (``TokenOutputs.vocab_size``); ``None`` until known
        self.vocab_size: int | None = None
        student_size = output_vocabulary_size(self.student)
        teacher_size = output_vocabulary_size(self.teacher) if self.teacher is not None else None
        if student_size is not None and (self.teacher is None or teacher_size is not None):
            self.vocab_size = self.shared_vocabulary_size(student_size, teacher_size)

    # ----------------------------------------------------------------- which path the terms take
    @property
    def fused_terms(self) -> list[str]:
        """Names of the terms on the fused LM-head path (``reads_hidden_states``)."""
        return [name for name, term in self.loss_terms.items() if term.reads_hidden_states]

    @property
    def forms_logits(self) -> bool:
        """Whether the training step forms the logits: some term does not read hidden states."""
        return any(not term.reads_hidden_states for term in self.loss_terms.values())

    def build_metrics(self) -> nn.ModuleDict:
        """Loss, perplexities and agreement for validation and test (over counted tokens)."""
        metrics: dict[str, nn.Module] = {}
        for stage in ("val", "test"):
            metrics[f"{stage}_loss"] = TokenMean()
            metrics[f"{stage}_perplexity"] = TokenPerplexity()
            if self.teacher is not None:
                metrics[f"{stage}_teacher_perplexity"] = TokenPerplexity()
                metrics[f"{stage}_agreement"] = TokenMean()
        return nn.ModuleDict(metrics)

    # ----------------------------------------------------------------- batches
    def unpack_batch(self, batch: Any) -> tuple[Any, Tensor | None]:
        """``(model inputs, None)``: the token labels are read by :meth:`step_outputs`, not as classes."""
        inputs, _ = super().unpack_batch(batch)
        return inputs, None

    def check_batch(self, batch: Any, stage: str) -> None:
        """Labels and attention mask checked on the host: shapes, dtypes and (on the CPU) the label ids."""
        super().check_batch(batch, stage)
        labels, _ = batch_labels(batch, self.labels_key, self.attention_mask_key)
        if self.vocab_size is not None and labels.device.type == "cpu":
            check_label_values(labels, self.vocab_size, stage)

    # ----------------------------------------------------------------- steps
    def _run(self, model: nn.Module, inputs: Any, teacher: bool) -> Any:
        """A model's output: its last hidden states on the fused path (no logits formed), else its logits."""
        module, call_inputs = hidden_state_call(model, inputs) if self.fused_terms else (model, inputs)
        if teacher:
            return self.teacher_role.forward(module, call_inputs)
        return call_model(module, call_inputs)

    def call_teacher(self, batch: Any, inputs: Any) -> tuple[Any, None]:
        """The teacher's output (last hidden states on the fused path); the teacher always runs."""
        return self._run(self.teacher, self.teacher_inputs(batch, inputs), teacher=True), None

    def call_student(self, inputs: Any) -> Any:
        """The student's output (last hidden states on the fused path)."""
        return self._run(self.student, inputs, teacher=False)

    def shared_vocabulary_size(self, student_size: int, teacher_size: int | None) -> int:
        """``TokenOutputs.vocab_size`` by :func:`~lightning_kd.language.shared_vocabulary`'s rule.

        A subclass with another rule (a teacher of another tokenizer) overrides it.
        """
        return shared_vocabulary(student_size, teacher_size, self.tokenizer, self.teacher_tokenizer)

    def _shared_vocabulary(self, student_size: int, teacher_size: int | None) -> int:
        if self.vocab_size is None:  # models without get_output_embeddings: known from the first logits
            self.vocab_size = self.shared_vocabulary_size(student_size, teacher_size)
        return self.vocab_size

    def step_outputs(self, batch: Any, teacher_output: Any = None) -> StepOutputs:
        """Teacher, then student, without labels; the shifted :class:`~lightning_kd.losses.TokenOutputs`.

        ``student_logits`` / ``teacher_logits`` of the result are the shifted ``(N, L - 1, V)``
        logits, or on the fused path without logit-reading terms the shifted last hidden states.
        ``targets`` is ``None``: the token targets are ``outputs.tokens.targets``. A training step
        counts its tokens for the token-mean gradients.
        """
        inputs, _ = self.unpack_batch(batch)
        labels, attention_mask = batch_labels(batch, self.labels_key, self.attention_mask_key)
        mask, targets = shifted_targets(labels, attention_mask)
        teacher_output, _, student_output = self.call_models(batch, inputs, teacher_output)
        tokens = self._token_outputs(
            student_output, teacher_output, bool(self.fused_terms), mask, targets, tuple(labels.shape)
        )
        return self.token_step_outputs(batch, tokens, teacher_output, student_output)

    def token_step_outputs(
        self, batch: Any, tokens: TokenOutputs, teacher_output: Any, student_output: Any
    ) -> StepOutputs:
        """The step's outputs around its token view; a training step counts its tokens (token-mean gradients).

        ``student_logits`` / ``teacher_logits`` are the token view's logits, or its hidden states
        where no logits were formed (the fused path).
        """
        if self.training:
            self.token_mean.count(tokens.mask)
        features = self.feature_hooks.features if self.feature_hooks is not None else {}
        student_view = tokens.student_logits if tokens.student_logits is not None else tokens.student_hidden
        teacher_view = tokens.teacher_logits if tokens.teacher_logits is not None else tokens.teacher_hidden
        return StepOutputs(
            student_logits=student_view,
            targets=None,
            teacher_logits=teacher_view,
            student_features=features.get("student", {}),
            teacher_features=features.get("teacher", {}),
            batch=batch,
            teacher_output=teacher_output,
            student_output=student_output,
            tokens=tokens,
        )

    def _token_outputs(
        self,
        student_output: Any,
        teacher_output: Any,
        fused: bool,
        mask: Tensor,
        targets: Tensor,
        shape: tuple[int, ...],
    ) -> TokenOutputs:
        """The shifted token view: logits, or (fused) hidden states and heads (and logits if read)."""
        if not fused:
            student = shifted(_checked_logits(logits_of(student_output), "student", shape))
            teacher = None
            if teacher_output is not None:
                teacher = shifted(_checked_logits(logits_of(teacher_output), "teacher", shape)).detach()
            vocab = self._shared_vocabulary(student.shape[-1], None if teacher is None else teacher.shape[-1])
            return TokenOutputs(mask, targets, vocab, student_logits=student, teacher_logits=teacher)
        terms = self.fused_terms
        student_head = output_head(self.student, "student", terms)
        student_hidden = shifted(last_hidden_state(student_output))
        teacher_head = teacher_hidden = None
        if teacher_output is not None:
            teacher_head = output_head(self.teacher, "teacher", terms)
            teacher_hidden = shifted(last_hidden_state(teacher_output)).detach()
        teacher_size = None if teacher_head is None else output_vocabulary_size(self.teacher)
        vocab = self._shared_vocabulary(int(output_vocabulary_size(self.student)), teacher_size)
        student_logits = teacher_logits = None
        if self.forms_logits:  # some term may read the logits: formed once, from the same hidden states
            student_logits = student_head(student_hidden)
            if teacher_hidden is not None:
                with torch.no_grad():
                    teacher_logits = teacher_head(teacher_hidden)
        return TokenOutputs(
            mask,
            targets,
            vocab,
            student_logits=student_logits,
            teacher_logits=teacher_logits,
            student_hidden=student_hidden,
            teacher_hidden=teacher_hidden,
            student_head=student_head,
            teacher_head=teacher_head,
        )

    def check_first_outputs(self, outputs: StepOutputs) -> None:
        """At the first training batch, on the fused path: each model's head reproduces its logits."""
        if not self.fused_terms:
            return
        inputs, _ = self.unpack_batch(outputs.batch)
        check_head_reproduces_logits(self.student, inputs, "student")
        if self.teacher is not None:
            check_head_reproduces_logits(self.teacher, self.teacher_inputs(outputs.batch, inputs), "teacher")

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        """The parent's step (terms, logs of the token means); returns the token SUM for the backward.

        See :class:`~lightning_kd.language.TokenMeanGradients`: the gradients become those of the
        global batch's token mean in :meth:`on_before_optimizer_step`.
        """
        return self.token_mean.token_sum(super().training_step(batch, batch_idx))

    def on_before_optimizer_step(self, optimizer: Optimizer) -> None:
        """Rescale the accumulated gradients to the token mean of the global batch (before clipping)."""
        parameters = [p for group in optimizer.param_groups for p in group["params"]]
        self.token_mean.rescale(parameters, self.trainer.accumulate_grad_batches, self.trainer.world_size)
        super().on_before_optimizer_step(optimizer)

    def evaluate(self, batch: Any, stage: str) -> None:
        """Student CE, perplexities and agreement over the batch's counted tokens, under ``stage/``."""
        tokens = self.step_outputs(batch).tokens
        assert tokens is not None
        vocab = tokens.vocab_size
        student = self._logits(tokens, "student")[..., :vocab].float()
        counted = self.log_student_perplexity(student, tokens.targets, tokens.mask, stage)
        if self.teacher is None:
            return
        teacher = self._logits(tokens, "teacher")[..., :vocab].float()
        teacher_nll = token_cross_entropy_sum(teacher, tokens.targets) / counted.clamp_min(1)
        self.metrics[f"{stage}_teacher_perplexity"].update(teacher_nll, counted)
        self.log(f"{stage}/teacher_perplexity", self.metrics[f"{stage}_teacher_perplexity"])
        agreed = ((student.argmax(dim=-1) == teacher.argmax(dim=-1)) & tokens.mask).sum()
        self.metrics[f"{stage}_agreement"].update(agreed / counted.clamp_min(1), counted)
        self.log(f"{stage}/agreement", self.metrics[f"{stage}_agreement"])

    def log_student_perplexity(self, logits: Tensor, targets: Tensor, mask: Tensor, stage: str) -> Tensor:
        """Log the student's ``stage/loss`` (token-weighted NLL) and ``stage/perplexity``; return the count.

        ``logits``, ``targets``, ``mask``: the shifted ``(N, L - 1, V)`` logits, the next-token ids
        and the tokens that count.
        """
        counted = mask.sum()
        nll = token_cross_entropy_sum(logits, targets) / counted.clamp_min(1)
        self.metrics[f"{stage}_loss"].update(nll, counted)
        self.log(f"{stage}/loss", self.metrics[f"{stage}_loss"])
        self.metrics[f"{stage}_perplexity"].update(nll, counted)
        self.log(f"{stage}/perplexity", self.metrics[f"{stage}_perplexity"], prog_bar=True)
        return counted

    @staticmethod
    def _logits(tokens: TokenOutputs, role: Literal["student", "teacher"]) -> Tensor:
        """A model's shifted logits: as formed, or from its hidden states and head (the fused path)."""
        logits = tokens.student_logits if role == "student" else tokens.teacher_logits
        if logits is not None:
            return logits
        head = tokens.student_head if role == "student" else tokens.teacher_head
        hidden = tokens.student_hidden if role == "student" else tokens.teacher_hidden
        assert head is not None and hidden is not None
        return head(hidden)
