"""What the report callbacks share: where their files go, validation logits in, metrics and images out."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import move_data_to_device
from matplotlib.figure import Figure
from torch import Tensor, nn

from lightning_kd.model_io import call_model, logits_of

if TYPE_CHECKING:  # the module imports the callbacks package (FeatureHooks)
    from lightning_kd.module import DistillationModule

__all__ = [
    "beside_checkpoints",
    "collect_logits",
    "log_metrics",
    "output_directory",
    "save_and_log_figure",
    "validation_loader",
]


def beside_checkpoints(trainer: pl.Trainer) -> Path:
    """Where end-of-fit reports go: the checkpoint directory, else the log directory.

    Args:
        trainer: the running trainer.
    """
    checkpoint = trainer.checkpoint_callback
    if checkpoint is not None and getattr(checkpoint, "dirpath", None):
        return Path(checkpoint.dirpath)
    return Path(trainer.log_dir or trainer.default_root_dir)


def output_directory(trainer: pl.Trainer, directory: Path | None = None) -> Path:
    """Where a callback writes its files, created if missing: ``directory``, else :func:`beside_checkpoints`.

    Args:
        trainer: the trainer whose checkpoint (else log) directory is the default.
        directory: the directory the user chose, or ``None``.
    """
    directory = directory or beside_checkpoints(trainer)
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def validation_loader(trainer: pl.Trainer) -> Any:
    """A fresh validation loader of the datamodule (the whole split on every rank), else the trainer's.

    Args:
        trainer: the running trainer.
    """
    datamodule = trainer.datamodule
    if datamodule is not None and hasattr(datamodule, "val_dataloader"):
        return datamodule.val_dataloader()
    return trainer.val_dataloaders


@torch.no_grad()
def collect_logits(
    module: DistillationModule,
    loader: Any,
    max_samples: int | None = None,
    others: Mapping[str, nn.Module] | None = None,
) -> dict[str, Tensor]:
    """Logits of the student, the teacher and ``others`` over ``loader``, in eval mode under ``no_grad``.

    Returns a dict with ``"student"``, ``"teacher"`` (with a teacher), one entry per network of
    ``others`` (run on the student's inputs, e.g. a baseline student), and ``"targets"`` (for
    labelled batches); float32, on the module's device. With ``max_samples``, batches are read
    until that many samples are seen and every entry is cut to them.

    Args:
        module: a :class:`~lightning_kd.DistillationModule`.
        loader: the batches.
        max_samples: read until this many samples are seen; ``None``: all of ``loader``.
        others: further networks to run on the student's inputs, by name.
    """
    was_training = module.training
    module.eval()
    others = dict(others or {})
    trained_others = {name: network.training for name, network in others.items()}
    for network in others.values():
        network.eval()
    collected: dict[str, list[Tensor]] = {}
    seen = 0
    try:
        for batch in loader:
            batch = move_data_to_device(batch, module.device)
            inputs, targets = module.unpack_batch(batch)
            outputs = {"student": logits_of(call_model(module.student, inputs))}
            teacher_output = module.teacher_forward(module.teacher_inputs(batch, inputs))
            if teacher_output is not None:
                outputs["teacher"] = logits_of(teacher_output)
            for name, network in others.items():
                outputs[name] = logits_of(call_model(network, inputs))
            outputs = {name: logits.float() for name, logits in outputs.items()}
            if targets is not None:
                outputs["targets"] = targets
            for name, value in outputs.items():
                collected.setdefault(name, []).append(value)
            seen += len(outputs["student"])
            if max_samples is not None and seen >= max_samples:
                break
    finally:
        module.train(was_training)
        for name, network in others.items():
            network.train(trained_others[name])
    return {name: torch.cat(values)[:max_samples] for name, values in collected.items()}


def log_metrics(trainer: pl.Trainer, metrics: Mapping[str, float]) -> None:
    """Send ``metrics`` to every logger of ``trainer`` at the current global step.

    Args:
        trainer: the running trainer.
        metrics: name -> value.
    """
    for logger in trainer.loggers:
        logger.log_metrics(dict(metrics), step=trainer.global_step)


def save_and_log_figure(trainer: pl.Trainer, figure: Figure, directory: Path, name: str, key: str) -> Path:
    """Save ``figure`` as ``directory / f"{name}.png"`` and log it as image ``key`` to W&B / TensorBoard.

    Other loggers (CSV, ...) get the file only. Returns the path of the PNG.

    Args:
        trainer: the running trainer (its loggers).
        figure: the matplotlib figure.
        directory: where the PNG goes (created if missing).
        name: file name without ``.png``.
        key: the image's name in the loggers.
    """
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.png"
    figure.savefig(path, dpi=120)
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key=key, images=[str(path)])
        elif isinstance(logger, TensorBoardLogger):
            logger.experiment.add_figure(key, figure, global_step=trainer.global_step)
    return path
