r"""Probabilistic knowledge transfer (PKT): match the conditional distributions of a cosine kernel.

Passalis, Tefas, "Learning Deep Representations with Probabilistic Knowledge Transfer", ECCV
2018. With :math:`p_{j|i} = K_{ij} / \sum_k K_{ik}` and :math:`K_{ij} = (\cos(x_i, x_j) + 1) / 2`:

.. math::
    \mathcal{L} = \frac{1}{N^2} \sum_{i, j} p^t_{j|i} \log \frac{p^t_{j|i} + \epsilon}{p^s_{j|i} + \epsilon}
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_kd.losses._checks import _check_positive, _check_same_batch
from lightning_kd.losses._maps import _rows
from lightning_kd.losses.base import LayerPairTerm, StepOutputs
from lightning_kd.precision import float32_math

__all__ = ["pkt_loss", "PKTTerm"]


def _pkt_conditionals(rows: Tensor, eps: float) -> Tensor:
    """Row-stochastic ``(N, N)`` matrix of the shifted cosine kernel ``(cos + 1) / 2``."""
    unit = rows / (rows.norm(p=2, dim=1, keepdim=True) + eps)
    kernel = (unit @ unit.t() + 1.0) / 2.0
    return kernel / kernel.sum(dim=1, keepdim=True)


@float32_math
def pkt_loss(student_emb: Tensor, teacher_emb: Tensor, eps: float = 1e-7) -> Tensor:
    r"""Probabilistic knowledge transfer: match the conditional distributions of a cosine kernel.

    Passalis, Tefas, "Learning Deep Representations with Probabilistic Knowledge Transfer",
    ECCV 2018. With :math:`\hat x_i = x_i / (\lVert x_i \rVert + \epsilon)` and the cosine
    kernel shifted to :math:`[0, 1]`:

    .. math::
        K_{ij} = \frac{\hat x_i^\top \hat x_j + 1}{2}, \qquad
        p_{j|i} = \frac{K_{ij}}{\sum_{k} K_{ik}}, \qquad
        \mathcal{L} = \frac{1}{N^2} \sum_{i, j} p^t_{j|i}
        \log \frac{p^t_{j|i} + \epsilon}{p^s_{j|i} + \epsilon}

    as ``PKT.cosine_similarity_loss`` of the CRD benchmark (``distiller_zoo/PKT.py`` of
    ``HobbitLong/RepDistiller``, from the authors' code): the sums include :math:`j = i` (the
    paper's conditional probabilities leave the sample itself out), :math:`\epsilon = 10^{-7}`
    is added to the norm and inside the logarithm, and the KL divergences are *averaged over all*
    :math:`N^2` *entries* (not summed, nor divided by :math:`N`), hence the benchmark's weight
    of 30000. The benchmark also replaces NaN entries of the normalised embeddings by 0; a zero
    embedding already gives 0 here (``0 / (0 + eps)``), so NaN can only come from non-finite
    inputs, and it is left to propagate rather than hidden. The norm is
    :func:`torch.linalg.vector_norm`, whose gradient at a zero embedding is 0 (the benchmark's
    ``sqrt(sum(x ** 2))`` gives NaN there); values are the same.

    Invariant to positive scaling of either embedding (up to :math:`\epsilon`); the embedding
    dimensions of student and teacher may differ.

    Args:
        student_emb: ``(N, ...)`` student embeddings, flattened to ``(N, D_s)``.
        teacher_emb: ``(N, ...)`` teacher embeddings, flattened to ``(N, D_t)``; same batch size.
        eps: :math:`\epsilon > 0`.

    Returns:
        Scalar: the mean over the :math:`N^2` entries of the teacher-to-student KL terms.
    """
    _check_same_batch("student_emb", student_emb, "teacher_emb", teacher_emb)
    _check_positive("eps", eps)
    p_student = _pkt_conditionals(_rows(student_emb), eps)
    p_teacher = _pkt_conditionals(_rows(teacher_emb), eps)
    return (p_teacher * torch.log((p_teacher + eps) / (p_student + eps))).mean()


class PKTTerm(LayerPairTerm):
    """Probabilistic knowledge transfer (Passalis & Tefas, ECCV 2018) with a cosine kernel.

    See :func:`lightning_kd.losses.functional.pkt_loss`. The layers' outputs are flattened per
    sample; their dimensions may differ, the batch size must match. The teacher's output is
    detached. The CRD benchmark applies it to the penultimate (pooled) features of both models,
    without an embedding head; no head is built here either.

    Args:
        student_layer: dotted path of the student layer.
        teacher_layer: dotted path of the teacher layer.
        name: key of the term (``train/loss_<name>``).
        weight: factor in the total loss; 30000 is the CRD benchmark's (``-b 30000``): the loss is
            a mean over the :math:`N^2` entries of the batch's similarity matrix.
        eps: added to the norms and inside the logarithm.
    """

    def __init__(
        self,
        student_layer: str,
        teacher_layer: str,
        name: str = "pkt",
        weight: float = 30000.0,
        eps: float = 1e-7,
    ) -> None:
        super().__init__(student_layer, teacher_layer, name, weight)
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps}.")
        self.eps = float(eps)

    def forward(self, outputs: StepOutputs) -> Tensor:
        """``pkt_loss(student_feature, teacher_feature.detach(), eps)``."""
        student, teacher = self.pair(outputs)
        return pkt_loss(student, teacher, eps=self.eps)

    def extra_repr(self) -> str:
        """Name, weight, layers and settings, shown in the module repr."""
        return f"{super().extra_repr()}, eps={self.eps}"
