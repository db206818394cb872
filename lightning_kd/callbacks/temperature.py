"""Anneal the distillation temperature over training."""

from __future__ import annotations

from collections.abc import Sequence

import lightning.pytorch as pl

from lightning_kd.callbacks.scheduled_value import Interval, Schedule, ScheduledValue
from lightning_kd.losses.base import checked_temperature

__all__ = ["TemperatureAnnealing"]


class TemperatureAnnealing(ScheduledValue):
    """Schedule the ``temperature`` of the module's loss terms; logged as ``kd/temperature``.

    Example: ``TemperatureAnnealing(start=8.0, end=2.0, schedule="cosine")`` cools every
    temperature-using term from 8 to 2 over the run. State is saved in checkpoints (see
    :class:`~lightning_kd.callbacks.scheduled_value.ScheduledValue` for the schedules).

    Args:
        start: temperature at the beginning (> 0).
        end: temperature after ``total`` steps/epochs (> 0).
        schedule: ``constant``, ``linear``, ``cosine``, ``step`` or ``exponential``.
        interval: ``step`` or ``epoch``.
        total: length of the schedule; default: the whole run.
        milestones: for ``step``: where the temperature is multiplied by ``gamma``.
        gamma: for ``step``: the factor.
        terms: names of the loss terms to drive; default: every term with a ``temperature``.

    Raises:
        ValueError: ``start``, ``end`` or ``gamma`` is not a finite number > 0; at a step, the
            schedule reached a temperature that is not (``gamma`` underflowing to 0).
    """

    log_name = "kd/temperature"

    def __init__(
        self,
        start: float = 4.0,
        end: float | None = None,
        schedule: Schedule = "linear",
        interval: Interval = "step",
        total: int | None = None,
        milestones: Sequence[int] = (),
        gamma: float = 0.5,
        terms: Sequence[str] | None = None,
    ) -> None:
        for label, value in (("start", start), ("end", end), ("gamma", gamma)):
            if value is not None:
                checked_temperature(value, f"TemperatureAnnealing {label}")
        super().__init__(start, end, schedule, interval, total, milestones, gamma)
        self.terms = tuple(terms) if terms is not None else None

    @property
    def state_key(self) -> str:
        """Unique per configuration, so several instances can save state side by side."""
        return self._generate_state_key(terms=self.terms)

    def apply(self, pl_module: pl.LightningModule, value: float) -> None:
        """Set ``temperature`` on the selected loss terms.

        Args:
            pl_module: the module whose loss terms get the temperature.
            value: the temperature now.
        """
        loss_terms = getattr(pl_module, "loss_terms", {})
        targets = [t for t in loss_terms.values() if hasattr(t, "temperature")]
        if self.terms is not None:
            unknown = set(self.terms) - {t.name for t in targets}
            if unknown:
                raise ValueError(
                    f"TemperatureAnnealing: no loss term with a temperature named {sorted(unknown)}; "
                    f"terms with a temperature: {[t.name for t in targets]}."
                )
            targets = [t for t in targets if t.name in self.terms]
        if not targets:
            raise ValueError(
                "TemperatureAnnealing found no loss term with a temperature; "
                f"the module's terms are {list(loss_terms)}."
            )
        value = checked_temperature(
            value, f"TemperatureAnnealing's temperature for {[t.name for t in targets]}"
        )
        for term in targets:
            term.temperature = value
