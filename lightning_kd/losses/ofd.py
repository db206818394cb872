r"""Overhaul of feature distillation (OFD): partial L2 on pre-ReLU features, clipped at a margin.

Heo, Kim, Yun, Park, Kwak, Choi, "A Comprehensive Overhaul of Feature Distillation", ICCV
2019. With :math:`m_c = \mathbb{E}[x \mid x < 0]` of the teacher's BatchNorm output per channel
and :math:`\tau = \max(t, m_c)`:

.. math::
    \mathcal{L} = \frac{1}{N} \sum (s - \tau)^2 \, \mathbb{1}[s > \tau \lor \tau > 0]
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from lightning_kd.hooks import find_layer
from lightning_kd.losses._checks import _check_same_shape, _per_channel
from lightning_kd.losses.adapters import check_feature_pair, pointwise
from lightning_kd.losses.base import LayerPairTerm, LossTerm, StepOutputs, modified_in_place_count
from lightning_kd.precision import float32_math

__all__ = ["margin_from_batchnorm", "ofd_loss", "ofd_margin", "OFDTerm"]


#: OFD's margin is ``-3 * std`` where P(x < 0) is at most this (``get_margin_from_BN``).
_OFD_CDF_THRESHOLD = 1e-3


@float32_math
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
    :class:`~lightning_kd.losses.ofd.OFDTerm`, ImageNet uses 1/10000). An earlier version of
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


_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def margin_from_batchnorm(bn: nn.Module) -> Tensor:
    """OFD's per-channel margin from the affine parameters of the BatchNorm before a ReLU.

    :func:`lightning_kd.losses.functional.ofd_margin` of ``|bn.weight|`` (std) and ``bn.bias``
    (mean), as ``get_margin_from_BN`` of the authors' code. A BatchNorm without affine
    parameters outputs (approximately) standard normal values: std 1, mean 0.

    Args:
        bn: a ``BatchNorm1d`` / ``2d`` / ``3d`` or ``SyncBatchNorm``.

    Returns:
        ``(C,)`` float32 margins (all ``<= 0``), on the BatchNorm's device.

    Raises:
        TypeError: ``bn`` is not a BatchNorm.
    """
    if not isinstance(bn, _BATCH_NORMS):
        raise TypeError(
            f"OFD's margin comes from a BatchNorm's weight and bias, got a {type(bn).__name__}: pick the "
            "BatchNorm whose output is the pre-ReLU feature."
        )
    if bn.weight is None or bn.bias is None:
        device = bn.running_mean.device if bn.running_mean is not None else None
        ones = torch.ones(bn.num_features, device=device)
        return ofd_margin(ones, torch.zeros_like(ones))
    return ofd_margin(bn.weight.detach(), bn.bias.detach())


def _ofd_connector(in_channels: int, out_channels: int, ndim: int) -> nn.Sequential:
    """OFD's ``build_feature_connector``: a bias-free 1x1 convolution (He init, fan-out) and a BatchNorm."""
    layer = pointwise(in_channels, out_channels, ndim)
    nn.init.normal_(layer.weight, 0.0, math.sqrt(2.0 / out_channels))  # theirs: n = k * k * out_channels
    bn = nn.BatchNorm2d(out_channels) if ndim == 4 else nn.BatchNorm1d(out_channels)
    return nn.Sequential(layer, bn)  # BatchNorm: weight 1, bias 0 as theirs


