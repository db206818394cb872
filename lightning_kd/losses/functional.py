"""Pure tensor math of the distillation losses: tensors in, scalar out, no state.

Every function here runs in float32, also under ``bf16-mixed`` / ``16-mixed`` autocast:
low-precision softmax and logarithms lose the small probability mass that soft targets
carry. Reductions are documented per function.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["dist_loss", "dkd_loss", "fitnet_loss", "kd_loss"]

_Fn = TypeVar("_Fn", bound=Callable[..., Tensor])


def _float32_math(fn: _Fn) -> _Fn:
    """Run ``fn`` with autocast disabled and its floating-point tensor arguments cast to float32."""

    def cast(value: object) -> object:
        if isinstance(value, Tensor) and value.is_floating_point():
            return value.float()
        return value

    @functools.wraps(fn)
    def wrapper(*args: object, **kwargs: object) -> Tensor:
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)]
        device_type = tensors[0].device.type if tensors else "cpu"
        with torch.autocast(device_type=device_type, enabled=False):
            return fn(*map(cast, args), **{k: cast(v) for k, v in kwargs.items()})

    return wrapper  # type: ignore[return-value]


def _check_same_shape(name_a: str, a: Tensor, name_b: str, b: Tensor, hint: str = "") -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"{name_a} has shape {tuple(a.shape)} but {name_b} has shape {tuple(b.shape)}. {hint}"
        )


def _check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}.")


def _check_logit_pair(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> None:
    """Same shapes (both models predict the same classes) and a positive temperature."""
    _check_same_shape(
        "student_logits",
        student_logits,
        "teacher_logits",
        teacher_logits,
        hint="Teacher and student must predict the same classes: check num_classes of both models.",
    )
    _check_positive("temperature", temperature)


def _check_targets(logits: Tensor, target: Tensor) -> None:
    if target.shape != logits.shape[:-1]:
        raise ValueError(
            f"target has shape {tuple(target.shape)} but logits have shape {tuple(logits.shape)}: "
            f"expected one class index per row of logits, i.e. target of shape {tuple(logits.shape[:-1])}."
        )
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise ValueError(f"target must hold integer class indices, got dtype {target.dtype}.")


def _check_num_classes(logits: Tensor, minimum: int, why: str) -> None:
    if logits.ndim < 1 or logits.shape[-1] < minimum:
        raise ValueError(
            f"logits of shape {tuple(logits.shape)} must have at least {minimum} classes in the last "
            f"dimension {why}."
        )


#: added to the standard deviation in logit standardization, as in the authors' code.
_STANDARDIZE_EPS = 1e-7

#: added to the product of norms in DIST's Pearson correlation, as in the authors' code.
_DIST_EPS = 1e-8


def _standardize(logits: Tensor) -> Tensor:
    """Z-score over the last dimension: ``(z - mean) / (1e-7 + std)``, std with Bessel's correction."""
    mean = logits.mean(dim=-1, keepdim=True)
    std = logits.std(dim=-1, keepdim=True)  # unbiased (correction=1), like torch's default
    return (logits - mean) / (_STANDARDIZE_EPS + std)


