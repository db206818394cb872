"""The ``lightning-kd`` command: LightningCLI over the package's training modules and any datamodule."""

from __future__ import annotations

import time
from typing import Any

from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_only

__all__ = ["DistillationCLI", "fit_summary", "main"]


def fit_summary(trainer: Trainer, seconds: float, baseline_accuracy: float | None = None) -> str:
    """A few lines on a finished fit: teacher, baseline, student accuracy, gain, time, checkpoint."""
    metrics = trainer.callback_metrics

    def percent(key: str) -> float | None:
        return 100 * float(metrics[key]) if key in metrics else None

    student, teacher = percent("val/acc"), percent("val/teacher_acc")
    rows = [("teacher (val/teacher_acc)", teacher), ("student (val/acc)", student)]
    if baseline_accuracy is not None:
        baseline = 100 * baseline_accuracy
        rows.insert(1, ("baseline (given)", baseline))
        rows.append(("gain over the baseline", None if student is None else student - baseline))
    lines = ["Fit finished:"]
    for name, value in rows:
        if value is not None:
            sign = "+" if name.startswith("gain") else ""
            lines.append(f"  {name:<26} {value:{sign}.2f}")
    checkpoint = trainer.checkpoint_callback
    path = (checkpoint.best_model_path or checkpoint.last_model_path) if checkpoint is not None else ""
    lines.append(f"  {'time':<26} {seconds:.0f} s ({trainer.current_epoch} epochs)")
    lines.append(f"  {'checkpoint':<26} {path or 'none written'}")
    return "\n".join(lines)


class DistillationCLI(LightningCLI):
    """LightningCLI over any LightningModule and any datamodule.

    The model is :class:`~lightning_kd.DistillationModule` (or a subclass),
    :class:`~lightning_kd.MutualLearningModule`, or any other LightningModule; model and data
    are chosen with ``class_path`` / ``init_args``; the optimizer and scheduler are the
    model's ``optimizer`` / ``lr_scheduler`` arguments. After ``fit`` it prints
    :func:`fit_summary`; ``--baseline_accuracy 0.69`` (the student trained alone, a fraction)
    adds the gain. Other ``LightningCLI`` arguments (``args``, ``run``, ...) pass through.
    """

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(
            LightningModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            auto_configure_optimizers=False,
            **kwargs,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """``--baseline_accuracy``: the student's accuracy without distillation, for the summary."""
        parser.add_argument(
            "--baseline_accuracy",
            type=float | None,
            default=None,
            help="validation accuracy (a fraction) of the student trained alone; the summary shows the gain",
        )

    def before_fit(self) -> None:
        """Start the clock for the summary."""
        self._fit_started = time.perf_counter()

    @rank_zero_only
    def after_fit(self) -> None:
        """Print the end-of-fit summary."""
        baseline = self.config[self.subcommand].get("baseline_accuracy")
        print(fit_summary(self.trainer, time.perf_counter() - self._fit_started, baseline))


def main(args: ArgsType = None) -> None:
    """Run ``lightning-kd {fit,validate,test,predict} --config recipe.yaml``."""
    DistillationCLI(args=args)


if __name__ == "__main__":
    main()
