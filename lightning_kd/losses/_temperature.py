"""A learned temperature (CTKD) as the logit losses read it: one value, or one per row of logits."""

from __future__ import annotations

from torch import Tensor

__all__ = ["rows_temperature"]


def rows_temperature(temperature: Tensor, rows: int) -> Tensor:
    """``(rows, 1)`` (or ``(1, 1)``) temperatures that broadcast over ``(rows, C)`` logits.

    Args:
        temperature: one temperature (``()`` or ``(1,)``) or one per row (``(rows,)`` or ``(rows, 1)``).
        rows: the number of rows of logits.

    Raises:
        ValueError: any other shape.
    """
    if temperature.numel() == 1:
        return temperature.reshape(1, 1)
    if temperature.numel() == rows and temperature.ndim <= 2 and temperature.shape[0] == rows:
        return temperature.reshape(rows, 1)
    raise ValueError(
        f"A learned temperature of shape {tuple(temperature.shape)} does not fit {rows} rows of logits: give "
        f"one temperature (shape () or (1,)) or one per row (shape ({rows},) or ({rows}, 1))."
    )
