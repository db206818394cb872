r"""Activation boundaries (AB): the student's pre-ReLU responses on the teacher's side of zero.

Heo, Lee, Yun, Choi, "Knowledge Transfer via Distillation of Activation Boundaries Formed by
Hidden Neurons", AAAI 2019. A squared hinge with margin :math:`m` per neuron:

.. math::
    \mathcal{L} = \frac{3}{1000} \cdot \frac{1}{N} \sum (s + m)^2 \mathbb{1}[s > -m \wedge t \le 0]
    + (s - m)^2 \mathbb{1}[s \le m \wedge t > 0]
"""

from __future__ import annotations

import warnings

from torch import Tensor, nn

from lightning_kd.losses._checks import _check_same_shape
from lightning_kd.losses.adapters import check_feature_pair, make_regressor
from lightning_kd.losses.base import LayerPairTerm, StepOutputs, modified_in_place_count
from lightning_kd.precision import float32_math

__all__ = ["ab_loss", "ABTerm", "make_ab_connector"]


#: ``ABLoss.forward`` of the CRD benchmark divides every pair's loss by 1000 and multiplies it by 3.
_AB_SCALE = 3.0 / 1000.0


@float32_math
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


def make_ab_connector(student_shape: tuple[int, ...], teacher_shape: tuple[int, ...]) -> nn.Module:
    """The CRD benchmark's AB connector from a student feature of ``student_shape`` onto ``teacher_shape``.

    As ``Connector`` in ``models/util.py`` of ``HobbitLong/RepDistiller`` (the one its
    ``train_student.py`` builds for ``abound``), for one layer pair:

    - ``nn.Identity()`` when channels and spatial sizes already agree (theirs: an empty
      ``nn.Sequential()``), e.g. for resnet8x4 against resnet32x4;
    - otherwise ``ConvReg(s, t, use_relu=False)``: the convolution of
      :func:`~lightning_kd.losses.adapters.make_regressor` (a 1x1 convolution with bias for equal
      sizes; stride-2 3x3, stride-2 transposed 4x4 or ``(1 + H_s - H_t) x (1 + W_s - W_t)``
      otherwise) and a ``BatchNorm2d``, without the ReLU, default init;
    - ``(N, C, L)`` sequences of equal length: ``Conv1d(C_s, C_t, 1)`` + ``BatchNorm1d``;
    - ``(N, C)`` vectors: ``Linear(C_s, C_t)`` + ``BatchNorm1d``.

    Raises:
        ValueError: no such mapping exists; the message names both shapes.
    """
    check_feature_pair(
        student_shape, teacher_shape, "Cannot connect a student feature to a teacher feature: "
    )
    if student_shape[1:] == teacher_shape[1:]:
        return nn.Identity()
    regressor = make_regressor(student_shape, teacher_shape)
    if len(student_shape) == 2:
        return nn.Sequential(regressor, nn.BatchNorm1d(teacher_shape[1]))
    return nn.Sequential(*list(regressor)[:-1])  # conv + BatchNorm, no ReLU: the pre-ReLU response


class ABTerm(LayerPairTerm):
    r"""Activation boundaries (Heo et al., AAAI 2019) between one student and one teacher layer.

    See :func:`lightning_kd.losses.functional.ab_loss`. Both layers must output the
    **pre-ReLU** response: a BatchNorm before a ReLU, or a residual block's sum before its ReLU
    (``preact_feature_paths`` of the CIFAR models, e.g. ``layer1.0.merge`` of resnet8x4 and
    ``layer1.4.merge`` of resnet32x4). The student's feature goes through a connector
    (:func:`make_ab_connector`: identity when the shapes agree, else the benchmark's
    ``ConvReg`` without ReLU), built in :meth:`build` from the probe step's shapes unless given,
    and owned by this term.

    The CRD benchmark (``abound`` in ``train_student.py`` of ``HobbitLong/RepDistiller``)
    distils the pre-activations of the last block of every stage (``feat[1:-1]``, margin 1) in an
    init stage only: the student's feature modules (stem and stages, not the classifier) and the
    connectors are trained on the AB loss alone, the unweighted sum over the pairs, with pair
    :math:`i` of :math:`L` weighted :math:`2^{i - L + 1}` (1/4, 1/2, 1 for three stages) inside
    ``ABLoss``; the main stage is cross-entropy alone. Put one term per pair with those weights
    in the init stage of a :class:`~lightning_kd.callbacks.DistillationStages`
    (recipe ``cifar100/methods/ab``).

    Only the sign of the teacher's feature enters the loss, so a teacher layer whose output is
    then overwritten by an in-place ReLU still gives the right loss. The student's values
    matter: a warning is issued once if the captured student feature was modified in place
    after its layer returned it (e.g. by ``ReLU(inplace=True)``); hook a layer whose output is
    not modified in place.

    Args:
        student_layer: dotted path of the student layer (its pre-ReLU feature).
        teacher_layer: dotted path of the teacher layer (its pre-ReLU feature, or any feature
            with the same sign).
        name: key of the term (``train/loss_<name>``); several terms need distinct names.
        weight: factor in the total loss; the benchmark's pair weight :math:`2^{i - L + 1}`.
        margin: :math:`m \ge 0`, 1 as in the benchmark.
        connector: a module mapping the student feature onto the teacher's shape; default:
            built from the shapes.
    """

    adapter_attributes = {"connector": "connector"}

    def __init__(
        self,
        student_layer: str,
        teacher_layer: str,
        name: str = "ab",
        weight: float = 1.0,
        margin: float = 1.0,
        connector: nn.Module | None = None,
    ) -> None:
        super().__init__(student_layer, teacher_layer, name, weight)
        if not margin >= 0:
            raise ValueError(f"margin must be >= 0, got {margin}.")
        self.margin = float(margin)
        self.connector = connector
        self._warned_in_place = False

    def build(self, outputs: StepOutputs) -> None:
        """Create the connector from the probe step's feature shapes."""
        student, teacher = self.pair(outputs)
        try:
            connector = make_ab_connector(tuple(student.shape), tuple(teacher.shape))
        except ValueError as error:
            raise ValueError(f"Loss term {self.name!r}: {error}") from None
        self.connector = connector.to(student.device)

    def _warn_if_modified_in_place(self, student: Tensor) -> None:
        if self._warned_in_place or modified_in_place_count(student) == 0:
            return
        self._warned_in_place = True
        warnings.warn(
            f"Loss term {self.name!r}: the student feature of layer {self.student_layer!r} was modified in "
            "place (e.g. by ReLU(inplace=True) or `+=`) after it was captured, so AB sees post-ReLU values, "
            "not the pre-ReLU response. Hook a layer whose output is not modified in place.",
            stacklevel=3,
        )

    def forward(self, outputs: StepOutputs) -> Tensor:
        """``ab_loss(connector(student_feature), teacher_feature, margin)``, the teacher detached."""
        connector = self.built_adapter("connector")
        student, teacher = self.pair(outputs)
        self._warn_if_modified_in_place(student)
        return ab_loss(connector(student), teacher, margin=self.margin)

    def extra_repr(self) -> str:
        """Name, weight, layers and margin, shown in the module repr."""
        return f"{super().extra_repr()}, margin={self.margin}"
