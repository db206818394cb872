"""What a checkpoint must match to be resumed: its frozen teacher and its student architecture.

The length of the run is the third thing a resume must follow: it is a callback,
:class:`~lightning_kd.callbacks.run_length.RunLength`, as it acts on the restored schedulers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from torch import Tensor
from torch.nn.parameter import is_lazy

from lightning_kd.teachers.fingerprints import teacher_fingerprint

if TYPE_CHECKING:  # the module imports this file
    from lightning_kd.module import DistillationModule

__all__ = ["FROZEN_TEACHER_KEY", "check_same_architecture", "check_same_teacher", "teacher_record"]

#: where a checkpoint records the frozen teacher it was trained with (its weights are left out)
FROZEN_TEACHER_KEY = "frozen_teacher"


def teacher_record(fingerprint: str, teacher_checkpoint: str | None) -> dict[str, str | None]:
    """What a checkpoint records of a frozen teacher: its fingerprint and the file it was loaded from.

    ``fingerprint`` is :func:`~lightning_kd.teachers.fingerprints.teacher_fingerprint`, the SHA-256 of
    the names, dtypes, shapes and bytes of its ``state_dict``.
    """
    return {"sha256": fingerprint, "teacher_checkpoint": teacher_checkpoint}


def check_same_teacher(module: DistillationModule, recorded: Mapping[str, Any] | None) -> None:
    """Raise a ``ValueError`` when a resumed fit's frozen teacher is not the one ``recorded``.

    Compared only when a Trainer resumes a fit: a checkpoint loaded for inference takes any
    ``teacher_checkpoint``, and one written before teachers were recorded has no record.

    Args:
        module: the module being restored; its teacher is the one it was built with.
        recorded: the checkpoint's :func:`teacher_record`, or ``None``.
    """
    trainer = module._trainer
    if recorded is None or trainer is None or trainer.state.fn != "fit":
        return
    if module.frozen_teacher_fingerprint is None:
        module.frozen_teacher_fingerprint = teacher_fingerprint(module.teacher)
    fingerprint = module.frozen_teacher_fingerprint
    if recorded["sha256"] == fingerprint:
        return

    def source(path: str | None) -> str:
        return f"teacher_checkpoint {path!r}" if path else "the teacher network passed to the module"

    before = recorded.get("teacher_checkpoint")
    raise ValueError(
        f"The checkpoint {str(trainer.ckpt_path)!r} was trained with another frozen teacher: it recorded "
        f"{source(before)} (SHA-256 {recorded['sha256'][:12]}...), but this module's teacher, "
        f"{source(module.teacher_checkpoint)}, has other weights (SHA-256 {fingerprint[:12]}...). Resuming "
        "would go on distilling from another teacher. Restore the teacher the run started with"
        + (f" (the file {before!r})" if before else "")
        + ", or start a fresh run (no ckpt_path); to go on from the student's weights under the new "
        "teacher, load them with `load_from_checkpoint(path, teacher_checkpoint=...)` and fit without "
        "ckpt_path (a new optimizer and schedule)."
    )


def check_same_architecture(module: DistillationModule, state: Mapping[str, Any]) -> None:
    """Raise a ``ValueError`` naming the entries of a checkpoint's ``state`` that do not fit ``module``.

    Parameters of another shape fail any load (``load_state_dict`` refuses them even
    non-strict); buffers are left to their modules, some of which resize them on load (the
    observers of quantization-aware training). Missing or unexpected ``student.`` entries are
    refused only in a Trainer's load with ``strict_loading``. A few of each are named, with both
    shapes. Under a strategy that restores after sharding the model (FSDP) the module's shapes
    are its shards': nothing is compared.
    """
    trainer = module._trainer
    if trainer is not None and trainer.strategy.restore_checkpoint_after_setup:
        return
    own = module.state_dict()
    strict = trainer is not None and module.strict_loading
    parameters = {name: p for name, p in module.named_parameters() if not is_lazy(p)}
    shapes = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs this module {tuple(p.shape)}"
        for k, p in parameters.items()
        if isinstance(state.get(k), Tensor) and state[k].shape != p.shape
    )
    missing = sorted(k for k in own.keys() - state.keys() if k.startswith("student.")) if strict else []
    unexpected = sorted(k for k in state.keys() - own.keys() if k.startswith("student.")) if strict else []
    if not (shapes or missing or unexpected):
        return
    found = [
        f"{len(entries)} {kind} {entries[:3]}"
        for kind, entries in (("of another shape", shapes), ("missing", missing), ("unexpected", unexpected))
        if entries
    ]
    where = f" {str(trainer.ckpt_path)!r}" if trainer is not None and trainer.ckpt_path else ""
    raise ValueError(
        f"The checkpoint{where} holds another student architecture than this module's "
        f"{type(module.student).__name__}: {', '.join(found)}. Build the module with the student "
        "configuration the checkpoint was trained with (the same recipe / model arguments), or start a "
        "fresh run (no ckpt_path) for this student; to reuse the tensors that fit, load them yourself with "
        "`student.load_state_dict(..., strict=False)`."
    )
