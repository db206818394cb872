r"""Relational knowledge distillation (RKD): match the batch's pairwise distances and triplet angles.

Park, Kim, Lu, Cho, "Relational Knowledge Distillation", CVPR 2019. With :math:`\psi_D` the
pairwise distances divided by their mean, :math:`\psi_A` the cosines of triplet angles and
:math:`\ell_1` the Huber loss:

.. math::
    \mathcal{L} = w_D \operatorname{mean}_{i,j} \ell_1(\psi^s_D, \psi^t_D)
    + w_A \operatorname{mean}_{i,j,k} \ell_1(\psi^s_A, \psi^t_A)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_kd.losses._checks import _check_same_batch
from lightning_kd.losses._maps import _rows
from lightning_kd.losses.base import LayerPairTerm, StepOutputs, checked_weight
from lightning_kd.precision import float32_math

__all__ = ["rkd_loss", "RKDTerm"]


#: clamp of the squared pairwise distances in RKD, before the square root (RepDistiller ``RKD.py``).
_RKD_PDIST_EPS = 1e-12


def _rkd_distances(rows: Tensor) -> Tensor:
    """Pairwise Euclidean distances ``(N, N)``, zero diagonal, divided by their off-diagonal mean.

    As RepDistiller's ``RKDLoss.pdist``: squared distances from the Gram matrix, clamped at
    ``1e-12`` (so distinct rows, even duplicates, get a distance of at least ``1e-6``), square root,
    diagonal set to 0. Every off-diagonal entry is then positive, so the benchmark's mean over
    ``d > 0`` is the mean over the :math:`N (N - 1)` off-diagonal entries.
    """
    batch = rows.shape[0]
    squared_norms = rows.pow(2).sum(dim=1)
    squared = squared_norms.unsqueeze(1) + squared_norms.unsqueeze(0) - 2 * rows @ rows.t()
    distances = squared.clamp(min=_RKD_PDIST_EPS).sqrt()
    diagonal = torch.eye(batch, dtype=torch.bool, device=rows.device)
    distances = distances.masked_fill(diagonal, 0.0)
    return distances / (distances.sum() / (batch * (batch - 1)))


def _rkd_angles(rows: Tensor) -> Tensor:
    """Cosines ``(N, N, N)``: entry ``[i, j, k]`` is the cosine of the angle at ``x_i`` to ``x_j``, ``x_k``.

    Difference vectors are L2-normalised with ``F.normalize`` (eps ``1e-12``), so a zero vector
    (``j == i`` or ``k == i``) gives a cosine of 0.
    """
    directions = F.normalize(rows.unsqueeze(0) - rows.unsqueeze(1), p=2, dim=2)  # [i, j] = x_j - x_i
    return torch.bmm(directions, directions.transpose(1, 2))


@float32_math
def rkd_loss(
    student_emb: Tensor,
    teacher_emb: Tensor,
    distance_weight: float = 25.0,
    angle_weight: float = 50.0,
) -> Tensor:
    r"""Relational KD: match the batch's normalised pairwise distances and triplet angles.

    Park, Kim, Lu, Cho, "Relational Knowledge Distillation", CVPR 2019. With embeddings
    :math:`x_1, \dots, x_N` (flattened per sample) and :math:`\ell_1` the Huber loss
    (``F.smooth_l1_loss``, threshold 1):

    .. math::
        \psi_D(i, j) = \frac{\lVert x_i - x_j \rVert}{\mu}, \quad
        \mu = \frac{1}{N(N-1)} \sum_{i \ne j} \lVert x_i - x_j \rVert, \qquad
        \psi_A(i, j, k) = \Big\langle \frac{x_j - x_i}{\lVert x_j - x_i \rVert},
        \frac{x_k - x_i}{\lVert x_k - x_i \rVert} \Big\rangle

    .. math::
        \mathcal{L} = w_D \cdot \frac{1}{N^2} \sum_{i, j} \ell_1\big(\psi^s_D(i, j), \psi^t_D(i, j)\big)
        + w_A \cdot \frac{1}{N^3} \sum_{i, j, k} \ell_1\big(\psi^s_A(i, j, k), \psi^t_A(i, j, k)\big)

    following ``RKDLoss`` of the CRD benchmark (``distiller_zoo/RKD.py`` of
    ``HobbitLong/RepDistiller``), which differs from the paper's sums in its reductions: both
    parts are *means* over all :math:`N^2` pairs and :math:`N^3` triplets, including the
    degenerate ones (zero-distance diagonal, and angles with ``j == i`` or ``k == i``, whose
    zero difference vector is normalised to 0 and gives a cosine of 0; both models then agree
    on those entries, which only dilute the mean). Distances are computed as in the benchmark
    (squared distances from the Gram matrix clamped at :math:`10^{-12}`, then square root).
    Defaults :math:`w_D = 25`, :math:`w_A = 50` are the benchmark's.

    Both parts are invariant to scaling either embedding and to translating it; the
    embedding dimensions of student and teacher may differ. Memory is
    :math:`O(N^2 D + N^3)` (the angle part builds all difference vectors, as the benchmark does).

    Args:
        student_emb: ``(N, ...)`` student embeddings, flattened to ``(N, D_s)``; ``N >= 2``.
        teacher_emb: ``(N, ...)`` teacher embeddings, flattened to ``(N, D_t)``; same batch size.
        distance_weight: :math:`w_D`, weight of the distance part.
        angle_weight: :math:`w_A`, weight of the angle part.

    Returns:
        Scalar: ``distance_weight * distance_loss + angle_weight * angle_loss``.
    """
    _check_same_batch("student_emb", student_emb, "teacher_emb", teacher_emb)
    if student_emb.shape[0] < 2:
        raise ValueError(
            f"rkd_loss needs at least 2 samples per batch to compare distances, got student_emb of shape "
            f"{tuple(student_emb.shape)} and teacher_emb of shape {tuple(teacher_emb.shape)}."
        )
    student, teacher = _rows(student_emb), _rows(teacher_emb)
    distance = F.smooth_l1_loss(_rkd_distances(student), _rkd_distances(teacher))
    angle = F.smooth_l1_loss(_rkd_angles(student), _rkd_angles(teacher))
    return distance_weight * distance + angle_weight * angle


class RKDTerm(LayerPairTerm):
    """Relational KD (Park et al., CVPR 2019): distance and angle relations of a batch's embeddings.

    See :func:`lightning_kd.losses.functional.rkd_loss`. The layers' outputs are flattened per
    sample; their dimensions may differ, the batch size must match (at least 2 samples). The
    teacher's output is detached. The CRD benchmark applies it to the penultimate (pooled)
    features of both models, without an embedding head; no head is built here either.

    Args:
        student_layer: dotted path of the student layer.
        teacher_layer: dotted path of the teacher layer.
        name: key of the term (``train/loss_<name>``).
        weight: factor in the total loss; 1 is the CRD benchmark's (``-b 1``).
        distance_weight: weight of the distance part inside the loss (benchmark: 25).
        angle_weight: weight of the angle part inside the loss (benchmark: 50).
    """

    def __init__(
        self,
        student_layer: str,
        teacher_layer: str,
        name: str = "rkd",
        weight: float = 1.0,
        distance_weight: float = 25.0,
        angle_weight: float = 50.0,
    ) -> None:
        super().__init__(student_layer, teacher_layer, name, weight)
        self.distance_weight = checked_weight(distance_weight, name, "distance_weight")
        self.angle_weight = checked_weight(angle_weight, name, "angle_weight")

    def forward(self, outputs: StepOutputs) -> Tensor:
        """``rkd_loss(student_feature, teacher_feature.detach(), distance_weight, angle_weight)``."""
        student, teacher = self.pair(outputs)
        return rkd_loss(
            student, teacher, distance_weight=self.distance_weight, angle_weight=self.angle_weight
        )

    def extra_repr(self) -> str:
        """Name, weight, layers and settings, shown in the module repr."""
        weights = f"distance_weight={self.distance_weight}, angle_weight={self.angle_weight}"
        return f"{super().extra_repr()}, {weights}"
