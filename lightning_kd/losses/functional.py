"""Pure tensor math of the distillation losses: tensors in, scalar out, no state.

Every function here runs in float32, also under ``bf16-mixed`` / ``16-mixed`` autocast:
low-precision softmax and logarithms lose the small probability mass that soft targets
carry. Reductions are documented per function.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "ab_loss",
    "at_loss",
    "attention_kl_loss",
    "bn_statistics_loss",
    "byot_loss",
    "cc_loss",
    "confidence_weights",
    "crd_loss",
    "dafl_activation_loss",
    "dafl_information_entropy_loss",
    "dafl_one_hot_loss",
    "dist_loss",
    "dkd_loss",
    "embedding_match_loss",
    "ensemble_log_probs",
    "fitnet_loss",
    "fsp_loss",
    "ft_loss",
    "generalized_distillation_loss",
    "hcl_loss",
    "hidden_state_loss",
    "kd_loss",
    "linear_cka",
    "multi_teacher_kd_loss",
    "non_argmax_probability",
    "nst_loss",
    "ofd_loss",
    "ofd_margin",
    "pkt_loss",
    "rkd_loss",
    "seed_loss",
    "soft_label_entropy",
    "sp_loss",
    "vid_loss",
    "value_relation_loss",
]

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


# --------------------------------------------------------------------------------------------
# Relation and attention losses, as in the CRD benchmark (HobbitLong/RepDistiller, distiller_zoo/).
# --------------------------------------------------------------------------------------------

#: clamp of the squared pairwise distances in RKD, before the square root (RepDistiller ``RKD.py``).
_RKD_PDIST_EPS = 1e-12


def _check_same_batch(name_a: str, a: Tensor, name_b: str, b: Tensor) -> None:
    """Both tensors hold one row per sample of the same batch: same (first) batch dimension."""
    if a.ndim == 0 or b.ndim == 0 or a.shape[0] != b.shape[0]:
        raise ValueError(
            f"{name_a} has shape {tuple(a.shape)} but {name_b} has shape {tuple(b.shape)}: both must "
            "have the same batch size in the first dimension (the loss compares the samples of one batch "
            "with each other, so student and teacher must see the same samples)."
        )


def _check_feature_maps(name_a: str, a: Tensor, name_b: str, b: Tensor) -> None:
    """Two ``(N, C, H, W)`` (or two ``(N, C, L)``) maps of one batch; channels and sizes may differ."""
    if a.ndim != b.ndim or a.ndim not in (3, 4):
        raise ValueError(
            f"{name_a} has shape {tuple(a.shape)} and {name_b} has shape {tuple(b.shape)}: expected two "
            "(N, C, H, W) (or two (N, C, L)) convolutional feature maps; pick convolutional layers."
        )
    _check_same_batch(name_a, a, name_b, b)


def _rows(x: Tensor) -> Tensor:
    """Flatten everything but the batch dimension: ``(N, ...) -> (N, D)``."""
    return x.reshape(x.shape[0], -1)


def _pool_to_common_size(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Average-pool the larger of two ``(N, C, H, W)`` (or ``(N, C, L)``) maps down to the smaller size.

    Each spatial dimension is matched separately: each map is pooled to
    ``(min(H_a, H_b), min(W_a, W_b))`` with :func:`torch.nn.functional.adaptive_avg_pool2d`
    (``adaptive_avg_pool1d`` for 1-D maps), and a map already of that size is left untouched.
    """
    size = tuple(min(x, y) for x, y in zip(a.shape[2:], b.shape[2:], strict=True))
    pool = F.adaptive_avg_pool2d if a.ndim == 4 else F.adaptive_avg_pool1d
    if tuple(a.shape[2:]) != size:
        a = pool(a, size)
    if tuple(b.shape[2:]) != size:
        b = pool(b, size)
    return a, b


def _sp_similarity(feature: Tensor) -> Tensor:
    """Row-L2-normalised Gram matrix of the flattened samples, ``(N, N)``."""
    rows = _rows(feature)
    return F.normalize(rows @ rows.t(), p=2, dim=1)


@_float32_math
def sp_loss(student_feat: Tensor, teacher_feat: Tensor) -> Tensor:
    r"""Similarity-preserving KD: match the batch's normalised pairwise-similarity matrices.

    Tung, Mori, "Similarity-Preserving Knowledge Distillation", ICCV 2019. With
    :math:`Q \in \mathbb{R}^{N \times D}` the features flattened per sample:

    .. math::
        \tilde G = \operatorname{rownorm}(Q Q^\top), \qquad
        \mathcal{L} = \frac{1}{N^2} \big\lVert \tilde G^t - \tilde G^s \big\rVert_F^2

    where each row of the Gram matrix is divided by its L2 norm (``F.normalize``, eps
    :math:`10^{-12}` on the norm), as in ``Similarity.similarity_loss`` of the CRD benchmark
    (``distiller_zoo/SP.py`` of ``HobbitLong/RepDistiller``), which agrees with the paper's
    formula. The paper sums this over layer pairs; the benchmark uses one pair (the last
    convolutional stage, before pooling) with weight 3000.

    Student and teacher may have different channel counts and spatial sizes: only the
    :math:`N \times N` similarity matrices are compared. The loss is invariant to scaling either
    feature.

    Args:
        student_feat: ``(N, ...)`` student feature, flattened to ``(N, D_s)``.
        teacher_feat: ``(N, ...)`` teacher feature, flattened to ``(N, D_t)``; same batch size.

    Returns:
        Scalar: the squared Frobenius distance divided by :math:`N^2` (the mean over the
        :math:`N^2` entries). The benchmark returns it as a 1-element tensor; here a 0-d one.
    """
    _check_same_batch("student_feat", student_feat, "teacher_feat", teacher_feat)
    batch = student_feat.shape[0]
    difference = _sp_similarity(teacher_feat) - _sp_similarity(student_feat)
    return difference.pow(2).sum() / batch**2


def _rkd_distances(rows: Tensor) -> Tensor:
    """Pairwise Euclidean distances ``(N, N)``, zero diagonal, divided by their off-diagonal mean.

    As RepDistiller's ``RKDLoss.pdist``: squared distances from the Gram matrix, clamped at
    ``1e-12`` (so distinct rows, even duplicates, get a distance of at least ``1e-6``), square root,
    diagonal set to 0. Every off-diagonal entry is then positive, so the benchmark's mean over
    ``d > 0`` is the mean over the :math:`N (N - 1)` off-diagonal entries.
    """
    batch = rows.shape[0]
    squared_norms = rows.pow(2).sum(dim=1)
    squared = squared_norms.unsqueeze(1) + squared_norms.unsqueeze(0) - 2 * rows @ rows.t()
    distances = squared.clamp(min=_RKD_PDIST_EPS).sqrt()
    diagonal = torch.eye(batch, dtype=torch.bool, device=rows.device)
    distances = distances.masked_fill(diagonal, 0.0)
    return distances / (distances.sum() / (batch * (batch - 1)))


def _rkd_angles(rows: Tensor) -> Tensor:
    """Cosines ``(N, N, N)``: entry ``[i, j, k]`` is the cosine of the angle at ``x_i`` to ``x_j``, ``x_k``.

    Difference vectors are L2-normalised with ``F.normalize`` (eps ``1e-12``), so a zero vector
    (``j == i`` or ``k == i``) gives a cosine of 0.
    """
    directions = F.normalize(rows.unsqueeze(0) - rows.unsqueeze(1), p=2, dim=2)  # [i, j] = x_j - x_i
    return torch.bmm(directions, directions.transpose(1, 2))


@_float32_math
def rkd_loss(
    student_emb: Tensor,
    teacher_emb: Tensor,
    distance_weight: float = 25.0,
    angle_weight: float = 50.0,
) -> Tensor:
    r"""Relational KD: match the batch's normalised pairwise distances and triplet angles.

    Park, Kim, Lu, Cho, "Relational Knowledge Distillation", CVPR 2019. With embeddings
    :math:`x_1, \dots, x_N` (flattened per sample) and :math:`\ell_1` the Huber loss
    (``F.smooth_l1_loss``, threshold 1):

    .. math::
        \psi_D(i, j) = \frac{\lVert x_i - x_j \rVert}{\mu}, \quad
        \mu = \frac{1}{N(N-1)} \sum_{i \ne j} \lVert x_i - x_j \rVert, \qquad
        \psi_A(i, j, k) = \Big\langle \frac{x_j - x_i}{\lVert x_j - x_i \rVert},
        \frac{x_k - x_i}{\lVert x_k - x_i \rVert} \Big\rangle

    .. math::
        \mathcal{L} = w_D \cdot \frac{1}{N^2} \sum_{i, j} \ell_1\big(\psi^s_D(i, j), \psi^t_D(i, j)\big)
        + w_A \cdot \frac{1}{N^3} \sum_{i, j, k} \ell_1\big(\psi^s_A(i, j, k), \psi^t_A(i, j, k)\big)

    following ``RKDLoss`` of the CRD benchmark (``distiller_zoo/RKD.py`` of
    ``HobbitLong/RepDistiller``), which differs from the paper's sums in its reductions: both
    parts are *means* over all :math:`N^2` pairs and :math:`N^3` triplets, including the
    degenerate ones (zero-distance diagonal, and angles with ``j == i`` or ``k == i``, whose
    zero difference vector is normalised to 0 and gives a cosine of 0; both models then agree
    on those entries, which only dilute the mean). Distances are computed as in the benchmark
    (squared distances from the Gram matrix clamped at :math:`10^{-12}`, then square root).
    Defaults :math:`w_D = 25`, :math:`w_A = 50` are the benchmark's.

    Both parts are invariant to scaling either embedding and to translating it; the
    embedding dimensions of student and teacher may differ. Memory is
    :math:`O(N^2 D + N^3)` (the angle part builds all difference vectors, as the benchmark does).

    Args:
        student_emb: ``(N, ...)`` student embeddings, flattened to ``(N, D_s)``; ``N >= 2``.
        teacher_emb: ``(N, ...)`` teacher embeddings, flattened to ``(N, D_t)``; same batch size.
        distance_weight: :math:`w_D`, weight of the distance part.
        angle_weight: :math:`w_A`, weight of the angle part.

    Returns:
        Scalar: ``distance_weight * distance_loss + angle_weight * angle_loss``.
    """
    _check_same_batch("student_emb", student_emb, "teacher_emb", teacher_emb)
    if student_emb.shape[0] < 2:
        raise ValueError(
            f"rkd_loss needs at least 2 samples per batch to compare distances, got student_emb of shape "
            f"{tuple(student_emb.shape)} and teacher_emb of shape {tuple(teacher_emb.shape)}."
        )
    student, teacher = _rows(student_emb), _rows(teacher_emb)
    distance = F.smooth_l1_loss(_rkd_distances(student), _rkd_distances(teacher))
    angle = F.smooth_l1_loss(_rkd_angles(student), _rkd_angles(teacher))
    return distance_weight * distance + angle_weight * angle


