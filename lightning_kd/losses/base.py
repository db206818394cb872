"""The contract between the training step and a loss term."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

__all__ = ["LossTerm", "StepOutputs"]


@dataclass
class StepOutputs:
    """Everything a loss term may read from one training step.

    Attributes:
        student_logits: the student's predictions.
        targets: the labels of the batch (``None`` for unlabelled data).
        teacher_logits: the teacher's predictions; ``None`` without a teacher. They carry
            gradients only for a co-trained teacher; terms that distil into the student
            detach them.
        student_features: outputs of the student's hooked layers, by dotted path.
        teacher_features: outputs of the teacher's hooked layers, by dotted path.
        batch: the batch as the dataloader produced it.
    """

    student_logits: Tensor
    targets: Tensor | None = None
    teacher_logits: Tensor | None = None
    student_features: dict[str, Any] = field(default_factory=dict)
    teacher_features: dict[str, Any] = field(default_factory=dict)
    batch: Any = None


class LossTerm(nn.Module):
    """A named, weighted term of the training objective.

    Subclasses implement :meth:`forward` (``StepOutputs -> scalar``) with the math taken from
    :mod:`lightning_kd.losses.functional`, declare the layers they read in
    :attr:`student_layers` / :attr:`teacher_layers` (the module hooks exactly those), and own
    any trainable adapter they need. ``weight`` is a plain attribute so that schedules
    (:class:`~lightning_kd.callbacks.LossWeightSchedule`) can change it during training.

    Args:
        name: key of the term; logged as ``train/loss_<name>``.
        weight: factor of the term in the total loss.
    """

    #: whether the term reads the teacher's outputs (it then needs a teacher).
    needs_teacher: bool = True

    def __init__(self, name: str, weight: float = 1.0) -> None:
        super().__init__()
        if not name.isidentifier():
            raise ValueError(
                f"Loss term name must be a Python identifier (letters, digits, _), got {name!r}."
            )
        self.name = name
        self.weight = float(weight)

    @property
    def student_layers(self) -> tuple[str, ...]:
        """Dotted paths of the student layers whose outputs this term reads."""
        return ()

    @property
    def teacher_layers(self) -> tuple[str, ...]:
        """Dotted paths of the teacher layers whose outputs this term reads."""
        return ()

    def forward(self, outputs: StepOutputs) -> Tensor:  # noqa: D102 - documented in the class
        raise NotImplementedError(f"{type(self).__name__} must implement forward(outputs) -> Tensor.")

    def extra_repr(self) -> str:
        """Name, weight and settings, shown in the module repr."""
        return f"name={self.name!r}, weight={self.weight}"
