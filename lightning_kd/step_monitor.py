"""StepMonitor: what the training steps record on the device, read only at set points.

A training step that reads a device value (``.item()``, ``bool(tensor)``, ``.tolist()``) waits for
the accelerator to finish the step, so the host cannot queue the next one. The step therefore
only records: its logged values (kept as one stacked tensor), the first step whose loss was NaN or
infinite and every value at that step (kept with ``torch.where``, no read), the correct
predictions of the epoch, and the device flags of warnings. All of it reaches the host in one
transfer (:meth:`StepMonitor.read`) at a reading point: Lightning's logging steps
(``log_every_n_steps``), the end of an epoch, a checkpoint save and the end of training.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor

__all__ = [
    "MonitorReadings",
    "Reading",
    "StepMonitor",
    "checked_finite_setting",
    "log_reading",
    "logs_this_step",
]


@dataclass
class Reading:
    """What :meth:`StepMonitor.read` found: the last recorded values and the first non-finite step.

    Attributes:
        values: every value of the last recorded step, by name, as Python floats.
        first_bad: the first step whose checked values were NaN/Inf, or ``None``.
        bad_values: every value at step ``first_bad``, by name (empty if none).
        last_step: the step of the last record.
    """

    values: dict[str, float] = field(default_factory=dict)
    first_bad: int | None = None
    bad_values: dict[str, float] = field(default_factory=dict)
    last_step: int = -1


def checked_finite_setting(check_finite: bool | str) -> bool | str:
    """A module's ``check_finite``: ``True`` (read at reading points), ``"step"`` or ``False``."""
    if not (check_finite is True or check_finite is False or check_finite == "step"):
        raise ValueError(f"check_finite must be True, False or 'step', got {check_finite!r}.")
    return check_finite


class StepMonitor:
    """The device-side bookkeeping of training steps, read in one transfer at reading points.

    Args:
        check_finite: keep the first step whose checked values are NaN/Inf (see :meth:`record`).
    """

    def __init__(self, check_finite: bool = True) -> None:
        self.check_finite = check_finite
        self.reset()

    #: records kept between two readings before the oldest are folded into the first-bad flag on
    #: the device (a few operations once per this many steps instead of every step).
    window_limit = 64

    def reset(self) -> None:
        """Forget everything recorded (a new fit starts; its tensors may be on another device)."""
        self.names: list[str] = []
        self.checked = 1
        self.window: list[tuple[int, Tensor]] = []  # (step, stacked values) since the last reading
        self.last_step = -1
        self.first_bad: Tensor | None = None  # the folded records' first bad step (-1: none)
        self.bad_values: Tensor | None = None
        self.correct: Tensor | None = None
        self.seen = 0
        self.pending: list[tuple[Tensor, str]] = []

    def record(self, step: int, values: Mapping[str, Tensor], checked: int = 1) -> None:
        """Keep one step's ``values`` (scalars, detached) on their device.

        One stacking operation per step. With ``check_finite``, every record since the last
        reading is kept, so :meth:`read` finds the first step whose last ``checked`` values (the
        totals) are NaN/Inf, and all ``values`` at it; past :attr:`window_limit` records the
        older ones are folded into a device flag first.
        """
        names = list(values)
        parts = [value.detach() for value in values.values()]
        if any(part.dtype != torch.float32 or part.ndim for part in parts):  # else: stacked as they are
            parts = [part.float().reshape(()) for part in parts]
        stacked = torch.stack(parts)
        if names != self.names or checked != self.checked:  # the first record, or another set of values
            self.names, self.checked, self.window = names, checked, []
            self.first_bad, self.bad_values = None, None
        self.last_step = step
        if not self.check_finite:
            self.window = [(step, stacked)]
            return
        if len(self.window) >= self.window_limit:
            self._fold()
        self.window.append((step, stacked))

    def _fold(self) -> None:
        """Move the window's first NaN/Inf record (if none was found before) into the device flag."""
        rows = torch.stack([stacked for _, stacked in self.window])
        steps = torch.tensor([step for step, _ in self.window]).to(rows.device, non_blocking=True)
        bad = ~torch.isfinite(rows[:, -self.checked :]).all(dim=1)
        first = torch.argmax(bad.to(torch.uint8))  # the first True row (0 when none: masked below)
        if self.first_bad is None or self.bad_values is None:
            self.first_bad = torch.full((), -1, dtype=torch.long, device=rows.device)
            self.bad_values = torch.zeros_like(rows[0])
        fresh = bad.any() & (self.first_bad < 0)
        self.first_bad = torch.where(fresh, steps[first], self.first_bad)
        self.bad_values = torch.where(fresh, rows[first], self.bad_values)
        self.window = self.window[-1:]

    def count(self, logits: Tensor, targets: Tensor) -> None:
        """Add the step's correct top-1 predictions (``logits`` ``(N, C)``, class indices ``(N,)``)."""
        hits = (logits.detach().argmax(dim=-1) == targets).sum()
        self.correct = hits if self.correct is None else self.correct + hits
        self.seen += targets.numel()

    def defer_warning(self, flag: Tensor, message: str) -> None:
        """Warn ``message`` at the next :meth:`read` if the device bool ``flag`` is true."""
        self.pending.append((flag.reshape(()), message))

    def read(self) -> Reading:
        """Everything recorded, in one device-to-host transfer; gives the deferred warnings.

        A non-finite step among the folded records is read exactly (a second read) only when
        one was found.
        """
        parts = [stacked for _, stacked in self.window]
        if self.first_bad is not None:
            parts.append(self.first_bad.float().reshape(1))
        parts += [flag.float().reshape(1) for flag, _ in self.pending]
        if not parts:
            return Reading()
        device = parts[0].device
        host = torch.cat([part.to(device) for part in parts]).tolist()
        reading = Reading(last_step=self.last_step)
        size = len(self.names)
        rows = [host[i * size : (i + 1) * size] for i in range(len(self.window))]
        host = host[size * len(self.window) :]
        if rows:
            reading.values = dict(zip(self.names, rows[-1], strict=True))
        if self.first_bad is not None and host.pop(0) >= 0 and self.bad_values is not None:
            reading.first_bad = int(self.first_bad)  # exact: the float above is only a flag
            reading.bad_values = dict(zip(self.names, self.bad_values.tolist(), strict=True))
        elif self.check_finite:  # the window's records come after the folded ones
            for (step, _), row in zip(self.window, rows, strict=True):
                if not all(math.isfinite(value) for value in row[size - self.checked :]):
                    reading.first_bad, reading.bad_values = step, dict(zip(self.names, row, strict=True))
                    break
        self.window = self.window[-1:]
        pending, self.pending = self.pending, []
        for (_, message), flagged in zip(pending, host, strict=True):
            if flagged:
                warnings.warn(message, UserWarning, stacklevel=3)
        return reading

    def epoch_accuracy(self, strategy: Any = None) -> float | None:
        """The epoch's top-1 accuracy over all processes (summed by ``strategy``), then reset.

        ``None`` if nothing was counted.
        """
        correct, seen = self.correct, self.seen
        self.correct, self.seen = None, 0
        if correct is None:
            return None
        counts = torch.stack([correct, torch.tensor(seen, device=correct.device)])
        if strategy is not None:
            counts = strategy.reduce(counts, reduce_op="sum")
        total_correct, total_seen = counts.tolist()
        return total_correct / total_seen if total_seen else None

    def reset_epoch(self) -> None:
        """Forget the epoch's counts (a new epoch starts)."""
        self.correct, self.seen = None, 0


