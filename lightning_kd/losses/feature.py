"""Loss terms on intermediate features that need a trainable adapter (FitNets, VID, OFD)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from lightning_kd.callbacks.feature_hooks import find_layer
from lightning_kd.losses import functional
from lightning_kd.losses.base import LayerPairTerm, LossTerm, StepOutputs, modified_in_place_count

__all__ = ["FitNetTerm", "OFDTerm", "VIDTerm", "make_regressor", "margin_from_batchnorm"]


def make_regressor(student_shape: tuple[int, ...], teacher_shape: tuple[int, ...]) -> nn.Module:
    """A module that maps a student feature of ``student_shape`` onto ``teacher_shape``.

    - ``(N, C)`` vectors: ``Linear(C_s, C_t)``.
    - ``(N, C, L)`` sequences of equal length: ``Conv1d(C_s, C_t, 1)`` + BN + ReLU.
    - ``(N, C, H, W)`` maps: the CRD benchmark's ``ConvReg`` + BN + ReLU: a stride-2 3x3 conv
      when the student map is twice the teacher's size, a stride-2 transposed conv when it is
      half, a ``(1 + H_s - H_t) x (1 + W_s - W_t)`` conv when it is at least as large.

    Raises:
        ValueError: no such mapping exists; the message names both shapes.
    """
    if student_shape[0] != teacher_shape[0]:
        raise ValueError(
            f"Student feature {student_shape} and teacher feature {teacher_shape} differ in batch size."
        )
    if len(student_shape) != len(teacher_shape) or len(student_shape) not in (2, 3, 4):
        raise ValueError(
            f"Cannot regress a student feature of shape {student_shape} onto a teacher feature of shape "
            f"{teacher_shape}: both must be (N, C), (N, C, L) or (N, C, H, W). Pick layers of the same kind."
        )
    c_s, c_t = student_shape[1], teacher_shape[1]
    if len(student_shape) == 2:
        return nn.Linear(c_s, c_t)
    if len(student_shape) == 3:
        if student_shape[2] != teacher_shape[2]:
            raise ValueError(
                f"Student sequence {student_shape} and teacher sequence {teacher_shape} differ in length; "
                "pick layers of equal length."
            )
        return nn.Sequential(nn.Conv1d(c_s, c_t, 1), nn.BatchNorm1d(c_t), nn.ReLU(inplace=True))
    (h_s, w_s), (h_t, w_t) = student_shape[2:], teacher_shape[2:]
    conv: nn.Module
    if (h_s, w_s) == (2 * h_t, 2 * w_t):
        conv = nn.Conv2d(c_s, c_t, kernel_size=3, stride=2, padding=1)
    elif (2 * h_s, 2 * w_s) == (h_t, w_t):
        conv = nn.ConvTranspose2d(c_s, c_t, kernel_size=4, stride=2, padding=1)
    elif h_s >= h_t and w_s >= w_t:
        conv = nn.Conv2d(c_s, c_t, kernel_size=(1 + h_s - h_t, 1 + w_s - w_t))
    else:
        raise ValueError(
            f"Cannot regress a student map of shape {student_shape} onto a teacher map of shape "
            f"{teacher_shape}: the student map must be twice, half, or at least the teacher's size."
        )
    return nn.Sequential(conv, nn.BatchNorm2d(c_t), nn.ReLU(inplace=True))


class FitNetTerm(LayerPairTerm):
    """FitNets hint (Romero et al., ICLR 2015): MSE between ``regressor(student)`` and the teacher.

    The regressor is built by :func:`make_regressor` from the two layers' shapes on the
    module's probe batch (or passed in), owned by this term, and trained with the student.
    The CRD benchmark weights this term 100 (its default here).

    Args:
        student_layer: dotted path of the student layer.
        teacher_layer: dotted path of the teacher layer (the "hint").
        name: key of the term.
        weight: factor in the total loss.
        regressor: a module mapping the student feature onto the teacher's shape; default:
            built from the shapes.
    """

    def __init__(
        self,
        student_layer: str,
        teacher_layer: str,
        name: str = "fitnet",
        weight: float = 100.0,
        regressor: nn.Module | None = None,
    ) -> None:
        super().__init__(student_layer, teacher_layer, name, weight)
        self.regressor = regressor

    @property
    def needs_build(self) -> bool:
        """Until the regressor exists."""
        return self.regressor is None

    def build(self, outputs: StepOutputs) -> None:
        """Create the regressor from the probe step's feature shapes."""
        student, teacher = self.pair(outputs)
        self.regressor = make_regressor(tuple(student.shape), tuple(teacher.shape)).to(student.device)

    def forward(self, outputs: StepOutputs) -> Tensor:
        """``fitnet_loss(regressor(student_feature), teacher_feature)``."""
        if self.regressor is None:
            raise RuntimeError(
                f"Loss term {self.name!r} has no regressor yet: the module builds it in setup()."
            )
        student, teacher = self.pair(outputs)
        return functional.fitnet_loss(self.regressor(student), teacher)


