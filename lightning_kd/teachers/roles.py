"""Teacher roles: how a teacher takes part in training (ingredient 2 of the survey: who teaches whom).

A :class:`~lightning_kd.DistillationModule` holds its teacher network as ``module.teacher`` and
asks its role everything that depends on the paradigm: how to run the teacher, whether it gets
gradients, what DDP ignores, what goes into a checkpoint, and what happens after an optimizer
step. The YAML argument ``teacher_mode`` names the role; :func:`teacher_role` is the one place
that reads that string.

- :class:`FrozenTeacher` (``"frozen"``): a fixed, pretrained teacher (offline distillation).
- :class:`CachedTeacher` (``"frozen"`` with a ``teacher_cache``): a frozen teacher whose training
  outputs are computed once and served from disk.
- :class:`ViewCachedTeacher` (``"frozen"`` with a :class:`~lightning_kd.TeacherViewCache`): the
  same for replayed augmented views (FKD, Shen & Xing, ECCV 2022).
- :class:`CoTrainedTeacher` (``"trainable"``): optimised with the student (online distillation).
- :class:`EMATeacher` (``"ema"``): a moving average of the student (mean teacher, Tarvainen &
  Valpola, NeurIPS 2017).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.utils.data import default_collate

from lightning_kd.losses import CrossEntropyTerm, LossTerm
from lightning_kd.model_io import call_model
from lightning_kd.teachers.cache import TeacherOutputCache
from lightning_kd.teachers.fingerprints import (
    dataset_fingerprint,
    input_signature,
    teacher_fingerprint,
    unwrapped_dataset,
)
from lightning_kd.teachers.loading import freeze, load_weights
from lightning_kd.teachers.view_cache import TeacherViewCache, view_cache_fingerprint

if TYPE_CHECKING:  # the module imports this file
    from lightning_kd.module import DistillationModule

__all__ = [
    "TEACHER_MODES",
    "CachedTeacher",
    "CoTrainedTeacher",
    "EMATeacher",
    "FrozenTeacher",
    "TeacherRole",
    "ViewCachedTeacher",
    "teacher_role",
]


class TeacherRole:
    """How a teacher takes part in training; the base class is a frozen teacher's behaviour.

    Attributes:
        mode: the ``teacher_mode`` string that selects this role.
        receives_gradients: the teacher is optimised with the student (in the optimizer,
            synchronised by DDP, trained mode during training).
        restored_from_source: the teacher's weights come from outside the run (its constructor
            and ``teacher_checkpoint``), so checkpoints leave them out unless ``save_teacher``.
        copies_student: the teacher is made from the student (it needs the student's whole
            weights, which rules out sharding and quantising the student alone).
    """

    mode: ClassVar[str]
    receives_gradients: ClassVar[bool] = False
    restored_from_source: ClassVar[bool] = True
    copies_student: ClassVar[bool] = False

    def make_teacher(
        self, student: nn.Module, teacher: nn.Module | None, checkpoint: str | Path | None
    ) -> nn.Module | None:
        """The teacher network this role trains with: ``teacher``, loaded from ``checkpoint`` and set up."""
        if teacher is None:
            if checkpoint is not None:
                raise ValueError("teacher_checkpoint is set but there is no teacher: pass `teacher` as well.")
            return None
        if checkpoint is not None:
            try:
                load_weights(teacher, checkpoint)
            except FileNotFoundError as error:
                raise FileNotFoundError(
                    f"{error} A module reloaded from a checkpoint reads the teacher from the path recorded "
                    f"there ({str(checkpoint)!r}): pass another with "
                    "`load_from_checkpoint(path, teacher_checkpoint=...)`."
                ) from None
        return teacher if self.receives_gradients else freeze(teacher)

    def check_terms(self, terms: Sequence[LossTerm]) -> None:
        """Raise if ``terms`` cannot train this role's teacher and student (nothing to check here)."""

    def default_terms(self) -> list[LossTerm]:
        """Terms this role adds to the default objective (none here)."""
        return []

    def on_train_start(self, module: DistillationModule) -> None:
        """Prepare for training once the Trainer is set up (nothing here)."""

    def on_train_epoch_end(self, module: DistillationModule) -> None:
        """Finish a training epoch (nothing here)."""

    def on_train_end(self, module: DistillationModule) -> None:
        """Finish training (nothing here)."""

    def before_transfer(self, module: DistillationModule, batch: Any) -> None:
        """Read what the role needs from a training ``batch`` while it is on the host (nothing by default)."""

    def training_outputs(
        self, module: DistillationModule, batch: Any, inputs: Any
    ) -> tuple[Any, dict | None]:
        """The teacher's output in a training step, and its hooked features (``None``: the hooks' own)."""
        return module.teacher_forward(module.teacher_inputs(batch, inputs)), None

    def forward(self, teacher: nn.Module, inputs: Any) -> Any:
        """The teacher's output on ``inputs``: under ``no_grad`` unless it receives gradients."""
        if self.receives_gradients:
            return call_model(teacher, inputs)
        with torch.no_grad():
            return call_model(teacher, inputs)

    def in_checkpoint(self, save_teacher: bool) -> bool:
        """Whether checkpoints hold the teacher's weights."""
        return save_teacher or not self.restored_from_source

    def ddp_ignores_teacher(self) -> bool:
        """Whether DDP leaves the teacher alone (no broadcast, no gradient all-reduce)."""
        return not self.receives_gradients

    def after_optimizer_step(self, student: nn.Module, teacher: nn.Module) -> None:
        """Update the teacher once the student has stepped (nothing here)."""

    def forget_tensors(self) -> None:
        """Drop references to tensors, which are about to be moved or cast (nothing held here)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class FrozenTeacher(TeacherRole):
    """A fixed, pretrained teacher (``teacher_mode="frozen"``), as in Hinton et al. (2015).

    Eval mode at all times, ``requires_grad=False``, forward under ``no_grad``, outside the
    optimizer and ignored by DDP; left out of checkpoints unless ``save_teacher=True`` (a loaded
    checkpoint gets the teacher from its own source).
    """

    mode = "frozen"


class CachedTeacher(FrozenTeacher):
    """A frozen teacher whose training outputs come from a :class:`~lightning_kd.TeacherOutputCache`.

    The first epoch runs the teacher and stores its logits (and the hooked features the terms
    read) by sample index; later epochs read them back, skipping the teacher's forward.
    Validation and test always run the teacher. Every sample is stored and served with the
    :func:`~lightning_kd.teachers.fingerprints.input_signature` of the teacher's input, computed on
    the batch's device, so a sample whose data changed is not served another input's outputs.

    Args:
        cache: where the outputs are stored.
    """

    def __init__(self, cache: TeacherOutputCache) -> None:
        self.cache = cache
        self._indices: Tensor | None = None  # the next training batch's sample indices, read on the host

    def on_train_start(self, module: DistillationModule) -> None:
        """Open the cache for this teacher and training set (rebuilt if either changed)."""
        trainer = module.trainer
        dataset = unwrapped_dataset(trainer.train_dataloader.dataset)
        fingerprint = f"{teacher_fingerprint(module.teacher)}|{dataset_fingerprint(dataset)}"
        probe = trainer.strategy.batch_to_device(default_collate([dataset[0]]), module.device)
        inputs, _ = module.unpack_batch(probe)
        logits = module.prediction_of(module.teacher_forward(module.teacher_inputs(probe, inputs)))
        features = module.feature_hooks.features["teacher"] if module.feature_hooks is not None else {}
        layers = [layer for term in module.loss_terms.values() for layer in term.teacher_layers]
        self.cache.open(
            fingerprint, len(dataset), logits, {path: features[path] for path in layers}, trainer.strategy
        )
        self.warn_if_resumed_in_memory(trainer)
        if module.feature_hooks is not None:
            module.feature_hooks.clear()

    def warn_if_resumed_in_memory(self, trainer: Any) -> None:
        """Say once that a resumed fit with an in-memory cache (not in checkpoints) is not exact."""
        if self.cache.directory is None and trainer.ckpt_path is not None:
            rank_zero_warn(
                f"This fit resumes from {trainer.ckpt_path} with an in-memory {type(self.cache).__name__} "
                "(directory=None), which checkpoints do not hold: the teacher runs again to refill it, in "
                "other batches than the first fit's, so its outputs (and the resumed fit) may differ from "
                "the uninterrupted fit's in the last bits. Give the cache a directory for an exact resume."
            )

    def before_transfer(self, module: DistillationModule, batch: Any) -> None:
        """Read (and check) the batch's sample indices on the host: the step then waits for no device."""
        self._indices = self.cache.indices_of(batch)

    def training_outputs(self, module: DistillationModule, batch: Any, inputs: Any) -> tuple[Tensor, dict]:
        """The teacher's logits and hooked features from the cache; on a miss, the teacher's (then stored)."""
        indices, self._indices = self._indices, None
        if indices is None:  # called outside a Trainer's loop: read them here
            indices = self.cache.indices_of(batch)
        teacher_inputs = module.teacher_inputs(batch, inputs)
        signature = input_signature(teacher_inputs, len(indices))
        found = self.cache.lookup(indices, signature, module.device)
        if found is not None:
            return found
        output = module.teacher_forward(teacher_inputs)
        if not isinstance(output, Tensor):
            raise TypeError(
                f"teacher_cache stores logits, but the teacher returns a {type(output).__name__}; terms that "
                "read more than the logits (ensembles, teacher_output) need teacher_cache=None."
            )
        features = module.feature_hooks.features["teacher"] if module.feature_hooks is not None else {}
        self.cache.store(indices, output, features, signature)
        # the values as stored (rounded, top-k, or another process's first write): the targets of a
        # sample never depend on whether it was stored before this step, so a resumed run is exact
        return self.cache.served(indices, module.device)

    def on_train_epoch_end(self, module: DistillationModule) -> None:
        """Check the epoch's inputs and flush the cache; it is complete once every sample is stored."""
        self.cache.finish_epoch(module.trainer.strategy)

    def on_train_end(self, module: DistillationModule) -> None:
        """Release the cache directory's lock."""
        self.cache.release()

    def __repr__(self) -> str:
        return f"CachedTeacher({self.cache!r})"


