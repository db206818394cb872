"""The ``lightning-kd`` command: LightningCLI over the package's training modules and any datamodule."""

from __future__ import annotations

import time
import zipfile
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_only

__all__ = ["DistillationCLI", "check_checkpoint_file", "fit_summary", "main"]


def fit_summary(trainer: Trainer, seconds: float, baseline_accuracy: float | None = None) -> str:
    """A few lines on a finished fit: teacher, baseline, student accuracy (or cosine), gain, time."""
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
    if "val/cosine" in metrics:
        lines.append(f"  {'cosine to teacher (val)':<26} {float(metrics['val/cosine']):.4f}")
    checkpoint = trainer.checkpoint_callback
    path = (checkpoint.best_model_path or checkpoint.last_model_path) if checkpoint is not None else ""
    lines.append(f"  {'time':<26} {seconds:.0f} s ({trainer.current_epoch} epochs)")
    lines.append(f"  {'checkpoint':<26} {path or 'none written'}")
    return "\n".join(lines)


def check_checkpoint_file(ckpt_path: str | Path | None) -> None:
    """Reject a truncated or foreign ``--ckpt_path`` file before Lightning loads it.

    ``torch.save`` writes a zip archive (since PyTorch 1.6) whose directory sits at the end of
    the file, so reading that directory catches truncated and non-checkpoint files without
    unpickling anything. Lightning's special values (``"last"``, ``"best"``, ...) and paths that
    are not local files are left to Lightning.

    Raises:
        ValueError: the file is not a complete ``torch.save`` archive.
    """
    if ckpt_path is None or not Path(ckpt_path).is_file():
        return
    try:
        with zipfile.ZipFile(ckpt_path) as archive:
            complete = any(name.endswith("/data.pkl") or name == "data.pkl" for name in archive.namelist())
    except (zipfile.BadZipFile, OSError) as error:
        complete, reason = False, str(error)
    else:
        reason = "it holds no data.pkl"
    if not complete:
        raise ValueError(
            f"Cannot load --ckpt_path {str(ckpt_path)!r}: it is truncated or not a checkpoint "
            f"({reason}). "
            "Pass a complete .ckpt written by Lightning (e.g. runs/.../checkpoints/last.ckpt), or drop "
            "--ckpt_path to start afresh."
        )


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

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        """Parse, then check ``--ckpt_path`` (LightningCLI reads its hyperparameters right after)."""
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        if subcommand:
            check_checkpoint_file(self.config[subcommand].get("ckpt_path"))

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
