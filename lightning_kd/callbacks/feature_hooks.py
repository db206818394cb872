"""Capture intermediate outputs of named submodules with forward hooks."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch._dynamo.eval_frame import OptimizedModule
from torch.utils.hooks import RemovableHandle

__all__ = ["FeatureHooks", "find_layer", "uncompiled"]

ROLES = ("student", "teacher")


def uncompiled(model: nn.Module) -> nn.Module:
    """The module that ``torch.compile(model)`` wraps, or ``model`` itself when it is not compiled.

    The compiled wrapper runs the original module, so hooks on its submodules still fire; their
    paths are the original ones (``"layer3"``, not ``"_orig_mod.layer3"``).
    """
    return model._orig_mod if isinstance(model, OptimizedModule) else model


def find_layer(model: nn.Module, path: str, role: str = "model") -> nn.Module:
    """Return the submodule of ``model`` at dotted ``path`` (``"layer3.1.conv2"``).

    A model wrapped by ``torch.compile`` is searched by its original paths (see :func:`uncompiled`).

    Raises:
        ValueError: the path names no submodule; the message lists the closest names.
    """
    model = uncompiled(model)
    modules = dict(model.named_modules())
    if path in modules and path != "":
        return modules[path]
    names = [name for name in modules if name]
    closest = difflib.get_close_matches(path, names, n=5, cutoff=0.3)
    top_level = [name for name in names if "." not in name]
    raise ValueError(
        f"Unknown {role} layer {path!r} in {type(model).__name__}. "
        f"Closest module names: {closest or 'none'}; top-level modules: {top_level}. "
        f"Use a dotted path from `{role}.named_modules()`."
    )


class FeatureHooks(Callback):
    """Capture the outputs of named student / teacher layers during each forward pass.

    Hooks are registered in :meth:`setup`, on the unwrapped ``pl_module.student`` and
    ``pl_module.teacher`` before any strategy wraps the model (DDP, FSDP) or it is
    compiled, and removed in :meth:`teardown`. Captured tensors are dropped at the end of
    every batch, so memory does not grow over an epoch. A
    :class:`~lightning_kd.DistillationModule` adds this callback itself for the layers its
    loss terms declare; the captured outputs reach the terms as
    ``StepOutputs.student_features`` / ``teacher_features``.

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
        self._handles: list[RemovableHandle] = []

    @property
    def state_key(self) -> str:
        """Unique per configuration, so several instances can save state side by side."""
        return self._generate_state_key(**self.layers)

    @property
    def attached(self) -> bool:
        """Whether the hooks are registered."""
        return bool(self._handles)

    def attach(self, pl_module: nn.Module) -> None:
        """Register the hooks on ``pl_module.student`` / ``pl_module.teacher``."""
        self.detach()
        for role, paths in self.layers.items():
            if not paths:
                continue
            model = getattr(pl_module, role, None)
            if model is None:
                raise ValueError(
                    f"Layers {list(paths)} were requested on the {role}, but there is no {role}."
                )
            for path in paths:
                layer = find_layer(model, path, role)
                self._handles.append(layer.register_forward_hook(self._capture(role, path)))

    def detach(self) -> None:
        """Remove every hook and drop captured outputs."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.clear()

    def clear(self) -> None:
        """Drop the captured outputs (the hooks stay)."""
        for store in self.features.values():
            store.clear()

    def _capture(self, role: str, path: str) -> Callable[[nn.Module, Any, Any], None]:
        store = self.features[role]

        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            store[path] = output

        return hook

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
