"""FSP: the flow between two layers, matched between student and teacher."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from lightning_kd.losses import functional
from lightning_kd.losses.base import LossTerm, StepOutputs, first_tensor

__all__ = ["FSPTerm"]


class FSPTerm(LossTerm):
    """FSP matrices of a pair of student layers against a pair of teacher layers.

    See :func:`lightning_kd.losses.functional.fsp_loss`. The benchmark trains the student on
    FSP alone in an init stage, then on cross-entropy (``configs/mnist1d/methods/fsp.yaml``
    with :class:`~lightning_kd.callbacks.DistillationStages`); several pairs are several terms.

    Args:
        student_layers: dotted paths of the earlier and the later student layer.
        teacher_layers: the matching teacher layers (same channel counts).
        name: key of the term.
        weight: factor in the total loss (the benchmark's init stage sums FSP unweighted).
    """

    def __init__(
        self,
        student_layers: Sequence[str],
        teacher_layers: Sequence[str],
        name: str = "fsp",
        weight: float = 1.0,
    ) -> None:
        super().__init__(name, weight)
        if len(student_layers) != 2 or len(teacher_layers) != 2:
            raise ValueError(
                f"FSPTerm needs two student and two teacher layers, got {list(student_layers)} and "
                f"{list(teacher_layers)}."
            )
        self._student_layers = tuple(student_layers)
        self._teacher_layers = tuple(teacher_layers)

    @property
    def student_layers(self) -> tuple[str, ...]:
        """The earlier and the later student layer."""
        return self._student_layers

    @property
    def teacher_layers(self) -> tuple[str, ...]:
        """The earlier and the later teacher layer."""
        return self._teacher_layers

    def forward(self, outputs: StepOutputs) -> Tensor:
        """``fsp_loss`` of the two pairs; the teacher's maps are detached."""
        s1, s2 = (first_tensor(outputs.student_features[p]) for p in self._student_layers)
        t1, t2 = (first_tensor(outputs.teacher_features[p]).detach() for p in self._teacher_layers)
        return functional.fsp_loss(s1, s2, t1, t2)

    def extra_repr(self) -> str:
        """Name, weight and layers, shown in the module repr."""
        layers = f"student_layers={self._student_layers}, teacher_layers={self._teacher_layers}"
        return f"{super().extra_repr()}, {layers}"
