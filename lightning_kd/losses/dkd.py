r"""Decoupled knowledge distillation (DKD): target-class and non-target-class KD, weighted apart.

Zhao, Cui, Song, Qiu, Liang, "Decoupled Knowledge Distillation", CVPR 2022. With
:math:`b = (p_g, 1 - p_g)` the binary target/non-target probabilities and :math:`\hat p` the
distribution among the non-target classes:

.. math::
    \mathcal{L} = \alpha\, T^2 \mathrm{KL}(b^t \| b^s) + \beta\, T^2 \mathrm{KL}(\hat p^t \| \hat p^s)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_kd.losses._checks import _check_logit_pair, _check_num_classes, _check_targets
from lightning_kd.losses._softened import scaled_kl, scaled_log_mean_exp, uses_direct_formula
from lightning_kd.losses._standardize import standardize_logits
from lightning_kd.losses._temperature import rows_temperature
from lightning_kd.losses.base import LossTerm, StepOutputs, checked_temperature, checked_weight
from lightning_kd.precision import float32_math

__all__ = ["dkd_loss", "DKDTerm"]


def _dkd_log_probs(scaled_logits: Tensor, target_mask: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Log-probabilities of DKD's two distributions, from ``(M, C)`` logits already divided by T.

    Returns ``(binary, non_target)``: ``(M, 2)`` log-probabilities of (target, not target) and
    ``(M, C)`` log-probabilities among the non-target classes, with 0 (not -inf) at the target so
    that the KL of those entries is exactly 0 and no NaN reaches the gradient.
    """
    log_norm = torch.logsumexp(scaled_logits, dim=-1, keepdim=True)
    log_p_target = scaled_logits.gather(-1, target.unsqueeze(-1)) - log_norm
    rest = scaled_logits.masked_fill(target_mask, float("-inf"))
    log_rest_norm = torch.logsumexp(rest, dim=-1, keepdim=True)
    binary = torch.cat([log_p_target, log_rest_norm - log_norm], dim=-1)
    non_target = (rest - log_rest_norm).masked_fill(target_mask, 0.0)
    return binary, non_target


def _softened_dkd_parts(
    student_logits: Tensor, teacher_logits: Tensor, target: Tensor, temperature: float
) -> tuple[Tensor, Tensor]:
    """Per-row ``T^2`` TCKD and NCKD of ``(M, C)`` logits, in float64 from ``t - s`` (accurate at any T).

    NCKD is the softened KL over the non-target classes; TCKD the KL of the binary (target, rest)
    distributions, whose teacher-minus-student logit gap for "rest" is ``T log E_q[exp(u / T)]``
    over the student's non-target distribution (:mod:`lightning_kd.losses._softened`).
    """
    student, teacher = student_logits.double(), teacher_logits.double()
    target_mask = torch.zeros_like(student, dtype=torch.bool).scatter_(-1, target.unsqueeze(-1), True)
    gap = (teacher - student).masked_fill(target_mask, 0.0)
    scaled = student / temperature
    log_q_rest = torch.log_softmax(scaled.masked_fill(target_mask, float("-inf")), dim=-1)
    nckd = scaled_kl(log_q_rest, gap, temperature)
    binary_log_q, _ = _dkd_log_probs(scaled, target_mask, target)
    binary_gap = torch.stack(
        [
            (teacher - student).gather(-1, target.unsqueeze(-1)).squeeze(-1),
            scaled_log_mean_exp(log_q_rest, gap, temperature),
        ],
        dim=-1,
    )
    return scaled_kl(binary_log_q, binary_gap, temperature), nckd


