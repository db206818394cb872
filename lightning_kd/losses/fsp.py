r"""FSP: the "flow of solution procedure" between two layers, matched between student and teacher.

Yim, Joo, Bae, Kim, "A Gift from Knowledge Distillation: Fast Optimization, Network
Minimization and Transfer Learning", CVPR 2017. With
:math:`G_{ij} = \frac{1}{HW} \sum_{h,w} F^2_{i,h,w} F^1_{j,h,w}` for two maps of one model:
:math:`\mathcal{L} = \operatorname{mean}\big((G^s - G^t)^2\big)`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_kd.losses._checks import _check_same_shape
from lightning_kd.losses.base import LayerListTerm, StepOutputs
from lightning_kd.precision import float32_math

__all__ = ["fsp_loss", "FSPTerm"]


def _fsp_matrix(first: Tensor, second: Tensor) -> Tensor:
    """``(N, C_2, C_1)``: spatial mean of the channel products of two maps of one model."""
    if first.shape[2:] != second.shape[2:]:
        size = tuple(min(a, b) for a, b in zip(first.shape[2:], second.shape[2:], strict=True))
        pool = F.adaptive_avg_pool2d if first.ndim == 4 else F.adaptive_avg_pool1d
        first = first if tuple(first.shape[2:]) == size else pool(first, size)
        second = second if tuple(second.shape[2:]) == size else pool(second, size)
    first = first.reshape(*first.shape[:2], -1)
    second = second.reshape(*second.shape[:2], -1)
    return torch.bmm(second, first.transpose(1, 2)) / first.shape[-1]


@float32_math
def fsp_loss(
    student_first: Tensor, student_second: Tensor, teacher_first: Tensor, teacher_second: Tensor
) -> Tensor:
    r"""FSP: match the "flow of solution procedure" matrices between two layers of each model.

    Yim, Joo, Bae, Kim, "A Gift from Knowledge Distillation: Fast Optimization, Network
    Minimization and Transfer Learning", CVPR 2017. For two maps :math:`F^1` (earlier) and
    :math:`F^2` (later) of one model:

    .. math::
        G_{ij} = \frac{1}{HW} \sum_{h,w} F^2_{i,h,w} F^1_{j,h,w}, \qquad
        \mathcal{L} = \operatorname{mean}\big((G^s - G^t)^2\big)

    the mean over batch and both channel indices, as ``FSP.compute_loss`` of the CRD benchmark
    (``distiller_zoo/FSP.py`` of ``HobbitLong/RepDistiller``). When the two maps of one model
    differ in size, the larger is average-pooled to the smaller (per dimension; the benchmark
    pools to a square from the heights only). Student and teacher must have the same channel
    counts at both layers (the benchmark raises otherwise).

    Args:
        student_first: ``(N, C_1, H, W)`` (or ``(N, C_1, L)``) earlier student map.
        student_second: ``(N, C_2, H', W')`` later student map.
        teacher_first: teacher map with ``C_1`` channels.
        teacher_second: teacher map with ``C_2`` channels.

    Returns:
        Scalar: the mean squared difference of the FSP matrices.
    """
    maps = {
        "student_first": student_first,
        "student_second": student_second,
        "teacher_first": teacher_first,
        "teacher_second": teacher_second,
    }
    ranks = {x.ndim for x in maps.values()}
    if len(ranks) != 1 or ranks.pop() not in (3, 4):
        shapes = {name: tuple(x.shape) for name, x in maps.items()}
        raise ValueError(f"FSP needs four (N, C, H, W) (or four (N, C, L)) maps; got {shapes}.")
    student = _fsp_matrix(student_first, student_second)
    teacher = _fsp_matrix(teacher_first, teacher_second)
    _check_same_shape(
        "the student's FSP matrix (N, C_2, C_1)",
        student,
        "the teacher's",
        teacher,
        hint="FSP needs the same batch and the same channel counts at both layers of student and teacher.",
    )
    return F.mse_loss(student, teacher)


class FSPTerm(LayerListTerm):
    """FSP matrices of a pair of student layers against a pair of teacher layers.

    See :func:`lightning_kd.losses.functional.fsp_loss`. The benchmark trains the student on
    FSP alone in an init stage, then on cross-entropy (recipe ``mnist1d/methods/fsp``
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
        super().__init__(student_layers, teacher_layers, name, weight)
        if len(student_layers) != 2 or len(teacher_layers) != 2:
            raise ValueError(
                f"FSPTerm needs two student and two teacher layers, got {list(student_layers)} and "
                f"{list(teacher_layers)}."
            )

    def forward(self, outputs: StepOutputs) -> Tensor:
        """``fsp_loss`` of the two pairs; the teacher's maps are detached."""
        s1, s2 = self.captured_features(outputs, "student")
        t1, t2 = self.captured_features(outputs, "teacher")
        return fsp_loss(s1, s2, t1, t2)