def _pkt_conditionals(rows: Tensor, eps: float) -> Tensor:
    """Row-stochastic ``(N, N)`` matrix of the shifted cosine kernel ``(cos + 1) / 2``."""
    unit = rows / (rows.norm(p=2, dim=1, keepdim=True) + eps)
    kernel = (unit @ unit.t() + 1.0) / 2.0
    return kernel / kernel.sum(dim=1, keepdim=True)


@_float32_math
def pkt_loss(student_emb: Tensor, teacher_emb: Tensor, eps: float = 1e-7) -> Tensor:
    r"""Probabilistic knowledge transfer: match the conditional distributions of a cosine kernel.

    Passalis, Tefas, "Learning Deep Representations with Probabilistic Knowledge Transfer",
    ECCV 2018. With :math:`\hat x_i = x_i / (\lVert x_i \rVert + \epsilon)` and the cosine
    kernel shifted to :math:`[0, 1]`:

    .. math::
        K_{ij} = \frac{\hat x_i^\top \hat x_j + 1}{2}, \qquad
        p_{j|i} = \frac{K_{ij}}{\sum_{k} K_{ik}}, \qquad
        \mathcal{L} = \frac{1}{N^2} \sum_{i, j} p^t_{j|i}
        \log \frac{p^t_{j|i} + \epsilon}{p^s_{j|i} + \epsilon}

    as ``PKT.cosine_similarity_loss`` of the CRD benchmark (``distiller_zoo/PKT.py`` of
    ``HobbitLong/RepDistiller``, from the authors' code): the sums include :math:`j = i` (the
    paper's conditional probabilities leave the sample itself out), :math:`\epsilon = 10^{-7}`
    is added to the norm and inside the logarithm, and the KL divergences are *averaged over all*
    :math:`N^2` *entries* (not summed, nor divided by :math:`N`), hence the benchmark's weight
    of 30000. The benchmark also replaces NaN entries of the normalised embeddings by 0; a zero
    embedding already gives 0 here (``0 / (0 + eps)``), so NaN can only come from non-finite
    inputs, and it is left to propagate rather than hidden. The norm is
    :func:`torch.linalg.vector_norm`, whose gradient at a zero embedding is 0 (the benchmark's
    ``sqrt(sum(x ** 2))`` gives NaN there); values are the same.

    Invariant to positive scaling of either embedding (up to :math:`\epsilon`); the embedding
    dimensions of student and teacher may differ.

    Args:
        student_emb: ``(N, ...)`` student embeddings, flattened to ``(N, D_s)``.
        teacher_emb: ``(N, ...)`` teacher embeddings, flattened to ``(N, D_t)``; same batch size.
        eps: :math:`\epsilon > 0`.

    Returns:
        Scalar: the mean over the :math:`N^2` entries of the teacher-to-student KL terms.
    """
    _check_same_batch("student_emb", student_emb, "teacher_emb", teacher_emb)
    _check_positive("eps", eps)
    p_student = _pkt_conditionals(_rows(student_emb), eps)
    p_teacher = _pkt_conditionals(_rows(teacher_emb), eps)
    return (p_teacher * torch.log((p_teacher + eps) / (p_student + eps))).mean()


def _cc_kernel(rows: Tensor, gamma: float, order: int) -> Tensor:
    """``(N, N)`` order-``P`` Taylor expansion of the Gaussian RBF kernel of the L2-normalised rows."""
    unit = F.normalize(rows, p=2, dim=1)
    cosine = unit @ unit.t()
    coefficients = [math.exp(-2.0 * gamma) * (2.0 * gamma) ** p / math.factorial(p) for p in range(order + 1)]
    kernel = torch.full_like(cosine, coefficients[-1])
    for coefficient in reversed(coefficients[:-1]):  # Horner: sum_p c_p * cosine ** p
        kernel = kernel * cosine + coefficient
    return kernel


@_float32_math
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


def _attention_map(feature: Tensor, p: float) -> Tensor:
    """``(N, H * W)``: channel mean of ``|f| ** p``, flattened, L2-normalised per sample."""
    return F.normalize(feature.abs().pow(p).mean(dim=1).reshape(feature.shape[0], -1), p=2, dim=1)


@_float32_math
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


def _mean_squared_dot(a: Tensor, b: Tensor) -> Tensor:
    """Mean over batch and channel pairs of the polynomial kernel ``(a_i . b_j) ** 2``."""
    return torch.bmm(a, b.transpose(1, 2)).pow(2).mean()


@_float32_math
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


def _fsp_matrix(first: Tensor, second: Tensor) -> Tensor:
    """``(N, C_2, C_1)``: spatial mean of the channel products of two maps of one model."""
    if first.shape[2:] != second.shape[2:]:
        size = tuple(min(a, b) for a, b in zip(first.shape[2:], second.shape[2:], strict=True))
        pool = F.adaptive_avg_pool2d if first.ndim == 4 else F.adaptive_avg_pool1d
        first = first if tuple(first.shape[2:]) == size else pool(first, size)
        second = second if tuple(second.shape[2:]) == size else pool(second, size)
    first = first.reshape(*first.shape[:2], -1)
    second = second.reshape(*second.shape[:2], -1)
    return torch.bmm(second, first.transpose(1, 2)) / first.shape[-1]


@_float32_math
def fsp_loss(
    student_first: Tensor, student_second: Tensor, teacher_first: Tensor, teacher_second: Tensor
) -> Tensor:
    r"""FSP: match the "flow of solution procedure" matrices between two layers of each model.

    Yim, Joo, Bae, Kim, "A Gift from Knowledge Distillation: Fast Optimization, Network
    Minimization and Transfer Learning", CVPR 2017. For two maps :math:`F^1` (earlier) and
    :math:`F^2` (later) of one model:

    .. math::
        G_{ij} = \frac{1}{HW} \sum_{h,w} F^2_{i,h,w} F^1_{j,h,w}, \qquad
        \mathcal{L} = \operatorname{mean}\big((G^s - G^t)^2\big)

    the mean over batch and both channel indices, as ``FSP.compute_loss`` of the CRD benchmark
    (``distiller_zoo/FSP.py`` of ``HobbitLong/RepDistiller``). When the two maps of one model
    differ in size, the larger is average-pooled to the smaller (per dimension; the benchmark
    pools to a square from the heights only). Student and teacher must have the same channel
    counts at both layers (the benchmark raises otherwise).

    Args:
        student_first: ``(N, C_1, H, W)`` (or ``(N, C_1, L)``) earlier student map.
        student_second: ``(N, C_2, H', W')`` later student map.
        teacher_first: teacher map with ``C_1`` channels.
        teacher_second: teacher map with ``C_2`` channels.

    Returns:
        Scalar: the mean squared difference of the FSP matrices.
    """
    maps = {
        "student_first": student_first,
        "student_second": student_second,
        "teacher_first": teacher_first,
        "teacher_second": teacher_second,
    }
    ranks = {x.ndim for x in maps.values()}
    if len(ranks) != 1 or ranks.pop() not in (3, 4):
        shapes = {name: tuple(x.shape) for name, x in maps.items()}
        raise ValueError(f"FSP needs four (N, C, H, W) (or four (N, C, L)) maps; got {shapes}.")
    student = _fsp_matrix(student_first, student_second)
    teacher = _fsp_matrix(teacher_first, teacher_second)
    _check_same_shape(
        "the student's FSP matrix (N, C_2, C_1)",
        student,
        "the teacher's",
        teacher,
        hint="FSP needs the same batch and the same channel counts at both layers of student and teacher.",
    )
    return F.mse_loss(student, teacher)


#: added to the denominators of CRD's NCE loss, as ``eps`` in the authors' ``crd/criterion.py``.
_CRD_EPS = 1e-7