@float32_math
def dkd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float | Tensor = 4.0,
    standardize: bool = False,
) -> Tensor:
    r"""Decoupled knowledge distillation: target-class KD plus non-target-class KD, weighted apart.

    Zhao, Cui, Song, Qiu, Liang, "Decoupled Knowledge Distillation", CVPR 2022. With
    :math:`p = \mathrm{softmax}(z / T)` for each model and :math:`g` the label of the row:

    .. math::
        b = \big(p_g,\ 1 - p_g\big), \qquad
        \hat p_c = \frac{p_c}{1 - p_g} \ (c \ne g)

    .. math::
        \mathcal{L} = \alpha \cdot T^2 \frac{1}{N} \sum_n \mathrm{KL}(b^t_n \| b^s_n)
        + \beta \cdot T^2 \frac{1}{N} \sum_n \mathrm{KL}(\hat p^t_n \| \hat p^s_n)

    i.e. ``alpha * TCKD + beta * NCKD``; both KLs are summed over their classes and divided by
    the number of rows (``reduction="sum"`` over the batch size in the authors' ``dkd_loss``,
    ``mdistiller/distillers/DKD.py`` of ``megvii-research/mdistiller``), times :math:`T^2`.
    Defaults are those of that code's config (``mdistiller/engine/cfg.py``: ``ALPHA=1``,
    ``BETA=8``, ``T=4``); its linear warm-up of the whole term over the first ``WARMUP=20``
    epochs is left to a :class:`~lightning_kd.callbacks.LossWeightSchedule`.

    Numerics: the authors take the non-target mass as the sum of the other probabilities and its
    plain ``log``, and drop the target class from :math:`\hat p` by subtracting 1000 from its
    scaled logit. Here both are computed in log-space (``logsumexp``), and the target class is
    excluded exactly (set to ``-inf`` before the non-target ``log_softmax``, its KL entry then set
    to 0). The values are the same wherever the authors' version is finite (it differs only
    where a probability underflows, where theirs gives ``inf`` / ``NaN`` or leaks target mass).
    Outside ``0.1 <= T <= 16`` both KLs are computed in float64 from :math:`t - s` (a cumulant series where
    the direct formula would cancel), accurate at any finite temperature.

    With ``standardize=True`` both models' logits are first replaced by their per-row Z-scores
    (logit standardization, Sun et al., CVPR 2024; :mod:`lightning_kd.losses._standardize`), as
    ``dkd_loss`` of ``sunshangquan/logit-standardization-KD`` does; the authors then use
    :math:`T = 2` and multiply ``alpha`` and ``beta`` by 9 (``tools/train.py``).

    A tensor ``temperature`` is a learned one (CTKD, :class:`~lightning_kd.losses.CTKDTerm`): one
    value or one per row :math:`T_n`, each row's two KLs scaled by its :math:`T_n^2`, by the direct
    formula (gradients flow into the temperature).

    Args:
        student_logits: ``(..., C)`` student logits, ``C >= 2``.
        teacher_logits: ``(..., C)`` teacher logits, same shape.
        target: ``(...)`` integer labels in ``[0, C)``, one per row (``(N,)`` for ``(N, C)``).
        alpha: weight of TCKD (target-class KD).
        beta: weight of NCKD (non-target-class KD).
        temperature: softening temperature :math:`T > 0`, or a learned tensor temperature (see above).
        standardize: Z-score each row of logits first (logit standardization).

    Returns:
        Scalar: ``alpha * TCKD + beta * NCKD``, averaged over all leading positions.
    """
    learned = isinstance(temperature, Tensor)
    # a learned temperature is > 0 by construction (CTKD's sigmoid); only the shapes are checked
    _check_logit_pair(student_logits, teacher_logits, 1.0 if learned else temperature)
    _check_num_classes(student_logits, 2, "for DKD (it splits the target class from the others)")
    _check_targets(student_logits, target)
    if standardize:
        student_logits, teacher_logits = (
            standardize_logits(student_logits),
            standardize_logits(teacher_logits),
        )
    num_classes = student_logits.shape[-1]
    target = target.reshape(-1).long()
    student_logits = student_logits.reshape(-1, num_classes)
    teacher_logits = teacher_logits.reshape(-1, num_classes)
    if not learned and not uses_direct_formula(temperature):
        tckd_rows, nckd_rows = _softened_dkd_parts(student_logits, teacher_logits, target, temperature)
        return (alpha * tckd_rows + beta * nckd_rows).mean().to(student_logits.dtype)
    scale = rows_temperature(temperature, student_logits.shape[0]) if learned else temperature
    z_s = student_logits / scale
    z_t = teacher_logits / scale
    target_mask = torch.zeros_like(z_s, dtype=torch.bool).scatter_(-1, target.unsqueeze(-1), True)
    binary_s, non_target_s = _dkd_log_probs(z_s, target_mask, target)
    binary_t, non_target_t = _dkd_log_probs(z_t, target_mask, target)
    if learned:
        tckd_rows = F.kl_div(binary_s, binary_t, reduction="none", log_target=True).sum(dim=-1)
        nckd_rows = F.kl_div(non_target_s, non_target_t, reduction="none", log_target=True).sum(dim=-1)
        return ((alpha * tckd_rows + beta * nckd_rows) * scale.squeeze(-1) ** 2).mean()
    tckd = F.kl_div(binary_s, binary_t, reduction="batchmean", log_target=True)
    nckd = F.kl_div(non_target_s, non_target_t, reduction="batchmean", log_target=True)
    return (alpha * tckd + beta * nckd) * temperature**2