class ViewCachedTeacher(CachedTeacher):
    """A frozen teacher whose soft labels on replayed augmented views come from a :class:`TeacherViewCache`.

    The training set must be :class:`~lightning_kd.data.ReplayedViews` (batches carry each item's
    sample index, view and view parameters). A batch whose views are all stored skips the
    teacher; any other runs it and stores its views. The rebuilt logits feed the terms as the
    teacher's (:func:`~lightning_kd.teachers.cache.topk_logits` for ``top_k``: the top-``k`` kept,
    the tail mass spread uniformly). Validation and test run the teacher.

    Args:
        cache: where the views' outputs are stored.
    """

    cache: TeacherViewCache

    def check_terms(self, terms: Sequence[LossTerm]) -> None:
        """Refuse terms that read teacher layers: the view cache stores logits only."""
        layers = [layer for term in terms for layer in term.teacher_layers]
        if layers:
            raise ValueError(
                "TeacherViewCache stores the teacher's soft labels only, but the loss terms read the "
                f"teacher layers {layers}: use terms on the teacher's logits (KDTerm, DKDTerm, ...) or "
                "teacher_cache=None."
            )

    def on_train_start(self, module: DistillationModule) -> None:
        """Open the cache for this teacher, training set, augmentation and number of views."""
        trainer = module.trainer
        dataset = unwrapped_dataset(trainer.train_dataloader.dataset)
        if not all(hasattr(dataset, name) for name in ("augmentation", "views", "dataset")):
            raise TypeError(
                "TeacherViewCache serves replayed views, but the training dataset is a "
                f"{type(dataset).__name__}: wrap it in lightning_kd.data.ReplayedViews (or use "
                "ReplayedViewsDataModule)."
            )
        if dataset.views != self.cache.views:
            raise ValueError(
                f"The training set replays {dataset.views} views per sample but TeacherViewCache stores "
                f"{self.cache.views}: give both the same number."
            )
        probe = trainer.strategy.batch_to_device(default_collate([dataset[(0, 0)]]), module.device)
        inputs, _ = module.unpack_batch(probe)
        logits = module.prediction_of(module.teacher_forward(module.teacher_inputs(probe, inputs)))
        self.cache.open(
            view_cache_fingerprint(module.teacher, dataset),
            len(dataset),
            logits,
            strategy=trainer.strategy,
            num_params=dataset.augmentation.num_params,
        )
        self.warn_if_resumed_in_memory(trainer)
        if module.feature_hooks is not None:
            module.feature_hooks.clear()

    def __repr__(self) -> str:
        return f"ViewCachedTeacher({self.cache!r})"


