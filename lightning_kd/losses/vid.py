r"""Variational information distillation (VID): Gaussian likelihood of the teacher's feature.

Ahn, Hu, Damianou, Lawrence, Dai, "Variational Information Distillation for Knowledge
Transfer", CVPR 2019. A regressor predicts the mean :math:`\mu` of the teacher's feature
:math:`t`, with one variance :math:`\sigma_c^2 = \log(1 + e^{\alpha_c}) + \epsilon` per channel:

.. math::
    \mathcal{L} = \frac{1}{|t|} \sum \frac{1}{2} \Big(\frac{(\mu - t)^2}{\sigma_c^2} + \log \sigma_c^2\Big)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_kd.losses._checks import _check_same_shape, _per_channel
from lightning_kd.losses._maps import _pool_to_common_size
from lightning_kd.losses.adapters import check_feature_pair, pointwise
from lightning_kd.losses.base import LayerPairTerm, StepOutputs
from lightning_kd.precision import float32_math

__all__ = ["vid_loss", "VIDTerm"]


@float32_math
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
    :class:`~lightning_kd.losses.vid.VIDTerm`.

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


def _inverse_softplus(value: float) -> float:
    """``x`` with ``log(1 + exp(x)) == value``, for ``value > 0``."""
    return math.log(math.expm1(value))


class VIDTerm(LayerPairTerm):
    """Variational information distillation (Ahn et al., CVPR 2019) between one student and one teacher layer.

    See :func:`lightning_kd.losses.functional.vid_loss`. The term owns the regressor that
    predicts the mean of the teacher's feature from the student's, and the per-channel variance
    parameter ``log_scale`` (alpha, before the softplus); both are trained with the student. As
    in the CRD benchmark (``VIDLoss`` in ``distiller_zoo/VID.py`` of ``HobbitLong/RepDistiller``):

    - regressor: three bias-free 1x1 convolutions ``C_s -> mid -> mid -> C_t`` with ReLU between
      them (default init), ``mid = C_t`` as the benchmark builds it (``VIDLoss(s, t, t)``);
      ``Linear`` layers for ``(N, C)`` vectors, ``Conv1d`` for ``(N, C, L)`` sequences;
    - ``log_scale`` of shape ``(C_t,)``, initialised to ``log(exp(init_pred_var - eps) - 1)``, so
      that every variance starts at ``init_pred_var`` (5);
    - when the spatial sizes differ, the larger map is average-pooled to the smaller size
      (``F.adaptive_avg_pool2d``) before the regressor: the student's map if it is larger,
      otherwise the teacher's. The benchmark pools to a square chosen from the heights; here
      each dimension is matched separately, which is the same for square maps.

    :meth:`build` creates ``log_scale`` and (unless given) the regressor from the probe step's
    shapes. The teacher's feature is detached.

    One term is one layer pair. The benchmark applies VID to the output of every stage
    (``feat[1:-1]``) and sums the losses with one weight (``-b 1``, with cross-entropy 1 and no
    KD, ``-a 0``): add one ``VIDTerm`` per stage pair, each with the default weight, for the same
    objective.

    Args:
        student_layer: dotted path of the student layer.
        teacher_layer: dotted path of the teacher layer.
        name: key of the term (``train/loss_<name>``); several terms need distinct names.
        weight: factor in the total loss; 1 is the CRD benchmark's.
        mid_channels: width of the regressor's hidden layers; default: the teacher's channels.
        init_pred_var: initial variance of every channel, ``> eps``.
        eps: added to every variance, ``>= 0``.
        regressor: a module mapping the (pooled) student feature onto the teacher's shape;
            default: built from the shapes.
    """

    adapter_attributes = {"regressor": "regressor", "log_scale": "variance"}

    def __init__(
        self,
        student_layer: str,
        teacher_layer: str,
        name: str = "vid",
        weight: float = 1.0,
        mid_channels: int | None = None,
        init_pred_var: float = 5.0,
        eps: float = 1e-5,
        regressor: nn.Module | None = None,
    ) -> None:
        super().__init__(student_layer, teacher_layer, name, weight)
        if not eps >= 0:
            raise ValueError(f"eps must be >= 0, got {eps}.")
        if not init_pred_var > eps:
            raise ValueError(f"init_pred_var must be > eps ({eps}), got {init_pred_var}.")
        if mid_channels is not None and mid_channels < 1:
            raise ValueError(f"mid_channels must be >= 1, got {mid_channels}.")
        self.mid_channels = mid_channels
        self.init_pred_var = float(init_pred_var)
        self.eps = float(eps)
        self.regressor = regressor
        self.log_scale: nn.Parameter | None
        self.register_parameter("log_scale", None)

    def _pooled_pair(self, outputs: StepOutputs) -> tuple[Tensor, Tensor]:
        student, teacher = self.pair(outputs)
        check_feature_pair(tuple(student.shape), tuple(teacher.shape), f"Loss term {self.name!r}: ")
        if student.ndim > 2:
            student, teacher = _pool_to_common_size(student, teacher)
        return student, teacher

    def build(self, outputs: StepOutputs) -> None:
        """Create the regressor and ``log_scale`` (whichever is missing) from the probe step's shapes."""
        student, teacher = self._pooled_pair(outputs)
        c_s, c_t = student.shape[1], teacher.shape[1]
        if self.regressor is None:
            mid = self.mid_channels if self.mid_channels is not None else c_t
            self.regressor = nn.Sequential(
                pointwise(c_s, mid, student.ndim),
                nn.ReLU(),
                pointwise(mid, mid, student.ndim),
                nn.ReLU(),
                pointwise(mid, c_t, student.ndim),
            ).to(student.device)
        if self.log_scale is None:
            start = _inverse_softplus(self.init_pred_var - self.eps)
            self.log_scale = nn.Parameter(torch.full((c_t,), start, device=teacher.device))

    def forward(self, outputs: StepOutputs) -> Tensor:
        """``vid_loss(regressor(student_feature), teacher_feature, log_scale, eps)``, after pooling."""
        regressor, log_scale = self.built_adapter("regressor"), self.built_adapter("log_scale")
        student, teacher = self._pooled_pair(outputs)
        return vid_loss(regressor(student), teacher, log_scale, eps=self.eps)

    def extra_repr(self) -> str:
        """Name, weight, layers and settings, shown in the module repr."""
        return (
            f"{super().extra_repr()}, mid_channels={self.mid_channels}, "
            f"init_pred_var={self.init_pred_var}, eps={self.eps}"
        )