class DKDTerm(LossTerm):
    """Decoupled KD (Zhao et al., CVPR 2022): ``alpha * TCKD + beta * NCKD``; needs labels.

    See :func:`lightning_kd.losses.functional.dkd_loss`. The teacher's logits are detached.

    Args:
        name: key of the term (``train/loss_<name>``).
        weight: factor in the total loss (the authors pair it with cross-entropy at weight 1 and
            warm it up linearly over 20 epochs: use a
            :class:`~lightning_kd.callbacks.LossWeightSchedule` for that).
        alpha: weight of the target-class part (TCKD).
        beta: weight of the non-target-class part (NCKD).
        temperature: softening temperature; :class:`~lightning_kd.callbacks.TemperatureAnnealing`
            changes it during training.
        standardize: Z-score each sample's logits first (logit standardization, Sun et al.,
            CVPR 2024); the authors then use ``temperature=2``, ``alpha=9``, ``beta=72``.
    """

    def __init__(
        self,
        name: str = "dkd",
        weight: float = 1.0,
        alpha: float = 1.0,
        beta: float = 8.0,
        temperature: float = 4.0,
        standardize: bool = False,
    ) -> None:
        super().__init__(name, weight)
        self.alpha = checked_weight(alpha, name, "alpha (the weight of TCKD)")
        self.beta = checked_weight(beta, name, "beta (the weight of NCKD)")
        self.temperature = checked_temperature(temperature)
        self.standardize = bool(standardize)

    def forward(self, outputs: StepOutputs) -> Tensor:
        """``dkd_loss(student_logits, teacher_logits.detach(), targets, ...)`` with the term's settings."""
        return self.loss_at_temperature(outputs, self.temperature)

    def loss_at_temperature(self, outputs: StepOutputs, temperature: float | Tensor) -> Tensor:
        """The term's loss at ``temperature``: a float, or a learned tensor (CTKD)."""
        targets = self.required_targets(outputs, why=" (DKD) to split the target class from the others")
        return dkd_loss(
            outputs.student_logits,
            self.detached_teacher_logits(outputs),
            targets,
            alpha=self.alpha,
            beta=self.beta,
            temperature=temperature,
            standardize=self.standardize,
        )

    def extra_repr(self) -> str:
        """Name, weight and settings, shown in the module repr."""
        settings = f"alpha={self.alpha}, beta={self.beta}, temperature={self.temperature}"
        return f"{super().extra_repr()}, {settings}, standardize={self.standardize}"
