"""CTKD's curriculum: the strength of the temperature's gradient reversal, 0 -> 1 over the first epochs."""

from __future__ import annotations

from collections.abc import Sequence

import lightning.pytorch as pl

from lightning_kd.callbacks.scheduled_value import Interval, Schedule, ScheduledValue

__all__ = ["ReversalStrengthSchedule"]


class ReversalStrengthSchedule(ScheduledValue):
    r"""Drive ``strength`` (:math:`\lambda`) of the :class:`~lightning_kd.losses.CTKDTerm` named ``term``.

    Li et al., "Curriculum Temperature for Knowledge Distillation", AAAI 2023: the defaults are the
    authors' cosine curriculum (``--cosine_decay 1 --decay_max 0 --decay_min -1 --decay_loops 10``
    in ``scripts/run_cifar_distill.sh`` of ``zhengli97/CTKD``),
    :math:`\lambda_e = \tfrac12 (1 - \cos(\pi \min(e / 10, 1)))` at epoch :math:`e`, logged as
    ``kd/strength_<term>``. Lightning counts epochs from 0 and the authors' loop from 1, so their
    :math:`\lambda` runs one epoch ahead (0.024 in their first epoch, 0 here; 1 from their epoch 10,
    our epoch 10, i.e. the 11th). State is saved in checkpoints.

    Args:
        term: name of the CTKD term.
        start: strength at the beginning (>= 0).
        end: strength after ``total`` epochs/steps (>= 0).
        schedule: ``constant``, ``linear``, ``cosine``, ``step`` or ``exponential``.
        interval: ``epoch`` or ``step``.
        total: length of the curriculum (10 epochs).
        milestones: for ``step``: where the strength is multiplied by ``gamma``.
        gamma: for ``step``: the factor.

    Raises:
        ValueError: ``start`` or ``end`` negative; (at set-up) no term ``term``, or one without ``strength``.
    """

    def __init__(
        self,
        term: str = "ctkd",
        start: float = 0.0,
        end: float | None = 1.0,
        schedule: Schedule = "cosine",
        interval: Interval = "epoch",
        total: int | None = 10,
        milestones: Sequence[int] = (),
        gamma: float = 0.1,
    ) -> None:
        for label, value in (("start", start), ("end", end)):
            if value is not None and value < 0:
                raise ValueError(f"ReversalStrengthSchedule {label} must be >= 0 (a strength), got {value}.")
        super().__init__(start, end, schedule, interval, total, milestones, gamma)
        self.term = term
        self.log_name = f"kd/strength_{term}"

    @property
    def state_key(self) -> str:
        """Unique per configuration, so several instances can save state side by side."""
        return self._generate_state_key(term=self.term)

    def apply(self, pl_module: pl.LightningModule, value: float) -> None:
        """Set the term's reversal strength.

        Args:
            pl_module: the module whose CTKD term gets the strength.
            value: the strength now.
        """
        loss_terms = getattr(pl_module, "loss_terms", {})
        term = loss_terms[self.term] if self.term in loss_terms else None
        if term is None or not hasattr(term, "strength"):
            ctkd_terms = [name for name, t in loss_terms.items() if hasattr(t, "strength")]
            raise ValueError(
                f"ReversalStrengthSchedule: no CTKD term named {self.term!r} (a term with a reversal "
                f"strength); CTKD terms: {ctkd_terms}, all terms: {list(loss_terms)}."
            )
        term.strength = value
