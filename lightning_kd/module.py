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
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from lightning_kd.batch_checks import (
    check_logits,
    check_separate,
    class_indices,
    class_targets,
    probabilities_message,
    probability_rows,
)
from lightning_kd.callbacks.exact_resume import default_exact_resume
from lightning_kd.callbacks.feature_hooks import FeatureHooks
from lightning_kd.callbacks.run_length import RunLength
from lightning_kd.checkpoint_io import use_atomic_checkpoint_io
from lightning_kd.diagnosis import CheckFinite, non_finite_loss_error
from lightning_kd.host_checks import HostBatchChecks
from lightning_kd.losses import CrossEntropyTerm, KDTerm, LossTerm, StepOutputs
from lightning_kd.losses.base import weighted_total
from lightning_kd.model_io import (
    BatchKey,
    InputKey,
    call_model,
    logits_of,
    select,
)
from lightning_kd.module_checkpoints import TeacherCheckpointRecords
from lightning_kd.module_faults import ExplainedFaults
from lightning_kd.module_metrics import ClassificationMetrics
from lightning_kd.module_setup import (
    check_equal_training_batches,
    check_training_data,
    compile_options,
    configure_optimization,
    hparams_given_by_cli,
    load_student_start,
)
from lightning_kd.module_terms import LossTermSetup
from lightning_kd.step_monitor import (
    MonitorReadings,
    StepMonitor,
    checked_finite_setting,
    logs_this_step,
)
from lightning_kd.teachers.cache import TeacherOutputCache
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


class DistillationModule(
    HostBatchChecks,
    ExplainedFaults,
    MonitorReadings,
    ClassificationMetrics,
    LossTermSetup,
    TeacherCheckpointRecords,
    pl.LightningModule,
):
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
        student_checkpoint: weights the student starts from (e.g. the supervised baseline's
            checkpoint, as on-policy distillation expects), loaded strictly when the module is
            built; ``None``: as given. A resumed
            fit (``ckpt_path``) restores its trained student over them. Checkpoints hold the trained
            student, so they record ``student_checkpoint=None`` (reloading never reads the start
            file) and the start's absolute path under ``"student_start"``.
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
        student_checkpoint: str | Path | None = None,
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
        #: the student's start weights as an absolute path (checkpoints record it apart), or ``None``
        self.student_checkpoint = None
        if student_checkpoint is not None:  # before the teacher: an EMA teacher copies the loaded student
            self.student_checkpoint = student_checkpoint = load_student_start(student, student_checkpoint)
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
        """Fail loudly when the fit had no training batch (``module_setup.check_training_data``)."""
        check_training_data(self.trainer)

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
        teacher_output, teacher_features, student_output = self.call_models(batch, inputs, teacher_output)
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

    def call_models(
        self, batch: Any, inputs: Any, teacher_output: Any = None
    ) -> tuple[Any, dict[str, Tensor] | None, Any]:
        """Teacher (unless ``teacher_output`` is given), then student: ``(teacher, features, student)``.

        ``teacher_features`` are the teacher's hooked features when they come from elsewhere (a
        cache), else ``None``. A forward that fails because of its inputs is re-raised naming the
        fix (:meth:`raise_explained`).
        """
        teacher_features = None
        try:
            if teacher_output is None and self.teacher is not None:
                teacher_output, teacher_features = self.call_teacher(batch, inputs)
            student_output = self.call_student(inputs)
        except (RuntimeError, ValueError) as error:
            self.raise_explained(error, batch, inputs)
            raise
        return teacher_output, teacher_features, student_output

    def call_teacher(self, batch: Any, inputs: Any) -> tuple[Any, dict[str, Tensor] | None]:
        """The teacher's output on ``batch`` and, when they come from elsewhere (a cache), its features.

        In training the teacher's role provides them (a cached teacher serves stored outputs);
        held-out batches run :meth:`teacher_forward`.
        """
        if self.training:
            return self.teacher_role.training_outputs(self, batch, inputs)
        return self.teacher_forward(self.teacher_inputs(batch, inputs)), None

    def call_student(self, inputs: Any) -> Any:
        """The student's output on ``inputs``."""
        return call_model(self.student, inputs)

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