def _check_crd_scores(name: str, scores: Tensor) -> None:
    if scores.ndim != 2 or scores.shape[1] < 2:
        raise ValueError(
            f"{name} must have shape (N, 1 + K): the positive's score in column 0, then K >= 1 negatives' "
            f"scores; got shape {tuple(scores.shape)}."
        )


def _crd_nce(scores: Tensor, num_samples: int, eps: float) -> Tensor:
    """One direction of CRD's NCE loss: ``-(sum log h(positive) + sum log(1 - h(negatives))) / N``."""
    noise = (scores.shape[1] - 1) / num_samples  # K * Pn, with Pn = 1 / num_samples
    positive, negatives = scores[:, 0], scores[:, 1:]
    log_positive = torch.log(positive / (positive + noise + eps))
    log_negatives = torch.log(noise / (negatives + noise + eps))
    return -(log_positive.sum() + log_negatives.sum()) / scores.shape[0]


@_float32_math
def crd_loss(
    student_scores: Tensor, teacher_scores: Tensor, num_samples: int, eps: float = _CRD_EPS
) -> Tensor:
    r"""CRD's NCE loss on the scores of one positive and K negatives, summed over both anchors.

    Tian, Krishnan, Isola, "Contrastive Representation Distillation", ICLR 2020, as
    ``ContrastLoss`` / ``CRDLoss`` in ``crd/criterion.py`` of ``HobbitLong/RepDistiller``. A score
    is :math:`P = \exp(u^\top v / \tau) / Z` for an anchor embedding :math:`u` of one model and a
    memory-bank embedding :math:`v` of the other model
    (:class:`~lightning_kd.losses.contrastive.ContrastMemory` computes them); column 0 holds the
    positive (the same sample), columns :math:`1 \dots K` the negatives. With the uniform noise
    distribution :math:`P_n = 1 / n` over the :math:`n` = ``num_samples`` training samples, NCE
    models the probability that a pair is real as
    :math:`h = P / (P + K P_n)`, and one direction of the loss is

    .. math::
        \mathcal{L}(P) = -\frac{1}{N} \sum_{i=1}^{N} \Big[
        \log \frac{P_{i0}}{P_{i0} + K P_n + \epsilon}
        + \sum_{k=1}^{K} \log \frac{K P_n}{P_{ik} + K P_n + \epsilon} \Big],
        \qquad \epsilon = 10^{-7}

    exactly as ``ContrastLoss`` (:math:`\epsilon` in the denominators only; the log-terms are
    *summed* over the positive and the :math:`K` negatives and divided by the batch size
    :math:`N`, not averaged over the :math:`1 + K` columns). CRD contrasts in both directions and
    adds them, as ``CRDLoss.forward`` does; this function does the sum:

    .. math::
        \mathcal{L}_{CRD} = \mathcal{L}(P^{s}) + \mathcal{L}(P^{t})

    where :math:`P^{s}` anchors on the student's embedding (scored against the teacher's
    memory) and :math:`P^{t}` on the teacher's (scored against the student's memory). For one
    direction alone, pass the same scores twice and halve the result.

    Args:
        student_scores: ``(N, 1 + K)`` student-anchored scores, positive in column 0, all > 0.
        teacher_scores: ``(N, 1 + K)`` teacher-anchored scores, same shape.
        num_samples: :math:`n`, the size of the training set (of the memory bank), for
            :math:`P_n = 1 / n`.
        eps: :math:`\epsilon \ge 0` added to the denominators.

    Returns:
        Scalar: ``L(student_scores) + L(teacher_scores)``, each summed over the :math:`1 + K`
        columns and averaged over the :math:`N` rows. The authors' code returns a 1-element
        tensor; here a 0-d one.
    """
    _check_crd_scores("student_scores", student_scores)
    _check_crd_scores("teacher_scores", teacher_scores)
    _check_same_shape(
        "student_scores",
        student_scores,
        "teacher_scores",
        teacher_scores,
        hint="Both directions score the same positive and negatives.",
    )
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(
            f"num_samples must be a positive integer (the training set size), got {num_samples!r}."
        )
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}.")
    return _crd_nce(student_scores, num_samples, eps) + _crd_nce(teacher_scores, num_samples, eps)


# --------------------------------------------------------------------------------------------
# Feature losses with trainable parts: VID (as in the CRD benchmark) and OFD (the authors' code).
# --------------------------------------------------------------------------------------------

#: OFD's margin is ``-3 * std`` where P(x < 0) is at most this (``get_margin_from_BN``).
_OFD_CDF_THRESHOLD = 1e-3


def _per_channel(name: str, values: Tensor, feature_name: str, feature: Tensor) -> Tensor:
    """``(C,)`` values reshaped to broadcast over dimension 1 of an ``(N, C, ...)`` feature."""
    if feature.ndim < 2 or values.ndim != 1 or values.shape[0] != feature.shape[1]:
        raise ValueError(
            f"{name} has shape {tuple(values.shape)} but {feature_name} has shape {tuple(feature.shape)}: "
            f"expected an (N, C, ...) feature and one {name} value per channel, of shape (C,)."
        )
    return values.reshape(1, -1, *([1] * (feature.ndim - 2)))


@_float32_math
def vid_loss(predicted_mean: Tensor, teacher_feat: Tensor, log_scale: Tensor, eps: float = 1e-5) -> Tensor:
    r"""Variational information distillation: Gaussian negative log-likelihood of the teacher's feature.

    Ahn, Hu, Damianou, Lawrence, Dai, "Variational Information Distillation for Knowledge
    Transfer", CVPR 2019. A regressor on the student's feature predicts the mean :math:`\mu` of a
    Gaussian over the teacher's feature :math:`t`, with one variance per channel :math:`c` from a
    free parameter :math:`\alpha_c` (``log_scale``):

    .. math::
        \sigma_c^2 = \log\big(1 + e^{\alpha_c}\big) + \epsilon, \qquad
        \mathcal{L} = \frac{1}{|t|} \sum_{n, c, \dots} \frac{1}{2} \Big(
        \frac{(\mu_{nc\dots} - t_{nc\dots})^2}{\sigma_c^2} + \log \sigma_c^2 \Big)

    as ``VIDLoss`` of the CRD benchmark (``distiller_zoo/VID.py`` of ``HobbitLong/RepDistiller``,
    from the authors' code): :math:`\epsilon = 10^{-5}` added after the softplus, the constant
    :math:`\frac{1}{2} \log 2\pi` left out, and the *mean* over all elements (batch, channels and
    positions), where the paper sums over channels and positions. The softplus is
    :func:`torch.nn.functional.softplus`: the benchmark's ``log(1 + exp(a))`` has the same values
    but overflows to ``inf`` for large :math:`\alpha`.

    For a fixed mean, the loss is smallest where :math:`\sigma_c^2` equals the mean squared
    residual of channel :math:`c`; gradients reach the mean (the regressor and the student) and
    ``log_scale``. The regressor, the pooling of the larger map and :math:`\alpha` belong to
    :class:`~lightning_kd.losses.feature.VIDTerm`.

    Args:
        predicted_mean: ``(N, C, ...)`` the regressor's output :math:`\mu`.
        teacher_feat: ``(N, C, ...)`` the teacher's feature, same shape.
        log_scale: ``(C,)`` :math:`\alpha`, the variance of each channel before the softplus.
        eps: :math:`\epsilon \ge 0`, added to every variance.

    Returns:
        Scalar: the mean over all elements of the negative log-likelihood (without its constant).
    """
    _check_same_shape(
        "predicted_mean",
        predicted_mean,
        "teacher_feat",
        teacher_feat,
        hint="The regressor must map the student feature onto the teacher feature's shape.",
    )
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}.")
    variance = F.softplus(_per_channel("log_scale", log_scale, "teacher_feat", teacher_feat)) + eps
    return (0.5 * ((predicted_mean - teacher_feat).pow(2) / variance + torch.log(variance))).mean()


@_float32_math
def ofd_loss(student_feat: Tensor, teacher_feat: Tensor, margin: Tensor) -> Tensor:
    r"""Overhaul of feature distillation: partial L2 to the teacher's pre-ReLU feature, clipped at a margin.

    Heo, Kim, Yun, Park, Kwak, Choi, "A Comprehensive Overhaul of Feature Distillation",
    ICCV 2019. With :math:`s` the student's pre-ReLU feature after the connector, :math:`t` the
    teacher's pre-ReLU feature and :math:`m_c \le 0` the margin of channel :math:`c`
    (:func:`ofd_margin`):

    .. math::
        \tau = \max(t, m_c), \qquad
        \mathcal{L} = \frac{1}{N} \sum_{n, c, \dots} (s - \tau)^2 \,
        \mathbb{1}\big[s > \tau \ \lor\ \tau > 0\big]

    Where the teacher responds positively the student is pulled onto it; where it responds
    negatively (ReLU turns that into 0) the target is raised to the margin, and a student value
    at or below that target costs nothing.

    As ``distillation_loss`` of the authors' code (``CIFAR-100/distiller.py`` of
    ``clovaai/overhaul-distillation``: ``torch.max(target, margin)``, squared error, mask
    ``(source > target) | (target > 0)``, *sum* over all elements), divided by the batch size as
    their training loop does (``loss_distill.sum() / batch_size / 1000`` in
    ``CIFAR-100/train_with_distillation.py``; the 1/1000 is the weight of
    :class:`~lightning_kd.losses.feature.OFDTerm`, ImageNet uses 1/10000). An earlier version of
    that file spells out the three cases (above the margin, between margin and 0, positive);
    both versions agree wherever :math:`m \le 0`, which :func:`ofd_margin` always gives. Their
    distiller sums this loss over :math:`L` layer pairs and divides pair :math:`i` (shallowest
    first, :math:`i = 0, \dots, L - 1`) by :math:`2^{L - i - 1}`: with one term per pair, put
    that factor into each term's weight.

    Args:
        student_feat: ``(N, C, ...)`` the student's pre-ReLU feature through the connector.
        teacher_feat: ``(N, C, ...)`` the teacher's pre-ReLU feature, same shape.
        margin: ``(C,)`` the margin of each channel.

    Returns:
        Scalar: the masked squared error summed over all elements, divided by the batch size.
    """
    _check_same_shape(
        "student_feat",
        student_feat,
        "teacher_feat",
        teacher_feat,
        hint="The connector must map the student feature onto the teacher feature's shape.",
    )
    target = torch.maximum(teacher_feat, _per_channel("margin", margin, "teacher_feat", teacher_feat))
    mask = (student_feat > target) | (target > 0)
    return ((student_feat - target).pow(2) * mask).sum() / student_feat.shape[0]


