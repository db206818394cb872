r"""Cross-entropy of the student's (or a co-trained teacher's) logits against the labels.

The supervised part of most distillation objectives (Hinton, Vinyals, Dean, 2015):
:math:`\mathcal{L} = -\frac{1}{N} \sum_n \log \mathrm{softmax}(z_n)_{y_n}`, with optional label
smoothing (:func:`torch.nn.functional.cross_entropy`).
"""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor

from lightning_kd.losses.base import LossTerm, StepOutputs

__all__ = ["CrossEntropyTerm"]


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
        targets = self.required_targets(outputs)
        logits = outputs.student_logits if self.model == "student" else outputs.teacher_logits
        assert logits is not None
        return F.cross_entropy(logits.float(), targets, label_smoothing=self.label_smoothing)
