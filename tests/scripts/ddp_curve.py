"""Per-step loss curve of a frozen-teacher KD fit, on 1 process (batch 32) or 2 DDP processes (2 x 16).

Run by tests/training/test_ddp_equivalence.py: ``python ddp_curve.py OUT DEVICES``. Lightning's "ddp"
strategy starts the second process by re-running this script, so it is a standalone file.
Each rank writes OUT/devices<d>_rank<r>.pt with the loss of every step it ran.

Same global batches: under DDP, Lightning replaces the training sampler with a shuffling
``DistributedSampler(seed=PL_GLOBAL_SEED)`` (it always shuffles training data), which draws one
permutation per epoch and gives rank r the positions r, r + 2, r + 4, ... of it; with 2 x 16 the
k-th global batch is positions 32k .. 32k + 31. The 1-process run uses the same sampler with one
replica, so its k-th batch of 32 holds the same samples. Same init: both runs seed 0
before building the models. The models have no BatchNorm (its per-process statistics would make
the runs differ; use SyncBatchNorm for that).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from lightning_kd import DistillationModule  # noqa: E402
from tests.helpers import NUM_CLASSES, NUM_FEATURES, small_net  # noqa: E402

GLOBAL_BATCH = 32
SAMPLES = 128
EPOCHS = 3


class OrderedData(pl.LightningDataModule):
    """Fixed random data, shuffled by one ``DistributedSampler`` permutation per epoch on 1 or 2 ranks."""

    def __init__(self, batch_size: int) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(1)
        self.x = torch.randn(SAMPLES, NUM_FEATURES, generator=generator)
        self.y = torch.randint(0, NUM_CLASSES, (SAMPLES,), generator=generator)
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        dataset = TensorDataset(self.x, self.y)
        if self.trainer.world_size > 1:  # Lightning puts in DistributedSampler(shuffle=True, seed=0)
            return DataLoader(dataset, batch_size=self.batch_size)
        sampler = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=0)
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler)


class RecordCurve(pl.Callback):
    """The loss of every step, the inputs each step saw, and how the strategy wrapped the model."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.inputs: list[torch.Tensor] = []

    def on_train_start(self, trainer: pl.Trainer, pl_module: DistillationModule) -> None:
        wrapped = trainer.strategy.model
        self.is_ddp = isinstance(wrapped, DistributedDataParallel)
        self.find_unused = bool(getattr(wrapped, "find_unused_parameters", False))
        ddp_params = {id(p) for p in getattr(wrapped, "_module_parameters", [])}
        self.teacher_params_in_ddp = sum(id(p) in ddp_params for p in pl_module.teacher.parameters())
        self.student_params_in_ddp = sum(id(p) in ddp_params for p in pl_module.student.parameters())
        self.ddp_modules = [
            type(m).__name__ for m in pl_module.modules() if isinstance(m, DistributedDataParallel)
        ]

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: DistillationModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.losses.append(float(outputs["loss"]))
        self.inputs.append(batch[0].detach().clone())


def main(out: Path, devices: int) -> None:
    pl.seed_everything(0, verbose=False)
    teacher = small_net(batchnorm=False)
    student = small_net(batchnorm=False)
    module = DistillationModule(student, teacher)  # CE 0.1 + KD 0.9 at T = 4, Adam, cosine decay
    recorder = RecordCurve()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        max_epochs=EPOCHS,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[recorder],
    )
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    trainer.fit(module, datamodule=OrderedData(GLOBAL_BATCH // devices))
    torch.save(
        {
            "losses": recorder.losses,
            "inputs": recorder.inputs,
            "is_ddp": recorder.is_ddp,
            "find_unused": recorder.find_unused,
            "teacher_params_in_ddp": recorder.teacher_params_in_ddp,
            "student_params_in_ddp": recorder.student_params_in_ddp,
            "nested_ddp": recorder.ddp_modules,
            "teacher_unchanged": all(
                torch.equal(v, teacher_before[k]) for k, v in teacher.state_dict().items()
            ),
            "student": module.student.state_dict(),
        },
        out / f"devices{devices}_rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
