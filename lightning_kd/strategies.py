"""FSDP for distillation: the student and the teacher in separate FSDP units, a frozen teacher unsharded."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.strategies import FSDPStrategy
from torch import nn
from torch.distributed.fsdp.wrap import CustomPolicy

from lightning_kd.teachers.roles import FrozenTeacher

__all__ = ["DistillationFSDPStrategy", "distillation_wrap_policy"]


def distillation_wrap_policy(
    module: pl.LightningModule, layer_classes: Iterable[type[nn.Module]] = (), wrap_teacher: bool = True
) -> CustomPolicy:
    """An FSDP auto-wrap policy with the student and the teacher as units of their own.

    Zhao et al., "PyTorch FSDP: Experiences on Scaling Fully Sharded Data Parallel", VLDB 2023:
    a unit's parameters are flattened together, so frozen and trainable parameters must not
    share one. Units: ``module.student``, ``module.teacher`` (if ``wrap_teacher``) and, inside
    them, every instance of ``layer_classes`` (e.g. transformer blocks of a large model); the
    rest (loss-term adapters) stays in the root unit.
    """
    layer_types = tuple(layer_classes)
    student = module.student
    teacher = getattr(module, "teacher", None) if wrap_teacher else None

    def wrap(submodule: nn.Module) -> bool:
        if submodule is student or (teacher is not None and submodule is teacher):
            return True
        return bool(layer_types) and isinstance(submodule, layer_types)

    return CustomPolicy(wrap)


class DistillationFSDPStrategy(FSDPStrategy):
    """Lightning's ``FSDPStrategy`` that keeps a distillation's frozen and trainable weights apart.

    At setup, for a :class:`~lightning_kd.DistillationModule` (anything with ``student`` /
    ``teacher`` attributes): the student becomes an FSDP unit of its own
    (:func:`distillation_wrap_policy`); a teacher that gets no gradients (``"frozen"``) is left
    out of FSDP (``ignored_modules``: every process holds the whole teacher, no all-gather in its
    forward) or, with ``shard_teacher=True``, sharded as a unit of its own (for teachers too
    large for one device). A co-trained teacher is always a unit of its own. Other arguments go
    to ``FSDPStrategy`` (``sharding_strategy``, ``mixed_precision``, ``cpu_offload``, ...);
    ``use_orig_params`` stays ``True`` (the module's optimizer is built from the original
    parameters). Multi-node: ``Trainer(num_nodes=N, devices=G, strategy=...)``.

    ``teacher_mode="ema"`` is not supported: the EMA update reads the student's whole
    parameters, which FSDP shards; use ``strategy="ddp"``.

    Args:
        layer_classes: classes of layers to make units of their own inside the student and a
            sharded teacher (e.g. ``{TransformerBlock}``).
        shard_teacher: shard a frozen teacher as its own unit instead of replicating it.
        **kwargs: passed to :class:`~lightning.pytorch.strategies.FSDPStrategy`.
    """

    def __init__(
        self, layer_classes: Iterable[type[nn.Module]] = (), shard_teacher: bool = False, **kwargs: Any
    ) -> None:
        taken = sorted({"auto_wrap_policy", "ignored_modules", "ignored_states"} & kwargs.keys())
        if taken:
            raise ValueError(
                f"DistillationFSDPStrategy sets {taken} itself from the student and teacher; use "
                "`layer_classes=` for more units, or lightning's FSDPStrategy to set them by hand."
            )
        if kwargs.get("use_orig_params") is False:
            raise ValueError(
                "use_orig_params=False is not supported: the optimizer uses the original parameters."
            )
        super().__init__(**kwargs)
        self.layer_classes = tuple(layer_classes)
        self.shard_teacher = shard_teacher

    def setup(self, trainer: pl.Trainer) -> None:
        """Set the wrap policy and the ignored teacher from the module, then wrap it."""
        module = trainer.lightning_module
        if not hasattr(module, "student"):
            raise ValueError(
                f"DistillationFSDPStrategy needs a module with a `student` (a DistillationModule), "
                f"got {type(module).__name__}; use lightning's FSDPStrategy for other modules."
            )
        teacher = getattr(module, "teacher", None)
        role = getattr(module, "teacher_role", FrozenTeacher())
        if teacher is not None and role.copies_student:
            raise ValueError(
                f"teacher_mode={role.mode!r} cannot run under FSDP: the teacher follows the student's whole "
                "parameters, which FSDP shards. Use strategy='ddp'."
            )
        ignore_teacher = teacher is not None and not role.receives_gradients and not self.shard_teacher
        self.kwargs["auto_wrap_policy"] = distillation_wrap_policy(
            module, self.layer_classes, wrap_teacher=not ignore_teacher
        )
        self.kwargs["ignored_modules"] = [teacher] if ignore_teacher else []
        super().setup(trainer)