def ofd_margin(std: Tensor, mean: Tensor) -> Tensor:
    r"""OFD's margin: the mean of a Gaussian pre-ReLU response given that it is negative, per channel.

    Heo et al., ICCV 2019 (see :func:`ofd_loss`). A BatchNorm's output is taken as
    :math:`x \sim \mathcal{N}(m, s^2)` with :math:`s = |\gamma|` and :math:`m = \beta`, the
    BatchNorm's weight and bias (its normalised input being standard normal). With :math:`\phi`,
    :math:`\Phi` the standard normal density and distribution function:

    .. math::
        \text{margin} = \mathbb{E}[x \mid x < 0]
        = m - s \, \frac{\phi(m / s)}{\Phi(-m / s)}
        \quad \text{if } \Phi(-m / s) > 10^{-3}, \qquad -3 s \text{ otherwise,}

    exactly ``get_margin_from_BN`` of the authors' code (``CIFAR-100/distiller.py`` of
    ``clovaai/overhaul-distillation``), which computes it in double precision (Python floats,
    ``scipy.stats.norm.cdf``) and returns float32: so does this function
    (:func:`torch.special.ndtr` for :math:`\Phi`). A zero weight (:math:`s = 0`), where theirs
    divides by zero, gives the limit: :math:`m` for :math:`m < 0`, else 0.

    Args:
        std: ``(C,)`` the BatchNorm's weight :math:`\gamma` (its absolute value is used).
        mean: ``(C,)`` the BatchNorm's bias :math:`\beta`.

    Returns:
        ``(C,)`` float32 margins, all :math:`\le 0`, on the device of ``std``.
    """
    if std.ndim != 1 or std.shape != mean.shape:
        raise ValueError(
            f"std has shape {tuple(std.shape)} but mean has shape {tuple(mean.shape)}: expected two (C,) "
            "vectors, a BatchNorm's weight and bias."
        )
    s = std.detach().double().abs()
    m = mean.detach().to(device=s.device, dtype=torch.float64)
    ratio = m / s
    below_zero = torch.special.ndtr(-ratio)
    density = torch.exp(-(ratio**2) / 2) / math.sqrt(2 * math.pi)
    conditional_mean = m - s * density / below_zero
    return torch.where(below_zero > _OFD_CDF_THRESHOLD, conditional_mean, -3 * s).float()


# --------------------------------------------------------------------------------------------
# Staged feature losses of the CRD benchmark: activation boundaries (AB) and factor transfer (FT).
# --------------------------------------------------------------------------------------------

#: ``ABLoss.forward`` of the CRD benchmark divides every pair's loss by 1000 and multiplies it by 3.
_AB_SCALE = 3.0 / 1000.0


@_float32_math
def ab_loss(student_pre: Tensor, teacher_pre: Tensor, margin: float = 1.0) -> Tensor:
    r"""Activation boundaries: the student's pre-ReLU responses on the teacher's side of zero, by a margin.

    Heo, Lee, Yun, Choi, "Knowledge Transfer via Distillation of Activation Boundaries Formed by
    Hidden Neurons", AAAI 2019: the paper's alternative (differentiable) loss, a squared hinge on
    each neuron. With :math:`s` the student's pre-ReLU response (through the connector),
    :math:`t` the teacher's pre-ReLU response and :math:`m \ge 0` the margin:

    .. math::
        \ell(s, t) = (s + m)^2 \, \mathbb{1}[s > -m \,\wedge\, t \le 0]
        + (s - m)^2 \, \mathbb{1}[s \le m \,\wedge\, t > 0]

    .. math::
        \mathcal{L} = \frac{3}{1000} \cdot \frac{1}{N} \sum_{n, c, \dots} \ell(s, t)

    Where the teacher's neuron is inactive (:math:`t \le 0`) the student is pushed below
    :math:`-m`, where it is active above :math:`m`; beyond the margin a response costs nothing.
    Only the sign of :math:`t` enters, so a teacher feature that went through a ReLU (even in
    place) gives the same loss as its pre-ReLU values.

    As ``ABLoss.criterion_alternative_l2`` and ``ABLoss.forward`` of the CRD benchmark
    (``distiller_zoo/AB.py`` of ``HobbitLong/RepDistiller``, after the authors'
    ``bhheo/AB_distillation``): the masks ``(s > -m) & (t <= 0)`` and ``(s <= m) & (t > 0)``, the
    *sum* over all elements divided by the batch size, then ``/ 1000 * 3``, all included here.
    The benchmark further multiplies pair :math:`i` of :math:`L` (shallowest first,
    :math:`i = 0, \dots, L - 1`) by :math:`2^{i - L + 1}` (for three stages: 1/4, 1/2, 1): with
    one term per pair, put that factor into each term's weight. Its margin is 1.

    Args:
        student_pre: ``(N, ...)`` the student's pre-ReLU feature through the connector.
        teacher_pre: ``(N, ...)`` the teacher's pre-ReLU feature, same shape.
        margin: :math:`m \ge 0`.

    Returns:
        Scalar: the squared hinges summed over all elements, divided by the batch size, times 3/1000.
    """
    _check_same_shape(
        "student_pre",
        student_pre,
        "teacher_pre",
        teacher_pre,
        hint="The connector must map the student feature onto the teacher feature's shape.",
    )
    if student_pre.ndim == 0:
        raise ValueError("student_pre and teacher_pre must have a batch dimension, got 0-d tensors.")
    if not margin >= 0:
        raise ValueError(f"margin must be >= 0, got {margin}.")
    teacher_active = teacher_pre > 0
    push_down = (student_pre > -margin) & ~teacher_active
    push_up = (student_pre <= margin) & teacher_active
    hinges = (student_pre + margin).pow(2) * push_down + (student_pre - margin).pow(2) * push_up
    return hinges.sum() / student_pre.shape[0] * _AB_SCALE


@_float32_math
def ft_loss(student_factor: Tensor, teacher_factor: Tensor, p: float = 1.0, power: float = 2.0) -> Tensor:
    r"""Factor transfer: L_p distance between the normalised factors of the translator and the paraphraser.

    Kim, Park, Kwak, "Paraphrasing Complex Network: Network Compression via Factor Transfer",
    NeurIPS 2018. The paper compares the vectorised factors, each divided by its L2 norm,
    :math:`\lVert F_T / \lVert F_T \rVert_2 - F_S / \lVert F_S \rVert_2 \rVert_p` with
    :math:`p = 1`. This function follows ``FactorTransfer`` of the CRD benchmark
    (``distiller_zoo/FT.py`` of ``HobbitLong/RepDistiller``, ``p1=2``, ``p2=1``), which first
    reduces each ``(N, C, H, W)`` factor to a spatial map, as attention transfer does:

    .. math::
        Q = \operatorname{vec}\Big(\frac{1}{C} \sum_c |F_c|^{q}\Big) \in \mathbb{R}^{HW}, \qquad
        \mathcal{L} = \frac{1}{N H W} \sum_{n} \Big\lVert \frac{Q^s_n}{\lVert Q^s_n \rVert_2}
        - \frac{Q^t_n}{\lVert Q^t_n \rVert_2} \Big\rVert_p^p

    with :math:`q` = ``power`` (2) and :math:`p` = ``p`` (1): the channel mean of the squared
    factor, ``F.normalize`` (eps :math:`10^{-12}`), and the *mean* over batch and positions of
    the absolute difference to the power :math:`p`. The benchmark raises :math:`F` itself to the
    power (and the difference, for :math:`p \ne 1`); here absolute values, which is the same for
    the defaults and avoids NaN or sign cancellation otherwise.

    Spatial sizes may differ: the larger map is average-pooled down to the smaller size, each
    dimension separately (the benchmark pools to a square chosen from the heights, the same for
    square maps). Channel counts may differ (the benchmark's factors both have
    ``int(rate * C_t)`` channels). Invariant to scaling either factor.

    Args:
        student_factor: ``(N, C_s, H_s, W_s)`` (or ``(N, C_s, L_s)``) the translator's output.
        teacher_factor: ``(N, C_t, H_t, W_t)`` (or ``(N, C_t, L_t)``) the paraphraser's factor.
        p: exponent :math:`p > 0` of the distance (1 in the benchmark and the paper).
        power: exponent :math:`q > 0` of the channel mean (2 in the benchmark).

    Returns:
        Scalar: the mean over the batch and the positions of ``|difference| ** p``.
    """
    _check_feature_maps("student_factor", student_factor, "teacher_factor", teacher_factor)
    _check_positive("p", p)
    _check_positive("power", power)
    student_factor, teacher_factor = _pool_to_common_size(student_factor, teacher_factor)
    difference = _attention_map(student_factor, power) - _attention_map(teacher_factor, power)
    return difference.abs().pow(p).mean()