class CoTrainedTeacher(TeacherRole):
    """A teacher optimised together with the student (``teacher_mode="trainable"``, online KD).

    It is in the optimizer, synchronised by DDP and saved in checkpoints; it needs a loss on its
    own outputs (the default objective adds ``CrossEntropyTerm("teacher_ce", model="teacher")``).
    """

    mode = "trainable"
    receives_gradients = True
    restored_from_source = False

    def check_terms(self, terms: Sequence[LossTerm]) -> None:
        """A co-trained teacher must learn from something: a cross-entropy term on its outputs."""
        if not any(isinstance(term, CrossEntropyTerm) and term.model == "teacher" for term in terms):
            raise ValueError(
                "A trainable teacher needs a loss on its own outputs, e.g. "
                "CrossEntropyTerm(name='teacher_ce', model='teacher'); otherwise it never learns."
            )

    def default_terms(self) -> list[LossTerm]:
        """The teacher's own cross-entropy, weight 1."""
        return [CrossEntropyTerm("teacher_ce", weight=1.0, model="teacher")]


class EMATeacher(TeacherRole):
    """A mean teacher (``teacher_mode="ema"``; Tarvainen & Valpola, NeurIPS 2017).

    A copy of the student whose parameters and float buffers follow
    ``ema <- d * ema + (1 - d) * student`` after every optimizer step (other buffers are copied);
    no gradients, eval mode, ignored by DDP (each process averages the same synchronised
    student), saved in checkpoints.

    Args:
        decay: ``d``, in ``[0, 1)``.
    """

    mode = "ema"
    restored_from_source = False
    copies_student = True

    def __init__(self, decay: float = 0.999) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {decay}.")
        self.decay = decay
        #: (teacher floats, student floats, other (teacher, student) pairs) of the update
        self._pairs: tuple[list[Tensor], list[Tensor], list[tuple[Tensor, Tensor]]] | None = None

    def make_teacher(
        self, student: nn.Module, teacher: nn.Module | None, checkpoint: str | Path | None
    ) -> nn.Module:
        """A frozen copy of the student."""
        if teacher is not None or checkpoint is not None:
            raise ValueError(
                "teacher_mode='ema' makes the teacher a moving average of the student: leave "
                "`teacher` and `teacher_checkpoint` unset."
            )
        return freeze(copy.deepcopy(student))

    @torch.no_grad()
    def after_optimizer_step(self, student: nn.Module, teacher: nn.Module) -> None:
        """``ema <- d * ema + (1 - d) * student`` for parameters and float buffers; other buffers copied.

        The float tensors are averaged in one fused ``torch._foreach_lerp_`` call; the pairing of
        teacher and student tensors is found once and kept until :meth:`forget_tensors`.
        """
        if self._pairs is None:
            teacher_state = teacher.state_dict(keep_vars=True)
            pairs = [
                (teacher_state[name], value) for name, value in student.state_dict(keep_vars=True).items()
            ]
            floats = [(t, s) for t, s in pairs if t.is_floating_point()]
            self._pairs = (
                [t for t, _ in floats],
                [s for _, s in floats],
                [(t, s) for t, s in pairs if not t.is_floating_point()],
            )
        teacher_floats, student_floats, others = self._pairs
        if teacher_floats:
            torch._foreach_lerp_(teacher_floats, [s.detach() for s in student_floats], 1.0 - self.decay)
        for target, value in others:
            target.copy_(value)

    def forget_tensors(self) -> None:
        """Forget the tensor pairing (tensors are moved or cast: ``.to()``, ``.half()``)."""
        self._pairs = None

    def __repr__(self) -> str:
        return f"EMATeacher(decay={self.decay})"


