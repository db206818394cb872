"""SEED fit under 2-process CPU DDP (gloo); run by tests/losses/test_seed.py.

Lightning's "ddp" strategy re-runs this script for the second process, so it is a standalone
file. Each rank writes its queue, pointer, the teacher and its student to OUT/rank<r>.pt.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_kd import EmbeddingDistillationModule, SEEDTerm

NUM_SAMPLES = 64


def encoder(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 6))


def main(out: Path) -> None:
    pl.seed_everything(0, verbose=False)
    inputs = torch.randn(NUM_SAMPLES, 8, generator=torch.Generator().manual_seed(1))
    seed = SEEDTerm(queue_size=NUM_SAMPLES)
    module = EmbeddingDistillationModule(encoder(2), encoder(3), losses=[seed], input_key=0)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, DataLoader(TensorDataset(inputs), batch_size=8))
    torch.save(
        {
            "queue": seed.queue.clone(),
            "pointer": seed.queue_pointer.clone(),
            "inputs": inputs,
            "teacher": module.teacher.state_dict(),
            "student": module.student.state_dict(),
            "global_step": trainer.global_step,
        },
        out / f"rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
