r"""Embedding matching: the student's embedding of each sample pulled onto the teacher's.

The "Cosine" distillation baseline of Fang, Wang, Wang, Zhang, Yang, Liu, "SEED: Self-supervised
Distillation For Visual Representation", ICLR 2021, and the MSE of Reimers, Gurevych, "Making
Monolingual Sentence Embeddings Multilingual using Knowledge Distillation", EMNLP 2020:

.. math::
    \mathcal{L}_{cos} = \frac{1}{N} \sum_i \big(1 - \cos(s_i, t_i)\big), \qquad
    \mathcal{L}_{mse} = \operatorname{mean}\big((s - t)^2\big)
"""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor

from lightning_kd.losses._checks import _check_embedding_pair
from lightning_kd.losses.base import LossTerm, StepOutputs
from lightning_kd.precision import float32_math

__all__ = ["embedding_match_loss", "EmbeddingMatchTerm"]


@float32_math
def embedding_match_loss(student_emb: Tensor, teacher_emb: Tensor, kind: str = "cosine") -> Tensor:
    r"""Distance between the student's and the teacher's embedding of each sample.

    ``"cosine"``: :math:`\frac{1}{N}\sum_i \left(1 - \cos(s_i, t_i)\right)`, as in the
    "Cosine" distillation baseline of SEED (Fang et al., ICLR 2021) and in sentence-embedding
    distillation (Reimers & Gurevych, EMNLP 2020, which uses MSE). ``"mse"``: the mean over all
    elements of :math:`(s - t)^2`.

    Args:
        student_emb: ``(N, D)`` student embeddings.
        teacher_emb: ``(N, D)`` teacher embeddings.
        kind: ``"cosine"`` or ``"mse"``.

    Returns:
        Scalar: mean over samples (cosine) or over all elements (MSE).
    """
    if kind not in ("cosine", "mse"):
        raise ValueError(f"kind must be 'cosine' or 'mse', got {kind!r}.")
    _check_embedding_pair(student_emb, teacher_emb)
    if kind == "mse":
        return F.mse_loss(student_emb, teacher_emb)
    return (1 - F.cosine_similarity(student_emb, teacher_emb, dim=-1)).mean()


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
        teacher = self.detached_teacher_logits(outputs, "embeddings")
        return embedding_match_loss(outputs.student_logits, teacher, kind=self.kind)
