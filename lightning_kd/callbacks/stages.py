"""Multi-stage distillation: per-stage loss weights and trainable parameters within one fit."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.optim import Optimizer

from lightning_kd.losses.base import checked_weight

__all__ = ["DistillationStages", "Stage"]


@dataclass
class Stage:
    """One stage of a multi-stage method.

    Args:
        epochs: length of the stage; ``None`` for the last stage (until the end of the fit).
        weights: loss-term weights during the stage; every term not listed has weight 0. ``None``
            keeps the weights the terms were configured with.
        trainable: dotted prefixes of the module's parameters that this stage trains (e.g.
            ``["student"]``, ``["loss_terms.ft.paraphraser"]``); ``None`` trains all of them.
    """

    epochs: int | None = None
    weights: dict[str, float] | None = None
    trainable: list[str] | None = None


def _under(path: str, prefixes: Sequence[str]) -> bool:
    return any(path == p or path.startswith(p + ".") for p in prefixes)


class DistillationStages(Callback):
    """Run stages (e.g. an init stage, then the main stage) inside one ``fit``.

    FitNets, activation boundaries, FSP and factor transfer first train some parts on a
    distillation loss alone (the CRD benchmark's 30-epoch "init" phase), then train the
    student. At each stage's first epoch this callback sets the term weights; parameters not
    trainable in the stage keep their values: their gradients are dropped before every
    optimizer step (optimizers skip parameters without a gradient, so neither momentum nor
    weight decay moves them) and their BatchNorm layers run in eval mode.

    Under DDP no parameter is left unused: every term is evaluated at every step (a weight of
    0 keeps it in the graph), so all trainable parameters receive a gradient and the reducer
    needs no ``find_unused_parameters``; the frozen ones are then skipped by the optimizer.
    Unlike the benchmark, one optimizer and learning-rate schedule span all stages. The stage
    follows from ``trainer.current_epoch``, so a resumed run continues in the right stage.
    Do not combine with a :class:`LossWeightSchedule` on the same term.

    Args:
        stages: the stages in order; all but the last need ``epochs``.
    """

    def __init__(self, stages: Sequence[Stage | dict[str, Any]]) -> None:
        self.stages = [s if isinstance(s, Stage) else Stage(**s) for s in stages]
        if not self.stages:
            raise ValueError("DistillationStages needs at least one stage.")
        for number, stage in enumerate(self.stages):
            for term, weight in (stage.weights or {}).items():
                checked_weight(weight, term, f"Stage {number} weight")
        for number, stage in enumerate(self.stages[:-1]):
            if stage.epochs is None or stage.epochs <= 0:
                raise ValueError(
                    f"Stage {number} needs a positive number of epochs (only the last may omit it)."
                )
        self.configured_weights: dict[str, float] = {}
        self.current: int | None = None
        self._frozen_norms: list[nn.Module] = []

    def stage_at(self, epoch: int) -> int:
        """Index of the stage that contains ``epoch``.

        Args:
            epoch: a training epoch (0-based).
        """
        start = 0
        for number, stage in enumerate(self.stages):
            if stage.epochs is None or epoch < start + stage.epochs:
                return number
            start += stage.epochs
        return len(self.stages) - 1

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Remember the configured weights and check names (after the module built its adapters)."""
        terms = getattr(pl_module, "loss_terms", {})
        self.configured_weights = {name: term.weight for name, term in terms.items()}
        parameter_names = [name for name, _ in pl_module.named_parameters()]
        for number, s in enumerate(self.stages):
            unknown = sorted(set(s.weights or {}) - set(terms))
            if unknown:
                raise ValueError(
                    f"Stage {number} weights unknown loss terms {unknown}; terms: {list(terms)}."
                )
            for prefix in s.trainable or []:
                if not any(_under(name, [prefix]) for name in parameter_names):
                    raise ValueError(
                        f"Stage {number}: no parameter under {prefix!r}. Use a dotted prefix such as "
                        "'student' or 'loss_terms.<term>' (see module.named_parameters())."
                    )

    def _enter(self, number: int, pl_module: pl.LightningModule) -> None:
        stage = self.stages[number]
        for name, term in pl_module.loss_terms.items():
            term.weight = (
                self.configured_weights[name] if stage.weights is None else stage.weights.get(name, 0.0)
            )
        if self._frozen_norms:  # back to train mode; the module's train() keeps a fixed teacher in eval
            pl_module.train(pl_module.training)
        self._frozen_norms = []
        if stage.trainable is not None:
            self._frozen_norms = [
                module
                for path, module in pl_module.named_modules()
                if isinstance(module, nn.modules.batchnorm._BatchNorm) and not _under(path, stage.trainable)
            ]
        self.current = number

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Enter the stage of this epoch; log its index as ``kd/stage``."""
        number = self.stage_at(trainer.current_epoch)
        if number != self.current:
            self._enter(number, pl_module)
        pl_module.log("kd/stage", float(number), on_step=False, on_epoch=True)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        """Keep the frozen parts' BatchNorm statistics fixed (Lightning re-enables train mode)."""
        for module in self._frozen_norms:
            module.eval()

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        """Drop the gradients of parameters this stage does not train."""
        trainable = self.stages[self.current or 0].trainable
        if trainable is None:
            return
        for name, parameter in pl_module.named_parameters():
            if parameter.grad is not None and not _under(name, trainable):
                parameter.grad = None

    def state_dict(self) -> dict[str, Any]:
        """The current stage, for inspection: a resumed run derives it from the epoch again."""
        return {"current": self.current}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Re-enter the stage at the next epoch start, re-applying its weights and frozen parts."""
        self.current = None