@_float32_math
def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 4.0,
    standardize: bool = False,
) -> Tensor:
    r"""Hinton knowledge distillation: KL divergence between temperature-softened predictions.

    Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network", 2015:

    .. math::
        \mathcal{L} = T^2 \cdot \frac{1}{N} \sum_{n} \mathrm{KL}\big(
        \mathrm{softmax}(t_n / T) \,\|\, \mathrm{softmax}(s_n / T)\big)

    The :math:`T^2` factor keeps the gradient magnitude independent of :math:`T`.

    With ``standardize=True``, logit standardization (Sun et al., "Logit Standardization in
    Knowledge Distillation", CVPR 2024) replaces every row of logits :math:`z` (student's and
    teacher's, each on its own) by its Z-score before the division by :math:`T`:

    .. math::
        \mathcal{Z}(z) = \frac{z - \bar z}{\epsilon + \sigma(z)}, \qquad
        \bar z = \frac{1}{C} \sum_c z_c, \quad
        \sigma(z) = \Big(\frac{1}{C - 1} \sum_c (z_c - \bar z)^2\Big)^{1/2},
        \quad \epsilon = 10^{-7}

    following the authors' code (``normalize`` in ``mdistiller/distillers/KD.py`` of
    ``sunshangquan/logit-standardization-KD``): ``torch.Tensor.std``'s default, i.e. the
    *unbiased* standard deviation (Bessel's correction), :math:`\epsilon` added to the std (not
    under the square root), and the :math:`T^2` factor kept. The loss then no longer depends on
    the scale or offset of either model's logits (up to :math:`\epsilon`), and :math:`T` acts as the
    paper's base temperature on logits of unit variance.

    Args:
        student_logits: ``(..., C)`` student logits.
        teacher_logits: ``(..., C)`` teacher logits, same shape.
        temperature: softening temperature :math:`T > 0`.
        standardize: Z-score each row of logits first (needs ``C >= 2``); ``False`` is plain KD.

    Returns:
        Scalar: KL summed over classes, averaged over all leading positions (``batchmean``
        for ``(N, C)`` inputs, as in the CRD benchmark's ``DistillKL``), times :math:`T^2`.
    """
    _check_logit_pair(student_logits, teacher_logits, temperature)
    if standardize:
        _check_num_classes(student_logits, 2, "for logit standardization (the std of one value is undefined)")
        student_logits, teacher_logits = _standardize(student_logits), _standardize(teacher_logits)
    num_classes = student_logits.shape[-1]
    log_p_student = F.log_softmax(student_logits.reshape(-1, num_classes) / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.reshape(-1, num_classes) / temperature, dim=-1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return kl * temperature**2


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


@_float32_math
def dkd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 4.0,
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

    Args:
        student_logits: ``(..., C)`` student logits, ``C >= 2``.
        teacher_logits: ``(..., C)`` teacher logits, same shape.
        target: ``(...)`` integer labels in ``[0, C)``, one per row (``(N,)`` for ``(N, C)``).
        alpha: weight of TCKD (target-class KD).
        beta: weight of NCKD (non-target-class KD).
        temperature: softening temperature :math:`T > 0`.

    Returns:
        Scalar: ``alpha * TCKD + beta * NCKD``, averaged over all leading positions.
    """
    _check_logit_pair(student_logits, teacher_logits, temperature)
    _check_num_classes(student_logits, 2, "for DKD (it splits the target class from the others)")
    _check_targets(student_logits, target)
    num_classes = student_logits.shape[-1]
    target = target.reshape(-1).long()
    z_s = student_logits.reshape(-1, num_classes) / temperature
    z_t = teacher_logits.reshape(-1, num_classes) / temperature
    target_mask = torch.zeros_like(z_s, dtype=torch.bool).scatter_(-1, target.unsqueeze(-1), True)
    binary_s, non_target_s = _dkd_log_probs(z_s, target_mask, target)
    binary_t, non_target_t = _dkd_log_probs(z_t, target_mask, target)
    tckd = F.kl_div(binary_s, binary_t, reduction="batchmean", log_target=True)
    nckd = F.kl_div(non_target_s, non_target_t, reduction="batchmean", log_target=True)
    return (alpha * tckd + beta * nckd) * temperature**2


def _mean_pearson(a: Tensor, b: Tensor) -> Tensor:
    """Mean over rows of the Pearson correlation of ``a[i]`` and ``b[i]`` (eps as in DIST)."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    correlation = (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + _DIST_EPS)
    return correlation.mean()


@_float32_math
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
    y_s = F.softmax(student_logits.reshape(-1, num_classes) / temperature, dim=-1)
    y_t = F.softmax(teacher_logits.reshape(-1, num_classes) / temperature, dim=-1)
    inter = 1 - _mean_pearson(y_s, y_t)
    intra = 1 - _mean_pearson(y_s.t(), y_t.t())
    return temperature**2 * (beta * inter + gamma * intra)


@_float32_math
def fitnet_loss(student_feature: Tensor, teacher_feature: Tensor) -> Tensor:
    r"""FitNets hint loss: mean squared error between the (regressed) student and the teacher feature.

    Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015:
    :math:`\mathcal{L} = \frac{1}{|F|} \sum (r(F^s) - F^t)^2`, the mean over every element,
    as the CRD benchmark's ``HintLoss`` (``nn.MSELoss()``). The regressor :math:`r` that maps
    the student's shape onto the teacher's belongs to the loss term
    (:class:`~lightning_kd.losses.feature.FitNetTerm`); pass its output here.

    Args:
        student_feature: the student's feature after the regressor, any shape.
        teacher_feature: the teacher's feature, same shape.

    Returns:
        Scalar: mean over all elements.
    """
    _check_same_shape(
        "student_feature",
        student_feature,
        "teacher_feature",
        teacher_feature,
        hint="The regressor must map the student feature onto the teacher feature's shape.",
    )
    return F.mse_loss(student_feature, teacher_feature)
