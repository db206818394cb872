"""DistillationReport: what distillation did, per class and in calibration, as plots for any logger."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from matplotlib.figure import Figure
from torch import Tensor
from torchmetrics.classification import MulticlassCalibrationError

from lightning_kd.callbacks.report.functional import per_class_accuracy, reliability_bins
from lightning_kd.callbacks.report.io import (
    collect_logits,
    log_metrics,
    output_directory,
    save_and_log_figure,
    validation_loader,
)

if TYPE_CHECKING:  # the module imports the callbacks package (FeatureHooks)
    from lightning_kd.module import DistillationModule

__all__ = ["DistillationReport"]


class DistillationReport(pl.Callback):
    """Per-class accuracy and reliability diagrams of student and teacher, as images and PNG files.

    For a :class:`~lightning_kd.DistillationModule` with a teacher:

    - at the start of training, the teacher's validation accuracy is logged once as
      ``reference/teacher_acc`` (a reference line next to ``val/acc``);
    - at the end of fit, the student and the teacher are run on the validation data and
      ``report/student_ece`` / ``report/teacher_ece`` (expected calibration error, torchmetrics)
      are logged, and two figures are drawn: per-class accuracy of both, and their reliability
      diagrams. They are saved as ``per_class_accuracy.png`` and ``reliability.png`` in
      ``directory`` (default: beside the checkpoints) and logged as images to a W&B or
      TensorBoard logger.

    Runs on global rank 0 only.

    Args:
        directory: where the PNG files go; default: the checkpoint directory, else the log directory.
        num_bins: confidence bins of the reliability diagram and the ECE.
    """

    def __init__(self, directory: str | Path | None = None, num_bins: int = 15) -> None:
        super().__init__()
        self.directory = Path(directory) if directory is not None else None
        self.num_bins = num_bins
        self.files: list[Path] = []

    # ----------------------------------------------------------------- data
    def collect(self, module: DistillationModule, loader: Any) -> tuple[Tensor, Tensor | None, Tensor]:
        """Student logits, teacher logits (``None`` without a teacher) and targets over ``loader``.

        Args:
            module: a :class:`~lightning_kd.DistillationModule`.
            loader: labelled validation batches.
        """
        logits = collect_logits(module, loader)
        return logits["student"], logits.get("teacher"), logits["targets"]

    def _usable(self, trainer: pl.Trainer, module: pl.LightningModule) -> Any:
        distillation = hasattr(module, "teacher_forward") and hasattr(module, "unpack_batch")
        if not trainer.is_global_zero or not distillation or module.target_key is None:
            return None
        loader = validation_loader(trainer)
        if loader is None:
            rank_zero_warn("DistillationReport needs validation data; no report is made.")
        return loader

    # ----------------------------------------------------------------- hooks
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Log the teacher's validation accuracy once, as a reference line."""
        loader = self._usable(trainer, pl_module)
        if loader is None or pl_module.teacher is None:
            return
        _, teacher, targets = self.collect(pl_module, loader)
        accuracy = (teacher.argmax(dim=-1) == targets).float().mean().item()
        log_metrics(trainer, {"reference/teacher_acc": accuracy})

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Compute the ECEs, draw and save both figures, and log them."""
        loader = self._usable(trainer, pl_module)
        if loader is None:
            return
        student, teacher, targets = self.collect(pl_module, loader)
        models = {"student": student} if teacher is None else {"student": student, "teacher": teacher}
        num_classes = pl_module.num_classes
        per_class = {}
        for name, logits in models.items():
            per_class[name] = per_class_accuracy(logits, targets, num_classes)
            ece = MulticlassCalibrationError(num_classes, n_bins=self.num_bins).to(logits.device)(
                logits, targets
            )
            log_metrics(trainer, {f"report/{name}_ece": ece.item()})
        figures = {
            "per_class_accuracy": self._per_class_figure(per_class),
            "reliability": self._reliability_figure(models, targets),
        }
        directory = output_directory(trainer, self.directory)
        self.files = [
            save_and_log_figure(trainer, figure, directory, key, f"report/{key}")
            for key, figure in figures.items()
        ]

    # ----------------------------------------------------------------- drawing
    @staticmethod
    def _per_class_figure(per_class: dict[str, Tensor]) -> Figure:
        figure = Figure(figsize=(8, 3.5), layout="constrained")
        axes = figure.add_subplot()
        width = 0.8 / len(per_class)
        for i, (name, accuracy) in enumerate(per_class.items()):
            classes = torch.arange(len(accuracy)).float() + i * width
            axes.bar(classes.tolist(), (100 * accuracy.cpu()).tolist(), width=width, label=name)
        num_classes = len(next(iter(per_class.values())))
        axes.set_xticks([c + (len(per_class) - 1) * width / 2 for c in range(num_classes)])
        axes.set_xticklabels([str(c) for c in range(num_classes)])
        axes.set_xlabel("class")
        axes.set_ylabel("validation accuracy (%)")
        axes.set_title("Per-class accuracy")
        axes.legend()
        return figure

    def _reliability_figure(self, models: dict[str, Tensor], targets: Tensor) -> Figure:
        figure = Figure(figsize=(4.5 * len(models), 4), layout="constrained")
        for i, (name, logits) in enumerate(models.items()):
            axes = figure.add_subplot(1, len(models), i + 1)
            confidence, accuracy, _ = reliability_bins(logits.softmax(dim=-1), targets, self.num_bins)
            centers = (torch.arange(self.num_bins).float() + 0.5) / self.num_bins
            filled = ~torch.isnan(accuracy.cpu())
            axes.bar(
                centers[filled].tolist(),
                accuracy.cpu()[filled].tolist(),
                width=1 / self.num_bins,
                edgecolor="black",
                label="accuracy",
            )
            axes.plot([0, 1], [0, 1], linestyle="--", color="gray", label="perfect calibration")
            axes.plot(
                confidence.cpu()[filled].tolist(),
                accuracy.cpu()[filled].tolist(),
                "o",
                label="mean confidence",
            )
            axes.set_xlabel("confidence")
            axes.set_ylabel("accuracy")
            axes.set_title(f"Reliability: {name}")
            axes.legend(loc="upper left")
        return figure
