"""KD fit under FSDP with DistillationFSDPStrategy; run by tests/training/test_fsdp.py on GPUs.

``python fsdp_fit.py OUT MODE ACCELERATOR DEVICES``, e.g. ``python fsdp_fit.py out frozen gpu 2``:
MODE "frozen" (teacher left out of FSDP), "sharded" (frozen teacher sharded as its own unit) or
"trainable" (co-trained teacher, its own unit). FSDP needs an accelerator: on CPU, torch raises
"FSDP needs a non-CPU accelerator device". Lightning re-runs this script for the other
processes. Each rank writes OUT/rank<r>.pt.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.distributed.fsdp import FullyShardedDataParallel

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from lightning_kd import DistillationModule  # noqa: E402
from lightning_kd.losses import (  # noqa: E402
    CrossEntropyTerm,
    FitNetTerm,  # noqa: E402
    KDTerm,
)
from lightning_kd.strategies import DistillationFSDPStrategy  # noqa: E402
from tests.helpers import RandomDataModule, small_net  # noqa: E402


class RecordUnits(pl.Callback):
    """Each FSDP unit's flat parameter: the names it flattens and whether each requires grad."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: DistillationModule) -> None:
        self.units: dict[str, list[tuple[str, bool]]] = {}
        for name, unit in trainer.strategy.model.named_modules():
            if isinstance(unit, FullyShardedDataParallel) and unit._handle is not None:
                flat = unit._handle.flat_param
                key = name.replace("_fsdp_wrapped_module.", "").removeprefix("_fsdp_wrapped_module")
                self.units[key] = [
                    (fqn, p.requires_grad) for fqn, p in zip(flat._fqns, flat._params, strict=True)
                ]


def main(out: Path, mode: str, accelerator: str, devices: int) -> None:
    pl.seed_everything(0, verbose=False)
    teacher = small_net(batchnorm=False)
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    losses = [CrossEntropyTerm(), KDTerm(weight=0.5), FitNetTerm("0", "0", weight=1.0)]
    if mode == "trainable":
        losses.append(CrossEntropyTerm("teacher_ce", model="teacher"))
    module = DistillationModule(
        small_net(batchnorm=False),
        teacher,
        losses=losses,
        teacher_mode="trainable" if mode == "trainable" else "frozen",
    )
    recorder = RecordUnits()
    trainer = pl.Trainer(
        accelerator=accelerator,
        devices=devices,
        strategy=DistillationFSDPStrategy(shard_teacher=mode == "sharded"),
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[recorder],
    )
    trainer.fit(module, datamodule=RandomDataModule(n=64, batch_size=16))
    torch.save(
        {
            "units": recorder.units,
            "teacher_unchanged": all(
                torch.equal(v, teacher_before[k]) for k, v in teacher.state_dict().items()
            ),
            "global_step": trainer.global_step,
            "loss": float(trainer.callback_metrics["train/loss"]),
        },
        out / f"rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4]))
