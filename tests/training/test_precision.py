"""bf16-mixed: a KD fit runs with float32 losses."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch

from lightning_kd import DistillationModule
from tests.helpers import RandomDataModule, make_trainer, small_net


class RecordLossDtypes(pl.Callback):
    def __init__(self) -> None:
        self.dtypes: set[torch.dtype] = set()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, *args: Any) -> None:
        self.dtypes.add(outputs["loss"].dtype)


def test_bf16_mixed_fit_runs_with_float32_losses() -> None:
    recorder = RecordLossDtypes()
    trainer = make_trainer(max_epochs=2, precision="bf16-mixed", callbacks=[recorder])
    teacher = small_net()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    trainer.fit(DistillationModule(small_net(), teacher), datamodule=RandomDataModule())
    assert recorder.dtypes == {torch.float32}
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
