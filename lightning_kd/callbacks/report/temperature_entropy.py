"""TemperatureEntropyReport: how the temperature softens the teacher's soft labels."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn
from matplotlib.figure import Figure

from lightning_kd.callbacks.report.functional import non_argmax_probability, soft_label_entropy
from lightning_kd.callbacks.report.io import (
    collect_logits,
    log_metrics,
    output_directory,
    save_and_log_figure,
    validation_loader,
)

__all__ = ["TemperatureEntropyReport"]


class TemperatureEntropyReport(pl.Callback):
    r"""The effect of the temperature on the teacher's soft labels, measured once at the start of fit.

    Hinton et al. ("Distilling the Knowledge in a Neural Network", 2015) soften the teacher's
    predictions with a temperature :math:`T`, :math:`p = \mathrm{softmax}(z / T)`, so that the
    student also learns from the probabilities of the wrong classes. For every :math:`T` of
    ``temperatures``, on the teacher's logits over the validation data (the teacher is fixed,
    so once, at the start of training, on global rank 0):

    - the mean entropy :math:`H(p)` in nats
      (:func:`~lightning_kd.callbacks.report.functional.soft_label_entropy`), logged as
      ``soft_labels/entropy_T<T>``, and as a fraction of its maximum :math:`\log C`,
      ``soft_labels/entropy_fraction_T<T>``;
    - the mean probability of a non-top-1 class, the "dark knowledge"
      (:func:`~lightning_kd.callbacks.report.functional.non_argmax_probability`),
      ``soft_labels/non_argmax_prob_T<T>``.

    ``temperature_entropy.png`` (both against :math:`T`, with the training temperature of the
    module's first loss term that has a ``temperature`` marked) is saved in ``directory``
    (default: beside the checkpoints) and logged as an image to a W&B or TensorBoard logger.
    The numbers are kept in :attr:`results` (``{T: (entropy, fraction, non_argmax)}``).

    Args:
        temperatures: the grid of temperatures (> 0).
        directory: where ``temperature_entropy.png`` goes.
    """

    def __init__(
        self, temperatures: Sequence[float] = (1.0, 2.0, 4.0, 8.0, 16.0), directory: str | Path | None = None
    ) -> None:
        super().__init__()
        self.temperatures = sorted(float(t) for t in temperatures)
        if not self.temperatures or self.temperatures[0] <= 0:
            raise ValueError(
                f"temperatures must be a non-empty list of values > 0, got {list(temperatures)}."
            )
        self.directory = Path(directory) if directory is not None else None
        self.results: dict[float, tuple[float, float, float]] = {}
        self.training_temperature: float | None = None
        self.path: Path | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Measure the teacher's soft labels over the grid; log, draw and save."""
        if not trainer.is_global_zero:
            return
        loader = validation_loader(trainer)
        if getattr(pl_module, "teacher", None) is None or loader is None:
            rank_zero_warn(
                "TemperatureEntropyReport needs a teacher and validation data; nothing is measured."
            )
            return
        teacher = collect_logits(pl_module, loader)["teacher"]
        max_entropy = math.log(teacher.shape[-1])
        self.results = {}
        logged = {}
        for t in self.temperatures:
            entropy = soft_label_entropy(teacher, t).item()
            fraction = entropy / max_entropy if max_entropy > 0 else 0.0
            non_argmax = non_argmax_probability(teacher, t).item()
            self.results[t] = (entropy, fraction, non_argmax)
            logged[f"soft_labels/entropy_T{t:g}"] = entropy
            logged[f"soft_labels/entropy_fraction_T{t:g}"] = fraction
            logged[f"soft_labels/non_argmax_prob_T{t:g}"] = non_argmax
        log_metrics(trainer, logged)
        terms = getattr(pl_module, "loss_terms", {})
        self.training_temperature = next(
            (float(term.temperature) for term in terms.values() if hasattr(term, "temperature")), None
        )
        directory = output_directory(trainer, self.directory)
        figure = self.figure(teacher.shape[-1])
        self.path = save_and_log_figure(
            trainer, figure, directory, "temperature_entropy", "report/temperature_entropy"
        )

    def figure(self, num_classes: int) -> Figure:
        """Entropy and non-top-1 probability against the temperature (log2 axis).

        Args:
            num_classes: classes of the teacher (the limits ``log C`` and ``1 / C``).
        """
        figure = Figure(figsize=(9, 3.5), layout="constrained")
        temperatures = list(self.results)
        panels = [
            (
                "soft-label entropy (nats)",
                [v[0] for v in self.results.values()],
                math.log(num_classes),
                "log C",
            ),
            (
                "mean non-top-1 probability",
                [v[2] for v in self.results.values()],
                1 / num_classes,
                "1 / C (uniform)",
            ),
        ]
        for i, (label, values, limit, limit_label) in enumerate(panels):
            axes = figure.add_subplot(1, 2, i + 1)
            axes.plot(temperatures, values, marker="o")
            axes.axhline(limit, color="gray", linestyle="--", label=limit_label)
            if self.training_temperature is not None:
                axes.axvline(
                    self.training_temperature,
                    color="tab:red",
                    linestyle=":",
                    label=f"training T = {self.training_temperature:g}",
                )
            axes.set_xscale("log", base=2)
            axes.set_xticks(temperatures, labels=[f"{t:g}" for t in temperatures])
            axes.minorticks_off()
            axes.set_xlabel("temperature T")
            axes.set_ylabel(label)
            axes.set_ylim(0, 1.08 * limit)
            axes.legend()
        figure.suptitle("Teacher's soft labels on validation data")
        return figure
