"""Loss terms on the models' responses (logits)."""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor

from lightning_kd.losses import functional
from lightning_kd.losses.base import LossTerm, StepOutputs, checked_temperature

__all__ = ["CrossEntropyTerm", "DISTTerm", "DKDTerm", "KDTerm"]


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


def _teacher_logits(term: LossTerm, outputs: StepOutputs) -> Tensor:
    """The teacher's logits, detached; a clear error when the step has no teacher."""
    if outputs.teacher_logits is None:
        raise ValueError(f"Loss term {term.name!r} needs the teacher's logits, but the step has none.")
    return outputs.teacher_logits.detach()


class KDTerm(LossTerm):
    """Hinton KD from the teacher's soft predictions into the student's.

    See :func:`lightning_kd.losses.functional.kd_loss`. The teacher's logits are detached:
    with a co-trained teacher the student learns from it, not the other way round.

    Args:
        name: key of the term (``train/loss_<name>``).
        weight: factor in the total loss (the CRD benchmark uses 0.9 with CE at 0.1).
        temperature: softening temperature; :class:`~lightning_kd.callbacks.TemperatureAnnealing`
            changes it during training.
        standardize: Z-score each sample's logits first (logit standardization, Sun et al.,
            CVPR 2024); the temperature then applies to logits of unit variance.
    """

    def __init__(
        self,
        name: str = "kd",
        weight: float = 1.0,
        temperature: float = 4.0,
        standardize: bool = False,
    ) -> None:
        super().__init__(name, weight)
        self.temperature = checked_temperature(temperature)
        self.standardize = bool(standardize)

    def forward(self, outputs: StepOutputs) -> Tensor:
        """``kd_loss(student_logits, teacher_logits.detach(), temperature, standardize)``."""
        return functional.kd_loss(
            outputs.student_logits,
            _teacher_logits(self, outputs),
            self.temperature,
            standardize=self.standardize,
        )

    def extra_repr(self) -> str:
        """Name, weight and settings, shown in the module repr."""
        return f"{super().extra_repr()}, temperature={self.temperature}, standardize={self.standardize}"


class DKDTerm(LossTerm):
    """Decoupled KD (Zhao et al., CVPR 2022): ``alpha * TCKD + beta * NCKD``; needs labels.

    See :func:`lightning_kd.losses.functional.dkd_loss`. The teacher's logits are detached.

    Args:
        name: key of the term (``train/loss_<name>``).
        weight: factor in the total loss (the authors pair it with cross-entropy at weight 1 and
            warm it up linearly over 20 epochs: use a
            :class:`~lightning_kd.callbacks.LossWeightSchedule` for that).
        alpha: weight of the target-class part (TCKD).
        beta: weight of the non-target-class part (NCKD).
        temperature: softening temperature; :class:`~lightning_kd.callbacks.TemperatureAnnealing`
            changes it during training.
    """

    def __init__(
        self,
        name: str = "dkd",
        weight: float = 1.0,
        alpha: float = 1.0,
        beta: float = 8.0,
        temperature: float = 4.0,
    ) -> None:
        super().__init__(name, weight)
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.temperature = checked_temperature(temperature)

    def forward(self, outputs: StepOutputs) -> Tensor:
        """``dkd_loss(student_logits, teacher_logits.detach(), targets, alpha, beta, temperature)``."""
        if outputs.targets is None:
            raise ValueError(
                f"Loss term {self.name!r} (DKD) needs labels to split the target class from the others, "
                "but the batch has no targets."
            )
        return functional.dkd_loss(
            outputs.student_logits,
            _teacher_logits(self, outputs),
            outputs.targets,
            alpha=self.alpha,
            beta=self.beta,
            temperature=self.temperature,
        )

    def extra_repr(self) -> str:
        """Name, weight and settings, shown in the module repr."""
        return f"{super().extra_repr()}, alpha={self.alpha}, beta={self.beta}, temperature={self.temperature}"


class DISTTerm(LossTerm):
    """DIST (Huang et al., NeurIPS 2022): match inter- and intra-class Pearson correlations.

    See :func:`lightning_kd.losses.functional.dist_loss`. The teacher's logits are detached. The
    intra-class part correlates each class across the batch: it needs batches of more than one
    sample.

    Args:
        name: key of the term (``train/loss_<name>``).
        weight: factor in the total loss.
        beta: weight of the inter-class relation (per sample, across classes).
        gamma: weight of the intra-class relation (per class, across the batch).
        temperature: softmax temperature; :class:`~lightning_kd.callbacks.TemperatureAnnealing`
            changes it during training.
    """

    def __init__(
        self,
        name: str = "dist",
        weight: float = 1.0,
        beta: float = 1.0,
        gamma: float = 1.0,
        temperature: float = 1.0,
    ) -> None:
        super().__init__(name, weight)
        self.beta = float(beta)
        self.gamma = float(gamma)
        self.temperature = checked_temperature(temperature)

    def forward(self, outputs: StepOutputs) -> Tensor:
        """``dist_loss(student_logits, teacher_logits.detach(), beta, gamma, temperature)``."""
        return functional.dist_loss(
            outputs.student_logits,
            _teacher_logits(self, outputs),
            beta=self.beta,
            gamma=self.gamma,
            temperature=self.temperature,
        )

    def extra_repr(self) -> str:
        """Name, weight and settings, shown in the module repr."""
        return f"{super().extra_repr()}, beta={self.beta}, gamma={self.gamma}, temperature={self.temperature}"
