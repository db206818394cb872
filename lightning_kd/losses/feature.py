"""Loss terms on intermediate features that need a trainable adapter."""

from __future__ import annotations

from torch import Tensor, nn

from lightning_kd.losses import functional
from lightning_kd.losses.base import LayerPairTerm, StepOutputs

__all__ = ["FitNetTerm", "make_regressor"]


def make_regressor(student_shape: tuple[int, ...], teacher_shape: tuple[int, ...]) -> nn.Module:
    """A module that maps a student feature of ``student_shape`` onto ``teacher_shape``.

    - ``(N, C)`` vectors: ``Linear(C_s, C_t)``.
    - ``(N, C, L)`` sequences of equal length: ``Conv1d(C_s, C_t, 1)`` + BN + ReLU.
    - ``(N, C, H, W)`` maps: the CRD benchmark's ``ConvReg`` + BN + ReLU: a stride-2 3x3 conv
      when the student map is twice the teacher's size, a stride-2 transposed conv when it is
      half, a ``(1 + H_s - H_t) x (1 + W_s - W_t)`` conv when it is at least as large.

    Raises:
        ValueError: no such mapping exists; the message names both shapes.
    """
    if student_shape[0] != teacher_shape[0]:
        raise ValueError(
            f"Student feature {student_shape} and teacher feature {teacher_shape} differ in batch size."
        )
    if len(student_shape) != len(teacher_shape) or len(student_shape) not in (2, 3, 4):
        raise ValueError(
            f"Cannot regress a student feature of shape {student_shape} onto a teacher feature of shape "
            f"{teacher_shape}: both must be (N, C), (N, C, L) or (N, C, H, W). Pick layers of the same kind."
        )
    c_s, c_t = student_shape[1], teacher_shape[1]
    if len(student_shape) == 2:
        return nn.Linear(c_s, c_t)
    if len(student_shape) == 3:
        if student_shape[2] != teacher_shape[2]:
            raise ValueError(
                f"Student sequence {student_shape} and teacher sequence {teacher_shape} differ in length; "
                "pick layers of equal length."
            )
        return nn.Sequential(nn.Conv1d(c_s, c_t, 1), nn.BatchNorm1d(c_t), nn.ReLU(inplace=True))
    (h_s, w_s), (h_t, w_t) = student_shape[2:], teacher_shape[2:]
    conv: nn.Module
    if (h_s, w_s) == (2 * h_t, 2 * w_t):
        conv = nn.Conv2d(c_s, c_t, kernel_size=3, stride=2, padding=1)
    elif (2 * h_s, 2 * w_s) == (h_t, w_t):
        conv = nn.ConvTranspose2d(c_s, c_t, kernel_size=4, stride=2, padding=1)
    elif h_s >= h_t and w_s >= w_t:
        conv = nn.Conv2d(c_s, c_t, kernel_size=(1 + h_s - h_t, 1 + w_s - w_t))
    else:
        raise ValueError(
            f"Cannot regress a student map of shape {student_shape} onto a teacher map of shape "
            f"{teacher_shape}: the student map must be twice, half, or at least the teacher's size."
        )
    return nn.Sequential(conv, nn.BatchNorm2d(c_t), nn.ReLU(inplace=True))


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

    @property
    def needs_build(self) -> bool:
        """Until the regressor exists."""
        return self.regressor is None

    def build(self, outputs: StepOutputs) -> None:
        """Create the regressor from the probe step's feature shapes."""
        student, teacher = self.pair(outputs)
        self.regressor = make_regressor(tuple(student.shape), tuple(teacher.shape)).to(student.device)

    def forward(self, outputs: StepOutputs) -> Tensor:
        """``fitnet_loss(regressor(student_feature), teacher_feature)``."""
        if self.regressor is None:
            raise RuntimeError(
                f"Loss term {self.name!r} has no regressor yet: the module builds it in setup()."
            )
        student, teacher = self.pair(outputs)
        return functional.fitnet_loss(self.regressor(student), teacher)
