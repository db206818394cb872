"""What a classification distillation module measures on held-out data: accuracy and agreement."""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_kd.batch_checks import check_logits, class_indices, class_targets
from lightning_kd.model_io import call_model, infer_num_classes, logits_of
from lightning_kd.teachers.ensemble import TeacherEnsemble

__all__ = ["ClassificationMetrics"]


class ClassificationMetrics:
    """The held-out metrics of :class:`~lightning_kd.DistillationModule` (a mixin of it).

    Student accuracy ``val|test/acc`` and loss; with a teacher, its accuracy and the top-1
    agreement of the two; with a :class:`~lightning_kd.TeacherEnsemble`, each member's accuracy.
    Subclasses for other tasks override :meth:`build_metrics` and :meth:`evaluate`.
    """

    def build_metrics(self) -> nn.ModuleDict:
        """The torchmetrics objects of the run (sets ``num_classes`` when it was not given)."""
        if self.num_classes is None:
            self.num_classes = self._infer_num_classes()
        if self.num_classes < 2:
            raise ValueError(
                f"num_classes={self.num_classes}: classification needs at least 2 classes. For a binary task "
                "give the models 2 outputs (e.g. nn.Linear(features, 2)) and use labels 0/1."
            )

        def accuracy() -> MulticlassAccuracy:
            return MulticlassAccuracy(num_classes=self.num_classes, average="micro")

        names = ["val_acc", "test_acc"]  # train/acc: counted by the StepMonitor
        if self.teacher is not None:
            names += ["val_teacher_acc", "test_teacher_acc", "val_agreement", "test_agreement"]
        if isinstance(self.teacher, TeacherEnsemble):
            members = range(len(self.teacher))
            names += [f"{stage}_teacher{i}_acc" for stage in ("val", "test") for i in members]
        return nn.ModuleDict({name: accuracy() for name in names})

    def _infer_num_classes(self) -> int:
        student_classes = infer_num_classes(self.student)
        teacher_classes = infer_num_classes(self.teacher) if self.teacher is not None else None
        if student_classes and teacher_classes and student_classes != teacher_classes:
            raise ValueError(
                f"The student predicts {student_classes} classes but the teacher {teacher_classes}. "
                "Build both with the same num_classes (or pass num_classes= if the inference is wrong)."
            )
        found = student_classes or teacher_classes
        if found is None:
            raise ValueError("Cannot infer the number of classes from the models; pass num_classes=.")
        return found

    def evaluate(self, batch: Any, stage: str) -> None:
        """Student (and teacher) accuracy and their agreement on one held-out batch, under ``stage/``."""
        inputs, targets = self.unpack_batch(batch)
        if targets is not None:  # the values were checked before the transfer (check_batch)
            targets = class_targets(targets, self.num_classes, stage, read_values=False)
        try:
            student_logits = logits_of(call_model(self.student, inputs))
            teacher_output = self.teacher_forward(self.teacher_inputs(batch, inputs))
        except (RuntimeError, ValueError) as error:
            self.raise_explained(error, batch, inputs)
            raise
        teacher_logits = logits_of(teacher_output) if teacher_output is not None else None
        check_logits(student_logits, "student", self.num_classes)
        if targets is not None:
            self.log(f"{stage}/loss", F.cross_entropy(student_logits.float(), targets), sync_dist=True)
            targets = class_indices(targets)
            self.metrics[f"{stage}_acc"](student_logits, targets)
            self.log(f"{stage}/acc", self.metrics[f"{stage}_acc"], prog_bar=True)
        if teacher_logits is not None:
            if targets is not None:
                self.metrics[f"{stage}_teacher_acc"](teacher_logits, targets)
                self.log(f"{stage}/teacher_acc", self.metrics[f"{stage}_teacher_acc"])
            self.metrics[f"{stage}_agreement"](student_logits, teacher_logits.argmax(dim=-1))
            self.log(f"{stage}/agreement", self.metrics[f"{stage}_agreement"])
        if isinstance(self.teacher, TeacherEnsemble) and targets is not None:
            for i, member_logits in enumerate(teacher_output["members"]):
                self.metrics[f"{stage}_teacher{i}_acc"](member_logits, targets)
                self.log(f"{stage}/teacher{i}_acc", self.metrics[f"{stage}_teacher{i}_acc"])
