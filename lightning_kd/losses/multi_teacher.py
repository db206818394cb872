r"""Multi-teacher KD: KL from the weighted mixture of several teachers' soft targets.

Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network", 2015 (distilling an
ensemble through its averaged predictions); per-sample confidence weights from Zhang, Chen, Wang,
"Confidence-Aware Multi-Teacher Knowledge Distillation", ICASSP 2022 (CA-MKD):

.. math::
    \mathcal{L} = T^2 \frac{1}{N} \sum_n \mathrm{KL}\Big(\sum_m w_{mn} \mathrm{softmax}(t_{mn} / T)
    \,\Big\|\, \mathrm{softmax}(s_n / T)\Big), \qquad
    w_{mn} = \frac{1}{M - 1}\Big(1 - \frac{e^{\ell_{mn}}}{\sum_k e^{\ell_{kn}}}\Big)
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_kd.losses._checks import _check_positive, _check_targets
from lightning_kd.losses._softened import scaled_kl, scaled_log_mean_exp, uses_direct_formula
from lightning_kd.losses.base import LossTerm, StepOutputs, checked_temperature
from lightning_kd.precision import float32_math

__all__ = ["confidence_weights", "ensemble_log_probs", "multi_teacher_kd_loss", "MultiTeacherKDTerm"]


def _check_teacher_stack(student_logits: Tensor, teacher_logits: Tensor, weights: Tensor) -> None:
    """``(M, N, C)`` teacher logits for ``(N, C)`` student logits; weights ``(M,)`` or ``(M, N)``."""
    if teacher_logits.ndim != student_logits.ndim + 1 or teacher_logits.shape[1:] != student_logits.shape:
        raise ValueError(
            f"teacher_logits must stack one (N, C) tensor per teacher, i.e. shape (M, "
            f"{', '.join(map(str, student_logits.shape))}); got {tuple(teacher_logits.shape)}. "
            "Teachers and student must predict the same classes."
        )
    if weights.shape not in ((teacher_logits.shape[0],), teacher_logits.shape[:2]):
        raise ValueError(
            f"weights must have shape (M,) or (M, N) = {tuple(teacher_logits.shape[:2])} for "
            f"{teacher_logits.shape[0]} teachers; got {tuple(weights.shape)}."
        )


@float32_math
def ensemble_log_probs(teacher_logits: Tensor, weights: Tensor, temperature: float = 1.0) -> Tensor:
    r"""Log-probabilities of a weighted mixture of teachers' softened predictions.

    .. math::
        \log \bar p_n = \log \sum_m w_{mn} \, \mathrm{softmax}(t_{mn} / T)

    computed as a ``logsumexp`` of :math:`\log w + \log\mathrm{softmax}` for stability.

    Args:
        teacher_logits: ``(M, N, C)`` logits of M teachers.
        weights: ``(M,)`` or per-sample ``(M, N)`` non-negative weights summing to 1 over M.
        temperature: softening temperature :math:`T > 0`.

    Returns:
        ``(N, C)`` log-probabilities of the mixture.
    """
    _check_positive("temperature", temperature)
    _check_teacher_stack(teacher_logits[0], teacher_logits, weights)
    log_weights = weights.clamp_min(0).log()
    while log_weights.ndim < teacher_logits.ndim:
        log_weights = log_weights.unsqueeze(-1)
    return torch.logsumexp(log_weights + F.log_softmax(teacher_logits / temperature, dim=-1), dim=0)


def _softened_mixture_kl(
    student_logits: Tensor, teacher_logits: Tensor, weights: Tensor, temperature: float
) -> Tensor:
    """The loss in float64 from the gaps ``t_m - s``, accurate at any temperature.

    Teacher m's log-ratio to the student, times T, is ``b_m = u_m - T log E_q[exp(u_m / T)]``; the
    mixture's is ``T log sum_m w_m exp(b_m / T)``, and the KL that of the student tilted by it
    (:mod:`lightning_kd.losses._softened`).
    """
    student, teachers = student_logits.double(), teacher_logits.double()
    log_q = torch.log_softmax(student / temperature, dim=-1)
    gaps = teachers - student
    ratios = gaps - scaled_log_mean_exp(log_q.expand_as(gaps), gaps, temperature).unsqueeze(-1)
    log_weights = weights.double().clamp_min(0).log()
    while log_weights.ndim < ratios.ndim:
        log_weights = log_weights.unsqueeze(-1)
    mixture = scaled_log_mean_exp(log_weights.expand_as(ratios), ratios, temperature, dim=0)
    return scaled_kl(log_q, mixture, temperature).mean()


@float32_math
def multi_teacher_kd_loss(
    student_logits: Tensor, teacher_logits: Tensor, weights: Tensor, temperature: float = 4.0
) -> Tensor:
    r"""KD from an ensemble: KL from the weighted mixture of the teachers' soft targets.

    Hinton et al. (2015) distil an ensemble through its averaged predictions:

    .. math::
        \mathcal{L} = T^2 \cdot \frac{1}{N} \sum_n \mathrm{KL}\Big(\sum_m w_{mn}\,
        \mathrm{softmax}(t_{mn} / T) \,\Big\|\, \mathrm{softmax}(s_n / T)\Big)

    Because the cross-entropy part of KL is linear in the target, the gradient with respect
    to the student equals that of the weighted sum of per-teacher KD losses
    :math:`\sum_m w_{mn} \mathrm{KL}_{mn}` (the form CA-MKD writes); the values differ by the
    mixture's entropy, a constant for the student.

    Args:
        student_logits: ``(N, C)`` student logits.
        teacher_logits: ``(M, N, C)`` logits of M teachers.
        weights: ``(M,)`` or per-sample ``(M, N)`` weights summing to 1 over M.
        temperature: softening temperature :math:`T > 0`.

    Returns:
        Scalar: KL summed over classes, averaged over samples, times :math:`T^2`.
    """
    _check_positive("temperature", temperature)
    _check_teacher_stack(student_logits, teacher_logits, weights)
    if not uses_direct_formula(temperature):
        return _softened_mixture_kl(student_logits, teacher_logits, weights, temperature).to(
            student_logits.dtype
        )
    log_target = ensemble_log_probs(teacher_logits, weights, temperature)
    log_student = F.log_softmax(student_logits / temperature, dim=-1)
    kl = F.kl_div(log_student, log_target, reduction="sum", log_target=True)
    return kl / student_logits.shape[0] * temperature**2


@float32_math
def confidence_weights(teacher_logits: Tensor, targets: Tensor) -> Tensor:
    r"""Per-sample teacher weights from their confidence in the label (CA-MKD).

    Zhang, Chen, Wang, "Confidence-Aware Multi-Teacher Knowledge Distillation", ICASSP 2022:
    with :math:`\ell_{mn}` teacher m's cross-entropy on sample n,

    .. math::
        w_{mn} = \frac{1}{M - 1}\Big(1 - \frac{\exp \ell_{mn}}{\sum_k \exp \ell_{kn}}\Big)

    so a teacher that is surer of the right class weighs more; weights sum to 1 over M
    (a single teacher gets weight 1).

    Args:
        teacher_logits: ``(M, N, C)`` logits of M teachers.
        targets: ``(N,)`` class indices.

    Returns:
        ``(M, N)`` weights.
    """
    num_teachers = teacher_logits.shape[0]
    _check_targets(teacher_logits[0], targets)
    if num_teachers == 1:
        return torch.ones(teacher_logits.shape[:2], device=teacher_logits.device)
    losses = torch.stack([F.cross_entropy(logits, targets, reduction="none") for logits in teacher_logits])
    return (1.0 - losses.softmax(dim=0)) / (num_teachers - 1)


Weighting = Literal["fixed", "confidence"]


class MultiTeacherKDTerm(LossTerm):
    """KD from several teachers' soft targets, mixed with fixed or confidence-based weights.

    See :func:`lightning_kd.losses.functional.multi_teacher_kd_loss`. The teacher must be a
    :class:`~lightning_kd.TeacherEnsemble`. ``weighting="fixed"`` mixes with the
    ensemble's ``weights``; ``"confidence"`` gives every sample its own weights from each
    teacher's cross-entropy on the label (CA-MKD, Zhang et al., ICASSP 2022,
    :func:`~lightning_kd.losses.functional.confidence_weights`), so it needs labels.

    Args:
        name: key of the term (``train/loss_<name>``).
        weight: factor in the total loss.
        temperature: softening temperature.
        weighting: ``"fixed"`` or ``"confidence"``.
    """

    def __init__(
        self, name: str = "kd", weight: float = 0.9, temperature: float = 4.0, weighting: Weighting = "fixed"
    ) -> None:
        super().__init__(name, weight)
        if weighting not in ("fixed", "confidence"):
            raise ValueError(f"weighting must be 'fixed' or 'confidence', got {weighting!r}.")
        self.temperature = checked_temperature(temperature)
        self.weighting = weighting

    def forward(self, outputs: StepOutputs) -> Tensor:
        """T^2-scaled KL from the mixture of the members' soft targets."""
        output = outputs.teacher_output
        if not isinstance(output, dict) or "members" not in output:
            raise ValueError(
                f"Loss term {self.name!r} reads every teacher's logits: make the teacher a "
                "lightning_kd.TeacherEnsemble (or use KDTerm for a single teacher)."
            )
        members = output["members"].detach()
        if self.weighting == "fixed":
            weights = output["weights"]
        else:
            targets = self.required_targets(
                outputs,
                why=" to weigh the teachers by their confidence in them",
                fix="use weighting='fixed' for unlabelled batches",
            )
            weights = confidence_weights(members, targets)
        return multi_teacher_kd_loss(outputs.student_logits, members, weights, self.temperature)