# --------------------------------------------------------------------------------------------
# ReviewKD's hierarchical context loss (the authors' code, dvlab-research/ReviewKD).
# --------------------------------------------------------------------------------------------

#: output sizes of HCL's pooled pyramid levels, finest first (``hcl`` in ``CIFAR-100/model/reviewkd.py``).
_HCL_LEVELS = (4, 2, 1)


@_float32_math
def _hcl_pair(student_feat: Tensor, teacher_feat: Tensor) -> Tensor:
    """HCL of one pair of equally shaped ``(N, C, H, W)`` or ``(N, C, L)`` maps (see :func:`hcl_loss`)."""
    loss = F.mse_loss(student_feat, teacher_feat)
    level_weight, total_weight = 1.0, 1.0
    smallest = min(student_feat.shape[2:])
    for size in _HCL_LEVELS:
        if size >= smallest:
            continue
        level_weight /= 2.0
        if student_feat.ndim == 4:
            pooled_s = F.adaptive_avg_pool2d(student_feat, (size, size))
            pooled_t = F.adaptive_avg_pool2d(teacher_feat, (size, size))
        else:
            pooled_s = F.adaptive_avg_pool1d(student_feat, size)
            pooled_t = F.adaptive_avg_pool1d(teacher_feat, size)
        loss = loss + level_weight * F.mse_loss(pooled_s, pooled_t)
        total_weight += level_weight
    return loss / total_weight


def hcl_loss(student_feats: Sequence[Tensor], teacher_feats: Sequence[Tensor]) -> Tensor:
    r"""ReviewKD's hierarchical context loss: MSE over a pyramid of average-pooled maps, summed over pairs.

    Chen, Liu, Zhao, Jia, "Distilling Knowledge via Knowledge Review", CVPR 2021. For one pair
    of maps :math:`F^s, F^t` of the same shape (the student's fused feature and the teacher's),
    with :math:`P_l` adaptive average pooling to :math:`l \times l` (to length :math:`l` for
    1-D maps) and :math:`\ell` the mean squared error over all elements:

    .. math::
        \mathcal{L}_{pair} = \frac{\ell(F^s, F^t) + \sum_{k=1}^{K} 2^{-k}\,
        \ell\big(P_{l_k}(F^s), P_{l_k}(F^t)\big)}{1 + \sum_{k=1}^{K} 2^{-k}}, \qquad
        \mathcal{L} = \sum_{pairs} \mathcal{L}_{pair}

    where :math:`l_1 > l_2 > \dots > l_K` are the levels of :math:`(4, 2, 1)` *smaller* than
    the map. The full map has weight 1 and every level used halves the weight: an 8x8 map
    gives weights 1, 1/2, 1/4, 1/8 (levels 4, 2, 1; total 1.875), a 4x4 map 1, 1/2, 1/4 (levels
    2, 1), a 1x1 map (the pooled feature) only the plain MSE. This is ``hcl`` of the authors'
    code (``CIFAR-100/model/reviewkd.py`` of ``dvlab-research/ReviewKD``; ``hcl_loss`` in
    ``mdistiller/distillers/ReviewKD.py`` of ``megvii-research/mdistiller`` is the same):
    ``F.mse_loss`` (mean), ``F.adaptive_avg_pool2d``, a level skipped when ``l >= h``, the sum
    over pairs. The authors test the height only and pool to a square; here a level is used
    when it is smaller than every spatial size, the same for their square maps. Their
    ``zip`` silently drops unpaired maps; here the numbers must match.

    Args:
        student_feats: ``(N, C, H, W)`` (or ``(N, C, L)``) maps, e.g. ReviewKD's fused student
            features, one per pair.
        teacher_feats: the teacher's maps, in the same order, each of its pair's shape.

    Returns:
        Scalar: the sum over the pairs of each pair's weighted mean of its levels' MSEs.
    """
    student_feats, teacher_feats = list(student_feats), list(teacher_feats)
    if len(student_feats) != len(teacher_feats) or not student_feats:
        raise ValueError(
            f"hcl_loss needs one teacher map per student map (at least one pair), got {len(student_feats)} "
            f"student and {len(teacher_feats)} teacher maps."
        )
    for index, (student, teacher) in enumerate(zip(student_feats, teacher_feats, strict=True)):
        if student.ndim not in (3, 4) or teacher.ndim not in (3, 4):
            raise ValueError(
                f"student_feats[{index}] has shape {tuple(student.shape)} and teacher_feats[{index}] has "
                f"shape {tuple(teacher.shape)}: expected (N, C, H, W) (or (N, C, L)) maps."
            )
        _check_same_shape(
            f"student_feats[{index}]",
            student,
            f"teacher_feats[{index}]",
            teacher,
            hint="HCL compares maps of equal shape: map the student's features onto the teacher's first.",
        )
    loss = _hcl_pair(student_feats[0], teacher_feats[0])
    for student, teacher in zip(student_feats[1:], teacher_feats[1:], strict=True):
        loss = loss + _hcl_pair(student, teacher)
    return loss


# --------------------------------------------------------------------------------------------
# Be Your Own Teacher self-distillation (Zhang et al., ICCV 2019).
# --------------------------------------------------------------------------------------------


@_float32_math
def _byot_head(
    logits: Tensor,
    feature: Tensor,
    deep_logits: Tensor,
    deep_feature: Tensor,
    target: Tensor,
    alpha: float,
    temperature: float,
    feature_weight: float,
) -> Tensor:
    """BYOT loss of one shallow classifier (see :func:`byot_loss`); the deepest outputs are detached."""
    cross_entropy = F.cross_entropy(logits, target)
    distillation = kd_loss(logits, deep_logits.detach(), temperature)
    hint = (feature - deep_feature.detach()).pow(2).flatten(1).sum(dim=1).mean()
    return (1 - alpha) * cross_entropy + alpha * distillation + feature_weight * hint


def byot_loss(
    shallow_logits: Sequence[Tensor],
    shallow_features: Sequence[Tensor],
    deep_logits: Tensor,
    deep_feature: Tensor,
    target: Tensor,
    alpha: float = 0.3,
    temperature: float = 3.0,
    feature_weight: float = 1e-4,
) -> Tensor:
    r"""Be Your Own Teacher: the deepest classifier teaches the shallow classifiers of the same network.

    Zhang, Song, Gao, Chen, Bao, Ma, "Be Your Own Teacher: Improve the Performance of
    Convolutional Neural Networks via Self Distillation", ICCV 2019. With shallow classifiers
    :math:`i = 1 \dots C-1` (logits :math:`z_i`, bottleneck features :math:`F_i`), the deepest
    classifier's logits :math:`z_C` and its input feature :math:`F_C` (both detached: the
    deepest classifier teaches and is not taught), labels :math:`y`, batch size :math:`N`:

    .. math::
        \mathcal{L} = \sum_{i=1}^{C-1} \Big[ (1 - \alpha)\,\mathrm{CE}(z_i, y)
        + \alpha\, T^2\, \mathrm{KL}\big(\mathrm{softmax}(z_C / T) \,\|\, \mathrm{softmax}(z_i / T)\big)
        + \lambda\, \frac{1}{N} \sum_{n} \lVert F_{i,n} - F_{C,n} \rVert_2^2 \Big]

    Reductions: CE averaged over the batch; KL summed over classes and averaged over the batch
    (``batchmean``, as :func:`kd_loss`), times :math:`T^2`; the hint is each sample's squared
    L2 distance (summed over every feature element), averaged over the batch. The deepest
    classifier's own cross-entropy is not part of this loss (a separate ``CrossEntropyTerm``).

    Reference code: the authors' ``train.py`` (``ArchipLab-LinfengZhang/pytorch-self-distillation-final``)
    uses :math:`\alpha = 0.3` (``loss_coefficient``) and :math:`T = 3`, the defaults here; its
    KD part is the soft-target cross-entropy, which differs from the KL by the teacher's
    entropy (same gradient) and has no :math:`T^2` (a factor 9 smaller at :math:`T = 3`), and
    it has no hint term; the deepest CE has weight 1. ``luanyunteng/pytorch-be-your-own-teacher``
    (``train.py``) adds the hint as ``beta * sum((F_i - F_C)**2 * mask)`` summed over the batch,
    with ``beta = 1e-6`` at batch 128 and a mask (either feature positive) that changes nothing
    for post-ReLU features: :math:`\lambda = \beta N \approx 10^{-4}`, the default here.

    Args:
        shallow_logits: ``(N, K)`` logits of each shallow classifier.
        shallow_features: ``(N, ...)`` bottleneck feature of each shallow classifier, each of
            ``deep_feature``'s shape.
        deep_logits: ``(N, K)`` logits of the deepest classifier (detached here).
        deep_feature: ``(N, ...)`` the deepest classifier's input feature (detached here).
        target: ``(N,)`` class indices.
        alpha: share of the distillation part, :math:`0 \le \alpha \le 1`; ``1 - alpha`` goes to CE.
        temperature: softening temperature :math:`T > 0`.
        feature_weight: :math:`\lambda \ge 0`, the weight of the hint.

    Returns:
        Scalar: the sum over the shallow classifiers.
    """
    shallow_logits, shallow_features = list(shallow_logits), list(shallow_features)
    if not shallow_logits or len(shallow_logits) != len(shallow_features):
        raise ValueError(
            f"byot_loss needs one feature per shallow classifier (at least one), got {len(shallow_logits)} "
            f"logits and {len(shallow_features)} features."
        )
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1] (the share of distillation), got {alpha}.")
    _check_positive("temperature", temperature)
    if not feature_weight >= 0:
        raise ValueError(f"feature_weight must be >= 0, got {feature_weight}.")
    _check_targets(deep_logits, target)
    for index, (logits, feature) in enumerate(zip(shallow_logits, shallow_features, strict=True)):
        _check_same_shape(
            f"shallow_logits[{index}]",
            logits,
            "deep_logits",
            deep_logits,
            hint="Every classifier must predict the same classes.",
        )
        _check_same_shape(
            f"shallow_features[{index}]",
            feature,
            "deep_feature",
            deep_feature,
            hint="Each shallow head's bottleneck must map its feature onto the deepest feature's shape.",
        )
    heads = zip(shallow_logits, shallow_features, strict=True)
    losses = [
        _byot_head(logits, feature, deep_logits, deep_feature, target, alpha, temperature, feature_weight)
        for logits, feature in heads
    ]
    return torch.stack(losses).sum()


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