class OFDTerm(LayerPairTerm):
    """Overhaul of feature distillation (Heo et al., ICCV 2019): partial L2 on pre-ReLU features.

    See :func:`lightning_kd.losses.functional.ofd_loss`. Both layers must output the
    **pre-ReLU** feature (e.g. the BatchNorm before a ReLU, or a residual block's sum before
    its ReLU: ``preact_feature_paths`` of the CIFAR models). The student's feature goes through
    a connector (the authors' ``build_feature_connector``: a bias-free 1x1 convolution with He
    init ``N(0, 2 / C_t)`` and a ``BatchNorm2d``; ``Linear`` + ``BatchNorm1d`` for ``(N, C)``
    vectors, ``Conv1d`` + ``BatchNorm1d`` for ``(N, C, L)`` sequences), built in :meth:`build`
    unless given and trained with the student. Spatial sizes must match (no pooling, as theirs).

    The margin (one value per teacher channel) is a buffer, saved in checkpoints. It comes from
    the teacher's BatchNorm at ``teacher_bn`` (:func:`margin_from_batchnorm`), which a loss term
    cannot reach from :class:`~lightning_kd.losses.base.StepOutputs`. So either

    - pass ``margin=[...]`` (e.g. in YAML), or
    - let :meth:`bind` read it: ``DistillationModule.build_terms`` binds every term to the
      models before building it, so in a fit the margin comes from the teacher by itself
      (outside a fit, call :meth:`set_margin_from` with the teacher).

    :meth:`build` raises while the margin is missing. The margin is computed once, from the
    teacher's weights at that time, as the authors do at construction.

    Weight: the authors' CIFAR-100 code adds ``loss_distill.sum() / batch_size / 1000``, hence
    the default 1e-3 (their ImageNet code: 1e-4), with pair :math:`i` of :math:`L`
    (shallowest first) further divided by :math:`2^{L - i - 1}`: for their three stages use
    weights 2.5e-4, 5e-4 and 1e-3. They do not add KD; ``CrossEntropyTerm`` weight 1.

    Their training loop runs the teacher in train mode (its BatchNorms use the batch's
    statistics); a frozen teacher here stays in eval mode (running statistics).

    A warning is issued once if a captured feature was modified in place after its layer
    returned it (e.g. by ``ReLU(inplace=True)`` or ``out += identity``, as in torchvision's
    ResNets): the term then sees the modified, not the pre-ReLU, values. Hook a layer whose
    output is not modified in place.

    Args:
        student_layer: dotted path of the student layer (its pre-ReLU feature).
        teacher_layer: dotted path of the teacher layer (its pre-ReLU feature).
        teacher_bn: dotted path of the teacher BatchNorm whose weight and bias give the margin;
            default: ``teacher_layer`` (when the hooked layer is that BatchNorm).
        name: key of the term (``train/loss_<name>``); several terms need distinct names.
        weight: factor in the total loss; 1e-3 as in the authors' CIFAR-100 code.
        margin: the margin of each teacher channel, instead of computing it from ``teacher_bn``.
        connector: a module mapping the student feature onto the teacher's shape; default:
            built from the shapes.
    """

    adapter_attributes = {"connector": "connector", "margin": "margin"}

    def __init__(
        self,
        student_layer: str,
        teacher_layer: str,
        teacher_bn: str | None = None,
        name: str = "ofd",
        weight: float = 1e-3,
        margin: Sequence[float] | None = None,
        connector: nn.Module | None = None,
    ) -> None:
        super().__init__(student_layer, teacher_layer, name, weight)
        self.teacher_bn = teacher_bn if teacher_bn is not None else teacher_layer
        self.connector = connector
        self.margin: Tensor | None
        self.register_buffer("margin", None)
        if margin is not None:
            values = torch.tensor([float(v) for v in margin], dtype=torch.float32)
            if values.numel() == 0 or not torch.isfinite(values).all():
                raise ValueError(
                    f"margin must hold one finite value per teacher channel, got {list(margin)}."
                )
            self.margin = values
        self._warned_in_place = False

    def bind(self, student: nn.Module, teacher: nn.Module | None, terms: Mapping[str, LossTerm]) -> None:
        """Take the margin from the teacher's BatchNorm, unless one was given."""
        if self.margin is None and teacher is not None:
            self.set_margin_from(teacher)

    def set_margin_from(self, teacher: nn.Module) -> None:
        """Set the margin from the teacher's BatchNorm at ``teacher_bn`` (replacing any margin).

        Raises:
            ValueError: ``teacher_bn`` names no submodule of ``teacher``, or not a BatchNorm.
        """
        bn = find_layer(teacher, self.teacher_bn, "teacher")
        if not isinstance(bn, _BATCH_NORMS):
            raise ValueError(
                f"Loss term {self.name!r}: teacher_bn={self.teacher_bn!r} is a {type(bn).__name__}, not a "
                "BatchNorm. Set teacher_bn to the BatchNorm before the ReLU whose input the term distils."
            )
        self.margin = margin_from_batchnorm(bn)

    def build(self, outputs: StepOutputs) -> None:
        """Create the connector from the probe step's shapes and check the margin against them."""
        student, teacher = self.pair(outputs)
        student_shape, teacher_shape = tuple(student.shape), tuple(teacher.shape)
        check_feature_pair(student_shape, teacher_shape, f"Loss term {self.name!r}: ")
        if student_shape[2:] != teacher_shape[2:]:
            raise ValueError(
                f"Loss term {self.name!r}: the student feature {student_shape} and the teacher feature "
                f"{teacher_shape} differ in spatial size; OFD's 1x1 connector needs equal sizes. Pick layers "
                "at the same resolution."
            )
        if self.margin is None:
            raise RuntimeError(
                f"Loss term {self.name!r} has no margin: pass margin=[...], or call "
                f"term.set_margin_from(teacher) (reads teacher_bn={self.teacher_bn!r}) before build()."
            )
        if self.margin.shape != (teacher_shape[1],):
            raise ValueError(
                f"Loss term {self.name!r}: the margin has shape {tuple(self.margin.shape)} but the teacher "
                f"feature has shape {teacher_shape}: one margin per teacher channel is needed. Check that "
                "teacher_bn belongs to teacher_layer."
            )
        self.margin = self.margin.to(teacher.device)
        if self.connector is None:
            self.connector = _ofd_connector(student_shape[1], teacher_shape[1], student.ndim).to(
                student.device
            )

    def _warn_if_modified_in_place(self, student: Tensor, teacher: Tensor) -> None:
        if self._warned_in_place:
            return
        for role, feature in (("student", student), ("teacher", teacher)):
            if modified_in_place_count(feature) > 0:
                self._warned_in_place = True
                layer = self.student_layer if role == "student" else self.teacher_layer
                warnings.warn(
                    f"Loss term {self.name!r}: the {role} feature of layer {layer!r} was modified in place "
                    "(e.g. by ReLU(inplace=True) or `+=`) after it was captured, so OFD may not see the "
                    "pre-ReLU values. Hook a layer whose output is not modified in place.",
                    stacklevel=3,
                )
                return

    def forward(self, outputs: StepOutputs) -> Tensor:
        """``ofd_loss(connector(student_feature), teacher_feature, margin)``."""
        connector, margin = self.built_adapter("connector"), self.built_adapter("margin")
        student, teacher = self.pair(outputs)
        self._warn_if_modified_in_place(student, teacher)
        return ofd_loss(connector(student), teacher, margin)

    def extra_repr(self) -> str:
        """Name, weight, layers and the margin's BatchNorm, shown in the module repr."""
        return f"{super().extra_repr()}, teacher_bn={self.teacher_bn!r}"
