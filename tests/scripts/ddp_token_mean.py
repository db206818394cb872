"""One optimizer step of causal-LM distillation under 2-process CPU DDP (gloo) with accumulate_grad_batches=2.

Run by tests/language/test_token_mean.py: ``python ddp_token_mean.py OUT``. Rank r trains on
sequences 2r and 2r + 1 of tests/language/token_mean_setup.py, one per micro-batch, so the four
micro-batches of the global batch count 11, 2, 6 and 2 tokens. The processes are forked
(``ddp_fork``: the package is imported once); Lightning hands rank 0's weights back to this
process, which writes OUT/student.pt.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.language.helpers import token_loader  # noqa: E402
from tests.language.token_mean_setup import module, samples, trainer  # noqa: E402


class RankData(pl.LightningDataModule):
    """Sequences 2r and 2r + 1 for rank r, one per micro-batch."""

    def train_dataloader(self) -> DataLoader:
        rank = self.trainer.global_rank
        return token_loader(samples()[2 * rank : 2 * rank + 2], batch_size=1)


def main(out: Path) -> None:
    fit = trainer(devices=2, strategy="ddp_fork", accumulate_grad_batches=2, use_distributed_sampler=False)
    distilled = module()
    fit.fit(distilled, datamodule=RankData())
    torch.save(distilled.student.state_dict(), out / "student.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
