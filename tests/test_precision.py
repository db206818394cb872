"""bf16-mixed: a KD fit runs, and the KD loss agrees with float32."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from conftest import RandomDataModule, make_trainer, small_net

from lightning_kd import DistillationModule


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


def test_kd_term_under_bf16_autocast_agrees_with_float32() -> None:
    module = DistillationModule(small_net(batchnorm=False), small_net(batchnorm=False))
    batch = (torch.randn(64, 8), torch.randint(0, 4, (64,)))
    reference = module.compute_loss(module.step_outputs(batch))[1]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = module.step_outputs(batch)
        assert outputs.student_logits.dtype == torch.bfloat16  # the models ran in bf16
        mixed = module.compute_loss(outputs)[1]
    for name in ("ce", "kd"):
        assert mixed[name].dtype == torch.float32
        torch.testing.assert_close(mixed[name], reference[name], rtol=3e-2, atol=3e-3)
