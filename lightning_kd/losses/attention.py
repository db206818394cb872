"""Loss terms on the spatial attention or activation patterns of convolutional feature maps (AT, NST)."""

from __future__ import annotations

from torch import Tensor

from lightning_kd.losses import functional
from lightning_kd.losses.base import LayerPairTerm, StepOutputs

__all__ = ["ATTerm", "NSTTerm"]


class ATTerm(LayerPairTerm):
    """Attention transfer (Zagoruyko & Komodakis, ICLR 2017) between two ``(N, C, H, W)`` feature maps.

    See :func:`lightning_kd.losses.functional.at_loss`. Channel counts may differ; when the
    spatial sizes differ, the larger map is average-pooled to the smaller one (as in the CRD
    benchmark). The teacher's feature is detached.

    One term is one layer pair. The CRD benchmark applies AT to the output of every stage
    (``feat[1:-1]``) and sums the losses with one weight (1000): add one ``ATTerm`` per stage
    pair, each with the default weight, for the same objective.

    Args:
        student_layer: dotted path of the student layer (as in ``student.named_modules()``).
        teacher_layer: dotted path of the teacher layer.
        name: key of the term (``train/loss_<name>``); several terms need distinct names.
        weight: factor in the total loss; 1000 is the CRD benchmark's (``-b 1000``).
        p: exponent of the attention map (benchmark: 2).
    """

    def __init__(
        self,
        student_layer: str,
        teacher_layer: str,
        name: str = "at",
        weight: float = 1000.0,
        p: float = 2.0,
    ) -> None:
        super().__init__(student_layer, teacher_layer, name, weight)
        if not p > 0:
            raise ValueError(f"p must be > 0, got {p}.")
        self.p = float(p)

    def forward(self, outputs: StepOutputs) -> Tensor:
        """``at_loss(student_feature, teacher_feature.detach(), p)``."""
        student, teacher = self.pair(outputs)
        return functional.at_loss(student, teacher, p=self.p)

    def extra_repr(self) -> str:
        """Name, weight, layers and settings, shown in the module repr."""
        return f"{super().extra_repr()}, p={self.p}"


class NSTTerm(LayerPairTerm):
    """Neuron selectivity transfer (Huang & Wang, 2017): polynomial-kernel MMD between channel patterns.

    See :func:`lightning_kd.losses.functional.nst_loss`. Channel counts may differ; when the
    spatial sizes differ, the larger map is average-pooled to the smaller one (as in the CRD
    benchmark). The teacher's feature is detached.

    One term is one layer pair. The CRD benchmark applies NST to the output of every stage
    (``feat[1:-1]``) and sums the losses with one weight (50): add one ``NSTTerm`` per stage
    pair, each with the default weight, for the same objective.

    Args:
        student_layer: dotted path of the student layer.
        teacher_layer: dotted path of the teacher layer.
        name: key of the term (``train/loss_<name>``); several terms need distinct names.
        weight: factor in the total loss; 50 is the CRD benchmark's (``-b 50``).
    """

    def __init__(
        self, student_layer: str, teacher_layer: str, name: str = "nst", weight: float = 50.0
    ) -> None:
        super().__init__(student_layer, teacher_layer, name, weight)

    def forward(self, outputs: StepOutputs) -> Tensor:
        """``nst_loss(student_feature, teacher_feature.detach())``."""
        student, teacher = self.pair(outputs)
        return functional.nst_loss(student, teacher)
