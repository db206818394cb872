"""ClassAgreementReport: per class, student-teacher agreement and what KD gained or lost."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from matplotlib.figure import Figure
from torch import Tensor, nn

from lightning_kd.callbacks.report.functional import per_class_accuracy
from lightning_kd.callbacks.report.io import (
    collect_logits,
    log_metrics,
    output_directory,
    save_and_log_figure,
    validation_loader,
)
from lightning_kd.hooks import uncompiled
from lightning_kd.teachers.loading import load_weights

__all__ = ["ClassAgreementReport", "ClassChanges", "agreement_figure", "gain_figure"]


@dataclass
class ClassChanges:
    """Per-class numbers of a distilled student, each ``(num_classes,)`` on the CPU (fractions).

    Attributes:
        samples: validation samples of each class.
        accuracy: the student's accuracy per class.
        teacher_accuracy: the teacher's, or ``None`` without a teacher.
        agreement: per class ``c`` that the teacher predicts, the share of those samples that the
            student also predicts as ``c`` (the student's accuracy against the teacher's top-1
            labels); ``None`` without a teacher.
        baseline_accuracy: accuracy per class of a student trained without a teacher, or ``None``.
        tolerance: a class counts as gained (lost) when its gain is above ``tolerance`` (below
            ``-tolerance``).
    """

    samples: Tensor
    accuracy: Tensor
    teacher_accuracy: Tensor | None = None
    agreement: Tensor | None = None
    baseline_accuracy: Tensor | None = None
    tolerance: float = 0.0

    @property
    def gain(self) -> Tensor | None:
        """Student minus baseline accuracy per class; ``None`` without a baseline."""
        return None if self.baseline_accuracy is None else self.accuracy - self.baseline_accuracy

    @property
    def gained(self) -> list[int]:
        """Classes (with validation samples) whose accuracy rose by more than ``tolerance``."""
        gain = self.gain
        return (
            []
            if gain is None
            else [c for c in range(len(gain)) if self.samples[c] and gain[c] > self.tolerance]
        )

    @property
    def lost(self) -> list[int]:
        """Classes (with validation samples) whose accuracy fell by more than ``tolerance``."""
        gain = self.gain
        return (
            []
            if gain is None
            else [c for c in range(len(gain)) if self.samples[c] and gain[c] < -self.tolerance]
        )

    @classmethod
    def compute(
        cls,
        student_logits: Tensor,
        targets: Tensor,
        num_classes: int,
        teacher_logits: Tensor | None = None,
        baseline_accuracy: Tensor | None = None,
        tolerance: float = 0.0,
    ) -> ClassChanges:
        """The per-class numbers from validation logits (``(N, C)``) and labels (``(N,)``).

        Args:
            student_logits: ``(N, C)`` logits of the student.
            targets: ``(N,)`` labels.
            num_classes: ``C``.
            teacher_logits: ``(N, C)`` logits of the teacher, or ``None``.
            baseline_accuracy: ``(C,)`` per-class accuracy of a baseline student, or ``None``.
            tolerance: gain (as a fraction) above which a class counts as gained or lost.
        """
        if baseline_accuracy is not None and baseline_accuracy.shape != (num_classes,):
            raise ValueError(
                f"baseline_accuracy has shape {tuple(baseline_accuracy.shape)}, expected "
                f"({num_classes},): one accuracy per class. Use the baseline of a run on the same classes."
            )
        teacher = None if teacher_logits is None else per_class_accuracy(teacher_logits, targets, num_classes)
        agreement = (
            None
            if teacher_logits is None
            else per_class_accuracy(student_logits, teacher_logits.argmax(dim=-1), num_classes)
        )
        return cls(
            samples=torch.bincount(targets.cpu(), minlength=num_classes),
            accuracy=per_class_accuracy(student_logits, targets, num_classes),
            teacher_accuracy=teacher,
            agreement=agreement,
            baseline_accuracy=None if baseline_accuracy is None else baseline_accuracy.float().cpu(),
            tolerance=tolerance,
        )

    def metrics(self) -> dict[str, float]:
        """``class_accuracy|agreement|gain/class_<i>`` and the counts ``class_changes/gained|lost``."""
        logged = {f"class_accuracy/class_{c}": float(v) for c, v in enumerate(self.accuracy)}
        if self.agreement is not None:
            logged.update({f"agreement/class_{c}": float(v) for c, v in enumerate(self.agreement)})
        gain = self.gain
        if gain is not None:
            logged.update({f"gain/class_{c}": float(v) for c, v in enumerate(gain) if self.samples[c]})
            logged["class_changes/gained"] = float(len(self.gained))
            logged["class_changes/lost"] = float(len(self.lost))
        return logged

    def table(self) -> str:
        """A Markdown table, one row per class, then the classes gained and lost."""
        columns: dict[str, Tensor] = {"student": self.accuracy}
        if self.baseline_accuracy is not None:
            columns = {"baseline": self.baseline_accuracy, "student": self.accuracy, "gain": self.gain}
        if self.teacher_accuracy is not None:
            columns.update({"teacher": self.teacher_accuracy, "agreement": self.agreement})
        header = [
            "class",
            "samples",
            *(f"{name} (%)" if name != "gain" else "gain (pts)" for name in columns),
        ]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for c in range(len(self.accuracy)):
            cells = [str(c), str(int(self.samples[c]))]
            for name, values in columns.items():
                if name == "gain":
                    cells.append(f"{100 * values[c]:+.1f}" if self.samples[c] else "-")
                elif name == "agreement" or self.samples[c]:
                    cells.append(f"{100 * values[c]:.1f}")
                else:
                    cells.append("-")
            lines.append("| " + " | ".join(cells) + " |")
        text = "\n".join(lines) + "\n"
        if self.gain is not None:
            points = 100 * self.tolerance
            text += f"\nGained (gain > {points:g} pts): {self.gained or 'none'}\n"
            text += f"Lost (gain < {-points if points else 0:g} pts): {self.lost or 'none'}\n"
        return text


class ClassAgreementReport(pl.Callback):
    """Per class: teacher-student agreement, and the classes KD gained or lost against a baseline student.

    Knowledge distillation (Hinton et al., "Distilling the Knowledge in a Neural Network",
    2015) moves the student towards the teacher; this shows where. At the end of fit, on
    global rank 0, the student (and the teacher, and a baseline student) run on the validation
    data, and :class:`ClassChanges` gives per class (torchmetrics ``MulticlassAccuracy`` with
    ``average=None``): the student's accuracy, its top-1 agreement with the teacher, and its
    gain over the baseline. Logged through every logger: ``class_accuracy/class_<i>``,
    ``agreement/class_<i>``, ``gain/class_<i>`` (fractions), ``class_changes/gained`` and
    ``class_changes/lost`` (counts). Written to ``directory`` (default: beside the
    checkpoints): ``class_agreement.png`` (with a teacher), ``class_gain.png`` (with a
    baseline; green bars gained, red lost), ``class_changes.md`` (the table) and
    ``per_class_accuracy.json`` (this student's per-class accuracy: a baseline run with this
    callback writes the file that a KD run reads as ``baseline_accuracy``). The figures are
    logged as images to a W&B or TensorBoard logger.

    The baseline, at most one of:

    - ``baseline_checkpoint``: a Lightning checkpoint of a student of the same architecture
      trained without a teacher (e.g. recipe ``mnist1d/baseline``); a copy of the
      student is loaded with its ``student.*`` weights and evaluated on the same validation
      data (the most exact: both are measured on the same samples).
    - ``baseline_accuracy``: a ``per_class_accuracy.json`` written by this callback in the
      baseline run.

    Args:
        baseline_checkpoint: checkpoint of the baseline student.
        baseline_accuracy: JSON file of the baseline's per-class accuracy.
        directory: where the files go.
        tolerance: a class is gained (lost) when its accuracy changed by more than this fraction.
    """

    def __init__(
        self,
        baseline_checkpoint: str | Path | None = None,
        baseline_accuracy: str | Path | None = None,
        directory: str | Path | None = None,
        tolerance: float = 0.0,
    ) -> None:
        super().__init__()
        if baseline_checkpoint is not None and baseline_accuracy is not None:
            raise ValueError("Give one baseline: baseline_checkpoint or baseline_accuracy, not both.")
        if tolerance < 0:
            raise ValueError(f"tolerance must be >= 0, got {tolerance}.")
        self.baseline_checkpoint = Path(baseline_checkpoint) if baseline_checkpoint is not None else None
        self.baseline_accuracy = Path(baseline_accuracy) if baseline_accuracy is not None else None
        self.directory = Path(directory) if directory is not None else None
        self.tolerance = tolerance
        self.changes: ClassChanges | None = None
        self.files: list[Path] = []
        self._baseline_model: nn.Module | None = None
        self._baseline_values: Tensor | None = None

    # ----------------------------------------------------------------- baseline
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Load the baseline now, so that a wrong path fails before training."""
        for path, what in (
            (self.baseline_checkpoint, "checkpoint"),
            (self.baseline_accuracy, "accuracy file"),
        ):
            if path is not None and not path.is_file():
                raise FileNotFoundError(
                    f"ClassAgreementReport: baseline {what} {str(path)!r} does not exist. Train the "
                    "baseline student first (e.g. `lightning-kd fit --config mnist1d/baseline`) "
                    "or fix the path."
                )
        if self.baseline_checkpoint is not None:
            model = copy.deepcopy(uncompiled(pl_module.student)).cpu()
            try:
                self._baseline_model = load_weights(model, self.baseline_checkpoint)
            except ValueError as error:
                raise ValueError(
                    f"ClassAgreementReport: the baseline checkpoint must hold a student of the same "
                    f"architecture. {error}"
                ) from error
        if self.baseline_accuracy is not None:
            self._baseline_values = self._read_accuracy(self.baseline_accuracy, pl_module.num_classes)

    @staticmethod
    def _read_accuracy(path: Path, num_classes: int) -> Tensor:
        content = json.loads(path.read_text())
        values = content.get("per_class_accuracy") if isinstance(content, dict) else None
        if not isinstance(values, list) or len(values) != num_classes:
            raise ValueError(
                f"ClassAgreementReport: {str(path)!r} must hold "
                f"{{'per_class_accuracy': [one value per class]}} with {num_classes} classes, as this "
                f"callback writes in the baseline run; got {content!r:.200}."
            )
        return torch.tensor(values, dtype=torch.float32)

    # ----------------------------------------------------------------- report
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Compute, log and write the per-class report."""
        if not trainer.is_global_zero:
            return
        loader = validation_loader(trainer)
        if loader is None or getattr(pl_module, "target_key", None) is None:
            rank_zero_warn("ClassAgreementReport needs labelled validation data; no report is made.")
            return
        others = {}
        if self._baseline_model is not None:
            others["baseline"] = self._baseline_model.to(pl_module.device)
        logits = collect_logits(pl_module, loader, others=others)
        num_classes = pl_module.num_classes
        baseline = self._baseline_values
        if "baseline" in logits:
            baseline = per_class_accuracy(logits["baseline"], logits["targets"], num_classes)
        self.changes = ClassChanges.compute(
            logits["student"], logits["targets"], num_classes, logits.get("teacher"), baseline, self.tolerance
        )
        log_metrics(trainer, self.changes.metrics())

        directory = output_directory(trainer, self.directory)
        self.files = []
        if self.changes.agreement is not None:
            figure = agreement_figure(self.changes)
            self.files.append(
                save_and_log_figure(trainer, figure, directory, "class_agreement", "report/agreement")
            )
        if self.changes.gain is not None:
            figure = gain_figure(self.changes)
            self.files.append(
                save_and_log_figure(trainer, figure, directory, "class_gain", "report/class_gain")
            )
        table = directory / "class_changes.md"
        table.write_text("# Per-class changes\n\n" + self.changes.table())
        accuracy = directory / "per_class_accuracy.json"
        content = {
            "per_class_accuracy": self.changes.accuracy.tolist(),
            "samples": self.changes.samples.tolist(),
        }
        accuracy.write_text(json.dumps(content, indent=1) + "\n")
        self.files += [table, accuracy]


def agreement_figure(changes: ClassChanges) -> Figure:
    """Bar chart of the student's top-1 agreement with the teacher, per teacher-predicted class.

    Args:
        changes: per-class numbers with a teacher (``agreement`` set).
    """
    figure = Figure(figsize=(8, 3.5), layout="constrained")
    axes = figure.add_subplot()
    classes = list(range(len(changes.agreement)))
    axes.bar(classes, (100 * changes.agreement).tolist(), color="tab:blue")
    axes.set_xticks(classes)
    axes.set_xlabel("class (teacher's top-1)")
    axes.set_ylabel("student agrees with teacher (%)")
    axes.set_ylim(0, 100)
    axes.set_title("Teacher-student top-1 agreement per class")
    return figure


def gain_figure(changes: ClassChanges) -> Figure:
    """Bar chart of the student's accuracy gain over the baseline per class: green gained, red lost.

    Args:
        changes: per-class numbers with a baseline (``baseline_accuracy`` set).
    """
    figure = Figure(figsize=(8, 3.5), layout="constrained")
    axes = figure.add_subplot()
    gain = 100 * changes.gain
    gained, lost = set(changes.gained), set(changes.lost)
    colors = [
        "tab:green" if c in gained else "tab:red" if c in lost else "tab:gray" for c in range(len(gain))
    ]
    classes = list(range(len(gain)))
    axes.bar(classes, gain.tolist(), color=colors)
    axes.axhline(0, color="black", linewidth=0.8)
    axes.set_xticks(classes)
    axes.set_xlabel("class")
    axes.set_ylabel("accuracy gain over baseline (pts)")
    axes.set_title(f"Distilled student vs baseline: {len(gained)} classes gained, {len(lost)} lost")
    return figure
