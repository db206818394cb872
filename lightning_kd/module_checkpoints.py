"""What a distillation module's checkpoints hold of its teacher, and what a resume must match.

A frozen teacher is left out of checkpoints (unless ``save_teacher``) and recorded by its
fingerprint and file; a fit resumed from such a checkpoint must have the same teacher, and every
checkpoint must hold the module's student architecture (:mod:`lightning_kd.resume`).
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.utilities import rank_zero_warn

from lightning_kd.resume import (
    FROZEN_TEACHER_KEY,
    check_same_architecture,
    check_same_teacher,
    teacher_record,
)

__all__ = ["STUDENT_START_KEY", "TeacherCheckpointRecords"]

#: where a checkpoint records the file its student started from (``student_checkpoint``)
STUDENT_START_KEY = "student_start"


class TeacherCheckpointRecords:
    """The checkpoint hooks of :class:`~lightning_kd.DistillationModule` (a mixin of it)."""

    @property
    def _teacher_left_out(self) -> bool:
        """Whether checkpoints leave the teacher's weights out (a frozen teacher without ``save_teacher``)."""
        return self.teacher is not None and not self.teacher_role.in_checkpoint(self.save_teacher)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record ``teacher_checkpoint`` as an absolute path; leave out a frozen teacher unless asked.

        A ``student_checkpoint`` (the start weights) is saved as ``None``, since the checkpoint holds the
        trained student, and its absolute path under ``checkpoint["student_start"]``.

        During a fit, a loss found non-finite since the last reading (``check_finite=True``) raises
        here, before anything is written: the previous checkpoint stays as it was.

        A teacher left out is recorded by its fingerprint (SHA-256 of its weights, taken once per
        fit in :meth:`setup`) and its file, so that a resumed fit can tell whether it has the same one.
        """
        self.read_before_saving()  # no NaN weights saved
        hparams = checkpoint.get("hyper_parameters")
        if isinstance(hparams, dict):
            if hparams.get("teacher_checkpoint") is not None:
                hparams["teacher_checkpoint"] = self.teacher_checkpoint
            if hparams.get("student_checkpoint") is not None:
                hparams["student_checkpoint"] = None  # the checkpoint holds the trained student
                checkpoint[STUDENT_START_KEY] = self.student_checkpoint
        if not self._teacher_left_out:
            return
        state = checkpoint["state_dict"]
        checkpoint["state_dict"] = type(state)(
            (k, v) for k, v in state.items() if not k.startswith("teacher.")
        )
        if self.frozen_teacher_fingerprint is not None:
            checkpoint[FROZEN_TEACHER_KEY] = teacher_record(
                self.frozen_teacher_fingerprint, self.teacher_checkpoint
            )

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Give a checkpoint without the frozen teacher the teacher this module was built with.

        A fit resumed from it must have the teacher the checkpoint was trained with (same
        fingerprint), and every checkpoint must hold this module's student architecture: both
        are refused with an error that names the difference. Terms whose adapters are not built
        yet (outside a Trainer) are built on ``example_input_array`` if set; otherwise their saved
        adapters are skipped with a warning (inference does not use them).
        """
        state = checkpoint["state_dict"]
        if self.teacher_is_frozen and not any(k.startswith("teacher.") for k in state):
            check_same_teacher(self, checkpoint.get(FROZEN_TEACHER_KEY))
            state.update({f"teacher.{k}": v for k, v in self.teacher.state_dict().items()})
        unbuilt = [name for name, term in self.loss_terms.items() if term.needs_build]
        if unbuilt and self.example_input_array is not None:
            self.build_terms(inputs=self.example_input_array)
        elif unbuilt:
            prefixes = tuple(f"loss_terms.{name}." for name in unbuilt)
            for key in [k for k in state if k.startswith(prefixes)]:
                del state[key]
            rank_zero_warn(
                f"Adapters of loss terms {unbuilt} were not restored: they are built on a probe batch. "
                "Set `example_input_array` to a student input (or call `build_terms(batch)`) before loading "
                "to restore them."
            )
        check_same_architecture(self, state)
