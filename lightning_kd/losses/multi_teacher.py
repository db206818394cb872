"""MultiTeacherKDTerm: KD from the weighted soft targets of a TeacherEnsemble."""

from __future__ import annotations

from typing import Literal

from torch import Tensor

from lightning_kd.losses import functional
from lightning_kd.losses.base import LossTerm, StepOutputs, checked_temperature

__all__ = ["MultiTeacherKDTerm"]

Weighting = Literal["fixed", "confidence"]


class MultiTeacherKDTerm(LossTerm):
    """KD from several teachers' soft targets, mixed with fixed or confidence-based weights.

    See :func:`lightning_kd.losses.functional.multi_teacher_kd_loss`. The teacher must be a
    :class:`~lightning_kd.TeacherEnsemble`. ``weighting="fixed"`` mixes with the
    ensemble's ``weights``; ``"confidence"`` gives every sample its own weights from each
    teacher's cross-entropy on the label (CA-MKD, Zhang et al., ICASSP 2022,
    :func:`~lightning_kd.losses.functional.confidence_weights`), so it needs labels.

    Args:
        name: key of the term (``train/loss_<name>``).
        weight: factor in the total loss.
        temperature: softening temperature.
        weighting: ``"fixed"`` or ``"confidence"``.
    """

    def __init__(
        self, name: str = "kd", weight: float = 0.9, temperature: float = 4.0, weighting: Weighting = "fixed"
    ) -> None:
        super().__init__(name, weight)
        if weighting not in ("fixed", "confidence"):
            raise ValueError(f"weighting must be 'fixed' or 'confidence', got {weighting!r}.")
        self.temperature = checked_temperature(temperature)
        self.weighting = weighting

    def forward(self, outputs: StepOutputs) -> Tensor:
        """T^2-scaled KL from the mixture of the members' soft targets."""
        output = outputs.teacher_output
        if not isinstance(output, dict) or "members" not in output:
            raise ValueError(
                f"Loss term {self.name!r} reads every teacher's logits: make the teacher a "
                "lightning_kd.TeacherEnsemble (or use KDTerm for a single teacher)."
            )
        members = output["members"].detach()
        if self.weighting == "fixed":
            weights = output["weights"]
        elif outputs.targets is None:
            raise ValueError(
                f"Loss term {self.name!r} weighs teachers by their confidence in the labels: "
                "the batch needs targets (or use weighting='fixed')."
            )
        else:
            weights = functional.confidence_weights(members, outputs.targets)
        return functional.multi_teacher_kd_loss(outputs.student_logits, members, weights, self.temperature)
