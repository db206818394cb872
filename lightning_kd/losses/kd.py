r"""Hinton knowledge distillation (KD), optionally on standardized logits.

Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network", NIPS Deep Learning
Workshop, 2015:

.. math::
    \mathcal{L} = T^2 \cdot \frac{1}{N} \sum_n \mathrm{KL}\big(\mathrm{softmax}(t_n / T)
    \,\|\, \mathrm{softmax}(s_n / T)\big)

Logit standardization: Sun, Ren, Li, Wang, Cao, "Logit Standardization in Knowledge
Distillation", CVPR 2024 (each row of logits replaced by its Z-score before the division by T).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from lightning_kd.losses._checks import _check_logit_pair
from lightning_kd.losses._softened import softened_kl, uses_direct_formula
from lightning_kd.losses._standardize import standardize_logits
from lightning_kd.losses._temperature import rows_temperature
from lightning_kd.losses.base import LossTerm, StepOutputs, checked_temperature
from lightning_kd.precision import float32_math

__all__ = ["kd_loss", "KDTerm"]


@float32_math
def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float | Tensor = 4.0,
    standardize: bool = False,
) -> Tensor:
    r"""Hinton knowledge distillation: KL divergence between temperature-softened predictions.

    Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network", 2015:

    .. math::
        \mathcal{L} = T^2 \cdot \frac{1}{N} \sum_{n} \mathrm{KL}\big(
        \mathrm{softmax}(t_n / T) \,\|\, \mathrm{softmax}(s_n / T)\big)

    The :math:`T^2` factor keeps the gradient magnitude independent of :math:`T`. As
    :math:`T \to \infty` the loss tends to :math:`\tfrac12 \mathrm{Var}_c(t_c - s_c)` (variance over
    the classes, uniformly weighted). Outside ``0.1 <= T <= 16`` it is computed in float64 from
    :math:`t - s` (a cumulant series where the direct formula would cancel), so value and gradient
    stay accurate at any finite temperature (see :mod:`lightning_kd.losses._softened`).

    With ``standardize=True``, logit standardization (Sun et al., "Logit Standardization in
    Knowledge Distillation", CVPR 2024) replaces every row of logits :math:`z` (student's and
    teacher's, each on its own) by its Z-score before the division by :math:`T`:

    .. math::
        \mathcal{Z}(z) = \frac{z - \bar z}{\epsilon + \sigma(z)}, \qquad
        \bar z = \frac{1}{C} \sum_c z_c, \quad
        \sigma(z) = \Big(\frac{1}{C - 1} \sum_c (z_c - \bar z)^2\Big)^{1/2},
        \quad \epsilon = 10^{-7}

    following the authors' code (``normalize`` in ``mdistiller/distillers/KD.py`` of
    ``sunshangquan/logit-standardization-KD``; :mod:`lightning_kd.losses._standardize`):
    ``torch.Tensor.std``'s default, i.e. the *unbiased* standard deviation (Bessel's correction),
    :math:`\epsilon` added to the std (not under the square root), then the division by :math:`T`,
    and the :math:`T^2` factor kept. The loss then no longer depends on the scale or offset of either
    model's logits (up to :math:`\epsilon`), and :math:`T` acts as the paper's base temperature on
    logits of unit variance (the authors use :math:`T = 2` with the KD weight 9 on CIFAR-100).

    A tensor ``temperature`` is a learned one (CTKD, :class:`~lightning_kd.losses.CTKDTerm`): one
    value, or one per row :math:`T_n`; the loss is then
    :math:`\frac{1}{N} \sum_n T_n^2\, \mathrm{KL}(\mathrm{softmax}(t_n / T_n) \| \mathrm{softmax}(s_n / T_n))`
    by the direct formula (gradients flow into the temperature).

    Args:
        student_logits: ``(..., C)`` student logits.
        teacher_logits: ``(..., C)`` teacher logits, same shape.
        temperature: softening temperature :math:`T > 0`, or a learned tensor temperature (see above).
        standardize: Z-score each row of logits first (needs ``C >= 2``); ``False`` is plain KD.

    Returns:
        Scalar: KL summed over classes, averaged over all leading positions (``batchmean``
        for ``(N, C)`` inputs, as in the CRD benchmark's ``DistillKL``), times :math:`T^2`.
    """
    learned = isinstance(temperature, Tensor)
    # a learned temperature is > 0 by construction (CTKD's sigmoid); only the shapes are checked
    _check_logit_pair(student_logits, teacher_logits, 1.0 if learned else temperature)
    if standardize:
        student_logits, teacher_logits = (
            standardize_logits(student_logits),
            standardize_logits(teacher_logits),
        )
    num_classes = student_logits.shape[-1]
    student_logits = student_logits.reshape(-1, num_classes)
    teacher_logits = teacher_logits.reshape(-1, num_classes)
    if learned:
        rows = rows_temperature(temperature, student_logits.shape[0])
        log_p_student = F.log_softmax(student_logits / rows, dim=-1)
        log_p_teacher = F.log_softmax(teacher_logits / rows, dim=-1)
        kl_rows = F.kl_div(log_p_student, log_p_teacher, reduction="none", log_target=True).sum(dim=-1)
        return (kl_rows * rows.squeeze(-1) ** 2).mean()
    if not uses_direct_formula(temperature):
        return softened_kl(student_logits, teacher_logits, temperature).mean().to(student_logits.dtype)
    log_p_student = F.log_softmax(student_logits / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits / temperature, dim=-1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return kl * temperature**2


class KDTerm(LossTerm):
    """Hinton KD from the teacher's soft predictions into the student's.

    See :func:`lightning_kd.losses.functional.kd_loss`. The teacher's logits are detached:
    with a co-trained teacher the student learns from it, not the other way round.

    Args:
        name: key of the term (``train/loss_<name>``).
        weight: factor in the total loss (the CRD benchmark uses 0.9 with CE at 0.1).
        temperature: softening temperature; :class:`~lightning_kd.callbacks.TemperatureAnnealing`
            changes it during training.
        standardize: Z-score each sample's logits first (logit standardization, Sun et al.,
            CVPR 2024); the temperature then applies to logits of unit variance.
    """

    def __init__(
        self,
        name: str = "kd",
        weight: float = 1.0,
        temperature: float = 4.0,
        standardize: bool = False,
    ) -> None:
        super().__init__(name, weight)
        self.temperature = checked_temperature(temperature)
        self.standardize = bool(standardize)

    def forward(self, outputs: StepOutputs) -> Tensor:
        """``kd_loss(student_logits, teacher_logits.detach(), temperature, standardize)``."""
        return self.loss_at_temperature(outputs, self.temperature)

    def loss_at_temperature(self, outputs: StepOutputs, temperature: float | Tensor) -> Tensor:
        """The term's loss at ``temperature``: a float, or a learned tensor (CTKD)."""
        return kd_loss(
            outputs.student_logits,
            self.detached_teacher_logits(outputs),
            temperature,
            standardize=self.standardize,
        )

    def extra_repr(self) -> str:
        """Name, weight and settings, shown in the module repr."""
        return f"{super().extra_repr()}, temperature={self.temperature}, standardize={self.standardize}"
