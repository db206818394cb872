"""CKAReport: linear CKA similarity between hooked student and teacher layers over training."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from matplotlib.figure import Figure
from torch import Tensor

from lightning_kd.callbacks.report.functional import linear_cka
from lightning_kd.callbacks.report.io import (
    collect_logits,
    log_metrics,
    output_directory,
    save_and_log_figure,
    validation_loader,
)
from lightning_kd.hooks import LayerHooks, find_layer

__all__ = ["CKAReport"]


class CKAReport(pl.Callback):
    """How similar student layers become to teacher layers: linear CKA over training, logged and plotted.

    Linear centered kernel alignment (Kornblith et al., "Similarity of Neural Network
    Representations Revisited", ICML 2019;
    :func:`~lightning_kd.callbacks.report.functional.linear_cka`) compares two layers' outputs on
    the same samples, whatever their widths: 1 means the same representation up to rotation and
    scale. For each ``(student_layer, teacher_layer)`` pair of dotted module paths, the outputs of
    both layers on the first ``num_samples`` validation samples (flattened per sample;
    :class:`~lightning_kd.hooks.LayerHooks` attached for the measurement only, eval mode,
    ``no_grad``) give one CKA value, logged as ``cka/<student_layer>-vs-<teacher_layer>``
    (characters valid as W&B and TensorBoard keys) through every logger:

    - at the start of training (0 epochs trained), then
    - after the validation of every ``every_n_epochs``-th epoch (x = epochs trained).

    The history is kept in the callback's ``state_dict``, so a resumed run continues the curve.
    At the end of fit, ``cka.png`` (CKA over epochs, one line per pair) is saved in
    ``directory`` (default: beside the checkpoints) and logged as an image to a W&B or
    TensorBoard logger. Runs on global rank 0 only; needs a module with ``student`` and
    ``teacher`` (a :class:`~lightning_kd.DistillationModule` with a teacher).

    Args:
        pairs: ``(student_layer, teacher_layer)`` dotted paths, e.g. ``[["features", "embedding"]]``.
        num_samples: validation samples per measurement (the first ones of the validation loader).
        every_n_epochs: measure after every n-th training epoch's validation.
        directory: where ``cka.png`` goes.
    """

    def __init__(
        self,
        pairs: Sequence[Sequence[str]],
        num_samples: int = 512,
        every_n_epochs: int = 1,
        directory: str | Path | None = None,
    ) -> None:
        super().__init__()
        self.pairs = [tuple(pair) for pair in pairs]
        if not self.pairs or any(
            len(pair) != 2 or not all(isinstance(p, str) for p in pair) for pair in self.pairs
        ):
            raise ValueError(
                f"pairs must be a non-empty list of [student_layer, teacher_layer] dotted paths, "
                f'got {pairs!r}; e.g. pairs=[["features", "embedding"]].'
            )
        if num_samples < 2:
            raise ValueError(f"num_samples must be >= 2 (CKA centres over samples), got {num_samples}.")
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}.")
        self.num_samples = num_samples
        self.every_n_epochs = every_n_epochs
        self.directory = Path(directory) if directory is not None else None
        #: metric key -> {epochs trained: CKA}
        self.history: dict[str, dict[int, float]] = {self.key(*pair): {} for pair in self.pairs}
        self.path: Path | None = None

    @staticmethod
    def key(student_layer: str, teacher_layer: str) -> str:
        """The logged name of a pair's CKA: ``cka/<student_layer>-vs-<teacher_layer>``.

        Args:
            student_layer: dotted path in the student.
            teacher_layer: dotted path in the teacher.
        """
        return f"cka/{student_layer}-vs-{teacher_layer}"

    @property
    def state_key(self) -> str:
        """Unique per configuration, so several instances can save state side by side."""
        return self._generate_state_key(pairs=self.pairs)

    # ----------------------------------------------------------------- measuring
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Fail before training when a layer path is wrong or there is no teacher."""
        for role in ("student", "teacher"):
            if getattr(pl_module, role, None) is None:
                raise ValueError(
                    f"CKAReport compares student and teacher layers, but the module has no {role}."
                )
        for student_layer, teacher_layer in self.pairs:
            find_layer(pl_module.student, student_layer, "student")
            find_layer(pl_module.teacher, teacher_layer, "teacher")

    def measure(self, pl_module: pl.LightningModule, loader: Any) -> dict[str, float]:
        """CKA of every pair on the first ``num_samples`` samples of ``loader``: ``{key: value}``.

        Args:
            pl_module: a module with ``student`` and ``teacher``.
            loader: validation batches.
        """
        with (
            LayerHooks.on(pl_module.student, [s for s, _ in self.pairs], "student", keep="all") as student,
            LayerHooks.on(pl_module.teacher, [t for _, t in self.pairs], "teacher", keep="all") as teacher,
        ):
            collect_logits(pl_module, loader, max_samples=self.num_samples)
        features = {
            (role, path): _stack(role, path, hooks.captured.get(path, []))[: self.num_samples]
            for role, hooks in (("student", student), ("teacher", teacher))
            for path in hooks.layers
        }
        found = len(next(iter(features.values())))
        if found < self.num_samples:
            rank_zero_warn(
                f"CKAReport: the validation data has {found} samples, fewer than "
                f"num_samples={self.num_samples}; CKA is measured on {found}."
            )
        return {
            self.key(s, t): linear_cka(features[("student", s)], features[("teacher", t)]).item()
            for s, t in self.pairs
        }

    def _record(self, trainer: pl.Trainer, pl_module: pl.LightningModule, epochs_trained: int) -> None:
        if not trainer.is_global_zero:
            return
        loader = validation_loader(trainer)
        if loader is None:
            rank_zero_warn("CKAReport needs validation data; CKA is not measured.")
            return
        values = self.measure(pl_module, loader)
        for key, value in values.items():
            self.history[key][epochs_trained] = value
        log_metrics(trainer, values)

    # ----------------------------------------------------------------- hooks
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Measure before training (a resumed run already has this point and skips it)."""
        if not any(trainer.current_epoch in points for points in self.history.values()):
            self._record(trainer, pl_module, trainer.current_epoch)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Measure after every ``every_n_epochs``-th epoch of training."""
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        epochs_trained = trainer.current_epoch + 1
        if epochs_trained % self.every_n_epochs == 0:
            self._record(trainer, pl_module, epochs_trained)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Draw, save and log ``cka.png``."""
        if not trainer.is_global_zero or not any(self.history.values()):
            return
        directory = output_directory(trainer, self.directory)
        self.path = save_and_log_figure(trainer, self.figure(), directory, "cka", "report/cka")

    def figure(self) -> Figure:
        """CKA over epochs trained, one line per pair."""
        figure = Figure(figsize=(6, 4), layout="constrained")
        axes = figure.add_subplot()
        for key, points in self.history.items():
            epochs = sorted(points)
            axes.plot(
                epochs, [points[e] for e in epochs], marker="o", markersize=3, label=key.removeprefix("cka/")
            )
        axes.set_ylim(0, 1.02)
        axes.set_xlabel("epochs trained")
        axes.set_ylabel("linear CKA (student vs teacher)")
        axes.set_title("Representation similarity over training")
        axes.legend(title="student layer -vs- teacher layer")
        axes.grid(alpha=0.3)
        return figure

    # ----------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The CKA history: ``{key: [[epochs_trained, value], ...]}``."""
        return {
            "history": {
                key: sorted([e, v] for e, v in points.items()) for key, points in self.history.items()
            }
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue the saved curve."""
        for key, points in state_dict["history"].items():
            self.history.setdefault(key, {}).update({int(e): float(v) for e, v in points})


def _stack(role: str, path: str, outputs: list[Any]) -> Tensor:
    """Every call's output of a hooked layer, flattened per sample, float32, one row per sample."""
    if not outputs or not all(isinstance(o, Tensor) for o in outputs):
        kinds = sorted({type(o).__name__ for o in outputs}) or ["nothing"]
        raise ValueError(
            f"CKAReport: {role} layer {path!r} gave {', '.join(kinds)} instead of a tensor; pick a "
            "layer whose output is one tensor (a submodule inside it, e.g. its last linear or activation)."
        )
    return torch.cat([o.detach().float().reshape(len(o), -1) for o in outputs])
