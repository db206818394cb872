"""A hyperparameter that follows a schedule over training steps or epochs."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

__all__ = ["ScheduledValue", "schedule_value"]

Schedule = Literal["constant", "linear", "cosine", "step", "exponential"]
Interval = Literal["step", "epoch"]


def schedule_value(
    schedule: Schedule,
    start: float,
    end: float | None,
    elapsed: int,
    total: int,
    milestones: Sequence[int] = (),
    gamma: float = 0.1,
) -> float:
    r"""Value of a schedule after ``elapsed`` of ``total`` steps (or epochs).

    With progress :math:`p = \min(\text{elapsed} / \text{total}, 1)`:

    - ``constant``: ``start``;
    - ``linear``: :math:`s + (e - s)\,p`;
    - ``cosine``: :math:`e + (s - e)\,(1 + \cos \pi p) / 2`;
    - ``exponential``: :math:`s\,(e / s)^p` (both positive);
    - ``step``: :math:`s\,\gamma^k`, :math:`k` the number of ``milestones`` reached (as
      :class:`torch.optim.lr_scheduler.MultiStepLR`); ``end`` is unused.

    Args:
        schedule: ``constant``, ``linear``, ``cosine``, ``step`` or ``exponential``.
        start: the value at the beginning.
        end: the value after ``total``; ``None`` only for ``constant`` and ``step``.
        elapsed: steps or epochs done.
        total: length of the schedule.
        milestones: for ``step``: where the value is multiplied by ``gamma``.
        gamma: for ``step``: the factor.
    """
    if schedule == "constant":
        return float(start)
    if schedule == "step":
        return float(start * gamma ** sum(elapsed >= m for m in milestones))
    if end is None:
        raise ValueError(f"The {schedule!r} schedule needs an end value.")
    progress = min(max(elapsed / total, 0.0), 1.0) if total > 0 else 1.0
    if schedule == "linear":
        return float(start + (end - start) * progress)
    if schedule == "cosine":
        return float(end + (start - end) * (1 + math.cos(math.pi * progress)) / 2)
    if schedule == "exponential":
        return float(start * (end / start) ** progress)
    raise ValueError(f"Unknown schedule {schedule!r}; choose constant, linear, cosine, step or exponential.")


class ScheduledValue(Callback):
    """Base class: set a value on the module from a schedule and log it.

    The value is recomputed from the trainer's position (``global_step`` or
    ``current_epoch``) before every step or epoch, so a run resumed from a checkpoint
    continues the schedule exactly; the current value is also stored in the checkpoint.
    Subclasses define :meth:`apply` and :attr:`log_name`.

    Args:
        start: value at the beginning.
        end: value after ``total`` steps/epochs (not used by ``constant`` and ``step``).
        schedule: ``constant``, ``linear``, ``cosine``, ``step`` or ``exponential``.
        interval: update every optimizer ``step`` or every ``epoch``.
        total: steps/epochs from ``start`` to ``end``; default: the whole run
            (``trainer.estimated_stepping_batches`` or ``trainer.max_epochs``).
        milestones: for ``step``: steps/epochs at which the value is multiplied by ``gamma``.
        gamma: for ``step``: the factor.
    """

    log_name: str = "kd/value"

    def __init__(
        self,
        start: float,
        end: float | None = None,
        schedule: Schedule = "linear",
        interval: Interval = "step",
        total: int | None = None,
        milestones: Sequence[int] = (),
        gamma: float = 0.1,
    ) -> None:
        if interval not in ("step", "epoch"):
            raise ValueError(f"interval must be 'step' or 'epoch', got {interval!r}.")
        for label, value in (("start", start), ("end", end), ("gamma", gamma)):
            if value is not None and not math.isfinite(value):
                raise ValueError(f"{type(self).__name__}: {label} must be a finite number, got {value}.")
        if total is not None and total <= 0:
            raise ValueError(f"total must be a positive number of {interval}s, got {total}.")
        if schedule in ("linear", "cosine", "exponential") and end is None:
            raise ValueError(f"The {schedule!r} schedule needs `end`.")
        if schedule == "exponential" and not (start > 0 and end is not None and end > 0):
            raise ValueError(f"The exponential schedule needs start > 0 and end > 0, got {start} and {end}.")
        schedule_value(schedule, start, end, 0, 1, milestones, gamma)  # rejects unknown names now
        self.start = start
        self.end = end
        self.schedule = schedule
        self.interval = interval
        self.total = total
        self.milestones = tuple(milestones)
        self.gamma = gamma
        self.current: float | None = None

    def apply(self, pl_module: pl.LightningModule, value: float) -> None:
        """Set ``value`` on the module (subclasses).

        Args:
            pl_module: the module being trained.
            value: the scheduled value now.
        """
        raise NotImplementedError

    def value_at(self, elapsed: int, total: int) -> float:
        """The schedule's value after ``elapsed`` of ``total`` steps/epochs.

        Args:
            elapsed: steps or epochs done.
            total: length of the schedule.
        """
        return schedule_value(
            self.schedule, self.start, self.end, elapsed, total, self.milestones, self.gamma
        )

    def _total(self, trainer: pl.Trainer) -> int:
        if self.total is not None:
            return self.total
        total = trainer.estimated_stepping_batches if self.interval == "step" else trainer.max_epochs
        if total is None or total < 0 or math.isinf(total):
            raise ValueError(f"{type(self).__name__}: the run has no fixed length; set `total`.")
        return int(total)

    def _elapsed(self, trainer: pl.Trainer) -> int:
        return trainer.global_step if self.interval == "step" else trainer.current_epoch

    def _update(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.current = self.value_at(self._elapsed(trainer), self._total(trainer))
        self.apply(pl_module, self.current)
        on_step = self.interval == "step"
        pl_module.log(self.log_name, self.current, on_step=on_step, on_epoch=not on_step)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Check the target exists and set the value the run starts (or resumes) with."""
        self.apply(pl_module, self.current if self.current is not None else self.start)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Set the value for the trainer's position (also after a resume)."""
        self.current = self.value_at(self._elapsed(trainer), self._total(trainer))
        self.apply(pl_module, self.current)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        """Per-step schedules: update before the step."""
        if self.interval == "step":
            self._update(trainer, pl_module)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Per-epoch schedules: update before the epoch."""
        if self.interval == "epoch":
            self._update(trainer, pl_module)

    def state_dict(self) -> dict[str, Any]:
        """The current value and the schedule that produced it."""
        return {"current": self.current, "schedule": self.schedule, "start": self.start, "end": self.end}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the current value."""
        self.current = state_dict["current"]
