"""Setting up a distillation module's loss terms: their checks, their layer hooks, their adapters."""

from __future__ import annotations

from typing import Any

import torch

from lightning_kd.callbacks.feature_hooks import FeatureHooks
from lightning_kd.losses import LossTerm
from lightning_kd.module_setup import first_batch

__all__ = ["LossTermSetup"]


class LossTermSetup:
    """The loss-term set-up of :class:`~lightning_kd.DistillationModule` (a mixin of it).

    The terms are checked when the module is built; their layers are hooked and their
    adapters sized on one probe batch in ``setup``.
    """

    def _check_terms(self, terms: list[LossTerm]) -> None:
        if not terms:
            raise ValueError("`losses` is empty: give at least one loss term.")
        names = [term.name for term in terms]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(
                f"Loss term names must be unique; repeated: {duplicates}. Set `name=` on each term."
            )
        if self.teacher is None:
            needing = [t.name for t in terms if t.needs_teacher]
            if needing:
                raise ValueError(f"Loss terms {needing} need a teacher, but teacher is None.")
        else:
            self.teacher_role.check_terms(terms)

    def _declared_hooks(self) -> FeatureHooks | None:
        """FeatureHooks for exactly the layers that the loss terms declare (None if none)."""
        student_layers = [layer for term in self.loss_terms.values() for layer in term.student_layers]
        teacher_layers = [layer for term in self.loss_terms.values() for layer in term.teacher_layers]
        if not (student_layers or teacher_layers):
            return None
        return FeatureHooks(student_layers, teacher_layers)

    def probe_batch(self, stage: str) -> Any:
        """One batch to size the loss terms' adapters on: the first of the ``stage`` call's data, or ``None``.

        The data may come from a datamodule, dataloaders passed to the Trainer call, or the
        module's own ``*_dataloader`` methods (:func:`~lightning_kd.module_setup.first_batch`).
        """
        return first_batch(self.trainer, stage)

    def build_terms(self, batch: Any = None, *, inputs: Any = None) -> None:
        """Size every term that ``needs_build`` on one forward (eval mode, no gradients).

        Runs in :meth:`setup`; call it yourself before ``load_state_dict`` outside a Trainer.

        Args:
            batch: a batch as the dataloader gives it.
            inputs: instead of a batch, the student's input alone (e.g. ``example_input_array``);
                the teacher reads the same input.
        """
        if (batch is None) == (inputs is None):
            raise ValueError(
                "build_terms needs either `batch` (a dataloader batch) or `inputs` (a student input)."
            )
        pending = [term for term in self.loss_terms.values() if term.needs_build]
        if not pending:
            return
        attached_here = self.feature_hooks is None or not self.feature_hooks.attached
        if attached_here:
            self.feature_hooks = self._declared_hooks()
            if self.feature_hooks is not None:
                self.feature_hooks.attach(self)
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                outputs = self.step_outputs(batch) if inputs is None else self.outputs_of(inputs, None, None)
                for term in pending:
                    term.bind(self.student, self.teacher, self.loss_terms)
                    term.build(outputs)
            self._ddp_params_and_buffers_to_ignore = self._ddp_ignored()
        finally:
            self.train(was_training)
            if self.feature_hooks is not None and attached_here:
                self.feature_hooks.detach()
            elif self.feature_hooks is not None:
                self.feature_hooks.clear()
