"""Set-up every training LightningModule of the package shares: optimizer, recorded config, probe batch."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

__all__ = ["configure_optimization", "first_batch", "hparams_given_by_cli"]

#: the loop of each Trainer stage, whose data source holds what the Trainer call was given
_STAGE_LOOPS = {
    "fit": "fit_loop",
    "validate": "validate_loop",
    "test": "test_loop",
    "predict": "predict_loop",
}


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


def first_batch(trainer: pl.Trainer, stage: str) -> Any | None:
    """The first batch of the data that the Trainer call of ``stage`` reads, or ``None`` if it has none.

    The data may come from any place Lightning accepts: a datamodule (``datamodule=``,
    ``LightningDataModule.from_datasets``, a CLI ``data:`` section), dataloaders passed to the
    call (``trainer.fit(module, train_loader, val_loader)``), or the module's own
    ``*_dataloader`` methods. Lightning reads that source only after the ``setup`` hook, so this
    asks the stage loop's data source directly (the same source the loop will use). Of several
    dataloaders (a list, a dict or a ``CombinedLoader``), the first is read.
    """
    loop = getattr(trainer, _STAGE_LOOPS.get(stage, "predict_loop"))
    source = loop._data_source  # set by the Trainer call, read by the loop after setup
    if source.instance is None or not source.is_defined():
        return None
    loaders = source.dataloader()
    loaders = getattr(loaders, "flattened", loaders)  # a CombinedLoader's dataloaders
    if isinstance(loaders, Mapping):
        loaders = list(loaders.values())
    if isinstance(loaders, (list, tuple)):
        loaders = loaders[0] if loaders else None
    if loaders is None:
        return None
    return next(iter(loaders), None)
