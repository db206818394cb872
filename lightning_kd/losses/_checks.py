"""Shared by the loss math of every method: the float32 policy and the checks of shapes and settings.

Loss math runs in float32, also under ``bf16-mixed`` / ``16-mixed`` autocast: low-precision
softmax and logarithms lose the small probability mass that soft targets carry
(:func:`lightning_kd.precision.float32_math`). The checks raise ``ValueError`` with both shapes
and what to fix.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["checked_temperature", "checked_weight"]


def checked_temperature(temperature: float, name: str = "temperature") -> float:
    """``temperature`` as a float; a ``ValueError`` naming the value unless it is finite and > 0."""
    _check_positive(name, temperature)
    return float(temperature)


def checked_weight(weight: float, term: str, where: str = "weight") -> float:
    """A loss term's weight as a float; a ``ValueError`` naming the term and the value unless finite and >= 0.

    0 is legal (the term switched off). A negative weight would make training *maximise* the
    term's divergence, a non-finite one turns every step's loss into ``inf`` / ``nan``; no term of
    the package takes either.
    """
    value = float(weight)
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(
            f"Loss term {term!r}: {where} must be a finite number >= 0 (0 switches the term off), got "
            f"{weight}. A negative weight makes training maximise the term and a non-finite one makes every "
            "loss inf/nan: set a weight >= 0 in the config or schedule."
        )
    return value


def _check_same_shape(name_a: str, a: Tensor, name_b: str, b: Tensor, hint: str = "") -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"{name_a} has shape {tuple(a.shape)} but {name_b} has shape {tuple(b.shape)}. {hint}"
        )


def _check_positive(name: str, value: float) -> None:
    """A finite number > 0 (``inf`` and ``nan`` are refused, naming the value)."""
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be > 0 and finite, got {value}.")


def _check_logit_pair(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> None:
    """Same shapes (both models predict the same classes) and a positive temperature."""
    _check_same_shape(
        "student_logits",
        student_logits,
        "teacher_logits",
        teacher_logits,
        hint="Teacher and student must predict the same classes: check num_classes of both models.",
    )
    _check_positive("temperature", temperature)


def _check_targets(logits: Tensor, target: Tensor) -> None:
    if target.shape != logits.shape[:-1]:
        raise ValueError(
            f"target has shape {tuple(target.shape)} but logits have shape {tuple(logits.shape)}: "
            f"expected one class index per row of logits, i.e. target of shape {tuple(logits.shape[:-1])}."
        )
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise ValueError(f"target must hold integer class indices, got dtype {target.dtype}.")


def _check_num_classes(logits: Tensor, minimum: int, why: str) -> None:
    if logits.ndim < 1 or logits.shape[-1] < minimum:
        raise ValueError(
            f"logits of shape {tuple(logits.shape)} must have at least {minimum} classes in the last "
            f"dimension {why}."
        )


def _check_same_batch(name_a: str, a: Tensor, name_b: str, b: Tensor) -> None:
    """Both tensors hold one row per sample of the same batch: same (first) batch dimension."""
    if a.ndim == 0 or b.ndim == 0 or a.shape[0] != b.shape[0]:
        raise ValueError(
            f"{name_a} has shape {tuple(a.shape)} but {name_b} has shape {tuple(b.shape)}: both must "
            "have the same batch size in the first dimension (the loss compares the samples of one batch "
            "with each other, so student and teacher must see the same samples)."
        )


def _check_feature_maps(name_a: str, a: Tensor, name_b: str, b: Tensor) -> None:
    """Two ``(N, C, H, W)`` (or two ``(N, C, L)``) maps of one batch; channels and sizes may differ."""
    if a.ndim != b.ndim or a.ndim not in (3, 4):
        raise ValueError(
            f"{name_a} has shape {tuple(a.shape)} and {name_b} has shape {tuple(b.shape)}: expected two "
            "(N, C, H, W) (or two (N, C, L)) convolutional feature maps; pick convolutional layers."
        )
    _check_same_batch(name_a, a, name_b, b)


def _check_embedding_pair(student_emb: Tensor, teacher_emb: Tensor) -> None:
    _check_same_shape(
        "student_emb",
        student_emb,
        "teacher_emb",
        teacher_emb,
        hint="Give the student a projection head onto the teacher's embedding width.",
    )


def _per_channel(name: str, values: Tensor, feature_name: str, feature: Tensor) -> Tensor:
    """``(C,)`` values reshaped to broadcast over dimension 1 of an ``(N, C, ...)`` feature."""
    if feature.ndim < 2 or values.ndim != 1 or values.shape[0] != feature.shape[1]:
        raise ValueError(
            f"{name} has shape {tuple(values.shape)} but {feature_name} has shape {tuple(feature.shape)}: "
            f"expected an (N, C, ...) feature and one {name} value per channel, of shape (C,)."
        )
    return values.reshape(1, -1, *([1] * (feature.ndim - 2)))
