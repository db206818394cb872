r"""DIST: knowledge distillation from a stronger teacher by matching Pearson correlations.

Huang, You, Wang, Qian, Xu, "Knowledge Distillation from A Stronger Teacher", NeurIPS 2022.
With :math:`\rho` the Pearson correlation of the softened predictions :math:`Y = \mathrm{softmax}(z / T)`:

.. math::
    \mathcal{L} = T^2 \Big(\beta \big(1 - \tfrac{1}{N} \textstyle\sum_n \rho(Y^s_{n,:}, Y^t_{n,:})\big)
    + \gamma \big(1 - \tfrac{1}{C} \textstyle\sum_c \rho(Y^s_{:,c}, Y^t_{:,c})\big)\Big)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_kd.losses._checks import _check_logit_pair
from lightning_kd.losses._softened import scaled_log_mean_exp, uses_direct_formula
from lightning_kd.losses.base import LossTerm, StepOutputs, checked_temperature, checked_weight
from lightning_kd.precision import float32_math

__all__ = ["dist_loss", "DISTTerm"]


#: added to the product of norms in DIST's Pearson correlation, as in the authors' code.
_DIST_EPS = 1e-8


def _mean_pearson(a: Tensor, b: Tensor) -> Tensor:
    """Mean over rows of the Pearson correlation of ``a[i]`` and ``b[i]`` (eps as in DIST)."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    correlation = (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + _DIST_EPS)
    return correlation.mean()


def _softmax_offset(logits: Tensor, temperature: float) -> Tensor:
    r""":math:`\mathrm{softmax}(z / T) - 1 / C` in float64, accurate where it is tiny (large T).

    With :math:`\beta = z - T \log \frac{1}{C} \sum_c e^{z_c / T}`, the offset is
    :math:`\mathrm{expm1}(\beta / T) / C` (and :math:`\beta / T \le \log C`, so no overflow).
    Pearson correlations are shift-invariant, so DIST reads the same from these.
    """
    logits = logits.double()
    num_classes = logits.shape[-1]
    uniform = torch.full_like(logits, -math.log(num_classes))
    beta = logits - scaled_log_mean_exp(uniform, logits, temperature).unsqueeze(-1)
    return torch.expm1(beta / temperature) / num_classes


@float32_math
def dist_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    beta: float = 1.0,
    gamma: float = 1.0,
    temperature: float = 1.0,
) -> Tensor:
    r"""DIST: match the Pearson correlations of the predictions across classes and across the batch.

    Huang, You, Wang, Qian, Xu, "Knowledge Distillation from A Stronger Teacher", NeurIPS 2022.
    With :math:`Y^s, Y^t \in \mathbb{R}^{N \times C}` the predictions
    :math:`\mathrm{softmax}(z / T)` and :math:`\rho` the Pearson correlation:

    .. math::
        \mathcal{L}_{inter} = 1 - \frac{1}{N} \sum_n \rho(Y^s_{n,:}, Y^t_{n,:}), \qquad
        \mathcal{L}_{intra} = 1 - \frac{1}{C} \sum_c \rho(Y^s_{:,c}, Y^t_{:,c})

    .. math::
        \mathcal{L} = T^2 \big(\beta \mathcal{L}_{inter} + \gamma \mathcal{L}_{intra}\big),
        \qquad \rho(u, v) = \frac{(u - \bar u) \cdot (v - \bar v)}
        {\lVert u - \bar u \rVert \, \lVert v - \bar v \rVert + \epsilon}, \quad
        \epsilon = 10^{-8}

    as in the authors' code (``lib/models/losses/dist_kd.py`` of
    ``hunto/image_classification_sota``, the classification code of ``hunto/DIST_KD``): the
    :math:`\epsilon` is added to the product of the norms, the mean is over samples
    (inter-class) and over classes (intra-class). That version of the file has no temperature
    (softmax at :math:`T = 1`); the temperature with its :math:`T^2` factor on both parts is the
    common temperature-scaled form of DIST, and the defaults (:math:`\beta = \gamma = T = 1`)
    reproduce the authors' module exactly.

    Leading dimensions are flattened into rows, as the authors' segmentation code does with
    pixels; the intra-class part correlates each class across all rows, so it needs more than one
    row (with a single row it is constantly 1 and gives no gradient).

    Outside ``0.1 <= T <= 16`` the predictions' offsets from uniform, which the correlations read, are
    computed in float64 without cancellation (:func:`_softmax_offset`). As :math:`T` grows those
    offsets shrink like :math:`1 / T` and the authors' :math:`\epsilon` comes to dominate the
    norms, so the loss approaches :math:`T^2 (\beta + \gamma)`: DIST is meant for small
    temperatures.

    Args:
        student_logits: ``(..., C)`` student logits.
        teacher_logits: ``(..., C)`` teacher logits, same shape.
        beta: weight of the inter-class relation.
        gamma: weight of the intra-class relation.
        temperature: softmax temperature :math:`T > 0`.

    Returns:
        Scalar: ``T^2 * (beta * inter + gamma * intra)``, each part in ``[0, 2]``.
    """
    _check_logit_pair(student_logits, teacher_logits, temperature)
    num_classes = student_logits.shape[-1]
    student_logits = student_logits.reshape(-1, num_classes)
    teacher_logits = teacher_logits.reshape(-1, num_classes)
    if not uses_direct_formula(temperature):
        y_s, y_t = _softmax_offset(student_logits, temperature), _softmax_offset(teacher_logits, temperature)
    else:
        y_s = F.softmax(student_logits / temperature, dim=-1)
        y_t = F.softmax(teacher_logits / temperature, dim=-1)
    inter = 1 - _mean_pearson(y_s, y_t)
    intra = 1 - _mean_pearson(y_s.t(), y_t.t())
    return (temperature**2 * (beta * inter + gamma * intra)).to(student_logits.dtype)


class DISTTerm(LossTerm):
    """DIST (Huang et al., NeurIPS 2022): match inter- and intra-class Pearson correlations.

    See :func:`lightning_kd.losses.functional.dist_loss`. The teacher's logits are detached. The
    intra-class part correlates each class across the batch: it needs batches of more than one
    sample.

    Args:
        name: key of the term (``train/loss_<name>``).
        weight: factor in the total loss.
        beta: weight of the inter-class relation (per sample, across classes).
        gamma: weight of the intra-class relation (per class, across the batch).
        temperature: softmax temperature; :class:`~lightning_kd.callbacks.TemperatureAnnealing`
            changes it during training.
    """

    def __init__(
        self,
        name: str = "dist",
        weight: float = 1.0,
        beta: float = 1.0,
        gamma: float = 1.0,
        temperature: float = 1.0,
    ) -> None:
        super().__init__(name, weight)
        self.beta = checked_weight(beta, name, "beta (the weight of the inter-class part)")
        self.gamma = checked_weight(gamma, name, "gamma (the weight of the intra-class part)")
        self.temperature = checked_temperature(temperature)

    def forward(self, outputs: StepOutputs) -> Tensor:
        """``dist_loss(student_logits, teacher_logits.detach(), beta, gamma, temperature)``."""
        return dist_loss(
            outputs.student_logits,
            self.detached_teacher_logits(outputs),
            beta=self.beta,
            gamma=self.gamma,
            temperature=self.temperature,
        )

    def extra_repr(self) -> str:
        """Name, weight and settings, shown in the module repr."""
        return f"{super().extra_repr()}, beta={self.beta}, gamma={self.gamma}, temperature={self.temperature}"
