"""Schedule the weight of one loss term over training."""

from __future__ import annotations

from collections.abc import Sequence

import lightning.pytorch as pl

from lightning_kd.callbacks.scheduled_value import Interval, Schedule, ScheduledValue
from lightning_kd.losses.base import checked_weight

__all__ = ["LossWeightSchedule"]


class LossWeightSchedule(ScheduledValue):
    """Drive ``weight`` of the loss term named ``term``; logged as ``kd/weight_<term>``.

    DKD's warm-up (Zhao et al., CVPR 2022: the KD weight grows linearly over the first 20
    epochs) is ``LossWeightSchedule("kd", start=0.05, end=1.0, interval="epoch", total=19)``.
    State is saved in checkpoints.

    Args:
        term: name of the loss term.
        start: weight at the beginning.
        end: weight after ``total`` steps/epochs.
        schedule: ``constant``, ``linear``, ``cosine``, ``step`` or ``exponential``.
        interval: ``step`` or ``epoch``.
        total: length of the schedule; default: the whole run.
        milestones: for ``step``: where the weight is multiplied by ``gamma``.
        gamma: for ``step``: the factor.

    Raises:
        ValueError: ``start``, ``end`` or ``gamma`` is negative or not finite (every weight the
            schedule reaches is then >= 0: linear and cosine stay between ``start`` and ``end``).
    """

    def __init__(
        self,
        term: str,
        start: float = 0.0,
        end: float | None = 1.0,
        schedule: Schedule = "linear",
        interval: Interval = "step",
        total: int | None = None,
        milestones: Sequence[int] = (),
        gamma: float = 0.1,
    ) -> None:
        checked_weight(start, term, "LossWeightSchedule start")
        if end is not None:
            checked_weight(end, term, "LossWeightSchedule end")
        checked_weight(gamma, term, "LossWeightSchedule gamma (the step factor)")
        super().__init__(start, end, schedule, interval, total, milestones, gamma)
        self.term = term
        self.log_name = f"kd/weight_{term}"

    @property
    def state_key(self) -> str:
        """Unique per configuration, so several instances can save state side by side."""
        return self._generate_state_key(term=self.term)

    def apply(self, pl_module: pl.LightningModule, value: float) -> None:
        """Set the term's weight.

        Args:
            pl_module: the module whose loss term gets the weight.
            value: the weight now.
        """
        loss_terms = getattr(pl_module, "loss_terms", {})
        if self.term not in loss_terms:
            raise ValueError(
                f"LossWeightSchedule: no loss term named {self.term!r}; terms: {list(loss_terms)}."
            )
        loss_terms[self.term].weight = value
