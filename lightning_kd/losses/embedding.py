"""Loss terms on embeddings: distillation of representations, with or without labels."""

from __future__ import annotations

from typing import Literal

from torch import Tensor

from lightning_kd.losses import functional
from lightning_kd.losses.base import LossTerm, StepOutputs

__all__ = ["EmbeddingMatchTerm"]


class EmbeddingMatchTerm(LossTerm):
    """The student's embedding of each sample pulled onto the teacher's (cosine or MSE).

    See :func:`lightning_kd.losses.functional.embedding_match_loss`. It reads
    ``student_logits`` / ``teacher_logits``, which hold the embeddings in an
    :class:`~lightning_kd.EmbeddingDistillationModule`; the teacher's are detached.

    Args:
        name: key of the term (``train/loss_<name>``).
        weight: factor in the total loss.
        kind: ``"cosine"`` (1 - cosine similarity) or ``"mse"``.
    """

    def __init__(
        self, name: str = "embedding", weight: float = 1.0, kind: Literal["cosine", "mse"] = "cosine"
    ) -> None:
        super().__init__(name, weight)
        if kind not in ("cosine", "mse"):
            raise ValueError(f"kind must be 'cosine' or 'mse', got {kind!r}.")
        self.kind = kind

    def forward(self, outputs: StepOutputs) -> Tensor:
        """Mean distance over the batch."""
        if outputs.teacher_logits is None:
            raise ValueError(f"Loss term {self.name!r} needs the teacher's embeddings; the step has none.")
        return functional.embedding_match_loss(
            outputs.student_logits, outputs.teacher_logits.detach(), kind=self.kind
        )
