"""Adapters shared by several methods, built from the shapes of a probe step: regressors and 1x1 projections.

A student feature rarely has the teacher's shape; FitNets (Romero et al., ICLR 2015) put a
trainable regressor between them, and so do AB, VID and OFD with their own variants.
"""

from __future__ import annotations

from torch import nn

__all__ = ["check_feature_pair", "make_regressor", "pointwise"]


def check_feature_pair(student_shape: tuple[int, ...], teacher_shape: tuple[int, ...], who: str = "") -> None:
    """Two ``(N, C)``, ``(N, C, L)`` or ``(N, C, H, W)`` features of the same batch, else a ``ValueError``.

    Args:
        student_shape: shape of the student feature.
        teacher_shape: shape of the teacher feature.
        who: what the message starts with (e.g. ``"Loss term 'vid': "``).
    """
    if len(student_shape) != len(teacher_shape) or len(student_shape) not in (2, 3, 4):
        raise ValueError(
            f"{who}the student feature has shape {student_shape} and the teacher feature {teacher_shape}; "
            "both must be (N, C), (N, C, L) or (N, C, H, W). Pick layers of the same kind."
        )
    if student_shape[0] != teacher_shape[0]:
        raise ValueError(
            f"{who}the student feature {student_shape} and the teacher feature {teacher_shape} differ in "
            "batch size."
        )


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
    check_feature_pair(
        student_shape, teacher_shape, "Cannot regress a student feature onto a teacher feature: "
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


def pointwise(in_channels: int, out_channels: int, ndim: int) -> nn.Module:
    """A bias-free 1x1 convolution for ``ndim``-dimensional features (``Linear`` for vectors)."""
    if ndim == 2:
        return nn.Linear(in_channels, out_channels, bias=False)
    conv = nn.Conv1d if ndim == 3 else nn.Conv2d
    return conv(in_channels, out_channels, kernel_size=1, bias=False)
