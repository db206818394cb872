"""Loss terms on the relations between the samples of a batch (SP, RKD, PKT, CC)."""

from __future__ import annotations

from torch import Tensor

from lightning_kd.losses import functional
from lightning_kd.losses.base import LayerPairTerm, StepOutputs

__all__ = ["CCTerm", "PKTTerm", "RKDTerm", "SPTerm"]


class SPTerm(LayerPairTerm):
    """Similarity-preserving KD (Tung & Mori, ICCV 2019) between one student and one teacher layer.

    See :func:`lightning_kd.losses.functional.sp_loss`. The layers' outputs are flattened per
    sample; their sizes may differ, the batch size must match. The teacher's feature is detached.
    The CRD benchmark applies it to the output of the last convolutional stage (before pooling).

    Args:
        student_layer: dotted path of the student layer (as in ``student.named_modules()``).
        teacher_layer: dotted path of the teacher layer.
        name: key of the term (``train/loss_<name>``).
        weight: factor in the total loss; 3000 is the CRD benchmark's (``-b 3000``).
    """

    def __init__(
        self, student_layer: str, teacher_layer: str, name: str = "sp", weight: float = 3000.0
    ) -> None:
        super().__init__(student_layer, teacher_layer, name, weight)

    def forward(self, outputs: StepOutputs) -> Tensor:
        """``sp_loss(student_feature, teacher_feature.detach())``."""
        student, teacher = self.pair(outputs)
        return functional.sp_loss(student, teacher)


class RKDTerm(LayerPairTerm):
    """Relational KD (Park et al., CVPR 2019): distance and angle relations of a batch's embeddings.

    See :func:`lightning_kd.losses.functional.rkd_loss`. The layers' outputs are flattened per
    sample; their dimensions may differ, the batch size must match (at least 2 samples). The
    teacher's output is detached. The CRD benchmark applies it to the penultimate (pooled)
    features of both models, without an embedding head; no head is built here either.

    Args:
        student_layer: dotted path of the student layer.
        teacher_layer: dotted path of the teacher layer.
        name: key of the term (``train/loss_<name>``).
        weight: factor in the total loss; 1 is the CRD benchmark's (``-b 1``).
        distance_weight: weight of the distance part inside the loss (benchmark: 25).
        angle_weight: weight of the angle part inside the loss (benchmark: 50).
    """

    def __init__(
        self,
        student_layer: str,
        teacher_layer: str,
        name: str = "rkd",
        weight: float = 1.0,
        distance_weight: float = 25.0,
        angle_weight: float = 50.0,
    ) -> None:
        super().__init__(student_layer, teacher_layer, name, weight)
        self.distance_weight = float(distance_weight)
        self.angle_weight = float(angle_weight)

    def forward(self, outputs: StepOutputs) -> Tensor:
        """``rkd_loss(student_feature, teacher_feature.detach(), distance_weight, angle_weight)``."""
        student, teacher = self.pair(outputs)
        return functional.rkd_loss(
            student, teacher, distance_weight=self.distance_weight, angle_weight=self.angle_weight
        )

    def extra_repr(self) -> str:
        """Name, weight, layers and settings, shown in the module repr."""
        weights = f"distance_weight={self.distance_weight}, angle_weight={self.angle_weight}"
        return f"{super().extra_repr()}, {weights}"


class PKTTerm(LayerPairTerm):
    """Probabilistic knowledge transfer (Passalis & Tefas, ECCV 2018) with a cosine kernel.

    See :func:`lightning_kd.losses.functional.pkt_loss`. The layers' outputs are flattened per
    sample; their dimensions may differ, the batch size must match. The teacher's output is
    detached. The CRD benchmark applies it to the penultimate (pooled) features of both models,
    without an embedding head; no head is built here either.

    Args:
        student_layer: dotted path of the student layer.
        teacher_layer: dotted path of the teacher layer.
        name: key of the term (``train/loss_<name>``).
        weight: factor in the total loss; 30000 is the CRD benchmark's (``-b 30000``): the loss is
            a mean over the :math:`N^2` entries of the batch's similarity matrix.
        eps: added to the norms and inside the logarithm.
    """

    def __init__(
        self,
        student_layer: str,
        teacher_layer: str,
        name: str = "pkt",
        weight: float = 30000.0,
        eps: float = 1e-7,
    ) -> None:
        super().__init__(student_layer, teacher_layer, name, weight)
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps}.")
        self.eps = float(eps)

    def forward(self, outputs: StepOutputs) -> Tensor:
        """``pkt_loss(student_feature, teacher_feature.detach(), eps)``."""
        student, teacher = self.pair(outputs)
        return functional.pkt_loss(student, teacher, eps=self.eps)

    def extra_repr(self) -> str:
        """Name, weight, layers and settings, shown in the module repr."""
        return f"{super().extra_repr()}, eps={self.eps}"


class CCTerm(LayerPairTerm):
    r"""Correlation congruence (Peng et al., ICCV 2019) with the Taylor-expanded Gaussian RBF kernel.

    See :func:`lightning_kd.losses.functional.cc_loss`. The layers' outputs are flattened per
    sample and L2-normalised; their dimensions may differ, the batch size must match. The
    teacher's output is detached. No embedding head is built: the CRD benchmark passes both
    models' penultimate features through a trainable linear embedding (128-d) first; to do that,
    name layers that are such heads in your models.

    The default weight is 100, not the CRD benchmark's 0.02: the benchmark's ``CC.py`` computes
    a different quantity (products of the absolute student-teacher residuals of consecutive
    samples, no kernel; see :func:`~lightning_kd.losses.functional.cc_loss`), unnormalised and
    of order 100 for 128-d embeddings with unit-variance entries, while this kernel loss (the
    paper's) stays below 1 for the default ``gamma`` and ``order``: at 0.02 it would do nothing.
    100 is the weight ``AberHu/Knowledge-Distillation-Zoo`` uses with this same kernel loss.

    Args:
        student_layer: dotted path of the student layer.
        teacher_layer: dotted path of the teacher layer.
        name: key of the term (``train/loss_<name>``).
        weight: factor in the total loss (see above).
        gamma: :math:`\gamma > 0` of the Gaussian kernel.
        order: order :math:`P \ge 0` of its Taylor expansion.
    """

    def __init__(
        self,
        student_layer: str,
        teacher_layer: str,
        name: str = "cc",
        weight: float = 100.0,
        gamma: float = 0.4,
        order: int = 2,
    ) -> None:
        super().__init__(student_layer, teacher_layer, name, weight)
        if not gamma > 0:
            raise ValueError(f"gamma must be > 0, got {gamma}.")
        if isinstance(order, bool) or not isinstance(order, int) or order < 0:
            raise ValueError(f"order must be an integer >= 0, got {order!r}.")
        self.gamma = float(gamma)
        self.order = order

    def forward(self, outputs: StepOutputs) -> Tensor:
        """``cc_loss(student_feature, teacher_feature.detach(), gamma, order)``."""
        student, teacher = self.pair(outputs)
        return functional.cc_loss(student, teacher, gamma=self.gamma, order=self.order)

    def extra_repr(self) -> str:
        """Name, weight, layers and settings, shown in the module repr."""
        return f"{super().extra_repr()}, gamma={self.gamma}, order={self.order}"
