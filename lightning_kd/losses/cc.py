r"""Correlation congruence (CC): match the batch's correlation matrices under a Gaussian-RBF kernel.

Peng, Jin, Liu, Li, Wu, Liu, Zhou, Zhang, "Correlation Congruence for Knowledge Distillation",
ICCV 2019. With :math:`\psi` the order-:math:`P` Taylor expansion of
:math:`\exp(-\gamma \lVert \hat x_i - \hat x_j \rVert^2)` on L2-normalised embeddings:
:math:`\mathcal{L} = \frac{1}{N^2} \lVert \psi^t - \psi^s \rVert_F^2`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_kd.losses._checks import _check_positive, _check_same_batch
from lightning_kd.losses._maps import _rows
from lightning_kd.losses.base import LayerPairTerm, StepOutputs
from lightning_kd.precision import float32_math

__all__ = ["cc_loss", "CCTerm"]


def _cc_kernel(rows: Tensor, gamma: float, order: int) -> Tensor:
    """``(N, N)`` order-``P`` Taylor expansion of the Gaussian RBF kernel of the L2-normalised rows."""
    unit = F.normalize(rows, p=2, dim=1)
    cosine = unit @ unit.t()
    coefficients = [math.exp(-2.0 * gamma) * (2.0 * gamma) ** p / math.factorial(p) for p in range(order + 1)]
    kernel = torch.full_like(cosine, coefficients[-1])
    for coefficient in reversed(coefficients[:-1]):  # Horner: sum_p c_p * cosine ** p
        kernel = kernel * cosine + coefficient
    return kernel


@float32_math
def cc_loss(student_emb: Tensor, teacher_emb: Tensor, gamma: float = 0.4, order: int = 2) -> Tensor:
    r"""Correlation congruence: match the batch's correlation matrices under a Gaussian-RBF kernel.

    Peng et al., "Correlation Congruence for Knowledge Distillation", ICCV 2019. With
    :math:`\hat x_i = x_i / \lVert x_i \rVert` (``F.normalize``, eps :math:`10^{-12}`), the
    Gaussian RBF kernel :math:`\exp(-\gamma \lVert \hat x_i - \hat x_j \rVert^2)
    = e^{-2\gamma} e^{2\gamma \hat x_i^\top \hat x_j}` is replaced by its order-:math:`P`
    Taylor expansion:

    .. math::
        \psi_{ij} = \sum_{p=0}^{P} e^{-2\gamma} \frac{(2\gamma)^p}{p!}
        \big(\hat x_i^\top \hat x_j\big)^p, \qquad
        \mathcal{L} = \frac{1}{N^2} \big\lVert \psi^t - \psi^s \big\rVert_F^2

    the paper's correlation-congruence term with its Gaussian kernel, in the form of ``CC`` in
    ``kd_losses/cc.py`` of ``AberHu/Knowledge-Distillation-Zoo`` (defaults :math:`\gamma = 0.4`,
    :math:`P = 2` from that repository's example script). As :math:`P \to \infty` it tends to the
    exact Gaussian kernel.

    **This is not the CRD benchmark's CC.** ``Correlation`` in ``distiller_zoo/CC.py`` of
    ``HobbitLong/RepDistiller`` computes, on
    embeddings of equal dimension (both models' penultimate features through a trainable
    ``LinearEmbed`` to 128 dimensions),
    :math:`\frac{1}{N-1} \sum_{i=1}^{N-1} \sum_d |\delta_{i,d}|\, |\delta_{i+1,d}|` with
    :math:`\delta = x^s - x^t`: the inner products of the absolute student-teacher residuals of
    *consecutive* samples of the batch, with no normalisation and no kernel (no :math:`\gamma`
    or :math:`P`). Its scale is unrelated to this loss's, so the benchmark's weight (0.02) is
    not calibrated for this form; Knowledge-Distillation-Zoo uses weight 100 with it.

    Invariant to scaling either embedding; student and teacher dimensions may differ (only the
    :math:`N \times N` kernel matrices are compared).

    Args:
        student_emb: ``(N, ...)`` student embeddings, flattened to ``(N, D_s)``.
        teacher_emb: ``(N, ...)`` teacher embeddings, flattened to ``(N, D_t)``; same batch size.
        gamma: :math:`\gamma > 0` of the Gaussian kernel.
        order: :math:`P \ge 0`, the order of the Taylor expansion.

    Returns:
        Scalar: the mean over the :math:`N^2` entries of the squared kernel differences
        (``F.mse_loss``).
    """
    _check_same_batch("student_emb", student_emb, "teacher_emb", teacher_emb)
    _check_positive("gamma", gamma)
    if isinstance(order, bool) or not isinstance(order, int) or order < 0:
        raise ValueError(f"order must be an integer >= 0, got {order!r}.")
    return F.mse_loss(
        _cc_kernel(_rows(student_emb), gamma, order), _cc_kernel(_rows(teacher_emb), gamma, order)
    )


class CCTerm(LayerPairTerm):
    r"""Correlation congruence (Peng et al., ICCV 2019) with the Taylor-expanded Gaussian RBF kernel.

    See :func:`lightning_kd.losses.functional.cc_loss`. The layers' outputs are flattened per
    sample and L2-normalised; their dimensions may differ, the batch size must match. The
    teacher's output is detached. No embedding head is built: the CRD benchmark passes both
    models' penultimate features through a trainable linear embedding (128-d) first; to do that,
    name layers that are such heads in your models.

    The default weight is 100, not the CRD benchmark's 0.02: the benchmark's ``CC.py`` computes
    a different quantity (products of the absolute student-teacher residuals of consecutive
    samples, no kernel; see :func:`~lightning_kd.losses.functional.cc_loss`), unnormalised and
    of order 100 for 128-d embeddings with unit-variance entries, while this kernel loss (the
    paper's) stays below 1 for the default ``gamma`` and ``order``: at 0.02 it would do nothing.
    100 is the weight ``AberHu/Knowledge-Distillation-Zoo`` uses with this same kernel loss.

    Args:
        student_layer: dotted path of the student layer.
        teacher_layer: dotted path of the teacher layer.
        name: key of the term (``train/loss_<name>``).
        weight: factor in the total loss (see above).
        gamma: :math:`\gamma > 0` of the Gaussian kernel.
        order: order :math:`P \ge 0` of its Taylor expansion.
    """

    def __init__(
        self,
        student_layer: str,
        teacher_layer: str,
        name: str = "cc",
        weight: float = 100.0,
        gamma: float = 0.4,
        order: int = 2,
    ) -> None:
        super().__init__(student_layer, teacher_layer, name, weight)
        if not gamma > 0:
            raise ValueError(f"gamma must be > 0, got {gamma}.")
        if isinstance(order, bool) or not isinstance(order, int) or order < 0:
            raise ValueError(f"order must be an integer >= 0, got {order!r}.")
        self.gamma = float(gamma)
        self.order = order

    def forward(self, outputs: StepOutputs) -> Tensor:
        """``cc_loss(student_feature, teacher_feature.detach(), gamma, order)``."""
        student, teacher = self.pair(outputs)
        return cc_loss(student, teacher, gamma=self.gamma, order=self.order)

    def extra_repr(self) -> str:
        """Name, weight, layers and settings, shown in the module repr."""
        return f"{super().extra_repr()}, gamma={self.gamma}, order={self.order}"
