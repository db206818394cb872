r"""FitNets: a regressed intermediate student feature matched to a teacher "hint" layer.

Romero, Ballas, Kahou, Chassang, Gatta, Bengio, "FitNets: Hints for Thin Deep Nets", ICLR 2015:
:math:`\mathcal{L} = \frac{1}{|F|} \sum \big(r(F^s) - F^t\big)^2`, with :math:`r` a trainable
regressor (:func:`~lightning_kd.losses.adapters.make_regressor`).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from lightning_kd.losses._checks import _check_same_shape
from lightning_kd.losses.adapters import make_regressor
from lightning_kd.losses.base import LayerPairTerm, StepOutputs
from lightning_kd.precision import float32_math

__all__ = ["fitnet_loss", "FitNetTerm"]


@float32_math
def fitnet_loss(student_feature: Tensor, teacher_feature: Tensor) -> Tensor:
    r"""FitNets hint loss: mean squared error between the (regressed) student and the teacher feature.

    Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015:
    :math:`\mathcal{L} = \frac{1}{|F|} \sum (r(F^s) - F^t)^2`, the mean over every element,
    as the CRD benchmark's ``HintLoss`` (``nn.MSELoss()``). The regressor :math:`r` that maps
    the student's shape onto the teacher's belongs to the loss term
    (:class:`~lightning_kd.losses.fitnet.FitNetTerm`); pass its output here.

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

    adapter_attributes = {"regressor": "regressor"}

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

    def build(self, outputs: StepOutputs) -> None:
        """Create the regressor from the probe step's feature shapes."""
        student, teacher = self.pair(outputs)
        self.regressor = make_regressor(tuple(student.shape), tuple(teacher.shape)).to(student.device)

    def forward(self, outputs: StepOutputs) -> Tensor:
        """``fitnet_loss(regressor(student_feature), teacher_feature)``."""
        regressor = self.built_adapter("regressor")
        student, teacher = self.pair(outputs)
        return fitnet_loss(regressor(student), teacher)
