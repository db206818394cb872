"""Generalized distillation (LUPI): a student learns from a teacher that saw privileged inputs."""

from __future__ import annotations

from torch import Tensor

from lightning_kd.losses import functional
from lightning_kd.losses.base import LossTerm, StepOutputs, checked_temperature

__all__ = ["GeneralizedDistillationTerm"]


class GeneralizedDistillationTerm(LossTerm):
    r"""Generalized distillation (Lopez-Paz, Bottou, Schölkopf, Vapnik, ICLR 2016).

    The whole objective of the paper's Eq. 2 in one term:
    :math:`(1 - \lambda)\,\ell(y, \sigma(f(x))) + \lambda\,\ell(\sigma(f_t(x^\star)/T), \sigma(f(x)))`;
    see :func:`lightning_kd.losses.functional.generalized_distillation_loss`. Use it alone
    (``losses=[GeneralizedDistillationTerm(...)]``, no separate cross-entropy term). For learning
    using privileged information, give the module ``teacher_input_key`` so that the teacher reads
    the privileged inputs :math:`x^\star` and the student only :math:`x`. The teacher's logits are
    detached.

    Args:
        name: key of the term (``train/loss_<name>``).
        weight: factor in the total loss.
        temperature: softening temperature :math:`T` of the teacher's predictions (the paper's
            grid: 1, 2, 5, 10, 20, 50); :class:`~lightning_kd.callbacks.TemperatureAnnealing`
            changes it during training.
        imitation: the imitation parameter :math:`\lambda \in [0, 1]` (0: labels only, 1: teacher
            only; the paper's grid: 0, 0.1, ..., 1).
    """

    def __init__(
        self,
        name: str = "gd",
        weight: float = 1.0,
        temperature: float = 1.0,
        imitation: float = 0.5,
    ) -> None:
        super().__init__(name, weight)
        if not 0.0 <= imitation <= 1.0:
            raise ValueError(f"imitation (lambda) must be in [0, 1], got {imitation}.")
        self.temperature = checked_temperature(temperature)
        self.imitation = float(imitation)

    def forward(self, outputs: StepOutputs) -> Tensor:
        """``generalized_distillation_loss(student_logits, teacher_logits.detach(), targets, T, lambda)``."""
        if outputs.teacher_logits is None:
            raise ValueError(f"Loss term {self.name!r} needs the teacher's logits, but the step has none.")
        if outputs.targets is None and self.imitation < 1.0:
            raise ValueError(
                f"Loss term {self.name!r} needs labels when imitation < 1 (got {self.imitation}), but the "
                "batch has no targets: set the module's target_key, or imitation=1.0 for pure imitation."
            )
        return functional.generalized_distillation_loss(
            outputs.student_logits,
            outputs.teacher_logits.detach(),
            outputs.targets,
            temperature=self.temperature,
            imitation=self.imitation,
        )

    def extra_repr(self) -> str:
        """Name, weight and settings, shown in the module repr."""
        return f"{super().extra_repr()}, temperature={self.temperature}, imitation={self.imitation}"
