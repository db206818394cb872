"""Set-up every training LightningModule of the package shares: its optimizer and its recorded config."""

from __future__ import annotations

from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

__all__ = ["configure_optimization", "hparams_given_by_cli"]


def hparams_given_by_cli() -> bool:
    """Whether LightningCLI is instantiating the module: it then records the config itself."""
    try:
        from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
    except ImportError:  # pragma: no cover - older or newer Lightning
        return False
    return _given_hyperparameters.get() is not None


def configure_optimization(
    module: pl.LightningModule,
    params: list[nn.Parameter],
    optimizer: OptimizerCallable | None,
    lr_scheduler: LRSchedulerCallable | None,
    lr_scheduler_interval: Literal["epoch", "step"],
    cosine_decay: bool,
) -> Any:
    """What ``configure_optimizers`` returns for ``params``.

    ``optimizer`` (default Adam, lr 1e-3) and ``lr_scheduler`` are callables as LightningCLI
    gives them; without a scheduler, ``cosine_decay`` anneals the learning rate to 0 over the
    run, stepped per optimizer step.
    """
    built = optimizer(params) if optimizer is not None else torch.optim.Adam(params, lr=1e-3)
    if lr_scheduler is not None:
        scheduler = lr_scheduler(built)
        config = {"scheduler": scheduler, "interval": lr_scheduler_interval}
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            config["monitor"] = "val/loss"
        return {"optimizer": built, "lr_scheduler": config}
    if cosine_decay:
        total_steps = max(int(module.trainer.estimated_stepping_batches), 1)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(built, T_max=total_steps)
        return {"optimizer": built, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
    return built
