"""How a distillation module reports a fault: a non-finite loss (with its cause) or a failing forward."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_kd.batch_checks import explain_forward_error
from lightning_kd.diagnosis import non_finite_cause, non_finite_loss_error
from lightning_kd.losses import StepOutputs
from lightning_kd.step_monitor import Reading

__all__ = ["ExplainedFaults"]


class ExplainedFaults:
    """The fault reports of :class:`~lightning_kd.DistillationModule` (a mixin of it).

    A NaN/Inf loss names its first step, its terms and the cause; a forward that fails because
    of its inputs names the fix.
    """

    def read_held_out_monitor(self, stage: str) -> None:
        """Raise for a NaN/Inf loss of a held-out batch of this ``stage`` loop (read once, at its end)."""
        reading = self.held_out_monitor.read()
        self.held_out_monitor.reset()
        if reading.first_bad is not None:
            terms = {name: value for name, value in reading.bad_values.items() if name != "total"}
            where = f"{stage} batch {reading.first_bad} (of the loop at training step {self.global_step})"
            cause = self.non_finite_cause(None)
            raise non_finite_loss_error("terms", self.global_step, terms, cause, where=where)

    def on_validation_epoch_end(self) -> None:
        """Raise for a NaN/Inf held-out loss (:meth:`read_held_out_monitor`)."""
        self.read_held_out_monitor("validation")

    def on_test_epoch_end(self) -> None:
        """Raise for a NaN/Inf held-out loss (:meth:`read_held_out_monitor`)."""
        self.read_held_out_monitor("test")

    def non_finite_error(self, reading: Reading, outputs: StepOutputs | None = None) -> FloatingPointError:
        """The error for the non-finite loss ``reading`` found, diagnosed on ``outputs`` (or the state)."""
        assert reading.first_bad is not None
        terms = {name: reading.bad_values[f"train/loss_{name}"] for name in self.loss_terms}
        outputs = outputs if reading.first_bad == reading.last_step else None  # else: the state now
        cause = self.non_finite_cause(outputs)
        return non_finite_loss_error("terms", reading.first_bad, terms, cause, found_at=reading.last_step)

    def non_finite_cause(self, outputs: StepOutputs | None) -> str:
        """What made the step's loss NaN/Inf, and its fix.

        See :func:`~lightning_kd.diagnosis.non_finite_cause`; call it wherever non-finiteness is
        detected. Without ``outputs`` (found after the step), only the settings and weights are read.
        """
        settings = {}
        for name, term in self.loss_terms.items():
            settings[f"weight of loss term {name!r}"] = term.weight
            temperature = getattr(term, "temperature", None)
            if isinstance(temperature, float | int | Tensor) and torch.as_tensor(temperature).numel() == 1:
                settings[f"temperature of loss term {name!r}"] = float(temperature)
        trained = ["student"] if self.teacher_is_frozen else ["student", "teacher"]
        if outputs is None:
            return non_finite_cause(
                None,
                {"student": self.student, "teacher": self.teacher},
                {},
                settings=settings,
                trained=trained,
            )
        return non_finite_cause(
            outputs.batch,
            {"student": self.student, "teacher": self.teacher},
            {"student": outputs.student_logits, "teacher": outputs.teacher_logits},
            settings=settings,
            trained=trained,
            samples=int(outputs.student_logits.shape[0]) if outputs.student_logits.ndim else None,
        )

    def raise_explained(self, error: Exception, batch: Any, inputs: Any) -> None:
        """Re-raise a forward's ``error`` naming the fix when its inputs caused it.

        See :func:`~lightning_kd.batch_checks.explain_forward_error`.
        """
        calls = [("student", self.student, inputs)]
        if self.teacher is not None:
            calls.append(("teacher", self.teacher, self.teacher_inputs(batch, inputs)))
        explained = explain_forward_error(error, calls)
        if explained is not None:
            raise explained from error
