"""Loss terms on the models' responses (logits)."""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor

from lightning_kd.losses import functional
from lightning_kd.losses.base import LossTerm, StepOutputs

__all__ = ["CrossEntropyTerm", "KDTerm"]


class CrossEntropyTerm(LossTerm):
    """Cross-entropy of one model's logits against the labels.

    Args:
        name: key of the term (``train/loss_<name>``).
        weight: factor in the total loss.
        model: whose logits: ``"student"``, or ``"teacher"`` for a co-trained teacher's own
            supervised loss.
        label_smoothing: passed to :func:`torch.nn.functional.cross_entropy`.
    """

    def __init__(
        self,
        name: str = "ce",
        weight: float = 1.0,
        model: Literal["student", "teacher"] = "student",
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__(name, weight)
        if model not in ("student", "teacher"):
            raise ValueError(f"model must be 'student' or 'teacher', got {model!r}.")
        self.model = model
        self.label_smoothing = label_smoothing

    @property
    def needs_teacher(self) -> bool:  # type: ignore[override]
        """Only the teacher's own cross-entropy needs a teacher."""
        return self.model == "teacher"

    def forward(self, outputs: StepOutputs) -> Tensor:
        """Mean cross-entropy over the batch."""
        if outputs.targets is None:
            raise ValueError(f"Loss term {self.name!r} needs labels, but the batch has no targets.")
        logits = outputs.student_logits if self.model == "student" else outputs.teacher_logits
        assert logits is not None
        return F.cross_entropy(logits.float(), outputs.targets, label_smoothing=self.label_smoothing)


class KDTerm(LossTerm):
    """Hinton KD from the teacher's soft predictions into the student's.

    See :func:`lightning_kd.losses.functional.kd_loss`. The teacher's logits are detached:
    with a co-trained teacher the student learns from it, not the other way round.

    Args:
        name: key of the term (``train/loss_<name>``).
        weight: factor in the total loss (the CRD benchmark uses 0.9 with CE at 0.1).
        temperature: softening temperature; :class:`~lightning_kd.callbacks.TemperatureAnnealing`
            changes it during training.
    """

    def __init__(self, name: str = "kd", weight: float = 1.0, temperature: float = 4.0) -> None:
        super().__init__(name, weight)
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}.")
        self.temperature = float(temperature)

    def forward(self, outputs: StepOutputs) -> Tensor:
        """``kd_loss(student_logits, teacher_logits.detach(), temperature)``."""
        assert outputs.teacher_logits is not None
        return functional.kd_loss(outputs.student_logits, outputs.teacher_logits.detach(), self.temperature)

    def extra_repr(self) -> str:
        """Name, weight and settings, shown in the module repr."""
        return f"{super().extra_repr()}, temperature={self.temperature}"
