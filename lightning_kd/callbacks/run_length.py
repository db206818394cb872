"""RunLength: a fit resumed with another length follows its real length, or is refused."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn

from lightning_kd.module_setup import CosineToZeroLR

__all__ = ["RunLength", "RunTooShortError", "total_steps"]

#: attributes by which a scheduler carries the run length it was built for
LENGTH_ATTRIBUTES = ("T_max", "total_steps")


class RunTooShortError(ValueError):
    """A fit resumed with a length shorter than what its checkpoint has already trained."""


def total_steps(trainer: pl.Trainer) -> int | None:
    """The run's optimizer steps (``trainer.estimated_stepping_batches``), or ``None`` if unbounded."""
    steps = trainer.estimated_stepping_batches
    return int(steps) if math.isfinite(steps) else None


class RunLength(Callback):
    """Make a fit resumed with another ``max_epochs`` / ``max_steps`` follow its real length.

    Every checkpoint records the length of the run that wrote it (``max_epochs``, ``max_steps``,
    its optimizer steps) and how far it got (``epochs_done``). When a fit resumes from it:

    - a run shorter than what the checkpoint has already trained (``max_epochs`` below its
      epochs, ``max_steps`` below its steps) is refused: Lightning would train nothing and keep
      the checkpoint's weights without a word;
    - the default schedule (:class:`~lightning_kd.module_setup.CosineToZeroLR`) is re-planned
      for the new length: from the resume step on, the learning rate is that of a run planned
      for the new length from the start (it decays to 0 at the new last step; at the resume it
      jumps to that run's value), with one warning naming both lengths and both rates. Restored
      as it was, a cosine planned for the old length would climb back to its peak after it, or
      stop half-way. A finished run extended this way trains on from the longer run's rate;
    - a user's scheduler is the user's and restored as saved; when it carries a length
      (``T_max``, ``total_steps``) and the run's length changed, a warning names both.

    The training modules of the package add it themselves (``configure_callbacks``).

    Attributes:
        resumed: the record of the checkpoint this fit resumed from, or ``None``.
        replanned_from: the steps the default schedule was planned for when this fit re-planned
            it to another length, else ``None``.
    """

    def __init__(self) -> None:
        self.resumed: dict[str, Any] | None = None
        self.replanned_from: int | None = None
        self._trainer: pl.Trainer | None = None

    def state_dict(self) -> dict[str, Any]:
        """The run writing the checkpoint: its length and the epochs it has done."""
        trainer = self._trainer
        if trainer is None or trainer.state.fn != "fit":
            return {}  # only a fit has a length (and resumes)
        return {
            "max_epochs": trainer.max_epochs,
            "max_steps": trainer.max_steps,
            "total_steps": total_steps(trainer),
            "epochs_done": trainer.fit_loop.epoch_progress.current.processed,
        }

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Remember the trainer (``state_dict`` reads the run's length from it); a new fit forgets the last.

        A ``trainer.test`` after the fit keeps what the fit found (``resumed``, ``replanned_from``).
        """
        self._trainer = trainer
        if stage == "fit":
            self.resumed, self.replanned_from = None, None

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Refuse to resume a fit shorter than what the checkpoint has already trained."""
        if trainer.state.fn != "fit":
            return
        record = checkpoint.get("callbacks", {}).get(self.state_key) or {}
        self.resumed = record or None
        source = f"The checkpoint {str(trainer.ckpt_path)!r}"
        epochs_done = record.get("epochs_done")
        if (
            trainer.max_epochs not in (None, -1)
            and epochs_done is not None
            and epochs_done > trainer.max_epochs
        ):
            raise RunTooShortError(
                f"{source} has trained {epochs_done} epochs, more than this run's max_epochs="
                f"{trainer.max_epochs}: resuming would train nothing and keep its weights as they are. "
                f"Set max_epochs >= {epochs_done} to train on (the default cosine schedule then re-plans to "
                "the new end), or start a new run from its weights without ckpt_path "
                "(load them with `load_from_checkpoint`)."
            )
        steps_done = checkpoint.get("global_step", 0)
        if trainer.max_steps != -1 and steps_done > trainer.max_steps:
            raise RunTooShortError(
                f"{source} has trained {steps_done} steps, more than this run's "
                f"max_steps={trainer.max_steps}: resuming would train nothing. Set max_steps >= {steps_done} "
                "(or -1) to train on, or start a new run from its weights without ckpt_path (load them "
                "with `load_from_checkpoint`)."
            )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Once the schedulers' states are restored: re-plan the default schedule, warn of a user's."""
        if trainer.ckpt_path is None:
            return
        steps = total_steps(trainer)
        for config in trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            if isinstance(scheduler, CosineToZeroLR):
                if steps is not None and scheduler.total_steps != steps:
                    self._replan(trainer, scheduler, steps)
            elif self.resumed is not None:
                self._warn_of_user_schedule(trainer, scheduler, config.interval, steps)

    def _replan(self, trainer: pl.Trainer, scheduler: CosineToZeroLR, steps: int) -> None:
        planned, step = scheduler.total_steps, scheduler.last_epoch
        before = ", ".join(f"{lr:.3g}" for lr in scheduler.get_last_lr())
        scheduler.replan(steps)
        if self.replanned_from is None:  # once, for the first of several (data-free: two optimizers)
            now = ", ".join(f"{lr:.3g}" for lr in scheduler.get_last_lr())
            rank_zero_warn(
                "Resumed with another run length: the default cosine learning-rate schedule was planned "
                f"for {planned} optimizer steps{self._epochs_of(self.resumed)}, this run has {steps}"
                f"{self._epochs_of({'max_epochs': trainer.max_epochs})}. From step {step} on it follows the "
                f"cosine of a {steps}-step run: the learning rate goes from {before} to {now} and decays to "
                f"0 at step {steps} (a cosine restored as it was would climb back after its old end). To "
                "keep the old schedule, resume with the old max_epochs / max_steps."
            )
        self.replanned_from = planned

    def _warn_of_user_schedule(
        self, trainer: pl.Trainer, scheduler: Any, interval: str, steps: int | None
    ) -> None:
        assert self.resumed is not None
        lengths = {name: getattr(scheduler, name) for name in LENGTH_ATTRIBUTES if hasattr(scheduler, name)}
        if interval == "epoch":
            before, now, unit = self.resumed.get("max_epochs"), trainer.max_epochs, "epochs"
        else:
            before, now, unit = self.resumed.get("total_steps"), steps, "optimizer steps"
        if not lengths or before is None or before == now:
            return
        carried = ", ".join(f"{name}={value}" for name, value in lengths.items())
        rank_zero_warn(
            f"Resumed with another run length: the checkpoint's run had {before} {unit}, this one has {now}, "
            f"but the lr_scheduler {type(scheduler).__name__} was restored with {carried} for the old length "
            "and follows it (a cosine climbs back after T_max; OneCycleLR fails past total_steps). Resume "
            "with the old length, or start a fresh run whose scheduler is built for the new one."
        )

    @staticmethod
    def _epochs_of(record: dict[str, Any] | None) -> str:
        epochs = (record or {}).get("max_epochs")
        return f" (max_epochs={epochs})" if epochs not in (None, -1) else ""
