"""Set-up every training LightningModule of the package shares: optimizer, recorded config, probe batch."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torch.optim.lr_scheduler import LRScheduler
from torch.utils.data import DataLoader

from lightning_kd.teachers.loading import load_weights

__all__ = [
    "CosineToZeroLR",
    "check_equal_training_batches",
    "check_training_data",
    "compile_options",
    "configure_optimization",
    "default_optimizer",
    "default_schedule",
    "first_batch",
    "hparams_given_by_cli",
    "load_student_start",
]

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


def load_student_start(student: nn.Module, checkpoint: str | Path) -> str:
    """Load the weights ``student`` starts from (e.g. a supervised baseline's); the file's absolute path.

    Any form :func:`~lightning_kd.teachers.loading.load_weights` reads (a Lightning checkpoint of
    this package's modules: the ``student.`` weights, a state dict), strictly: every weight must match.
    """
    path = str(Path(checkpoint).expanduser().resolve())
    load_weights(student, path, role="student")
    return path


def configure_optimization(
    module: pl.LightningModule,
    params: list[nn.Parameter],
    optimizer: OptimizerCallable | None,
    lr_scheduler: LRSchedulerCallable | None,
    lr_scheduler_interval: Literal["epoch", "step"],
    cosine_decay: bool,
) -> Any:
    """What ``configure_optimizers`` returns for ``params``.

    ``optimizer`` (default :func:`default_optimizer`) and ``lr_scheduler`` are callables as
    LightningCLI gives them; without a scheduler, ``cosine_decay`` anneals the learning rate to 0
    over the run, stepped per optimizer step.
    """
    built = optimizer(params) if optimizer is not None else default_optimizer(params)
    if lr_scheduler is not None:
        scheduler = lr_scheduler(built)
        config = {"scheduler": scheduler, "interval": lr_scheduler_interval}
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            config["monitor"] = "val/loss"
        return {"optimizer": built, "lr_scheduler": config}
    if cosine_decay:
        scheduler = default_schedule(built, module.trainer)
        return {"optimizer": built, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
    return built


def compile_options(compile: bool | Mapping[str, Any]) -> dict[str, Any] | None:
    """A module's ``compile`` argument as ``torch.compile`` keyword arguments, ``None`` when off."""
    if compile is True:
        return {}
    if compile is False or compile is None:
        return None
    if isinstance(compile, Mapping) and all(isinstance(key, str) for key in compile):
        return dict(compile)
    raise TypeError(
        "compile must be True, False or a mapping of torch.compile options (e.g. "
        f"{{'backend': 'aot_eager'}}), got {compile!r}."
    )


def default_optimizer(params: list[nn.Parameter]) -> torch.optim.Adam:
    """Adam with lr 1e-3, as one fused kernel per step where torch has one for the parameters.

    The fused implementation (CPU and CUDA, plain tensors) computes Adam's update for every
    parameter in one kernel instead of a loop of small ones per parameter; its results equal the
    loop's up to float rounding. Sharded (DTensor) or other subclassed parameters, and devices
    without the kernel, get the default implementation.
    """
    plain = all(type(p) is nn.Parameter and type(p.data) is torch.Tensor for p in params)
    if plain and params and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params):
        try:
            return torch.optim.Adam(params, lr=1e-3, fused=True)
        except RuntimeError:  # a torch build without the kernel for these parameters
            pass
    return torch.optim.Adam(params, lr=1e-3)


class CosineToZeroLR(LRScheduler):
    r"""The default schedule: every learning rate decays along a half cosine to 0 at the run's last step.

    After scheduler step :math:`t` of a run of :math:`T` steps, with :math:`\eta_0` the
    optimizer's initial rates:

    .. math:: \eta_t = \eta_0 \, \frac{1 + \cos\left(\pi \min\left(1, t / T\right)\right)}{2}

    SGDR's cosine without restarts (Loshchilov & Hutter, "SGDR", ICLR 2017; ``CosineAnnealingLR``
    with ``eta_min=0``), in closed form, and staying at 0 past :math:`T` instead of climbing back.
    A fit resumed with another length sets :math:`T` to it (:meth:`replan`, done by
    :class:`~lightning_kd.callbacks.run_length.RunLength`): from the resume on, the rates are
    those of a run planned for the new length from the start.

    Args:
        optimizer: the optimizer whose rates it sets.
        total_steps: :math:`T`, the run's scheduler steps.
        last_epoch: the index of the last step taken (-1: a new run).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int, last_epoch: int = -1) -> None:
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}.")
        self.total_steps = total_steps
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        """The rates after step ``last_epoch`` (closed form, see the class docstring)."""
        progress = min(self.last_epoch / self.total_steps, 1.0)
        return [lr * (1 + math.cos(math.pi * progress)) / 2 for lr in self.base_lrs]

    def replan(self, total_steps: int) -> None:
        """Follow the cosine of a run of ``total_steps`` steps from the current step on."""
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}.")
        self.total_steps = total_steps
        for group, lr in zip(self.optimizer.param_groups, self.get_lr(), strict=True):
            if isinstance(group["lr"], torch.Tensor):  # a capturable optimizer's rate stays a tensor
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state; one saved as ``CosineAnnealingLR`` (the earlier default) plans ``T_max`` steps."""
        if "T_max" in state_dict and "total_steps" not in state_dict:
            state_dict = {**state_dict, "total_steps": state_dict["T_max"]}
        super().load_state_dict(state_dict)


def default_schedule(optimizer: torch.optim.Optimizer, trainer: pl.Trainer) -> CosineToZeroLR:
    """:class:`CosineToZeroLR` over the run's optimizer steps (``trainer.estimated_stepping_batches``)."""
    steps = trainer.estimated_stepping_batches
    if not math.isfinite(steps):
        raise ValueError(
            "The default cosine learning-rate decay ends at the run's last step, but this run has no end "
            f"(max_epochs={trainer.max_epochs}, max_steps={trainer.max_steps}, or a training set without a "
            "length): set max_epochs or max_steps, or pass cosine_decay=False or an lr_scheduler."
        )
    return CosineToZeroLR(optimizer, total_steps=max(int(steps), 1))


def check_equal_training_batches(trainer: pl.Trainer) -> None:
    """Raise a ``ValueError`` when the processes of a distributed fit have unequal training batch counts.

    Under DDP every optimizer step all-reduces the gradients of all processes: a process with
    more batches waits for the others at its extra steps (a hang) or pairs its collectives with
    theirs out of step. Lightning's ``DistributedSampler`` gives equal shares, but a sampler of
    the user's (``use_distributed_sampler=False``) or an ``IterableDataset`` split by hand may
    not. One all-gather of each process's ``num_training_batches`` at the start of the fit; a
    training set without a length (counted as unknown) is compared only with the others.
    """
    if trainer.world_size < 2:
        return
    count = trainer.num_training_batches
    mine = torch.tensor([count if math.isfinite(count) else -1], device=trainer.strategy.root_device)
    counts = [int(c) for c in trainer.strategy.all_gather(mine).reshape(-1).tolist()]
    if len(set(counts)) == 1:
        return
    shown = ", ".join(f"rank {rank}: {c if c >= 0 else 'unknown'}" for rank, c in enumerate(counts))
    raise ValueError(
        "The processes of this distributed fit have different numbers of training batches per epoch "
        f"({shown}): they would fall out of step (a hang, or gradients averaged across different steps). "
        "Give every process an equal share: a DistributedSampler (Lightning adds one unless "
        "use_distributed_sampler=False), drop_last=True in a sampler of your own, or equal shards of an "
        "IterableDataset "
        "(or limit_train_batches to the smallest count)."
    )


def check_training_data(trainer: pl.Trainer) -> None:
    """Fail loudly when the fit had no training batch (Lightning only logs "No training batches").

    Names the cause: an empty dataset, or fewer samples than one batch with ``drop_last=True``.
    """
    if trainer.num_training_batches != 0:
        return
    loaders = trainer.train_dataloader
    loaders = list(loaders.values()) if isinstance(loaders, dict) else loaders
    loaders = loaders if isinstance(loaders, list | tuple) else [loaders]
    source = (
        f"{type(trainer.datamodule).__name__}.train_dataloader()"
        if trainer.datamodule is not None
        else "the train_dataloaders given to Trainer.fit"
    )
    for loader in loaders:
        if not isinstance(loader, DataLoader) or not hasattr(loader.dataset, "__len__"):
            continue
        samples = len(loader.dataset)
        if samples == 0:
            raise ValueError(
                f"The training split is empty: {source} has a dataset of 0 samples, so nothing was "
                "trained. Check the datamodule's data path and split sizes (e.g. train_samples)."
            )
        if loader.drop_last and loader.batch_size and samples < loader.batch_size:
            raise ValueError(
                f"The training split gives no batch: {source} has {samples} samples, fewer than "
                f"batch_size={loader.batch_size} with drop_last=True. Lower the batch size or add data."
            )


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
