r"""Neuron selectivity transfer (NST): MMD between the channels' spatial activation patterns.

Huang, Wang, "Like What You Like: Knowledge Distill via Neuron Selectivity Transfer", arXiv
1707.01219, 2017. With :math:`f^i` the L2-normalised channels and :math:`k(x, y) = (x^\top y)^2`:

.. math::
    \mathcal{L} = \frac{1}{C_t^2} \sum_{i, i'} k(f^i_t, f^{i'}_t) + \frac{1}{C_s^2} \sum_{j, j'}
    k(f^j_s, f^{j'}_s) - \frac{2}{C_s C_t} \sum_{i, j} k(f^j_s, f^i_t)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_kd.losses._checks import _check_feature_maps
from lightning_kd.losses._maps import _pool_to_common_size
from lightning_kd.losses.base import LayerPairTerm, StepOutputs
from lightning_kd.precision import float32_math

__all__ = ["nst_loss", "NSTTerm"]


def _mean_squared_dot(a: Tensor, b: Tensor) -> Tensor:
    """Mean over batch and channel pairs of the polynomial kernel ``(a_i . b_j) ** 2``."""
    return torch.bmm(a, b.transpose(1, 2)).pow(2).mean()


@float32_math
def nst_loss(student_feat: Tensor, teacher_feat: Tensor) -> Tensor:
    r"""Neuron selectivity transfer: MMD between the channels' spatial activation patterns.

    Huang, Wang, "Like What You Like: Knowledge Distill via Neuron Selectivity Transfer", 2017.
    Each channel of an ``(N, C, H, W)`` map is a sample :math:`f^i \in \mathbb{R}^{HW}` of its
    image's distribution, L2-normalised (``F.normalize``, eps :math:`10^{-12}`); with the
    polynomial kernel :math:`k(x, y) = (x^\top y)^2` (degree 2, constant 0):

    .. math::
        \mathcal{L} = \frac{1}{N} \sum_n \Big[
        \frac{1}{C_t^2} \sum_{i, i'} k(f^i_t, f^{i'}_t)
        + \frac{1}{C_s^2} \sum_{j, j'} k(f^j_s, f^{j'}_s)
        - \frac{2}{C_s C_t} \sum_{i, j} k(f^j_s, f^i_t) \Big]

    the squared MMD of the paper, per sample and averaged over the batch, as ``NSTLoss.nst_loss``
    of the CRD benchmark (``distiller_zoo/NST.py`` of ``HobbitLong/RepDistiller``, with its
    ``full_loss=True``: the teacher-teacher term is included, so the loss is 0 when the maps
    agree). The kernel matrices are computed with a batched matrix product instead of the
    benchmark's broadcast (the same values, without its :math:`N C_s C_t H W` intermediate).
    Gradients flow into both inputs; the loss terms pass a detached teacher feature, as the
    benchmark computes teacher features without gradients.

    Spatial sizes may differ: the larger map is average-pooled down to the smaller size, as in
    :func:`at_loss` (and the benchmark). Channel counts may differ. The benchmark sums this loss
    over several stage pairs with one weight (50); add one term per pair for that.

    Invariant to scaling either feature map.

    Args:
        student_feat: ``(N, C_s, H_s, W_s)`` student feature map.
        teacher_feat: ``(N, C_t, H_t, W_t)`` teacher feature map; same batch size.

    Returns:
        Scalar: the squared MMD, averaged over the batch.
    """
    _check_feature_maps("student_feat", student_feat, "teacher_feat", teacher_feat)
    student_feat, teacher_feat = _pool_to_common_size(student_feat, teacher_feat)
    student = F.normalize(student_feat.reshape(*student_feat.shape[:2], -1), p=2, dim=2)
    teacher = F.normalize(teacher_feat.reshape(*teacher_feat.shape[:2], -1), p=2, dim=2)
    return (
        _mean_squared_dot(teacher, teacher)
        + _mean_squared_dot(student, student)
        - 2 * _mean_squared_dot(student, teacher)
    )


class NSTTerm(LayerPairTerm):
    """Neuron selectivity transfer (Huang & Wang, 2017): polynomial-kernel MMD between channel patterns.

    See :func:`lightning_kd.losses.functional.nst_loss`. Channel counts may differ; when the
    spatial sizes differ, the larger map is average-pooled to the smaller one (as in the CRD
    benchmark). The teacher's feature is detached.

    One term is one layer pair. The CRD benchmark applies NST to the output of every stage
    (``feat[1:-1]``) and sums the losses with one weight (50): add one ``NSTTerm`` per stage
    pair, each with the default weight, for the same objective.

    Args:
        student_layer: dotted path of the student layer.
        teacher_layer: dotted path of the teacher layer.
        name: key of the term (``train/loss_<name>``); several terms need distinct names.
        weight: factor in the total loss; 50 is the CRD benchmark's (``-b 50``).
    """

    def __init__(
        self, student_layer: str, teacher_layer: str, name: str = "nst", weight: float = 50.0
    ) -> None:
        super().__init__(student_layer, teacher_layer, name, weight)

    def forward(self, outputs: StepOutputs) -> Tensor:
        """``nst_loss(student_feature, teacher_feature.detach())``."""
        student, teacher = self.pair(outputs)
        return nst_loss(student, teacher)
