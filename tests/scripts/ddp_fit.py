"""KD fit with a frozen teacher under 2-process CPU DDP (gloo); run by tests/training/test_ddp.py.

Lightning's "ddp" strategy starts the second process by re-running this script, so it must be
a standalone file, not a pytest function. Each rank writes what it saw to OUT/rank<r>.pt.
With the argument "stages", the fit is a FitNet hint with an init stage (epoch 0: only the
regressor trains), then the main stage.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from lightning_kd import (  # noqa: E402
    CrossEntropyTerm,
    DistillationModule,
    DistillationStages,
    FitNetTerm,
    KDTerm,
    Stage,
)
from tests.helpers import RandomDataModule, small_net  # noqa: E402


class RecordWrapping(pl.Callback):
    student_after_epoch0: dict[str, torch.Tensor] | None = None
    hits = seen = 0  # this process's correct training predictions in the epoch, counted here

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: DistillationModule) -> None:
        self.hits = self.seen = 0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.targets = batch[1]

    def count(self, layer: torch.nn.Module, args: Any, output: torch.Tensor) -> None:
        if layer.training:
            self.hits += int((output.argmax(-1) == self.targets).sum())
            self.seen += len(self.targets)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: DistillationModule) -> None:
        if trainer.current_epoch == 0:
            self.student_after_epoch0 = {k: v.clone() for k, v in pl_module.student.state_dict().items()}

    def on_train_start(self, trainer: pl.Trainer, pl_module: DistillationModule) -> None:
        wrapped = trainer.strategy.model
        self.is_ddp = isinstance(wrapped, DistributedDataParallel)
        self.ignored = sorted(wrapped.parameters_to_ignore) if self.is_ddp else []
        self.find_unused = bool(getattr(wrapped, "find_unused_parameters", True))


def main(out: Path, staged: bool) -> None:
    pl.seed_everything(0, verbose=False)
    teacher = small_net()
    initial_teacher = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = small_net()
    initial_student = {k: v.clone() for k, v in student.state_dict().items()}
    callbacks: list[pl.Callback] = []
    if staged:
        losses = [CrossEntropyTerm(), KDTerm(weight=0.5), FitNetTerm("2", "2", weight=10.0)]
        module = DistillationModule(student, teacher, losses=losses)
        callbacks.append(DistillationStages([Stage(1, {"fitnet": 1.0}, ["loss_terms.fitnet"]), Stage()]))
    else:
        module = DistillationModule(student, teacher)
    spy = RecordWrapping()
    student.register_forward_hook(spy.count)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[spy, *callbacks],
    )
    trainer.fit(module, datamodule=RandomDataModule(n=128, batch_size=16))
    torch.save(
        {
            "student": module.student.state_dict(),
            "teacher": module.teacher.state_dict(),
            "initial_teacher": initial_teacher,
            "initial_student": initial_student,
            "student_after_epoch0": spy.student_after_epoch0,
            "teacher_training": module.teacher.training,
            "is_ddp": spy.is_ddp,
            "ignored": spy.ignored,
            "find_unused": spy.find_unused,
            "global_step": trainer.global_step,
            "loss": float(trainer.callback_metrics["train/loss"]),
            "train_acc": float(trainer.callback_metrics["train/acc"]),
            "hits": spy.hits,
            "seen": spy.seen,
        },
        out / f"rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]), staged=sys.argv[2:] == ["stages"])