#: the ``teacher_mode`` values and the roles they select
TEACHER_MODES: dict[str, type[TeacherRole]] = {
    role.mode: role for role in (FrozenTeacher, CoTrainedTeacher, EMATeacher)
}


def teacher_role(
    mode: str,
    ema_decay: float = 0.999,
    cache: TeacherOutputCache | None = None,
    teacher: nn.Module | None = None,
) -> TeacherRole:
    """The role that ``teacher_mode=mode`` selects (the one place that reads the string).

    Args:
        mode: ``"frozen"``, ``"trainable"`` or ``"ema"``.
        ema_decay: ``d`` of an EMA teacher.
        cache: a :class:`~lightning_kd.TeacherOutputCache` (or :class:`~lightning_kd.TeacherViewCache`)
            for a frozen teacher.
        teacher: the teacher network given by the user, if any (a cache needs one).
    """
    if mode not in TEACHER_MODES:
        raise ValueError(f"teacher_mode must be one of {list(TEACHER_MODES)}, got {mode!r}.")
    role_class = TEACHER_MODES[mode]
    if cache is not None:
        if role_class is not FrozenTeacher or teacher is None:
            raise ValueError(
                "teacher_cache stores a fixed teacher's outputs: it needs a teacher with "
                "teacher_mode='frozen' "
                f"(got teacher={'None' if teacher is None else type(teacher).__name__}, "
                f"teacher_mode={mode!r}). Remove teacher_cache or freeze the teacher."
            )
        return ViewCachedTeacher(cache) if isinstance(cache, TeacherViewCache) else CachedTeacher(cache)
    if role_class is EMATeacher:
        return EMATeacher(ema_decay)
    return role_class()