@_float32_math
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


@_float32_math
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
    log_target = ensemble_log_probs(teacher_logits, weights, temperature)
    log_student = F.log_softmax(student_logits / temperature, dim=-1)
    kl = F.kl_div(log_student, log_target, reduction="sum", log_target=True)
    return kl / student_logits.shape[0] * temperature**2


@_float32_math
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


@_float32_math
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


# --------------------------------------------------------------------------------------------
# Data-free distillation: DAFL's generator losses (Chen et al., ICCV 2019) and DeepInversion's
# BatchNorm-statistics prior (Yin et al., CVPR 2020).
# --------------------------------------------------------------------------------------------


def _check_generated_logits(teacher_logits: Tensor) -> None:
    if teacher_logits.ndim != 2 or teacher_logits.shape[0] < 1 or teacher_logits.shape[1] < 2:
        raise ValueError(
            f"teacher_logits must have shape (N, C) with N >= 1 samples and C >= 2 classes, got "
            f"{tuple(teacher_logits.shape)}."
        )


@_float32_math
def dafl_one_hot_loss(teacher_logits: Tensor) -> Tensor:
    r"""DAFL's one-hot loss: cross-entropy of the teacher's predictions against their own argmax.

    Chen et al., "Data-Free Learning of Student Networks", ICCV 2019, eq. (4). For the
    teacher's logits :math:`y^n_T` on generated samples and the pseudo-labels
    :math:`t^n = \arg\max_c y^n_{T,c}` (no gradient):

    .. math::
        \mathcal{L}_{oh} = \frac{1}{N} \sum_{n} H_{cross}(y^n_T, t^n)
        = -\frac{1}{N} \sum_{n} \log \mathrm{softmax}(y^n_T)_{t^n}

    Small when the teacher is as confident on generated samples as on real ones.

    Args:
        teacher_logits: ``(N, C)`` teacher logits on generated samples.

    Returns:
        Scalar: the mean over the batch.
    """
    _check_generated_logits(teacher_logits)
    return F.cross_entropy(teacher_logits, teacher_logits.detach().argmax(dim=1))


@_float32_math
def dafl_activation_loss(features: Tensor) -> Tensor:
    r"""DAFL's activation loss: minus the mean absolute value of the teacher's features.

    Chen et al., "Data-Free Learning of Student Networks", ICCV 2019, eq. (5): real inputs
    excite the teacher's penultimate features :math:`f^n_T` (the input of its classifier) more
    than noise does. With :math:`d` elements per sample, as in the authors' code
    (``-features_T.abs().mean()``):

    .. math::
        \mathcal{L}_a = -\frac{1}{N d} \sum_{n} \| f^n_T \|_1

    (the paper's :math:`-\frac{1}{N}\sum_n \|f^n_T\|_1` divided by :math:`d`).

    Args:
        features: ``(N, ...)`` teacher features on generated samples.

    Returns:
        Scalar: minus the mean absolute value over all elements.
    """
    if features.ndim < 1 or features.numel() == 0:
        raise ValueError(f"features must be a non-empty (N, ...) tensor, got shape {tuple(features.shape)}.")
    return -features.abs().mean()


@_float32_math
def dafl_information_entropy_loss(teacher_logits: Tensor) -> Tensor:
    r"""DAFL's information-entropy loss: minus the entropy of the teacher's batch-mean prediction.

    Chen et al., "Data-Free Learning of Student Networks", ICCV 2019, eq. (6). With
    :math:`\bar p = \frac{1}{N} \sum_n \mathrm{softmax}(y^n_T)`:

    .. math::
        \mathcal{L}_{ie} = -H_{info}(\bar p) = \sum_{c} \bar p_c \log \bar p_c

    Smallest (:math:`-\log C`) when the generated batch covers all :math:`C` classes equally.
    Natural logarithm; the authors' code uses :math:`\log_{10}`, i.e. this loss times
    :math:`1 / \ln 10`. :math:`\log \bar p` is computed as a log-sum-exp of log-probabilities,
    finite even where a class's mean probability underflows.

    Args:
        teacher_logits: ``(N, C)`` teacher logits on generated samples.

    Returns:
        Scalar in :math:`[-\log C, 0]`.
    """
    _check_generated_logits(teacher_logits)
    log_probs = F.log_softmax(teacher_logits, dim=1)
    log_mean = torch.logsumexp(log_probs, dim=0) - math.log(teacher_logits.shape[0])
    return (log_mean.exp() * log_mean).sum()


@_float32_math
def _bn_statistics_distance(inputs: Tensor, running_mean: Tensor, running_var: Tensor) -> Tensor:
    """One layer's term of :func:`bn_statistics_loss`."""
    channels = inputs.transpose(0, 1).reshape(inputs.shape[1], -1)
    mean = channels.mean(dim=1)
    var = channels.var(dim=1, unbiased=False)
    return torch.linalg.vector_norm(mean - running_mean) + torch.linalg.vector_norm(var - running_var)


def bn_statistics_loss(
    inputs: Sequence[Tensor], running_means: Sequence[Tensor], running_vars: Sequence[Tensor]
) -> Tensor:
    r"""DeepInversion's feature-distribution prior: batch statistics against BatchNorm's running ones.

    Yin et al., "Dreaming to Distill: Data-free Knowledge Transfer via DeepInversion", CVPR
    2020, eq. (4). For every BatchNorm layer :math:`l` of the teacher, with
    :math:`\mu_l(x), \sigma^2_l(x)` the per-channel mean and (biased) variance of the layer's
    input over the batch and all positions, and :math:`\hat\mu_l, \hat\sigma^2_l` the layer's
    running statistics (those of the real training data):

    .. math::
        \mathcal{R}_{feature} = \sum_{l} \|\mu_l(x) - \hat\mu_l\|_2 + \|\sigma^2_l(x) - \hat\sigma^2_l\|_2

    Args:
        inputs: the inputs of the BatchNorm layers, ``(N, C_l, ...)`` each (channels in dim 1).
        running_means: ``(C_l,)`` running means, in the same order.
        running_vars: ``(C_l,)`` running variances, in the same order.

    Returns:
        Scalar: the sum over the layers.
    """
    inputs, running_means, running_vars = list(inputs), list(running_means), list(running_vars)
    if not inputs or not len(inputs) == len(running_means) == len(running_vars):
        raise ValueError(
            f"bn_statistics_loss needs one running mean and variance per input (at least one layer), got "
            f"{len(inputs)} inputs, {len(running_means)} means and {len(running_vars)} variances."
        )
    for index, (x, mean, var) in enumerate(zip(inputs, running_means, running_vars, strict=True)):
        if x.ndim < 2 or mean.shape != (x.shape[1],) or var.shape != (x.shape[1],):
            raise ValueError(
                f"inputs[{index}] has shape {tuple(x.shape)}, running_means[{index}] {tuple(mean.shape)} and "
                f"running_vars[{index}] {tuple(var.shape)}: expected (N, C, ...) inputs and (C,) statistics."
            )
    loss = _bn_statistics_distance(inputs[0], running_means[0], running_vars[0])
    for x, mean, var in zip(inputs[1:], running_means[1:], running_vars[1:], strict=True):
        loss = loss + _bn_statistics_distance(x, mean, var)
    return loss


# --------------------------------------------------------------------------------------------
# Embedding (representation) distillation, without labels.
# --------------------------------------------------------------------------------------------


def _check_embedding_pair(student_emb: Tensor, teacher_emb: Tensor) -> None:
    _check_same_shape(
        "student_emb",
        student_emb,
        "teacher_emb",
        teacher_emb,
        hint="Give the student a projection head onto the teacher's embedding width.",
    )