def _check_feature_pair(term: str, student_shape: tuple[int, ...], teacher_shape: tuple[int, ...]) -> None:
    """Two ``(N, C)``, ``(N, C, L)`` or ``(N, C, H, W)`` features of the same batch."""
    if len(student_shape) != len(teacher_shape) or len(student_shape) not in (2, 3, 4):
        raise ValueError(
            f"{term}: the student feature has shape {student_shape} and the teacher feature {teacher_shape}; "
            "both must be (N, C), (N, C, L) or (N, C, H, W). Pick layers of the same kind."
        )
    if student_shape[0] != teacher_shape[0]:
        raise ValueError(
            f"{term}: the student feature {student_shape} and the teacher feature {teacher_shape} differ in "
            "batch size."
        )


def _pointwise(in_channels: int, out_channels: int, ndim: int) -> nn.Module:
    """A bias-free 1x1 convolution for ``ndim``-dimensional features (``Linear`` for vectors)."""
    if ndim == 2:
        return nn.Linear(in_channels, out_channels, bias=False)
    conv = nn.Conv1d if ndim == 3 else nn.Conv2d
    return conv(in_channels, out_channels, kernel_size=1, bias=False)


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

    @property
    def needs_build(self) -> bool:
        """Until the regressor and ``log_scale`` exist."""
        return self.regressor is None or self.log_scale is None

    def _pooled_pair(self, outputs: StepOutputs) -> tuple[Tensor, Tensor]:
        student, teacher = self.pair(outputs)
        _check_feature_pair(f"Loss term {self.name!r}", tuple(student.shape), tuple(teacher.shape))
        if student.ndim > 2:
            student, teacher = functional._pool_to_common_size(student, teacher)
        return student, teacher

    def build(self, outputs: StepOutputs) -> None:
        """Create the regressor and ``log_scale`` (whichever is missing) from the probe step's shapes."""
        student, teacher = self._pooled_pair(outputs)
        c_s, c_t = student.shape[1], teacher.shape[1]
        if self.regressor is None:
            mid = self.mid_channels if self.mid_channels is not None else c_t
            self.regressor = nn.Sequential(
                _pointwise(c_s, mid, student.ndim),
                nn.ReLU(),
                _pointwise(mid, mid, student.ndim),
                nn.ReLU(),
                _pointwise(mid, c_t, student.ndim),
            ).to(student.device)
        if self.log_scale is None:
            start = _inverse_softplus(self.init_pred_var - self.eps)
            self.log_scale = nn.Parameter(torch.full((c_t,), start, device=teacher.device))

    def forward(self, outputs: StepOutputs) -> Tensor:
        """``vid_loss(regressor(student_feature), teacher_feature, log_scale, eps)``, after pooling."""
        if self.regressor is None or self.log_scale is None:
            raise RuntimeError(
                f"Loss term {self.name!r} has no regressor / variance yet: the module builds them in setup()."
            )
        student, teacher = self._pooled_pair(outputs)
        return functional.vid_loss(self.regressor(student), teacher, self.log_scale, eps=self.eps)

    def extra_repr(self) -> str:
        """Name, weight, layers and settings, shown in the module repr."""
        return (
            f"{super().extra_repr()}, mid_channels={self.mid_channels}, "
            f"init_pred_var={self.init_pred_var}, eps={self.eps}"
        )


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
        return functional.ofd_margin(ones, torch.zeros_like(ones))
    return functional.ofd_margin(bn.weight.detach(), bn.bias.detach())


def _ofd_connector(in_channels: int, out_channels: int, ndim: int) -> nn.Sequential:
    """OFD's ``build_feature_connector``: a bias-free 1x1 convolution (He init, fan-out) and a BatchNorm."""
    layer = _pointwise(in_channels, out_channels, ndim)
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

    @property
    def needs_build(self) -> bool:
        """Until the connector and the margin exist."""
        return self.connector is None or self.margin is None

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
        _check_feature_pair(f"Loss term {self.name!r}", student_shape, teacher_shape)
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
        if self.connector is None or self.margin is None:
            raise RuntimeError(
                f"Loss term {self.name!r} has no connector / margin yet: the module builds them in setup()."
            )
        student, teacher = self.pair(outputs)
        self._warn_if_modified_in_place(student, teacher)
        return functional.ofd_loss(self.connector(student), teacher, self.margin)

    def extra_repr(self) -> str:
        """Name, weight, layers and the margin's BatchNorm, shown in the module repr."""
        return f"{super().extra_repr()}, teacher_bn={self.teacher_bn!r}"
