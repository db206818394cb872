"""KD with a TeacherOutputCache on disk under 2-process CPU DDP (gloo); run by tests/teachers/test_cache.py.

Both processes share one cache directory. Each rank writes OUT/rank<r>.pt: the epoch of every
training-time teacher forward, whether the cache is complete, and the stored and true logits.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from lightning_kd import DistillationModule  # noqa: E402
from lightning_kd.data import WithIndex  # noqa: E402
from lightning_kd.teachers import TeacherOutputCache  # noqa: E402
from tests.helpers import RandomDataModule, small_net  # noqa: E402


class IndexedDataModule(RandomDataModule):
    def train_dataloader(self) -> DataLoader:
        return DataLoader(WithIndex(self._dataset()), batch_size=self.batch_size, shuffle=True)


def main(out: Path) -> None:
    pl.seed_everything(0, verbose=False)
    cache = TeacherOutputCache(out / "cache")
    module = DistillationModule(small_net(), small_net(), teacher_cache=cache)
    calls: list[int] = []
    module.teacher.register_forward_pre_hook(
        lambda *_: calls.append(module.trainer.current_epoch) if module.training else None
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=2,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    datamodule = IndexedDataModule(n=64, batch_size=16)
    trainer.fit(module, datamodule=datamodule)
    with torch.no_grad():
        teacher_logits = module.teacher(datamodule.x)
    torch.save(
        {
            "calls": calls,
            "complete": cache.complete,
            "logits": cache.arrays["logits"].clone(),
            "teacher_logits": teacher_logits,
        },
        out / f"rank{trainer.global_rank}.pt",
    )
    # tear gloo down before exit: its threads otherwise abort the process at interpreter exit
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