@_float32_math
def embedding_match_loss(student_emb: Tensor, teacher_emb: Tensor, kind: str = "cosine") -> Tensor:
    r"""Distance between the student's and the teacher's embedding of each sample.

    ``"cosine"``: :math:`\frac{1}{N}\sum_i \left(1 - \cos(s_i, t_i)\right)`, as in the
    "Cosine" distillation baseline of SEED (Fang et al., ICLR 2021) and in sentence-embedding
    distillation (Reimers & Gurevych, EMNLP 2020, which uses MSE). ``"mse"``: the mean over all
    elements of :math:`(s - t)^2`.

    Args:
        student_emb: ``(N, D)`` student embeddings.
        teacher_emb: ``(N, D)`` teacher embeddings.
        kind: ``"cosine"`` or ``"mse"``.

    Returns:
        Scalar: mean over samples (cosine) or over all elements (MSE).
    """
    if kind not in ("cosine", "mse"):
        raise ValueError(f"kind must be 'cosine' or 'mse', got {kind!r}.")
    _check_embedding_pair(student_emb, teacher_emb)
    if kind == "mse":
        return F.mse_loss(student_emb, teacher_emb)
    return (1 - F.cosine_similarity(student_emb, teacher_emb, dim=-1)).mean()


@_float32_math
def linear_cka(features_x: Tensor, features_y: Tensor) -> Tensor:
    r"""Linear centered kernel alignment (CKA): how similar two representations of the same samples are.

    Kornblith, Norouzi, Lee, Hinton, "Similarity of Neural Network Representations Revisited",
    ICML 2019. With :math:`X` ``(N, D_x)`` and :math:`Y` ``(N, D_y)`` the two layers' outputs on
    the same :math:`N` samples (flattened per sample), each column-centred:

    .. math::
        \mathrm{CKA}(X, Y) = \frac{\|Y^\top X\|_F^2}{\|X^\top X\|_F \, \|Y^\top Y\|_F}

    It lies in :math:`[0, 1]`, is 1 for :math:`X = Y`, does not change under an orthogonal
    transform or an isotropic scaling of either representation, and compares layers of
    different widths. When :math:`N` is small against the widths, the same number is computed
    from the :math:`N \times N` Gram matrices :math:`K = XX^\top, L = YY^\top` as
    :math:`\langle K, L\rangle_F / (\|K\|_F \|L\|_F)` (as :math:`\|Y^\top X\|_F^2 = \mathrm{tr}(KL)`),
    whichever needs fewer multiplications.

    Args:
        features_x: ``(N, ...)`` outputs of one layer; everything after dim 0 is flattened.
        features_y: ``(N, ...)`` outputs of another layer on the same samples.

    Returns:
        Scalar in :math:`[0, 1]`; NaN when either representation is the same for every sample
        (nothing is left after centring).
    """
    if features_x.ndim == 0 or features_y.ndim == 0 or features_x.shape[0] != features_y.shape[0]:
        raise ValueError(
            f"features_x has shape {tuple(features_x.shape)} but features_y has shape "
            f"{tuple(features_y.shape)}: CKA compares two representations of the same samples, so both "
            "need the same number of samples in the first dimension."
        )
    if features_x.shape[0] < 2:
        raise ValueError(f"CKA needs at least 2 samples to centre the features, got {features_x.shape[0]}.")
    x = _rows(features_x)
    y = _rows(features_y)
    x = x - x.mean(dim=0, keepdim=True)
    y = y - y.mean(dim=0, keepdim=True)
    n, width_x, width_y = x.shape[0], x.shape[1], y.shape[1]
    if n * (width_x + width_y) < width_x**2 + width_y**2 + width_x * width_y:
        gram_x, gram_y = x @ x.T, y @ y.T
        cross = (gram_x * gram_y).sum()
        return cross / (torch.linalg.matrix_norm(gram_x) * torch.linalg.matrix_norm(gram_y))
    cross = torch.linalg.matrix_norm(y.T @ x) ** 2
    return cross / (torch.linalg.matrix_norm(x.T @ x) * torch.linalg.matrix_norm(y.T @ y))


def _check_soft_label_input(logits: Tensor, temperature: float, minimum_classes: int, why: str) -> None:
    _check_positive("temperature", temperature)
    _check_num_classes(logits, minimum_classes, why)


@_float32_math
def soft_label_entropy(logits: Tensor, temperature: float = 1.0) -> Tensor:
    r"""Mean Shannon entropy, in nats, of temperature-softened predictions: how soft the soft labels are.

    Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network", 2015: raising the
    temperature :math:`T` of :math:`p = \mathrm{softmax}(z / T)` spreads probability onto the
    non-target classes. With :math:`H(p) = -\sum_c p_c \log p_c`, the entropy is 0 for a one-hot
    prediction, :math:`\log C` for a uniform one, and grows towards :math:`\log C` with :math:`T`.
    Computed by :class:`torch.distributions.Categorical`.

    Args:
        logits: ``(..., C)`` logits (e.g. the teacher's).
        temperature: :math:`T > 0`.

    Returns:
        Scalar in :math:`[0, \log C]`: the entropy averaged over all leading positions (the mean
        over samples for ``(N, C)``).
    """
    _check_soft_label_input(logits, temperature, 1, "(one score per class)")
    return torch.distributions.Categorical(logits=logits / temperature).entropy().mean()


@_float32_math
def non_argmax_probability(logits: Tensor, temperature: float = 1.0) -> Tensor:
    r"""Mean probability that a softened prediction gives each class other than its top-1 ("dark knowledge").

    Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network", 2015 call the
    relative probabilities of the wrong classes the dark knowledge that soft labels carry. With
    :math:`p = \mathrm{softmax}(z / T)` over :math:`C` classes, per sample
    :math:`(1 - \max_c p_c) / (C - 1)`: 0 for a one-hot prediction, :math:`1 / C` for a uniform one.

    Args:
        logits: ``(..., C)`` logits, ``C >= 2``.
        temperature: :math:`T > 0`.

    Returns:
        Scalar in :math:`[0, 1 / C]`: averaged over all leading positions.
    """
    _check_soft_label_input(logits, temperature, 2, "(a top-1 class and at least one other)")
    top = F.softmax(logits / temperature, dim=-1).amax(dim=-1)
    return ((1 - top) / (logits.shape[-1] - 1)).mean()


@_float32_math
def seed_loss(
    student_emb: Tensor,
    teacher_emb: Tensor,
    queue: Tensor,
    student_temperature: float = 0.2,
    teacher_temperature: float = 0.01,
) -> Tensor:
    r"""SEED: the student matches the teacher's similarity distribution over a queue of embeddings.

    Fang, Wang, Wang, Zhang, Yang, Liu, "SEED: Self-supervised Distillation For Visual
    Representation", ICLR 2021 (``seed/builder.py`` of ``jacobswan1/SEED``). With
    :math:`z^S_i, z^T_i` the L2-normalised embeddings of sample :math:`i` and
    :math:`\mathbf{D}^+ = [z^T_i, d_1, \dots, d_K]` the teacher's own embedding followed by the
    :math:`K` queue rows :math:`d_j`,

    .. math::

        p^T_{ij} = \mathrm{softmax}_j\left(z^T_i \cdot \mathbf{D}^+_j / \tau_T\right), \quad
        p^S_{ij} = \mathrm{softmax}_j\left(z^S_i \cdot \mathbf{D}^+_j / \tau_S\right), \quad
        L = \frac{1}{N} \sum_i \sum_j -p^T_{ij} \log p^S_{ij}

    (the first column is the positive: :math:`z^T_i \cdot z^T_i = 1` for the teacher,
    :math:`z^S_i \cdot z^T_i` for the student). The teacher side carries no gradient.

    Args:
        student_emb: ``(N, D)`` student embeddings (normalised here).
        teacher_emb: ``(N, D)`` teacher embeddings (normalised here; detached).
        queue: ``(K, D)`` past teacher embeddings, rows L2-normalised (not renormalised here);
            ``K`` may be 0 (then the loss is 0: one candidate only).
        student_temperature: :math:`\tau_S > 0` (0.2 in the paper and the authors' code).
        teacher_temperature: :math:`\tau_T > 0` (0.01 here; the authors' code defaults to 1e-4).

    Returns:
        Scalar: the cross-entropy summed over the :math:`1 + K` candidates, averaged over the batch.
    """
    _check_embedding_pair(student_emb, teacher_emb)
    if student_emb.ndim != 2:
        raise ValueError(f"Expected (N, D) embeddings, got student_emb of shape {tuple(student_emb.shape)}.")
    if queue.ndim != 2 or queue.shape[1] != student_emb.shape[1]:
        raise ValueError(
            f"queue has shape {tuple(queue.shape)}; expected (K, D={student_emb.shape[1]}): one teacher "
            "embedding of the same width per row."
        )
    _check_positive("student_temperature", student_temperature)
    _check_positive("teacher_temperature", teacher_temperature)
    student = F.normalize(student_emb, dim=1)
    teacher = F.normalize(teacher_emb.detach(), dim=1)
    queue = queue.detach()
    student_scores = torch.cat([(student * teacher).sum(dim=1, keepdim=True), student @ queue.T], dim=1)
    teacher_scores = torch.cat([(teacher * teacher).sum(dim=1, keepdim=True), teacher @ queue.T], dim=1)
    student_scores = student_scores / student_temperature
    teacher_scores = teacher_scores / teacher_temperature
    teacher_probs = F.softmax(teacher_scores, dim=1)
    return -(teacher_probs * F.log_softmax(student_scores, dim=1)).sum(dim=1).mean()


