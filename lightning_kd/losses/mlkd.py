r"""Multi-level logit distillation (MLKD): instance-, batch- and class-level alignment at many temperatures.

Jin, Wang, Lin, "Multi-Level Logit Distillation", CVPR 2023. With :math:`P = \mathrm{softmax}(Z / T)`
the ``(N, C)`` predictions of a batch at temperature :math:`T`:

.. math::
    L_{ins} = T^2\, \frac{1}{N} \sum_n \mathrm{KL}(p^t_n \| p^s_n), \quad
    L_{batch} = \frac{1}{N} \big\| P_t P_t^\top - P_s P_s^\top \big\|_F^2, \quad
    L_{class} = \frac{1}{C} \big\| P_t^\top P_t - P_s^\top P_s \big\|_F^2

summed over the temperatures :math:`T \in \{2, 3, 4, 5, 6\}` and over a weak and a strong
augmentation of each sample (:mod:`lightning_kd.data.two_views`), as the authors' code combines them
(``KD_ours.forward_train`` in ``mdistiller/distillers/KD_ours.py`` of
``Jin-Ying/Multi-Level-Logit-Distillation``; ``MLKD.forward_train`` in
``mdistiller/distillers/MLKD.py`` of ``sunshangquan/logit-standardization-KD``, which adds logit
standardization to the instance level).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_kd.losses._checks import _check_logit_pair, _check_num_classes, _check_same_shape
from lightning_kd.losses.base import LossTerm, StepOutputs, checked_temperature
from lightning_kd.losses.kd import kd_loss
from lightning_kd.model_io import TwoViewBatch
from lightning_kd.precision import float32_math

__all__ = [
    "MLKD_TEMPERATURES",
    "MLKDTerm",
    "batch_correlation_loss",
    "class_correlation_loss",
    "mlkd_loss",
    "share_at_or_below_percentile",
]

#: the temperatures of the authors' code, in its order (the first is ``cfg.KD.TEMPERATURE``).
MLKD_TEMPERATURES = (4.0, 3.0, 5.0, 2.0, 6.0)


@float32_math
def batch_correlation_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    r"""MLKD's batch level: :math:`\frac{1}{N} \| P_t P_t^\top - P_s P_s^\top \|_F^2` of ``(N, C)`` logits.

    :math:`P = \mathrm{softmax}(Z / T)` row-wise; the ``(N, N)`` Gram matrices compare every pair of
    samples' predictions (``bc_loss`` of the authors' code; no :math:`T^2` factor).

    Returns:
        Scalar: the squared differences summed over the ``N x N`` entries, divided by ``N``.
    """
    _check_logit_pair(student_logits, teacher_logits, temperature)
    p_s = torch.softmax(student_logits / temperature, dim=-1)
    p_t = torch.softmax(teacher_logits / temperature, dim=-1)
    return (p_t @ p_t.T - p_s @ p_s.T).square().sum() / student_logits.shape[0]


@float32_math
def class_correlation_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    r"""MLKD's class level: :math:`\frac{1}{C} \| P_t^\top P_t - P_s^\top P_s \|_F^2` of ``(N, C)`` logits.

    :math:`P = \mathrm{softmax}(Z / T)` row-wise; the ``(C, C)`` matrices correlate the classes over
    the batch (``cc_loss`` of the authors' code; no :math:`T^2` factor).

    Returns:
        Scalar: the squared differences summed over the ``C x C`` entries, divided by ``C``.
    """
    _check_logit_pair(student_logits, teacher_logits, temperature)
    p_s = torch.softmax(student_logits / temperature, dim=-1)
    p_t = torch.softmax(teacher_logits / temperature, dim=-1)
    return (p_t.T @ p_t - p_s.T @ p_s).square().sum() / student_logits.shape[-1]


def share_at_or_below_percentile(values: Tensor, percentile: float) -> Tensor:
    """The fraction of ``values`` that are <= their ``percentile``-th percentile, on the device.

    The percentile interpolates linearly between order statistics (:func:`torch.quantile`, as
    ``numpy.percentile``'s default that the authors call). ``values <= threshold`` is MLKD's
    confidence mask; its mean is how the authors' code applies it (see :func:`mlkd_loss`).
    """
    threshold = torch.quantile(values.float(), percentile / 100.0)
    return (values <= threshold).float().mean()


@float32_math
def mlkd_loss(
    student_weak: Tensor,
    teacher_weak: Tensor,
    student_strong: Tensor,
    teacher_strong: Tensor,
    temperatures: Sequence[float] = MLKD_TEMPERATURES,
    percentile: float = 50.0,
    standardize: bool = False,
    strong_sum_as_authors: bool = True,
) -> Tensor:
    r"""Multi-level logit distillation (Jin et al., CVPR 2023), as the authors' code computes it.

    With :math:`w, s` the weak and strong views' ``(N, C)`` logits, :math:`\mathcal{T}` the
    temperatures, :math:`\mathrm{KD}_T` Hinton's loss (:func:`~lightning_kd.losses.functional.kd_loss`,
    :math:`T^2` included, on Z-scored logits when ``standardize``), :math:`\mathrm{BC}_T` and
    :math:`\mathrm{CC}_T` :func:`batch_correlation_loss` and :func:`class_correlation_loss`:

    .. math::
        \mathcal{L} = \bar m \sum_{T \in \mathcal{T}} \big(\mathrm{KD}_T(w) + \mathrm{BC}_T(w)\big)
        + \sum_{T \in \mathcal{T}} \mathrm{KD}_T(s) + \bar c \sum_{T \in \mathcal{T}} \mathrm{CC}_T(w)

    **The confidence masks, as the authors' code applies them.** With :math:`q_n = \max_c
    \mathrm{softmax}(t^w_n)_c` the teacher's confidence on the weak view and
    :math:`k_c = \sum_n \mathrm{softmax}(t^w_n)_c` its class mass, the masks are
    :math:`q_n \le \mathrm{pct}_{50}(q)` and :math:`k_c \le \mathrm{pct}_{50}(k)` (``percentile``).
    The code multiplies the *already averaged* (scalar) losses by the masks and averages again
    (``(kd_loss(...) * mask).mean()``, its ``reduce=False`` commented out), so each mask acts as
    its mean: :math:`\bar m = \frac{1}{N} \sum_n [q_n \le \mathrm{pct}(q)]` (1/2 for an even
    batch of distinct confidences) and :math:`\bar c` likewise over the classes. This function
    does exactly that (on the device, no host read).

    **The strong-view sum.** In the authors' code the strong instance-level sum takes its last two
    temperatures (2 and 6) on the *weak* view's logits (``loss_kd_strong``); with
    ``strong_sum_as_authors=True`` (default) ``temperatures[3:]`` are taken on the weak view the same
    way, so the loss equals the published code's; ``False`` takes every temperature on the strong
    view (the formula above). The batch and class levels use the weak view only, without
    standardization (the code computes strong-view versions but leaves them out of the loss).

    Weights: the authors multiply every part by ``KD_WEIGHT`` (0.9; 9 with logit standardization)
    and add ``CE_WEIGHT`` (0.1) times the cross-entropy of *each* view: give the term that weight
    and a :class:`~lightning_kd.losses.CrossEntropyTerm` weight 0.2 (it averages over both views'
    ``2N`` rows). With standardization the authors' base temperature 2 replaces the first
    temperature: ``(2, 3, 5, 2, 6)``.

    Args:
        student_weak: ``(N, C)`` student logits on the weak views.
        teacher_weak: ``(N, C)`` teacher logits on the weak views.
        student_strong: ``(N, C)`` student logits on the strong views.
        teacher_strong: ``(N, C)`` teacher logits on the strong views.
        temperatures: the temperatures, each > 0 (the authors' ``(4, 3, 5, 2, 6)``).
        percentile: the masks' percentile, in ``[0, 100]``.
        standardize: logit standardization of the instance level (Sun et al., CVPR 2024).
        strong_sum_as_authors: ``temperatures[3:]`` of the strong instance sum on the weak view.

    Returns:
        Scalar: the sum above.

    Raises:
        ValueError: shapes differ, no temperature, a temperature <= 0, or ``percentile`` outside [0, 100].
    """
    for name, student, teacher in (
        ("weak", student_weak, teacher_weak),
        ("strong", student_strong, teacher_strong),
    ):
        _check_logit_pair(student, teacher, 1.0)
        if student.ndim != 2:
            raise ValueError(
                f"MLKD needs (N, C) logits, got {name} views' logits of shape {tuple(student.shape)}."
            )
    _check_same_shape(
        "student_weak", student_weak, "student_strong", student_strong, "Both views hold the same samples."
    )
    _check_num_classes(student_weak, 2, "for MLKD")
    temperatures = _checked_temperatures(temperatures)
    if not 0.0 <= percentile <= 100.0:
        raise ValueError(f"percentile must be in [0, 100], got {percentile}.")
    p_teacher = torch.softmax(teacher_weak, dim=-1)
    sample_share = share_at_or_below_percentile(p_teacher.max(dim=-1).values, percentile)
    class_share = share_at_or_below_percentile(p_teacher.sum(dim=0), percentile)
    weak_sum = student_weak.new_zeros(())
    strong_sum = student_weak.new_zeros(())
    class_sum = student_weak.new_zeros(())
    for index, temperature in enumerate(temperatures):
        kd_weak = kd_loss(student_weak, teacher_weak, temperature, standardize=standardize)
        weak_sum = weak_sum + kd_weak + batch_correlation_loss(student_weak, teacher_weak, temperature)
        if strong_sum_as_authors and index >= 3:
            strong_sum = strong_sum + kd_weak
        else:
            strong_sum = strong_sum + kd_loss(
                student_strong, teacher_strong, temperature, standardize=standardize
            )
        class_sum = class_sum + class_correlation_loss(student_weak, teacher_weak, temperature)
    return sample_share * weak_sum + strong_sum + class_share * class_sum


def _checked_temperatures(temperatures: Sequence[float]) -> tuple[float, ...]:
    values = tuple(checked_temperature(t, "each MLKD temperature") for t in temperatures)
    if not values:
        raise ValueError("MLKD needs at least one temperature (the authors use (4, 3, 5, 2, 6)).")
    return values


class MLKDTerm(LossTerm):
    """Multi-level logit distillation (Jin et al., CVPR 2023) on two-view batches.

    See :func:`lightning_kd.losses.functional.mlkd_loss`. The training batches must be
    :class:`~lightning_kd.model_io.TwoViewBatch` es (weak rows, then strong rows; e.g. from
    :class:`~lightning_kd.data.CIFAR100TwoViewDataModule`): the term splits the step's logits
    into the two views, and refuses any other batch (a plain batch split in halves would train on
    without error but on the wrong pairs). The teacher's logits are detached.

    Args:
        name: key of the term.
        weight: factor in the total loss (the authors' ``KD_WEIGHT``: 0.9, or 9 with standardization).
        temperatures: the temperatures (the authors' ``(4, 3, 5, 2, 6)``).
        percentile: the confidence masks' percentile (50).
        standardize: logit standardization of the instance level (Sun et al., CVPR 2024).
        strong_sum_as_authors: see :func:`~lightning_kd.losses.functional.mlkd_loss`.

    Raises:
        ValueError: no temperature, a temperature <= 0, or ``percentile`` outside [0, 100].
    """

    def __init__(
        self,
        name: str = "mlkd",
        weight: float = 1.0,
        temperatures: Sequence[float] = MLKD_TEMPERATURES,
        percentile: float = 50.0,
        standardize: bool = False,
        strong_sum_as_authors: bool = True,
    ) -> None:
        super().__init__(name, weight)
        self.temperatures = _checked_temperatures(temperatures)
        if not 0.0 <= percentile <= 100.0:
            raise ValueError(f"Loss term {name!r}: percentile must be in [0, 100], got {percentile}.")
        self.percentile = float(percentile)
        self.standardize = bool(standardize)
        self.strong_sum_as_authors = bool(strong_sum_as_authors)

    def forward(self, outputs: StepOutputs) -> Tensor:
        """``mlkd_loss`` of the weak rows and the strong rows of the step's two-view batch.

        Raises:
            ValueError: the batch is not a ``TwoViewBatch``.
        """
        if not isinstance(outputs.batch, TwoViewBatch):
            raise ValueError(
                f"Loss term {self.name!r} (MLKD) needs two-view training batches (weak and strong views of "
                f"each sample), got a {type(outputs.batch).__name__}. Use a two-view datamodule "
                "(lightning_kd.data.CIFAR100TwoViewDataModule, MNIST1DTwoViewDataModule) or a TwoViews "
                "dataset with collate_fn=collate_two_views (lightning_kd.data.two_views)."
            )
        student = outputs.student_logits
        teacher = self.detached_teacher_logits(outputs)
        half = student.shape[0] // 2
        return mlkd_loss(
            student[:half],
            teacher[:half],
            student[half:],
            teacher[half:],
            self.temperatures,
            self.percentile,
            standardize=self.standardize,
            strong_sum_as_authors=self.strong_sum_as_authors,
        )

    def extra_repr(self) -> str:
        """Name, weight and settings, shown in the module repr."""
        settings = (
            f"temperatures={self.temperatures}, percentile={self.percentile}, standardize={self.standardize}"
        )
        return f"{super().extra_repr()}, {settings}, strong_sum_as_authors={self.strong_sum_as_authors}"
