r"""Generalized distillation (learning using privileged information, LUPI).

Lopez-Paz, Bottou, Schölkopf, Vapnik, "Unifying distillation and privileged information", ICLR
2016, Eq. 2; the teacher may see privileged inputs :math:`x^\star`:

.. math::
    \mathcal{L} = \frac{1}{N} \sum_n \Big[(1 - \lambda)\, \ell\big(y_n, \sigma(s_n)\big)
    + \lambda\, \ell\big(\sigma(t_n / T), \sigma(s_n)\big)\Big]
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from lightning_kd.losses._checks import _check_logit_pair, _check_targets
from lightning_kd.losses.base import LossTerm, StepOutputs, checked_temperature
from lightning_kd.precision import float32_math

__all__ = ["generalized_distillation_loss", "GeneralizedDistillationTerm"]


@float32_math
def generalized_distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor | None,
    temperature: float = 1.0,
    imitation: float = 0.5,
) -> Tensor:
    r"""Generalized distillation: imitate a teacher's softened predictions and fit the hard labels.

    Lopez-Paz, Bottou, Schölkopf, Vapnik, "Unifying distillation and privileged information",
    ICLR 2016, Eq. 2. The teacher may see privileged inputs :math:`x^\star` that the student
    never sees (Vapnik's learning using privileged information); with :math:`x^\star = x` this is
    Hinton's distillation. With :math:`\sigma` the softmax, :math:`s_n` the student's logits,
    :math:`t_n` the teacher's, :math:`y_n` the label and
    :math:`\ell(p, q) = -\sum_k p_k \log q_k` the cross-entropy:

    .. math::
        \mathcal{L} = \frac{1}{N} \sum_n \Big[(1 - \lambda)\, \ell\big(y_n, \sigma(s_n)\big)
        + \lambda\, \ell\big(\sigma(t_n / T), \sigma(s_n)\big)\Big]

    Unlike Hinton KD (:func:`kd_loss`), the student's softmax is taken at :math:`T = 1` and there is
    no :math:`T^2` factor: the student's own probabilities match the teacher's softened ones. (The
    authors' Keras code, ``code/mnist.py`` of ``lopezpaz/distillation_privileged_information``,
    weights the soft term by :math:`T^2 \lambda` instead of :math:`\lambda`; that objective is
    :math:`w` times this one with :math:`w = 1 - \lambda + T^2 \lambda` and imitation
    :math:`T^2 \lambda / w`.) The soft term is a cross-entropy, so it includes the entropy of
    the teacher's soft labels: its minimum is that entropy, not 0; the gradient equals a KL's.

    Args:
        student_logits: ``(..., C)`` student logits (computed from the regular inputs :math:`x`).
        teacher_logits: ``(..., C)`` teacher logits, same shape (computed from :math:`x^\star`).
        target: ``(...)`` class indices; may be ``None`` when ``imitation == 1`` (pure
            imitation, e.g. on unlabelled data).
        temperature: softening temperature :math:`T > 0` of the teacher's predictions.
        imitation: the imitation parameter :math:`\lambda \in [0, 1]`: 0 is the student alone
            on the labels, 1 pure imitation of the teacher.

    Returns:
        Scalar: the objective averaged over all leading positions.
    """
    _check_logit_pair(student_logits, teacher_logits, temperature)
    if not 0.0 <= imitation <= 1.0:
        raise ValueError(f"imitation (lambda) must be in [0, 1], got {imitation}.")
    num_classes = student_logits.shape[-1]
    log_p_student = F.log_softmax(student_logits.reshape(-1, num_classes), dim=-1)
    soft_labels = F.softmax(teacher_logits.reshape(-1, num_classes) / temperature, dim=-1)
    soft = -(soft_labels * log_p_student).sum(dim=-1).mean()
    if imitation == 1.0:
        return soft
    if target is None:
        raise ValueError(
            f"generalized_distillation_loss needs labels when imitation < 1 (got imitation={imitation} "
            "and target=None): pass the class indices, or set imitation=1 for pure imitation."
        )
    _check_targets(student_logits, target)
    hard = F.nll_loss(log_p_student, target.reshape(-1))
    return (1.0 - imitation) * hard + imitation * soft


class GeneralizedDistillationTerm(LossTerm):
    r"""Generalized distillation (Lopez-Paz, Bottou, Schölkopf, Vapnik, ICLR 2016).

    The whole objective of the paper's Eq. 2 in one term:
    :math:`(1 - \lambda)\,\ell(y, \sigma(f(x))) + \lambda\,\ell(\sigma(f_t(x^\star)/T), \sigma(f(x)))`;
    see :func:`lightning_kd.losses.functional.generalized_distillation_loss`. Use it alone
    (``losses=[GeneralizedDistillationTerm(...)]``, no separate cross-entropy term). For learning
    using privileged information, give the module ``teacher_input_key`` so that the teacher reads
    the privileged inputs :math:`x^\star` and the student only :math:`x`. The teacher's logits are
    detached.

    Args:
        name: key of the term (``train/loss_<name>``).
        weight: factor in the total loss.
        temperature: softening temperature :math:`T` of the teacher's predictions (the paper's
            grid: 1, 2, 5, 10, 20, 50); :class:`~lightning_kd.callbacks.TemperatureAnnealing`
            changes it during training.
        imitation: the imitation parameter :math:`\lambda \in [0, 1]` (0: labels only, 1: teacher
            only; the paper's grid: 0, 0.1, ..., 1).
    """

    def __init__(
        self,
        name: str = "gd",
        weight: float = 1.0,
        temperature: float = 1.0,
        imitation: float = 0.5,
    ) -> None:
        super().__init__(name, weight)
        if not 0.0 <= imitation <= 1.0:
            raise ValueError(f"imitation (lambda) must be in [0, 1], got {imitation}.")
        self.temperature = checked_temperature(temperature)
        self.imitation = float(imitation)

    def forward(self, outputs: StepOutputs) -> Tensor:
        """``generalized_distillation_loss(student_logits, teacher_logits.detach(), targets, T, lambda)``."""
        teacher_logits = self.detached_teacher_logits(outputs)
        targets = outputs.targets
        if self.imitation < 1.0:
            targets = self.required_targets(
                outputs,
                why=f" when imitation < 1 (got {self.imitation})",
                fix="set the module's target_key, or imitation=1.0 for pure imitation",
            )
        return generalized_distillation_loss(
            outputs.student_logits,
            teacher_logits,
            targets,
            temperature=self.temperature,
            imitation=self.imitation,
        )

    def extra_repr(self) -> str:
        """Name, weight and settings, shown in the module repr."""
        return f"{super().extra_repr()}, temperature={self.temperature}, imitation={self.imitation}"
