"""DistillationModule: a LightningModule that trains a student from a teacher."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from itertools import chain
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.utils.data import DataLoader
from torchmetrics.classification import MulticlassAccuracy

from lightning_kd.batch_checks import (
    check_logits,
    check_separate,
    class_indices,
    class_targets,
    explain_forward_error,
    probabilities_message,
    probability_rows,
)
from lightning_kd.callbacks.exact_resume import default_exact_resume
from lightning_kd.callbacks.feature_hooks import FeatureHooks
from lightning_kd.callbacks.run_length import RunLength
from lightning_kd.checkpoint_io import use_atomic_checkpoint_io
from lightning_kd.diagnosis import CheckFinite, non_finite_cause, non_finite_loss_error
from lightning_kd.host_checks import HostBatchChecks
from lightning_kd.losses import CrossEntropyTerm, KDTerm, LossTerm, StepOutputs
from lightning_kd.losses.base import weighted_total
from lightning_kd.model_io import (
    BatchKey,
    InputKey,
    call_model,
    infer_num_classes,
    logits_of,
    select,
)
from lightning_kd.module_setup import (
    check_equal_training_batches,
    compile_options,
    configure_optimization,
    first_batch,
    hparams_given_by_cli,
)
from lightning_kd.resume import (
    FROZEN_TEACHER_KEY,
    check_same_architecture,
    check_same_teacher,
    teacher_record,
)
from lightning_kd.step_monitor import (
    MonitorReadings,
    Reading,
    StepMonitor,
    checked_finite_setting,
    logs_this_step,
)
from lightning_kd.teachers.cache import TeacherOutputCache
from lightning_kd.teachers.ensemble import TeacherEnsemble
from lightning_kd.teachers.fingerprints import teacher_fingerprint
from lightning_kd.teachers.roles import TeacherRole, teacher_role

__all__ = ["DistillationModule", "logits_of"]

TeacherMode = Literal["frozen", "trainable", "ema"]


def default_losses(teacher: nn.Module | None, role: TeacherRole) -> list[LossTerm]:
    """The objective when none is given.

    Without a teacher: cross-entropy. With one: Hinton KD with the CRD benchmark's defaults
    (CE 0.1, KD 0.9, T = 4), plus the role's own terms (a co-trained teacher also learns from
    the labels, weight 1).
    """
    if teacher is None:
        return [CrossEntropyTerm("ce", weight=1.0)]
    return [
        CrossEntropyTerm("ce", weight=0.1),
        KDTerm("kd", weight=0.9, temperature=4.0),
        *role.default_terms(),
    ]


class DistillationModule(HostBatchChecks, MonitorReadings, pl.LightningModule):
    """Train a ``student`` with a weighted sum of loss terms, taught by an optional ``teacher``.

    ``DistillationModule(student, teacher)`` is Hinton KD with the CRD benchmark's defaults
    (CE 0.1 + KD 0.9 at T = 4) from a frozen teacher, on ``(inputs, targets)`` batches.
    One training step: teacher forward (under ``no_grad`` unless co-trained) -> student forward ->
    each term of ``losses`` -> ``sum(weight * term)``; every term is logged as
    ``train/loss_<name>`` and the total as ``train/loss``.

    Teacher modes (each a role in :mod:`lightning_kd.teachers.roles`, which the module asks):

    - ``"frozen"``: eval mode at all times (also after validation), ``requires_grad=False``,
      never in the optimizer, ignored by DDP, and left out of checkpoints unless
      ``save_teacher=True`` (a loaded checkpoint gets the teacher from its own source: the
      ``teacher`` argument and ``teacher_checkpoint``).
    - ``"trainable"``: co-trained; optimised with the student, saved in checkpoints. It
      needs a term on its own outputs (the default adds ``CrossEntropyTerm(model="teacher")``).
    - ``"ema"``: a mean teacher (Tarvainen & Valpola, NeurIPS 2017): a copy of the student
      whose weights and float buffers follow ``ema <- d * ema + (1 - d) * student`` after every
      optimizer step (``d = ema_decay``); no gradients, eval mode, saved in checkpoints.
      Leave ``teacher`` unset: the copy is made here.
    - ``teacher=None``: plain supervised training (baselines, training teachers).

    A :class:`~lightning_kd.TeacherEnsemble` is a teacher too (multi-teacher KD);
    each member's accuracy is then logged as ``val|test/teacher<i>_acc``. With
    ``teacher_input_key`` the teacher reads its own input from the batch (privileged
    information, LUPI): the student never sees it.

    Metrics: student accuracy ``train/acc`` (of the epoch, counted on the device), ``val/acc``,
    ``test/acc`` (torchmetrics); with a teacher, ``val|test/teacher_acc`` and top-1 agreement
    ``val|test/agreement``. The training losses reach the logger at Lightning's logging steps
    (``log_every_n_steps``) with the value of that step, read from the device in one transfer; no
    other training step reads the device (the progress bar shows the value of the last logging
    step, and ``trainer.callback_metrics`` holds the last step's values after each epoch).

    Args:
        student: the network being trained.
        teacher: the network teaching it, or ``None``.
        losses: the loss terms; default: ``default_losses(teacher, role)`` (Hinton KD with a teacher).
        teacher_mode: ``"frozen"``, ``"trainable"`` or ``"ema"``.
        teacher_checkpoint: a file with the teacher's trained weights (a Lightning checkpoint
            of a teacher trained by this module, or a state dict); resolved to an absolute path
            when the module is built, and recorded so in checkpoints (they reload from any
            directory; pass ``teacher_checkpoint=`` to ``load_from_checkpoint`` for another file).
        save_teacher: also write a frozen teacher into checkpoints.
        num_classes: number of classes; default: inferred from the models.
        input_key: where the inputs are in a batch: an index for tuples, a key for dicts, a list of
            keys of a dict batch (passed as keyword arguments, e.g. ``[input_ids, attention_mask]``
            for Hugging Face models), or ``None`` for the whole batch.
        target_key: where the labels are in a batch; ``None`` for unlabelled data.
        teacher_input_key: where the teacher's own input is in a batch; default: the student's.
        ema_decay: ``d`` of the ``"ema"`` teacher, in [0, 1).
        optimizer: a callable ``params -> Optimizer`` (``OptimizerCallable`` in YAML); default
            Adam with lr 1e-3, fused where torch has the kernel
            (``lightning_kd.module_setup.default_optimizer``).
        lr_scheduler: a callable ``optimizer -> LRScheduler``; default: cosine decay to 0
            over the run, stepped per optimizer step (unless ``cosine_decay=False``), re-planned
            when a fit resumes with another length (:class:`~lightning_kd.callbacks.run_length.RunLength`).
        lr_scheduler_interval: ``"epoch"`` or ``"step"``: when ``lr_scheduler`` steps.
        cosine_decay: use the default cosine decay when ``lr_scheduler`` is ``None``.
        check_finite: stop with an error naming the first step whose loss was NaN or infinite, its
            terms and the cause. ``True``: checked on the device in every step and read at the
            logging steps (``log_every_n_steps``), the epoch end, every checkpoint save (no checkpoint
            of NaN weights is written) and the end of training, so no step waits for the device;
            ``"step"``: read in every step (stops at that step, diagnosing its batch; one wait per
            step); ``False``: off.
        teacher_cache: a :class:`~lightning_kd.TeacherOutputCache` for a frozen
            teacher: its training outputs (logits and the hooked features the terms declare) are
            computed once, stored by sample index, and reused, skipping the teacher forward.
        compile: ``torch.compile`` the training step's teacher forward, student forward and loss
            terms (with their hooks) as one function, ``step_loss``; ``True`` with torch's
            defaults, or a mapping of ``torch.compile`` options (``{"backend": "aot_eager"}``,
            ``{"mode": "max-autotune"}``). The first step runs eagerly, with every first-batch check.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None = None,
        losses: Sequence[LossTerm] | None = None,
        teacher_mode: TeacherMode = "frozen",
        teacher_checkpoint: str | Path | None = None,
        save_teacher: bool = False,
        num_classes: int | None = None,
        input_key: InputKey = 0,
        target_key: BatchKey | None = 1,
        teacher_input_key: InputKey = None,
        ema_decay: float = 0.999,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        lr_scheduler_interval: Literal["epoch", "step"] = "epoch",
        cosine_decay: bool = True,
        check_finite: CheckFinite = True,
        teacher_cache: TeacherOutputCache | None = None,
        compile: bool | Mapping[str, Any] = False,
    ) -> None:
        super().__init__()
        if teacher_checkpoint is not None:  # absolute, so a checkpoint reloads from any directory
            teacher_checkpoint = str(Path(teacher_checkpoint).expanduser().resolve())
        #: the teacher's weights file as an absolute path (recorded in checkpoints), or ``None``
        self.teacher_checkpoint = teacher_checkpoint
        self.save_hyperparameters(
            ignore=None
            if hparams_given_by_cli()
            else ["student", "teacher", "losses", "optimizer", "lr_scheduler", "teacher_cache"]
        )
        check_separate(
            {"student": student, "teacher": teacher},
            "a frozen teacher would freeze the student, and the student would teach itself",
        )
        self.teacher_role = teacher_role(teacher_mode, ema_decay, teacher_cache, teacher)
        teacher = self.teacher_role.make_teacher(student, teacher, teacher_checkpoint)
        self.student = student
        self.teacher = teacher
        self.teacher_mode = teacher_mode
        self.save_teacher = save_teacher
        self.input_key = input_key
        self.target_key = target_key
        self.teacher_input_key = teacher_input_key
        self.ema_decay = ema_decay
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.lr_scheduler_interval = lr_scheduler_interval
        self.cosine_decay = cosine_decay
        self.check_finite = checked_finite_setting(check_finite)
        #: ``torch.compile`` options of :meth:`step_loss` (``None``: it runs eagerly)
        self.compile_options = compile_options(compile)
        self._compiled_step_loss: Callable[..., Any] | None = None
        #: what the training steps record on the device, read at the logging steps and epoch ends
        self.monitor = StepMonitor(check_finite=check_finite is True)
        #: the held-out batches' losses of subclasses that evaluate the loss terms, read at the loop's end
        self.held_out_monitor = StepMonitor(check_finite=True)
        self.reset_host_checks()
        self.teacher_cache = teacher_cache
        self.feature_hooks: FeatureHooks | None = None
        #: SHA-256 of a frozen teacher's weights as this fit set it up (recorded in checkpoints)
        self.frozen_teacher_fingerprint: str | None = None

        terms = list(losses) if losses is not None else default_losses(teacher, self.teacher_role)
        self._check_terms(terms)
        self.loss_terms = nn.ModuleDict({term.name: term for term in terms})
        self._ddp_params_and_buffers_to_ignore = self._ddp_ignored()

        self.num_classes = num_classes
        self.metrics = self.build_metrics()

    def build_metrics(self) -> nn.ModuleDict:
        """The torchmetrics objects of the run (sets ``num_classes`` when it was not given)."""
        if self.num_classes is None:
            self.num_classes = self._infer_num_classes()
        if self.num_classes < 2:
            raise ValueError(
                f"num_classes={self.num_classes}: classification needs at least 2 classes. For a binary task "
                "give the models 2 outputs (e.g. nn.Linear(features, 2)) and use labels 0/1."
            )

        def accuracy() -> MulticlassAccuracy:
            return MulticlassAccuracy(num_classes=self.num_classes, average="micro")

        names = ["val_acc", "test_acc"]  # train/acc: counted by the StepMonitor
        if self.teacher is not None:
            names += ["val_teacher_acc", "test_teacher_acc", "val_agreement", "test_agreement"]
        if isinstance(self.teacher, TeacherEnsemble):
            members = range(len(self.teacher))
            names += [f"{stage}_teacher{i}_acc" for stage in ("val", "test") for i in members]
        return nn.ModuleDict({name: accuracy() for name in names})

    @staticmethod
    def prediction_of(output: Any) -> Tensor:
        """The tensor the loss terms read as ``student_logits`` / ``teacher_logits``: the logits."""
        return logits_of(output)

    # ----------------------------------------------------------------- set-up checks
    @property
    def teacher_is_frozen(self) -> bool:
        """Whether a teacher is present and frozen (fixed weights from outside, not checkpointed)."""
        return self.teacher is not None and self.teacher_role.restored_from_source

    @property
    def teacher_without_gradients(self) -> bool:
        """Whether a teacher is present and gets no gradients (frozen or EMA): eval mode, ``no_grad``."""
        return self.teacher is not None and not self.teacher_role.receives_gradients

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

    def _ddp_ignored(self) -> list[str]:
        """Names DDP neither broadcasts nor all-reduces.

        A frozen teacher (each process loads the same one), an EMA teacher (each process
        averages the same synchronised student), and the buffers of terms that keep them in
        sync themselves (``LossTerm.synchronizes_own_buffers``).
        """
        names = []
        if self.teacher is not None and self.teacher_role.ddp_ignores_teacher():
            teacher = self.teacher
            names += [f"teacher.{n}" for n, _ in chain(teacher.named_parameters(), teacher.named_buffers())]
        for term_name, term in self.loss_terms.items():
            if term.synchronizes_own_buffers:
                names += [f"loss_terms.{term_name}.{n}" for n, _ in term.named_buffers()]
        return names

    def _infer_num_classes(self) -> int:
        student_classes = infer_num_classes(self.student)
        teacher_classes = infer_num_classes(self.teacher) if self.teacher is not None else None
        if student_classes and teacher_classes and student_classes != teacher_classes:
            raise ValueError(
                f"The student predicts {student_classes} classes but the teacher {teacher_classes}. "
                "Build both with the same num_classes (or pass num_classes= if the inference is wrong)."
            )
        found = student_classes or teacher_classes
        if found is None:
            raise ValueError("Cannot infer the number of classes from the models; pass num_classes=.")
        return found

    # ----------------------------------------------------------------- model plumbing
    def on_fit_start(self) -> None:
        """Silence Lightning's eval-mode warning for exactly the fixed teacher's modules (intended)."""
        if self.teacher_without_gradients:
            count = sum(1 for _ in self.teacher.modules())
            warnings.filterwarnings("ignore", message=rf"Found {count} module\(s\) in eval mode at the start")

    def on_train_start(self) -> None:
        """Check DDP's batch counts are equal, start the step records; the teacher's role prepares."""
        check_equal_training_batches(self.trainer)
        self.monitor.reset()
        if self.teacher is not None:
            self.teacher_role.on_train_start(self)

    def on_train_epoch_start(self) -> None:
        """Start the epoch's accuracy count."""
        self.monitor.reset_epoch()

    def on_train_epoch_end(self) -> None:
        """Read the epoch's records (raise for a non-finite loss), log ``train/acc``; the role ends the epoch.

        The last step's losses go to ``trainer.callback_metrics`` and the progress bar (not to the
        logger, which got them at the logging steps). A cached teacher flushes its cache.
        """
        self.log_reading(self.read_monitor(), epoch_end=True)
        accuracy = self.monitor.epoch_accuracy(self.trainer.strategy)
        if accuracy is not None:  # over all processes already: sync_dist averages equal values
            self.log("train/acc", torch.tensor(accuracy, device=self.device), sync_dist=True)
        if self.teacher is not None:
            self.teacher_role.on_train_epoch_end(self)

    def on_train_end(self) -> None:
        """Raise for a non-finite loss not yet read; the teacher's role ends (a cache releases its lock).

        A compiled :meth:`step_loss` is dropped (it holds the module; a copy of the module compiles anew).
        """
        self._compiled_step_loss = None
        self.read_monitor()
        if self.teacher is not None:
            self.teacher_role.on_train_end(self)

    def on_fit_end(self) -> None:
        """Fail loudly when the training set is empty (Lightning only logs "No training batches")."""
        if self.trainer.num_training_batches != 0:
            return
        loaders = self.trainer.train_dataloader
        loaders = list(loaders.values()) if isinstance(loaders, dict) else loaders
        loaders = loaders if isinstance(loaders, list | tuple) else [loaders]
        source = (
            f"{type(self.trainer.datamodule).__name__}.train_dataloader()"
            if self.trainer.datamodule is not None
            else "the train_dataloaders given to Trainer.fit"
        )
        for loader in loaders:
            if not isinstance(loader, DataLoader) or not hasattr(loader.dataset, "__len__"):
                continue
            samples = len(loader.dataset)
            if samples == 0:
                raise ValueError(
                    f"The training split is empty: {source} has a dataset of 0 samples, so nothing was "
                    "trained. Check the datamodule's data path and split sizes (e.g. train_samples)."
                )
            if loader.drop_last and loader.batch_size and samples < loader.batch_size:
                raise ValueError(
                    f"The training split gives no batch: {source} has {samples} samples, fewer than "
                    f"batch_size={loader.batch_size} with drop_last=True. Lower the batch size or add data."
                )

    def train(self, mode: bool = True) -> DistillationModule:
        """Set train/eval mode; a frozen or EMA teacher stays in eval mode regardless."""
        super().train(mode)
        if self.teacher_without_gradients:
            self.teacher.eval()
        return self

    def forward(self, inputs: Any) -> Any:
        """The student's output."""
        return call_model(self.student, inputs)

    def check_batch(self, batch: Any, stage: str) -> None:
        """The checks that read a batch's values, run before its transfer to the device (no wait there).

        The labels' values (:meth:`HostBatchChecks.check_batch
        <lightning_kd.host_checks.HostBatchChecks.check_batch>`); in training, the teacher's role
        reads what it needs (a cached teacher: the sample indices).
        """
        super().check_batch(batch, stage)
        if stage == "training" and self.teacher is not None:
            self.teacher_role.before_transfer(self, batch)

    def unpack_batch(self, batch: Any) -> tuple[Any, Tensor | None]:
        """``(inputs, targets)`` of a batch, by ``input_key`` / ``target_key``; override for other layouts."""
        inputs = select(batch, self.input_key, "input_key")
        targets = select(batch, self.target_key, "target_key") if self.target_key is not None else None
        return inputs, targets

    def teacher_inputs(self, batch: Any, inputs: Any) -> Any:
        """What the teacher reads: ``batch[teacher_input_key]`` if set, else the student's ``inputs``."""
        if self.teacher_input_key is None:
            return inputs
        return select(batch, self.teacher_input_key, "teacher_input_key")

    def teacher_forward(self, inputs: Any) -> Any:
        """The teacher's output (under ``no_grad`` unless co-trained), or ``None`` without a teacher."""
        if self.teacher is None:
            return None
        return self.teacher_role.forward(self.teacher, inputs)

    def _declared_hooks(self) -> FeatureHooks | None:
        """FeatureHooks for exactly the layers that the loss terms declare (None if none)."""
        student_layers = [layer for term in self.loss_terms.values() for layer in term.student_layers]
        teacher_layers = [layer for term in self.loss_terms.values() for layer in term.teacher_layers]
        if not (student_layers or teacher_layers):
            return None
        return FeatureHooks(student_layers, teacher_layers)

    def configure_callbacks(self) -> list[pl.Callback]:
        """Hook exactly the layers that the loss terms declare; in a fit, resume exactly, at its length.

        :class:`~lightning_kd.callbacks.run_length.RunLength` and
        :class:`~lightning_kd.callbacks.exact_resume.ExactResume` are given to fits only, so a
        ``trainer.test`` after a fit does not replace the fit's.
        """
        self.feature_hooks = self._declared_hooks()
        hooks = [self.feature_hooks] if self.feature_hooks is not None else []
        fitting = self._trainer is None or self._trainer.state.fn == "fit"
        return [*hooks, RunLength(), *default_exact_resume(self._trainer)] if fitting else hooks

    def setup(self, stage: str) -> None:
        """Build the loss terms' adapters (before the optimizer exists and any strategy wraps the model).

        They are sized on :meth:`probe_batch`: the first batch of whatever data the Trainer call
        was given; without any, on ``example_input_array`` (the student's input, as in Lightning).
        Lightning's warning that this module has an ``on_before_batch_transfer`` (:meth:`check_batch`)
        is silenced. Lightning's default checkpoint IO becomes
        :class:`~lightning_kd.checkpoint_io.AtomicCheckpointIO` (atomic writes, checked reads).
        A fit also takes the fingerprint of a frozen teacher left out of checkpoints
        (:meth:`on_save_checkpoint`), before any device move or precision cast.
        """
        use_atomic_checkpoint_io(self.trainer)
        self.prepare_host_checks()
        stage = getattr(stage, "value", stage)  # Lightning passes a TrainerFn
        if stage == "fit" and self._teacher_left_out:
            self.frozen_teacher_fingerprint = teacher_fingerprint(self.teacher)
        if not any(term.needs_build for term in self.loss_terms.values()):
            return
        batch = self.probe_batch(stage)
        if batch is not None:
            self.build_terms(batch)
        elif self.example_input_array is not None:
            self.build_terms(inputs=self.example_input_array)
        else:
            pending = [name for name, term in self.loss_terms.items() if term.needs_build]
            raise ValueError(
                f"Loss terms {pending} size their adapters on one batch, but the Trainer's {stage} call has "
                "no data: pass dataloaders or a datamodule to it, set `module.example_input_array` to an "
                "input of the student, or call `module.build_terms(batch)` first."
            )

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

    # ----------------------------------------------------------------- steps
    def step_outputs(self, batch: Any, teacher_output: Any = None) -> StepOutputs:
        """Run the teacher, then the student, and gather what the loss terms read.

        Args:
            batch: a batch as the dataloader gives it.
            teacher_output: the teacher's output on ``batch`` when the caller already has it (the
                teacher then does not run again); default: the teacher's role provides it.
        """
        inputs, targets = self.unpack_batch(batch)
        return self.outputs_of(inputs, targets, batch, teacher_output)

    def outputs_of(
        self, inputs: Any, targets: Tensor | None, batch: Any, teacher_output: Any = None
    ) -> StepOutputs:
        """:meth:`step_outputs` of an unpacked batch: teacher (unless ``teacher_output``), then student."""
        teacher_features = None
        try:
            if teacher_output is None and self.teacher is not None:
                if self.training:  # the role may serve it from elsewhere (a cache)
                    teacher_output, teacher_features = self.teacher_role.training_outputs(self, batch, inputs)
                else:
                    teacher_output = self.teacher_forward(self.teacher_inputs(batch, inputs))
            student_output = call_model(self.student, inputs)
        except (RuntimeError, ValueError) as error:
            self.raise_explained(error, batch, inputs)
            raise
        features = self.feature_hooks.features if self.feature_hooks is not None else {}
        return StepOutputs(
            student_logits=self.prediction_of(student_output),
            targets=targets,
            teacher_logits=self.prediction_of(teacher_output) if teacher_output is not None else None,
            student_features=features.get("student", {}),
            teacher_features=features.get("teacher", {}) if teacher_features is None else teacher_features,
            batch=batch,
            teacher_output=teacher_output,
            student_output=student_output,
        )

    def compute_loss(self, outputs: StepOutputs) -> tuple[Tensor, dict[str, Tensor]]:
        """The weighted total and each term's unweighted value.

        With class-probability targets, :class:`~lightning_kd.losses.CrossEntropyTerm` reads the
        probabilities (soft cross-entropy) and every other term their argmax, the class index.
        """
        indexed = outputs
        if outputs.targets is not None and outputs.targets.is_floating_point():
            indexed = replace(outputs, targets=outputs.targets.argmax(dim=-1))
        values = {
            name: term(outputs if isinstance(term, CrossEntropyTerm) else indexed)
            for name, term in self.loss_terms.items()
        }
        total = weighted_total(values, {name: term.weight for name, term in self.loss_terms.items()})
        if self.check_finite == "step" and not torch.isfinite(total):
            raise non_finite_loss_error("terms", self.global_step, values, self.non_finite_cause(outputs))
        if self.check_finite and not self.training:  # a held-out batch: read at the loop's epoch end
            self.held_out_monitor.record(self.held_out_monitor.last_step + 1, {**values, "total": total})
        return total, values

    def read_held_out_monitor(self, stage: str) -> None:
        """Raise for a NaN/Inf loss of a held-out batch of this ``stage`` loop (read once, at its end)."""
        reading = self.held_out_monitor.read()
        self.held_out_monitor.reset()
        if reading.first_bad is not None:
            terms = {name: value for name, value in reading.bad_values.items() if name != "total"}
            where = f"{stage} batch {reading.first_bad} (of the loop at training step {self.global_step})"
            cause = self.non_finite_cause(None)
            raise non_finite_loss_error("terms", self.global_step, terms, cause, where=where)

    def on_validation_epoch_end(self) -> None:
        """Raise for a NaN/Inf held-out loss (:meth:`read_held_out_monitor`)."""
        self.read_held_out_monitor("validation")

    def on_test_epoch_end(self) -> None:
        """Raise for a NaN/Inf held-out loss (:meth:`read_held_out_monitor`)."""
        self.read_held_out_monitor("test")

    def non_finite_error(self, reading: Reading, outputs: StepOutputs | None = None) -> FloatingPointError:
        """The error for the non-finite loss ``reading`` found, diagnosed on ``outputs`` (or the state)."""
        assert reading.first_bad is not None
        terms = {name: reading.bad_values[f"train/loss_{name}"] for name in self.loss_terms}
        outputs = outputs if reading.first_bad == reading.last_step else None  # else: the state now
        cause = self.non_finite_cause(outputs)
        return non_finite_loss_error("terms", reading.first_bad, terms, cause, found_at=reading.last_step)

    def non_finite_cause(self, outputs: StepOutputs | None) -> str:
        """What made the step's loss NaN/Inf, and its fix.

        See :func:`~lightning_kd.diagnosis.non_finite_cause`; call it wherever non-finiteness is
        detected. Without ``outputs`` (found after the step), only the settings and weights are read.
        """
        settings = {}
        for name, term in self.loss_terms.items():
            settings[f"weight of loss term {name!r}"] = term.weight
            temperature = getattr(term, "temperature", None)
            if isinstance(temperature, float | int | Tensor) and torch.as_tensor(temperature).numel() == 1:
                settings[f"temperature of loss term {name!r}"] = float(temperature)
        trained = ["student"] if self.teacher_is_frozen else ["student", "teacher"]
        if outputs is None:
            return non_finite_cause(
                None,
                {"student": self.student, "teacher": self.teacher},
                {},
                settings=settings,
                trained=trained,
            )
        return non_finite_cause(
            outputs.batch,
            {"student": self.student, "teacher": self.teacher},
            {"student": outputs.student_logits, "teacher": outputs.teacher_logits},
            settings=settings,
            trained=trained,
            samples=int(outputs.student_logits.shape[0]) if outputs.student_logits.ndim else None,
        )

    def raise_explained(self, error: Exception, batch: Any, inputs: Any) -> None:
        """Re-raise a forward's ``error`` naming the fix when its inputs caused it.

        See :func:`~lightning_kd.batch_checks.explain_forward_error`.
        """
        calls = [("student", self.student, inputs)]
        if self.teacher is not None:
            calls.append(("teacher", self.teacher, self.teacher_inputs(batch, inputs)))
        explained = explain_forward_error(error, calls)
        if explained is not None:
            raise explained from error

    def check_first_outputs(self, outputs: StepOutputs) -> None:
        """At the first batch: logits of shape ``(N, num_classes)``; warn on probabilities given as logits.

        The shapes are checked at once; whether the rows are probabilities is computed on the
        device and warned about at the next reading (a logging step or the epoch end).
        """
        check_logits(outputs.student_logits, "student", self.num_classes)
        self.monitor.defer_warning(probability_rows(outputs.student_logits), probabilities_message("student"))
        if outputs.teacher_logits is not None:  # its shape: the terms compare it with the student's
            flag = probability_rows(outputs.teacher_logits)
            self.monitor.defer_warning(flag, probabilities_message("teacher"))

    def step_loss(self, batch: Any, first: bool = False) -> tuple[StepOutputs, Tensor, dict[str, Tensor]]:
        """Teacher, student and loss terms of a training step: what ``compile=`` compiles as one function.

        Returns the step's outputs, the weighted total and each term's value; ``first``: the run's
        first batch, whose outputs are checked (:meth:`check_first_outputs`).
        """
        outputs = self.step_outputs(batch)
        if outputs.targets is not None:  # values: checked before the transfer (check_batch)
            outputs.targets = class_targets(outputs.targets, self.num_classes, "training", read_values=False)
        if first:
            self.check_first_outputs(outputs)
        total, values = self.compute_loss(outputs)
        return outputs, total, values

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        """One distillation step: every term, the total and the accuracy are recorded on the device.

        At Lightning's logging steps they are read in one transfer and logged as ``train/loss_<name>``
        and ``train/loss`` (``train/acc`` at the epoch end); no other step reads the device.
        """
        self.check_if_unchecked(batch, "training")
        first = batch_idx == 0 and self.global_step == 0
        if first or self.compile_options is None:
            outputs, total, values = self.step_loss(batch, first)
        else:
            if self._compiled_step_loss is None:
                self._compiled_step_loss = torch.compile(self.step_loss, **self.compile_options)
            outputs, total, values = self._compiled_step_loss(batch)
        recorded = {f"train/loss_{name}": value for name, value in values.items()}
        self.monitor.record(self.global_step, {**recorded, "train/loss": total})
        if outputs.targets is not None:
            self.monitor.count(outputs.student_logits, class_indices(outputs.targets))
        if logs_this_step(self._trainer):
            self.log_reading(self.read_monitor(outputs))
        return total

    def evaluate(self, batch: Any, stage: str) -> None:
        """Student (and teacher) accuracy and their agreement on one held-out batch, under ``stage/``."""
        inputs, targets = self.unpack_batch(batch)
        if targets is not None:  # the values were checked before the transfer (check_batch)
            targets = class_targets(targets, self.num_classes, stage, read_values=False)
        try:
            student_logits = logits_of(call_model(self.student, inputs))
            teacher_output = self.teacher_forward(self.teacher_inputs(batch, inputs))
        except (RuntimeError, ValueError) as error:
            self.raise_explained(error, batch, inputs)
            raise
        teacher_logits = logits_of(teacher_output) if teacher_output is not None else None
        check_logits(student_logits, "student", self.num_classes)
        if targets is not None:
            self.log(f"{stage}/loss", F.cross_entropy(student_logits.float(), targets), sync_dist=True)
            targets = class_indices(targets)
            self.metrics[f"{stage}_acc"](student_logits, targets)
            self.log(f"{stage}/acc", self.metrics[f"{stage}_acc"], prog_bar=True)
        if teacher_logits is not None:
            if targets is not None:
                self.metrics[f"{stage}_teacher_acc"](teacher_logits, targets)
                self.log(f"{stage}/teacher_acc", self.metrics[f"{stage}_teacher_acc"])
            self.metrics[f"{stage}_agreement"](student_logits, teacher_logits.argmax(dim=-1))
            self.log(f"{stage}/agreement", self.metrics[f"{stage}_agreement"])
        if isinstance(self.teacher, TeacherEnsemble) and targets is not None:
            for i, member_logits in enumerate(teacher_output["members"]):
                self.metrics[f"{stage}_teacher{i}_acc"](member_logits, targets)
                self.log(f"{stage}/teacher{i}_acc", self.metrics[f"{stage}_teacher{i}_acc"])

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        """Student (and teacher) accuracy and their agreement (labels checked in :meth:`check_batch`)."""
        self.check_if_unchecked(batch, "validation")
        self.evaluate(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        """As validation, under ``test/``."""
        self.check_if_unchecked(batch, "test")
        self.evaluate(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        """The student's logits."""
        inputs, _ = self.unpack_batch(batch)
        return self.prediction_of(call_model(self.student, inputs))

    # ----------------------------------------------------------------- optimisation
    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """Step the optimizer, then let the teacher's role follow the student (an EMA teacher moves)."""
        super().optimizer_step(*args, **kwargs)
        if self.teacher is not None:
            self.teacher_role.after_optimizer_step(self.student, self.teacher)

    def update_ema_teacher(self) -> None:
        """Move an EMA teacher towards the student now (:meth:`EMATeacher.after_optimizer_step`)."""
        self.teacher_role.after_optimizer_step(self.student, self.teacher)

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> DistillationModule:
        """The teacher's role forgets the tensors it holds: they are moved or cast (``.to()``)."""
        self.teacher_role.forget_tensors()
        return super()._apply(fn, *args, **kwargs)

    def configure_optimizers(self) -> Any:
        """Every trainable parameter (student, co-trained teacher, loss adapters) in one optimizer."""
        return configure_optimization(
            self,
            [p for p in self.parameters() if p.requires_grad],
            self.optimizer_factory,
            self.lr_scheduler_factory,
            self.lr_scheduler_interval,
            self.cosine_decay,
        )

    # ----------------------------------------------------------------- checkpoints
    @property
    def _teacher_left_out(self) -> bool:
        """Whether checkpoints leave the teacher's weights out (a frozen teacher without ``save_teacher``)."""
        return self.teacher is not None and not self.teacher_role.in_checkpoint(self.save_teacher)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record ``teacher_checkpoint`` as an absolute path; leave out a frozen teacher unless asked.

        During a fit, a loss found non-finite since the last reading (``check_finite=True``) raises
        here, before anything is written: the previous checkpoint stays as it was.

        A teacher left out is recorded by its fingerprint (SHA-256 of its weights, taken once per
        fit in :meth:`setup`) and its file, so that a resumed fit can tell whether it has the same one.
        """
        self.read_before_saving()  # no NaN weights saved
        hparams = checkpoint.get("hyper_parameters")
        if isinstance(hparams, dict) and hparams.get("teacher_checkpoint") is not None:
            hparams["teacher_checkpoint"] = self.teacher_checkpoint
        if not self._teacher_left_out:
            return
        state = checkpoint["state_dict"]
        checkpoint["state_dict"] = type(state)(
            (k, v) for k, v in state.items() if not k.startswith("teacher.")
        )
        if self.frozen_teacher_fingerprint is not None:
            checkpoint[FROZEN_TEACHER_KEY] = teacher_record(
                self.frozen_teacher_fingerprint, self.teacher_checkpoint
            )

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Give a checkpoint without the frozen teacher the teacher this module was built with.

        A fit resumed from it must have the teacher the checkpoint was trained with (same
        fingerprint), and every checkpoint must hold this module's student architecture: both
        are refused with an error that names the difference. Terms whose adapters are not built
        yet (outside a Trainer) are built on ``example_input_array`` if set; otherwise their saved
        adapters are skipped with a warning (inference does not use them).
        """
        state = checkpoint["state_dict"]
        if self.teacher_is_frozen and not any(k.startswith("teacher.") for k in state):
            check_same_teacher(self, checkpoint.get(FROZEN_TEACHER_KEY))
            state.update({f"teacher.{k}": v for k, v in self.teacher.state_dict().items()})
        unbuilt = [name for name, term in self.loss_terms.items() if term.needs_build]
        if unbuilt and self.example_input_array is not None:
            self.build_terms(inputs=self.example_input_array)
        elif unbuilt:
            prefixes = tuple(f"loss_terms.{name}." for name in unbuilt)
            for key in [k for k in state if k.startswith(prefixes)]:
                del state[key]
            rank_zero_warn(
                f"Adapters of loss terms {unbuilt} were not restored: they are built on a probe batch. "
                "Set `example_input_array` to a student input (or call `build_terms(batch)`) before loading "
                "to restore them."
            )
        check_same_architecture(self, state)
