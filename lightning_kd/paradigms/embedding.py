"""EmbeddingDistillationModule: distil a teacher's representations, without labels."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch.nn.functional as F
from torch import Tensor, nn

from lightning_kd.losses import EmbeddingMatchTerm, LossTerm, StepOutputs
from lightning_kd.model_io import InputKey
from lightning_kd.module import DistillationModule
from lightning_kd.module_setup import hparams_given_by_cli
from lightning_kd.teachers.roles import TEACHER_MODES

__all__ = ["EmbeddingDistillationModule", "embedding_of"]

#: keys (or attributes) under which a model's output may carry its embedding
EMBEDDING_KEYS = ("embedding", "sentence_embedding")


def embedding_of(output: Any) -> Tensor:
    """The ``(N, D)`` embedding in a model's output.

    The tensor itself, or ``output["embedding"]`` / ``output.embedding`` (also
    ``sentence_embedding``, the sentence-transformers name) of a mapping or ``ModelOutput``.
    """
    if isinstance(output, Tensor):
        return output
    for key in EMBEDDING_KEYS:
        if isinstance(output, Mapping) and key in output:
            return output[key]
        if not isinstance(output, Mapping) and isinstance(getattr(output, key, None), Tensor):
            return getattr(output, key)
    raise TypeError(
        f"Cannot find an embedding in a model output of type {type(output).__name__}; return a tensor "
        f"or an output with one of {list(EMBEDDING_KEYS)} (for Hugging Face encoders, wrap the model in "
        "lightning_kd.models.SentenceEncoder, which pools the token states)."
    )


class EmbeddingDistillationModule(DistillationModule):
    """Train a student to reproduce a teacher's embeddings; labels, if the batches have any, are unused.

    The training step is :class:`~lightning_kd.DistillationModule`'s with embeddings in place of
    logits: teacher forward (no gradients) -> student forward -> weighted sum of loss terms, which
    read the embeddings as ``student_logits`` / ``teacher_logits`` and the raw outputs (e.g. a
    Hugging Face ``ModelOutput`` with hidden states and attentions) as ``student_output`` /
    ``teacher_output``. Default objective: :class:`~lightning_kd.losses.EmbeddingMatchTerm`
    (1 - cosine similarity). Self-supervised distillation (SEED, Fang et al., ICLR 2021) and
    sentence-encoder compression (Reimers & Gurevych, EMNLP 2020) are both this module with
    other terms. With ``teacher_mode="ema"`` the teacher is a moving average of the student
    (mean-teacher self-distillation).

    Student and teacher embeddings must have the same width: give a narrower student a
    projection head. Metrics: ``val|test/cosine``, the mean cosine similarity between student and
    teacher embeddings, and ``val|test/loss``, the training objective on held-out data.

    Args:
        student: the network being trained; returns an ``(N, D)`` embedding (see :func:`embedding_of`).
        teacher: the network whose embeddings are reproduced (``None`` with ``teacher_mode="ema"``).
        losses: the loss terms; default ``[EmbeddingMatchTerm("embedding", kind="cosine")]``.
        teacher_mode: ``"frozen"`` or ``"ema"``.
        input_key: where the inputs are in a batch (see :class:`~lightning_kd.DistillationModule`);
            a list of keys of a dict batch is passed as keyword arguments, ``None`` is the whole batch.
        **kwargs: the other arguments of :class:`~lightning_kd.DistillationModule`
            (``teacher_checkpoint``, ``save_teacher``, ``teacher_input_key``, ``ema_decay``,
            ``optimizer``, ``lr_scheduler``, ...); there are no labels, so no ``target_key``.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None = None,
        losses: Sequence[LossTerm] | None = None,
        teacher_mode: Literal["frozen", "ema"] = "frozen",
        input_key: InputKey = 0,
        **kwargs: Any,
    ) -> None:
        role = TEACHER_MODES.get(teacher_mode)
        if role is None or role.receives_gradients:
            raise ValueError(
                f"teacher_mode must be 'frozen' or 'ema' for embedding distillation, got {teacher_mode!r}."
            )
        if teacher is None and not role.copies_student:
            raise ValueError(
                "Embedding distillation needs a teacher: pass `teacher` (or teacher_mode='ema')."
            )
        if "target_key" in kwargs:
            raise ValueError("Embedding distillation reads no labels: remove target_key.")
        super().__init__(
            student,
            teacher,
            losses=list(losses) if losses is not None else [EmbeddingMatchTerm("embedding", kind="cosine")],
            teacher_mode=teacher_mode,
            input_key=input_key,
            target_key=None,
            **kwargs,
        )
        modules = ["student", "teacher", "losses", "optimizer", "lr_scheduler"]
        self.save_hyperparameters(ignore=None if hparams_given_by_cli() else modules)

    def build_metrics(self) -> nn.ModuleDict:
        """None: the held-out cosine and loss are batch means that Lightning averages over the epoch."""
        return nn.ModuleDict()

    @staticmethod
    def prediction_of(output: Any) -> Tensor:
        """The embedding in a model's output (:func:`embedding_of`)."""
        return embedding_of(output)

    def check_first_outputs(self, outputs: StepOutputs) -> None:
        """At the first batch: one ``(N, D)`` embedding per sample from both models (no class checks)."""
        for role, embedding in (("student", outputs.student_logits), ("teacher", outputs.teacher_logits)):
            if embedding is not None and embedding.ndim != 2:
                raise ValueError(
                    f"The {role}'s embedding has shape {tuple(embedding.shape)}: expected (N, D), one vector "
                    "per sample: pool token states into one (lightning_kd.models.SentenceEncoder does)."
                )

    def evaluate(self, batch: Any, stage: str) -> None:
        """The held-out objective and the mean student-teacher cosine, under ``stage/``."""
        outputs = self.step_outputs(batch)
        total, _ = self.compute_loss(outputs)
        student, teacher = outputs.student_logits.float(), outputs.teacher_logits.float()
        if student.shape != teacher.shape:
            raise ValueError(
                f"The student's embeddings have shape {tuple(student.shape)} but the teacher's "
                f"{tuple(teacher.shape)}: give the student a projection head onto width {teacher.shape[-1]}."
            )
        cosine = F.cosine_similarity(student, teacher, dim=-1).mean()
        size = student.shape[0]
        self.log(f"{stage}/loss", total.detach(), batch_size=size, sync_dist=True)
        self.log(f"{stage}/cosine", cosine, batch_size=size, sync_dist=True, prog_bar=True)