def logs_this_step(trainer: Any) -> bool:
    """Whether Lightning sends this training step's metrics to the loggers (``log_every_n_steps``, stop)."""
    if trainer is None:
        return True
    return trainer._logger_connector.should_update_logs or bool(trainer.fast_dev_run)


def log_reading(module: Any, reading: Reading, progress_bar: str, epoch_end: bool = False) -> None:
    """``module.log`` the read values, ``progress_bar`` among them in the progress bar.

    In a step: as host tensors, not Python floats (Lightning makes a float a tensor on the
    module's device, which the progress bar would then read after every later step). At the
    ``epoch_end``: for ``trainer.callback_metrics`` and the progress bar only (the loggers had them
    at the logging steps), averaged over the processes (so on the device, where the collective runs).
    """
    for name, value in reading.values.items():
        if epoch_end:
            value_there = torch.tensor(value, device=module.device)
            module.log(name, value_there, prog_bar=name == progress_bar, logger=False, sync_dist=True)
        else:
            module.log(name, torch.tensor(value), prog_bar=name == progress_bar)


class MonitorReadings:
    """The reading points of a training module's :class:`StepMonitor` (a mixin of the training modules).

    The module keeps its monitor in ``self.monitor`` and builds the error for a non-finite loss in
    :meth:`non_finite_error`; it reads at its logging steps and epoch ends (:meth:`read_monitor`,
    :meth:`log_reading`), and before every checkpoint of a fit (:meth:`read_before_saving`).
    """

    monitor: StepMonitor
    #: the training value shown in the progress bar
    progress_bar_metric = "train/loss"

    def read_monitor(self, *step: Any) -> Reading:
        """Read the records in one transfer; raise :meth:`non_finite_error` for a NaN/Inf loss found.

        ``step``: the current step's values (its outputs), diagnosed when the loss was found in it.
        """
        reading = self.monitor.read()
        if reading.first_bad is not None:
            raise self.non_finite_error(reading, *step)
        return reading

    def non_finite_error(self, reading: Reading, *step: Any) -> FloatingPointError:
        """The error for the non-finite loss ``reading`` found (``step``: as :meth:`read_monitor`'s)."""
        raise NotImplementedError

    def log_reading(self, reading: Reading, epoch_end: bool = False) -> None:
        """Log the read values (:func:`log_reading`), :attr:`progress_bar_metric` in the progress bar."""
        log_reading(self, reading, self.progress_bar_metric, epoch_end)

    def read_before_saving(self) -> None:
        """During a fit, raise for a NaN/Inf loss not yet read, before a checkpoint is written."""
        trainer = getattr(self, "_trainer", None)
        if trainer is not None and trainer.state.fn == TrainerFn.FITTING:
            self.read_monitor()
