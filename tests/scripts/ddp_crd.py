"""CRD fit under 2-process CPU DDP (gloo); run by tests/losses/test_crd.py.

Lightning's "ddp" strategy starts the second process by re-running this script, so it must be
a standalone file, not a pytest function. Each rank writes its memory banks (at the start of
training and at the end) and what it trained on to OUT/rank<r>.pt.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from lightning_kd import CRDTerm, CrossEntropyTerm, DistillationModule  # noqa: E402
from lightning_kd.data import WithIndex  # noqa: E402
from tests.helpers import RandomDataModule, small_net  # noqa: E402

NUM_SAMPLES = 128


class IndexedDataModule(RandomDataModule):
    def _dataset(self) -> Dataset:
        return WithIndex(super()._dataset())


class RecordMemory(pl.Callback):
    def __init__(self) -> None:
        self.seen: list[torch.Tensor] = []

    def on_train_start(self, trainer: pl.Trainer, pl_module: DistillationModule) -> None:
        memory = pl_module.loss_terms["crd"].memory
        self.initial = {k: v.clone() for k, v in memory.state_dict().items()}

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: DistillationModule, batch, batch_idx
    ) -> None:
        self.seen.append(batch[2].clone())


def main(out: Path) -> None:
    pl.seed_everything(0, verbose=False)
    crd = CRDTerm("2", "2", num_samples=NUM_SAMPLES, feat_dim=8, num_negatives=16)
    module = DistillationModule(small_net(hidden=16), small_net(hidden=32), losses=[CrossEntropyTerm(), crd])
    spy = RecordMemory()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[spy],
    )
    trainer.fit(module, datamodule=IndexedDataModule(n=NUM_SAMPLES, batch_size=16))
    memory = module.loss_terms["crd"].memory
    torch.save(
        {
            "memory": {k: v.clone() for k, v in memory.state_dict().items()},
            "initial": spy.initial,
            "seen": torch.cat(spy.seen),
            "student": module.student.state_dict(),
            "global_step": trainer.global_step,
        },
        out / f"rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
