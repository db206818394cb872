"""The generator's losses of data-free distillation: DAFL's three and DeepInversion's BatchNorm prior.

Chen et al., "Data-Free Learning of Student Networks", ICCV 2019 (one-hot, activation and
information-entropy losses); Yin et al., "Dreaming to Distill: Data-free Knowledge Transfer via
DeepInversion", CVPR 2020 (BatchNorm-statistics prior). They train the generator of
:class:`~lightning_kd.DataFreeDistillationModule`, not the student, so they are not loss terms.
Tensors in, scalar out, float32 under autocast.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_kd.precision import float32_math

__all__ = [
    "bn_statistics_loss",
    "dafl_activation_loss",
    "dafl_information_entropy_loss",
    "dafl_one_hot_loss",
]


def _check_generated_logits(teacher_logits: Tensor) -> None:
    if teacher_logits.ndim != 2 or teacher_logits.shape[0] < 1 or teacher_logits.shape[1] < 2:
        raise ValueError(
            f"teacher_logits must have shape (N, C) with N >= 1 samples and C >= 2 classes, got "
            f"{tuple(teacher_logits.shape)}."
        )


@float32_math
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


@float32_math
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


@float32_math
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


@float32_math
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
