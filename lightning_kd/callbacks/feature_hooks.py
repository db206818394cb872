"""FeatureHooks: the Lightning callback that captures the layers the loss terms read."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_kd.hooks import LayerHooks

__all__ = ["FeatureHooks"]

ROLES = ("student", "teacher")


class FeatureHooks(Callback):
    """Capture the outputs of named student / teacher layers during each forward pass.

    A thin Lightning adapter over :class:`~lightning_kd.hooks.LayerHooks`: the hooks are
    registered in :meth:`setup`, on the unwrapped ``pl_module.student`` and
    ``pl_module.teacher`` before any strategy wraps the model (DDP, FSDP) or it is compiled,
    and removed in :meth:`teardown`. Captured tensors are dropped at the end of every batch, so
    memory does not grow over an epoch. A :class:`~lightning_kd.DistillationModule` adds this
    callback itself for the layers its loss terms declare; the captured outputs reach the terms
    as ``StepOutputs.student_features`` / ``teacher_features``. Each hooked layer must run once
    per forward of its model: a layer called twice (a shared block) stops the forward with a
    ``RuntimeError`` naming it (``LayerHooks``' ``keep="once"``), rather than pairing its last call.

    Args:
        student_layers: dotted module paths in the student.
        teacher_layers: dotted module paths in the teacher.
    """

    def __init__(self, student_layers: Sequence[str] = (), teacher_layers: Sequence[str] = ()) -> None:
        self.layers: dict[str, tuple[str, ...]] = {
            "student": tuple(dict.fromkeys(student_layers)),
            "teacher": tuple(dict.fromkeys(teacher_layers)),
        }
        self.features: dict[str, dict[str, Any]] = {role: {} for role in ROLES}
        self._hooks: list[LayerHooks] = []

    @property
    def state_key(self) -> str:
        """Unique per configuration, so several instances can save state side by side."""
        return self._generate_state_key(**self.layers)

    @property
    def attached(self) -> bool:
        """Whether the hooks are registered."""
        return any(hooks.attached for hooks in self._hooks)

    def attach(self, pl_module: nn.Module) -> None:
        """Register the hooks on ``pl_module.student`` / ``pl_module.teacher``.

        Args:
            pl_module: the module whose ``student`` / ``teacher`` get the hooks.
        """
        self.detach()
        for role, paths in self.layers.items():
            if not paths:
                continue
            model = getattr(pl_module, role, None)
            if model is None:
                raise ValueError(
                    f"Layers {list(paths)} were requested on the {role}, but there is no {role}."
                )
            hooks = LayerHooks.on(model, paths, role).attach()
            self.features[role] = hooks.captured
            self._hooks.append(hooks)

    def detach(self) -> None:
        """Remove every hook and drop captured outputs."""
        for hooks in self._hooks:
            hooks.detach()
        self._hooks.clear()
        self.clear()

    def clear(self) -> None:
        """Drop the captured outputs (the hooks stay)."""
        for store in self.features.values():
            store.clear()

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Register the hooks before the strategy wraps the model."""
        self.attach(pl_module)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Remove the hooks."""
        self.detach()

    def on_train_batch_start(self, *args: Any, **kwargs: Any) -> None:
        """Start each step with no stale outputs."""
        self.clear()

    def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
        """Free the step's features (and their autograd graph) once the loss is done."""
        self.clear()

    on_validation_batch_end = on_train_batch_end
    on_test_batch_end = on_train_batch_end
    on_predict_batch_end = on_train_batch_end
