r"""Similarity-preserving knowledge distillation (SP): match the batch's pairwise-similarity matrices.

Tung, Mori, "Similarity-Preserving Knowledge Distillation", ICCV 2019. With
:math:`\tilde G = \operatorname{rownorm}(Q Q^\top)` of the features :math:`Q` flattened per sample:
:math:`\mathcal{L} = \frac{1}{N^2} \lVert \tilde G^t - \tilde G^s \rVert_F^2`.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from lightning_kd.losses._checks import _check_same_batch
from lightning_kd.losses._maps import _rows
from lightning_kd.losses.base import LayerPairTerm, StepOutputs
from lightning_kd.precision import float32_math

__all__ = ["sp_loss", "SPTerm"]


def _sp_similarity(feature: Tensor) -> Tensor:
    """Row-L2-normalised Gram matrix of the flattened samples, ``(N, N)``."""
    rows = _rows(feature)
    return F.normalize(rows @ rows.t(), p=2, dim=1)


@float32_math
def sp_loss(student_feat: Tensor, teacher_feat: Tensor) -> Tensor:
    r"""Similarity-preserving KD: match the batch's normalised pairwise-similarity matrices.

    Tung, Mori, "Similarity-Preserving Knowledge Distillation", ICCV 2019. With
    :math:`Q \in \mathbb{R}^{N \times D}` the features flattened per sample:

    .. math::
        \tilde G = \operatorname{rownorm}(Q Q^\top), \qquad
        \mathcal{L} = \frac{1}{N^2} \big\lVert \tilde G^t - \tilde G^s \big\rVert_F^2

    where each row of the Gram matrix is divided by its L2 norm (``F.normalize``, eps
    :math:`10^{-12}` on the norm), as in ``Similarity.similarity_loss`` of the CRD benchmark
    (``distiller_zoo/SP.py`` of ``HobbitLong/RepDistiller``), which agrees with the paper's
    formula. The paper sums this over layer pairs; the benchmark uses one pair (the last
    convolutional stage, before pooling) with weight 3000.

    Student and teacher may have different channel counts and spatial sizes: only the
    :math:`N \times N` similarity matrices are compared. The loss is invariant to scaling either
    feature.

    Args:
        student_feat: ``(N, ...)`` student feature, flattened to ``(N, D_s)``.
        teacher_feat: ``(N, ...)`` teacher feature, flattened to ``(N, D_t)``; same batch size.

    Returns:
        Scalar: the squared Frobenius distance divided by :math:`N^2` (the mean over the
        :math:`N^2` entries). The benchmark returns it as a 1-element tensor; here a 0-d one.
    """
    _check_same_batch("student_feat", student_feat, "teacher_feat", teacher_feat)
    batch = student_feat.shape[0]
    difference = _sp_similarity(teacher_feat) - _sp_similarity(student_feat)
    return difference.pow(2).sum() / batch**2


class SPTerm(LayerPairTerm):
    """Similarity-preserving KD (Tung & Mori, ICCV 2019) between one student and one teacher layer.

    See :func:`lightning_kd.losses.functional.sp_loss`. The layers' outputs are flattened per
    sample; their sizes may differ, the batch size must match. The teacher's feature is detached.
    The CRD benchmark applies it to the output of the last convolutional stage (before pooling).

    Args:
        student_layer: dotted path of the student layer (as in ``student.named_modules()``).
        teacher_layer: dotted path of the teacher layer.
        name: key of the term (``train/loss_<name>``).
        weight: factor in the total loss; 3000 is the CRD benchmark's (``-b 3000``).
    """

    def __init__(
        self, student_layer: str, teacher_layer: str, name: str = "sp", weight: float = 3000.0
    ) -> None:
        super().__init__(student_layer, teacher_layer, name, weight)

    def forward(self, outputs: StepOutputs) -> Tensor:
        """``sp_loss(student_feature, teacher_feature.detach())``."""
        student, teacher = self.pair(outputs)
        return sp_loss(student, teacher)