# --------------------------------------------------------------------------------------------
# Transformer distillation: hidden states, attention maps, value relations (TinyBERT, MiniLM).
# Token positions where ``attention_mask`` is 0 (padding) never enter these losses.
# --------------------------------------------------------------------------------------------


def _real_tokens(attention_mask: Tensor | None, batch: int, length: int, device: torch.device) -> Tensor:
    """``attention_mask`` as a boolean ``(N, L)`` tensor (all True when ``None``), checked."""
    if attention_mask is None:
        return torch.ones(batch, length, dtype=torch.bool, device=device)
    if tuple(attention_mask.shape) != (batch, length):
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)} but the token states need "
            f"({batch}, {length}): pass the batch's attention_mask (1 for real tokens, 0 for padding)."
        )
    real = attention_mask.bool()
    if not real.any(dim=1).all():
        raise ValueError(
            "attention_mask marks no real token in some sequence: every sequence needs at least one "
            "token with mask 1 (drop empty sentences from the dataset)."
        )
    return real


@_float32_math
def hidden_state_loss(
    student_hidden: Tensor, teacher_hidden: Tensor, attention_mask: Tensor | None = None
) -> Tensor:
    r"""TinyBERT hidden-state loss: mean squared error between token states, over real tokens only.

    Jiao et al., "TinyBERT: Distilling BERT for Natural Language Understanding", Findings of
    EMNLP 2020, Eq. 8: :math:`\mathcal{L}_{hidn} = \mathrm{MSE}(H^S W_h, H^T)`; with
    :math:`H^S = E^S` and :math:`H^T = E^T` it is their embedding-layer loss (Eq. 9). The
    projection :math:`W_h` onto the teacher's width belongs to the loss term
    (:class:`~lightning_kd.losses.transformer.HiddenStateTerm`); pass its output here. Unlike the
    authors' code (an MSE over every position), padded positions are left out.

    Args:
        student_hidden: ``(N, L, D)`` token states of the student (after the projection).
        teacher_hidden: ``(N, L, D)`` token states of the teacher.
        attention_mask: ``(N, L)``, 1 for real tokens and 0 for padding; ``None``: every token is real.

    Returns:
        Scalar: the mean of :math:`(h^S - h^T)^2` over real tokens and the ``D`` features.
    """
    _check_same_shape(
        "student_hidden",
        student_hidden,
        "teacher_hidden",
        teacher_hidden,
        hint="Project the student's states onto the teacher's width (HiddenStateTerm does) and tokenize "
        "both models' inputs with the same tokenizer.",
    )
    if student_hidden.ndim != 3:
        raise ValueError(f"Token states must be (N, L, D), got shape {tuple(student_hidden.shape)}.")
    real = _real_tokens(attention_mask, *student_hidden.shape[:2], student_hidden.device)
    per_token = (student_hidden - teacher_hidden).pow(2).mean(dim=-1)
    return torch.where(real, per_token, 0.0).sum() / real.sum()


def _masked_attention_kl(teacher_probs: Tensor, student_log_probs: Tensor, real: Tensor) -> Tensor:
    """``KL(teacher || student)`` per ``(N, H, L, L)`` row over real keys; mean over heads, real queries."""
    pointwise = torch.xlogy(teacher_probs, teacher_probs) - teacher_probs * student_log_probs
    keep = (teacher_probs > 0) & real[:, None, None, :]
    rows = torch.where(keep, pointwise, 0.0).sum(dim=-1)
    queries = real[:, None, :].expand_as(rows)
    return torch.where(queries, rows, 0.0).sum() / queries.sum()


@_float32_math
def attention_kl_loss(
    student_attention: Tensor, teacher_attention: Tensor, attention_mask: Tensor | None = None
) -> Tensor:
    r"""MiniLM self-attention distribution transfer: KL from the teacher's attention rows to the student's.

    Wang et al., "MiniLM: Deep Self-Attention Distillation for Task-Agnostic Compression of
    Pre-Trained Transformers", NeurIPS 2020, Eq. 7:
    :math:`\mathcal{L}_{AT} = \frac{1}{A_h |x|} \sum_{a=1}^{A_h} \sum_{t=1}^{|x|}
    D_{KL}(A^T_{a,t} \,\|\, A^S_{a,t})`, on the attention distributions
    :math:`A = \mathrm{softmax}(QK^\top / \sqrt{d_k})` of the last layer (the probabilities that
    Hugging Face models return with ``output_attentions=True``). Rows (queries) and columns (keys)
    of padded tokens are left out; the mean runs over heads and the real queries of the whole
    batch. Student probabilities are clamped at the smallest positive float before the logarithm,
    so a zero where the teacher also puts zero gives no NaN gradient.

    Args:
        student_attention: ``(N, H, L, L)`` attention probabilities of the student (rows sum to 1).
        teacher_attention: ``(N, H, L, L)`` attention probabilities of the teacher, same heads.
        attention_mask: ``(N, L)``, 1 for real tokens and 0 for padding; ``None``: every token is real.

    Returns:
        Scalar >= 0: the KL divergence in nats, averaged over heads and real query tokens.
    """
    _check_same_shape(
        "student_attention",
        student_attention,
        "teacher_attention",
        teacher_attention,
        hint="Student and teacher need the same number of attention heads (build the student with the "
        "teacher's num_attention_heads) and inputs from the same tokenizer.",
    )
    if student_attention.ndim != 4 or student_attention.shape[-1] != student_attention.shape[-2]:
        raise ValueError(f"Attention maps must be (N, H, L, L), got shape {tuple(student_attention.shape)}.")
    n, _, length, _ = student_attention.shape
    real = _real_tokens(attention_mask, n, length, student_attention.device)
    student_log_probs = student_attention.clamp_min(torch.finfo(student_attention.dtype).tiny).log()
    return _masked_attention_kl(teacher_attention, student_log_probs, real)


def _value_relation_log_probs(values: Tensor, num_heads: int, real: Tensor) -> Tensor:
    """``log_softmax(V_a V_a^T / sqrt(d_k))`` per head ``a`` of ``(N, L, D)`` values, padded keys masked."""
    n, length, width = values.shape
    per_head = values.reshape(n, length, num_heads, width // num_heads).transpose(1, 2)
    scores = per_head @ per_head.transpose(-1, -2) / math.sqrt(width // num_heads)
    scores = scores.masked_fill(~real[:, None, None, :], torch.finfo(scores.dtype).min)
    return F.log_softmax(scores, dim=-1)


@_float32_math
def value_relation_loss(
    student_values: Tensor, teacher_values: Tensor, num_heads: int, attention_mask: Tensor | None = None
) -> Tensor:
    r"""MiniLM value-relation transfer: KL between the scaled dot-products of values, per head.

    Wang et al., "MiniLM", NeurIPS 2020, Eq. 8-9: :math:`VR_a = \mathrm{softmax}(V_a V_a^\top /
    \sqrt{d_k})` for each head :math:`a` of the last layer's values, and
    :math:`\mathcal{L}_{VR} = \frac{1}{A_h |x|} \sum_a \sum_t D_{KL}(VR^T_{a,t} \,\|\, VR^S_{a,t})`.
    Both models' values are split into the same ``num_heads`` heads, each with its own
    :math:`d_k = D / \text{num\_heads}`, so the student may be narrower (with MiniLMv2's relation
    heads, ``num_heads`` may differ from the models' attention heads). Padded tokens are left out as
    keys (masked before the softmax) and as queries; the mean runs over heads and real queries.

    Args:
        student_values: ``(N, L, D_s)`` value vectors (the output of the last layer's value projection).
        teacher_values: ``(N, L, D_t)`` value vectors of the teacher.
        num_heads: heads to split both into; must divide ``D_s`` and ``D_t``.
        attention_mask: ``(N, L)``, 1 for real tokens and 0 for padding; ``None``: every token is real.

    Returns:
        Scalar >= 0: the KL divergence in nats, averaged over heads and real query tokens.
    """
    same_tokens = student_values.shape[:2] == teacher_values.shape[:2]
    if student_values.ndim != 3 or teacher_values.ndim != 3 or not same_tokens:
        raise ValueError(
            f"student_values {tuple(student_values.shape)} and teacher_values {tuple(teacher_values.shape)} "
            "must both be (N, L, D) for the same N sentences of L tokens (same tokenizer for both models)."
        )
    for name, values in (("student_values", student_values), ("teacher_values", teacher_values)):
        if num_heads < 1 or values.shape[-1] % num_heads:
            raise ValueError(
                f"num_heads={num_heads} must divide the width {values.shape[-1]} of {name}: pick a number "
                "of relation heads that divides both models' hidden sizes."
            )
    n, length, _ = student_values.shape
    real = _real_tokens(attention_mask, n, length, student_values.device)
    teacher_probs = _value_relation_log_probs(teacher_values, num_heads, real).exp()
    student_log_probs = _value_relation_log_probs(student_values, num_heads, real)
    return _masked_attention_kl(teacher_probs, student_log_probs, real)
