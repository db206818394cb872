r"""Attention transfer (AT): match the normalised spatial attention maps of two feature maps.

Zagoruyko, Komodakis, "Paying More Attention to Attention: Improving the Performance of
Convolutional Neural Networks via Attention Transfer", ICLR 2017. With
:math:`Q = \operatorname{vec}(\frac{1}{C} \sum_c |f_c|^p)`:

.. math::
    \mathcal{L} = \frac{1}{N H W} \sum_n \Big\lVert \frac{Q^s_n}{\lVert Q^s_n \rVert}
    - \frac{Q^t_n}{\lVert Q^t_n \rVert} \Big\rVert_2^2
"""

from __future__ import annotations

from torch import Tensor

from lightning_kd.losses._checks import _check_feature_maps, _check_positive
from lightning_kd.losses._maps import _attention_map, _pool_to_common_size
from lightning_kd.losses.base import LayerPairTerm, StepOutputs
from lightning_kd.precision import float32_math

__all__ = ["at_loss", "ATTerm"]


@float32_math
def at_loss(student_feat: Tensor, teacher_feat: Tensor, p: float = 2.0) -> Tensor:
    r"""Attention transfer: match the normalised spatial attention maps of two feature maps.

    Zagoruyko, Komodakis, "Paying More Attention to Attention", ICLR 2017. With the attention
    map of an ``(N, C, H, W)`` feature :math:`f`:

    .. math::
        Q = \operatorname{vec}\Big(\frac{1}{C} \sum_c |f_c|^p\Big) \in \mathbb{R}^{HW}, \qquad
        \mathcal{L} = \frac{1}{N H W} \sum_{n} \Big\lVert \frac{Q^s_n}{\lVert Q^s_n \rVert}
        - \frac{Q^t_n}{\lVert Q^t_n \rVert} \Big\rVert_2^2

    as ``Attention.at_loss`` of the CRD benchmark (``distiller_zoo/AT.py`` of
    ``HobbitLong/RepDistiller``, after the authors' ``szagoruyko/attention-transfer``): the
    channel *mean* (the normalisation makes mean and sum equivalent), ``F.normalize`` (eps
    :math:`10^{-12}`), and the *mean of the squared* difference, where the paper writes the
    (unsquared) :math:`p`-norm of the difference. The benchmark raises :math:`f` itself to the
    power ``p``; here :math:`|f|^p` as in the paper, which is the same for the default
    :math:`p = 2` and for non-negative (post-ReLU) features, and avoids NaN or sign
    cancellation for negative inputs with other ``p``.

    Spatial sizes may differ: as in the benchmark, the larger map is average-pooled
    (``F.adaptive_avg_pool2d``) down to the smaller size before the attention maps are taken.
    The benchmark pools to a square ``(H, H)`` chosen from the heights only; here height and width
    are matched separately (to ``(min H, min W)``), which is the same for square maps. Channel
    counts may differ. The benchmark sums this loss over several stage pairs with one weight
    (1000); add one term per pair for that.

    Invariant to scaling either feature map.

    Args:
        student_feat: ``(N, C_s, H_s, W_s)`` student feature map.
        teacher_feat: ``(N, C_t, H_t, W_t)`` teacher feature map; same batch size.
        p: exponent :math:`p > 0` of the attention map.

    Returns:
        Scalar: the mean over the batch and the :math:`H W` positions of the squared difference.
    """
    _check_feature_maps("student_feat", student_feat, "teacher_feat", teacher_feat)
    _check_positive("p", p)
    student_feat, teacher_feat = _pool_to_common_size(student_feat, teacher_feat)
    return (_attention_map(student_feat, p) - _attention_map(teacher_feat, p)).pow(2).mean()


class ATTerm(LayerPairTerm):
    """Attention transfer (Zagoruyko & Komodakis, ICLR 2017) between two ``(N, C, H, W)`` feature maps.

    See :func:`lightning_kd.losses.functional.at_loss`. Channel counts may differ; when the
    spatial sizes differ, the larger map is average-pooled to the smaller one (as in the CRD
    benchmark). The teacher's feature is detached.

    One term is one layer pair. The CRD benchmark applies AT to the output of every stage
    (``feat[1:-1]``) and sums the losses with one weight (1000): add one ``ATTerm`` per stage
    pair, each with the default weight, for the same objective.

    Args:
        student_layer: dotted path of the student layer (as in ``student.named_modules()``).
        teacher_layer: dotted path of the teacher layer.
        name: key of the term (``train/loss_<name>``); several terms need distinct names.
        weight: factor in the total loss; 1000 is the CRD benchmark's (``-b 1000``).
        p: exponent of the attention map (benchmark: 2).
    """

    def __init__(
        self,
        student_layer: str,
        teacher_layer: str,
        name: str = "at",
        weight: float = 1000.0,
        p: float = 2.0,
    ) -> None:
        super().__init__(student_layer, teacher_layer, name, weight)
        if not p > 0:
            raise ValueError(f"p must be > 0, got {p}.")
        self.p = float(p)

    def forward(self, outputs: StepOutputs) -> Tensor:
        """``at_loss(student_feature, teacher_feature.detach(), p)``."""
        student, teacher = self.pair(outputs)
        return at_loss(student, teacher, p=self.p)

    def extra_repr(self) -> str:
        """Name, weight, layers and settings, shown in the module repr."""
        return f"{super().extra_repr()}, p={self.p}"
