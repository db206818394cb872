"""Data-free distillation (DAFL): a generator makes the transfer set from the frozen teacher alone."""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_kd.batch_checks import probabilities_message, probability_rows
from lightning_kd.data.latent_noise import LatentNoiseDataModule
from lightning_kd.diagnosis import CheckFinite, non_finite_cause, non_finite_loss_error
from lightning_kd.hooks import LayerHooks, find_layer, first_tensor
from lightning_kd.losses import CrossEntropyTerm, KDTerm, LossTerm, StepOutputs
from lightning_kd.losses.base import weighted_total
from lightning_kd.model_io import BatchKey, logits_of
from lightning_kd.module import DistillationModule
from lightning_kd.module_setup import default_schedule
from lightning_kd.paradigms.generator_losses import (
    bn_statistics_loss,
    dafl_activation_loss,
    dafl_information_entropy_loss,
    dafl_one_hot_loss,
)
from lightning_kd.step_monitor import Reading, logs_this_step

__all__ = ["GENERATOR_PARTS", "DataFreeDistillationModule"]

#: the parts of the generator's loss, logged as ``train/loss_<part>``.
GENERATOR_PARTS = ("one_hot", "activation", "entropy", "bn")


def _last_linear(teacher: nn.Module) -> str:
    names = [name for name, module in teacher.named_modules() if isinstance(module, nn.Linear)]
    if not names:
        raise ValueError(
            f"{type(teacher).__name__} has no nn.Linear whose input could serve as the penultimate features "
            "of DAFL's activation loss: set feature_layer= to the dotted path of the teacher's feature layer."
        )
    return names[-1]


class DataFreeDistillationModule(DistillationModule):
    """Distil a frozen teacher into a student without training data (DAFL).

    Chen et al., "Data-Free Learning of Student Networks", ICCV 2019. A ``generator`` maps
    latent noise ``z`` to inputs ``x = G(z)``; each training step (manual optimisation, two
    optimizers) is:

    1. **generator step**: the frozen teacher (eval mode, no parameter gradients; the
       gradient flows through it into ``x``) classifies ``x``, and the generator minimises
       ``one_hot_weight * L_oh + activation_weight * L_a + entropy_weight * L_ie
       (+ bn_weight * R_bn)``: the teacher is confident on ``x``
       (:func:`~lightning_kd.paradigms.generator_losses.dafl_one_hot_loss`), its penultimate features
       fire strongly (:func:`~lightning_kd.paradigms.generator_losses.dafl_activation_loss`), and the
       batch covers the classes evenly
       (:func:`~lightning_kd.paradigms.generator_losses.dafl_information_entropy_loss`). Optionally
       DeepInversion's prior (Yin et al., CVPR 2020): ``x`` matches the statistics stored in
       the teacher's BatchNorm layers (:func:`~lightning_kd.paradigms.generator_losses.bn_statistics_loss`).
    2. **student step**: on ``x.detach()``, the student minimises ``losses`` against the
       teacher's detached logits of the same ``x``; default DAFL's: the KL divergence
       ``KL(softmax(t) || softmax(s))`` at temperature 1 (:class:`~lightning_kd.KDTerm`).

    The student's loss gives the generator no gradient and the generator's loss gives the
    student none. Training batches are latent noise from
    :class:`~lightning_kd.data.latent_noise.LatentNoiseDataModule`, which wraps a real
    datamodule for validation and test only (its training split is never read). Validation
    and test report the student's (and the teacher's) accuracy on real data like
    :class:`~lightning_kd.DistillationModule`. Logged: ``train/loss_generator``,
    ``train/loss_student``, ``train/loss_<part>`` for every generator part
    (``one_hot``, ``activation``, ``entropy``, ``bn`` if used) and every student term.

    ``trainer.global_step`` counts the steps of both optimizers (two per batch). Checkpoints
    hold student, generator, both optimizers and schedulers; the teacher is restored from its
    own source (``teacher`` and ``teacher_checkpoint``).

    Args:
        student: the network being trained.
        teacher: the trained network it learns from (frozen).
        generator: ``z -> x``, e.g. :class:`~lightning_kd.models.generator.Generator`, with a
            ``latent_dim`` attribute; its output must fit the teacher and the student.
        losses: the student's terms on generated samples (no labels); default
            ``KDTerm("kd", weight=1, temperature=1)``.
        teacher_checkpoint: a file with the teacher's trained weights.
        student_checkpoint: weights the student starts from (see :class:`~lightning_kd.DistillationModule`).
        one_hot_weight: weight of DAFL's one-hot loss (the paper's 1).
        activation_weight: weight of DAFL's activation loss (alpha; the paper's MNIST 0.1).
        entropy_weight: weight of DAFL's information-entropy loss (beta), natural logarithm;
            the paper's MNIST beta of 5 with the authors' base-10 logarithm is 5 / ln 10 = 2.17.
        bn_weight: weight of DeepInversion's BatchNorm-statistics prior (0: off).
        feature_layer: dotted path of the teacher layer whose output the activation loss reads;
            default: the input of the teacher's last registered ``nn.Linear`` (its classifier).
        num_classes: number of classes; default: inferred from the models.
        input_key: where the inputs are in a real (validation/test) batch.
        target_key: where the labels are in a real batch.
        optimizer: ``params -> Optimizer`` for the student (and its terms' adapters); default Adam 1e-3.
        generator_optimizer: ``params -> Optimizer`` for the generator; default Adam 1e-3.
        lr_scheduler: ``optimizer -> LRScheduler``, applied to both optimizers; default: cosine
            decay to 0 over the run, stepped every batch (unless ``cosine_decay=False``).
        lr_scheduler_interval: ``"epoch"`` or ``"step"``: when ``lr_scheduler`` steps.
        cosine_decay: use the default cosine decay when ``lr_scheduler`` is ``None``.
        check_finite: stop with an error naming the first step and the part when a loss is NaN or
            infinite: ``True`` (read at the logging steps and epoch ends, no wait per step),
            ``"step"`` (read in every step) or ``False`` (see :class:`~lightning_kd.DistillationModule`).
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        generator: nn.Module,
        losses: Sequence[LossTerm] | None = None,
        teacher_checkpoint: str | Path | None = None,
        student_checkpoint: str | Path | None = None,
        one_hot_weight: float = 1.0,
        activation_weight: float = 0.1,
        entropy_weight: float = 5.0,
        bn_weight: float = 0.0,
        feature_layer: str | None = None,
        num_classes: int | None = None,
        input_key: BatchKey = 0,
        target_key: BatchKey | None = 1,
        optimizer: OptimizerCallable | None = None,
        generator_optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        lr_scheduler_interval: Literal["epoch", "step"] = "epoch",
        cosine_decay: bool = True,
        check_finite: CheckFinite = True,
    ) -> None:
        if teacher is None:
            raise ValueError("Data-free distillation needs a trained teacher: pass `teacher`.")
        if not isinstance(getattr(generator, "latent_dim", None), int):
            raise ValueError(
                f"The generator ({type(generator).__name__}) needs an int attribute `latent_dim` (the size "
                "of the noise it maps), e.g. lightning_kd.models.generator.Generator."
            )
        terms = list(losses) if losses is not None else [KDTerm("kd", weight=1.0, temperature=1.0)]
        with warnings.catch_warnings():  # the base class records hyperparameters before ours are known
            warnings.filterwarnings("ignore", message="Attribute 'generator' is an instance of `nn.Module`")
            super().__init__(
                student,
                teacher,
                losses=terms,
                teacher_mode="frozen",
                teacher_checkpoint=teacher_checkpoint,
                student_checkpoint=student_checkpoint,
                num_classes=num_classes,
                input_key=input_key,
                target_key=target_key,
                optimizer=optimizer,
                lr_scheduler=lr_scheduler,
                lr_scheduler_interval=lr_scheduler_interval,
                cosine_decay=cosine_decay,
                check_finite=check_finite,
            )
        modules = ["student", "teacher", "generator", "losses"]
        self.save_hyperparameters(ignore=[*modules, "optimizer", "generator_optimizer", "lr_scheduler"])
        self.automatic_optimization = False
        labelled = [term.name for term in terms if isinstance(term, CrossEntropyTerm)]
        if labelled:
            raise ValueError(
                f"Loss terms {labelled} read labels, but data-free training has none: the student learns "
                "from the teacher's outputs on generated samples (e.g. KDTerm)."
            )
        clashes = sorted({term.name for term in terms} & {*GENERATOR_PARTS, "generator", "student"})
        if clashes:
            raise ValueError(f"Loss term names {clashes} clash with the generator's losses; rename them.")
        weights = {"one_hot": one_hot_weight, "activation": activation_weight, "entropy": entropy_weight}
        negative = {name: value for name, value in {**weights, "bn": bn_weight}.items() if value < 0}
        if negative:
            raise ValueError(f"Generator loss weights must be >= 0, got {negative}.")
        self.generator = generator
        self.generator_weights = {name: float(value) for name, value in weights.items()}
        if bn_weight > 0:
            self.generator_weights["bn"] = float(bn_weight)
            if not any(isinstance(m, _BatchNorm) for m in teacher.modules()):
                raise ValueError(
                    f"bn_weight={bn_weight} needs BatchNorm layers in the teacher ({type(teacher).__name__} "
                    "has none): set bn_weight=0."
                )
        self.feature_layer = feature_layer
        if feature_layer is not None:
            find_layer(teacher, feature_layer, "teacher")  # fail early on an unknown path
        self._classifier = _last_linear(teacher) if feature_layer is None else None
        self.generator_optimizer_factory = generator_optimizer

    # ----------------------------------------------------------------- set-up
    def setup(self, stage: str) -> None:
        """Refuse real training data; build the student terms' adapters on a generated batch."""
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        if stage == "fit" and datamodule is not None and not isinstance(datamodule, LatentNoiseDataModule):
            raise TypeError(
                f"DataFreeDistillationModule trains on latent noise, not on {type(datamodule).__name__}'s "
                "training data: pass LatentNoiseDataModule(your_datamodule, latent_dim=...) as the "
                "datamodule (your datamodule then serves validation and test only)."
            )
        super().setup(stage)

    def check_batch(self, batch: Any, stage: str) -> None:
        """Real (validation, test) batches as in the base class; training batches are latent noise."""
        if stage != "training":
            super().check_batch(batch, stage)

    def probe_batch(self, stage: str) -> Tensor:
        """Two generated samples (generator in eval mode, no gradient) to size the student terms' adapters."""
        was_training = self.generator.training
        self.generator.eval()
        try:
            with torch.no_grad():
                return self.generator(torch.randn(2, self.generator.latent_dim, device=self.device))
        finally:
            self.generator.train(was_training)

    def _teacher_taps(self) -> tuple[LayerHooks, LayerHooks | None]:
        """Hooks for one teacher forward: its features, and (if used) every BatchNorm's input."""
        if self._classifier is not None:
            features = LayerHooks.on(self.teacher, [self._classifier], "teacher", capture="input")
        else:
            assert self.feature_layer is not None
            features = LayerHooks.on(self.teacher, [self.feature_layer], "teacher")
        if "bn" not in self.generator_weights:
            return features, None
        batch_norms = [m for m in self.teacher.modules() if isinstance(m, _BatchNorm)]
        return features, LayerHooks(dict(enumerate(batch_norms)), capture="input", keep="all")

    # ----------------------------------------------------------------- losses
    def generator_loss(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
        """Generate ``x = G(z)`` and score it with the teacher.

        Returns ``(x, teacher_logits, total, parts)``: the generated samples and the teacher's
        logits (both carrying the generator's graph), the weighted generator loss, and each
        part unweighted.
        """
        inputs = self.generator(z)
        feature_hooks, bn_hooks = self._teacher_taps()
        with feature_hooks, bn_hooks or nullcontext():
            teacher_logits = logits_of(self.teacher(inputs))
        if not feature_hooks.captured:
            raise RuntimeError("The teacher's feature layer did not run in its forward: set feature_layer=.")
        parts = {
            "one_hot": dafl_one_hot_loss(teacher_logits),
            "activation": dafl_activation_loss(first_tensor(next(iter(feature_hooks.captured.values())))),
            "entropy": dafl_information_entropy_loss(teacher_logits),
        }
        if bn_hooks is not None:  # every call of every BatchNorm that ran
            calls = [(bn_hooks.layers[i], x) for i, seen in bn_hooks.captured.items() for x in seen]
            parts["bn"] = bn_statistics_loss(
                [x for _, x in calls],
                [layer.running_mean for layer, _ in calls],
                [layer.running_var for layer, _ in calls],
            )
        total = weighted_total(parts, self.generator_weights)
        if self.check_finite == "step" and not torch.isfinite(total):
            cause = self.generator_cause(z, inputs, teacher_logits)
            raise non_finite_loss_error("generator losses", self.global_step, parts, cause)
        return inputs, teacher_logits, total, parts

    def generator_cause(self, z: Tensor | None, inputs: Tensor | None, teacher_logits: Tensor | None) -> str:
        """What made the generator's loss NaN/Inf (:func:`~lightning_kd.diagnosis.non_finite_cause`).

        Without ``z`` (found after its step), only the settings and the weights are read.
        """
        return non_finite_cause(
            z,
            {"generator": self.generator, "teacher": self.teacher},
            {"generator": inputs, "teacher": teacher_logits} if z is not None else {},
            settings={
                f"weight of the generator's {name} loss": w for name, w in self.generator_weights.items()
            },
            trained=["generator"],
            samples=int(z.shape[0]) if z is not None else None,
        )

    def non_finite_error(self, reading: Reading, outputs: StepOutputs | None = None) -> FloatingPointError:
        """The generator's losses when they were NaN/Inf at the first bad step, else the student's terms."""
        assert reading.first_bad is not None
        if math.isfinite(reading.bad_values["train/loss_generator"]):
            return super().non_finite_error(reading, None)
        parts = {name: reading.bad_values[f"train/loss_{name}"] for name in self.generator_weights}
        cause = self.generator_cause(None, None, None)
        return non_finite_loss_error(
            "generator losses", reading.first_bad, parts, cause, found_at=reading.last_step
        )

    #: the training value shown in the progress bar
    progress_bar_metric = "train/loss_student"

    def step_outputs(self, batch: Tensor, teacher_output: Tensor | None = None) -> StepOutputs:
        """The student's (and the teacher's) outputs on generated samples ``batch`` (no labels).

        ``teacher_output``: the teacher's logits on ``batch`` if already computed (they are
        detached); otherwise the teacher runs under ``no_grad``.
        """
        batch = batch.detach()
        teacher_logits = (
            logits_of(self.teacher_forward(batch)) if teacher_output is None else teacher_output.detach()
        )
        student_logits = logits_of(self.student(batch))
        features = self.feature_hooks.features if self.feature_hooks is not None else {}
        return StepOutputs(
            student_logits=student_logits,
            teacher_logits=teacher_logits,
            student_features=features.get("student", {}),
            teacher_features=features.get("teacher", {}),
            batch=batch,
        )

    def student_loss(
        self, inputs: Tensor, teacher_logits: Tensor | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The student's weighted loss on generated ``inputs`` (detached) and each term's value."""
        return self.compute_loss(self.step_outputs(inputs, teacher_logits))  # compute_loss checks finiteness

    # ----------------------------------------------------------------- steps
    def _latents(self, batch: Any) -> Tensor:
        z = batch[0] if isinstance(batch, (tuple, list)) and len(batch) == 1 else batch
        latent_dim = self.generator.latent_dim
        if not isinstance(z, Tensor) or z.ndim != 2 or z.shape[1] != latent_dim or not z.is_floating_point():
            shape = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
            raise ValueError(
                f"Training batches must be latent noise of shape (N, {latent_dim}), got {shape}: use "
                f"LatentNoiseDataModule(your_datamodule, latent_dim={latent_dim})."
            )
        return z

    def training_step(self, batch: Any, batch_idx: int) -> None:
        """A generator step, then a student step on the same (detached) generated samples.

        Every loss is recorded on the device and logged at Lightning's logging steps (one transfer).
        """
        z = self._latents(batch)
        step = self.global_step
        student_optimizer, generator_optimizer = self.optimizers()
        inputs, teacher_logits, generator_total, parts = self.generator_loss(z)
        if batch_idx == 0 and step == 0:  # DAFL's losses read the teacher's logits
            self.monitor.defer_warning(probability_rows(teacher_logits), probabilities_message("teacher"))
        generator_optimizer.zero_grad()
        self.manual_backward(generator_total)
        generator_optimizer.step()

        student_total, values = self.student_loss(inputs, teacher_logits)
        student_optimizer.zero_grad()
        self.manual_backward(student_total)
        student_optimizer.step()
        if self._scheduler_interval == "step":
            self._step_schedulers()

        recorded = {f"train/loss_{name}": value for name, value in {**parts, **values}.items()}
        recorded |= {"train/loss_generator": generator_total, "train/loss_student": student_total}
        self.monitor.record(step, recorded, checked=2)
        if logs_this_step(self._trainer):
            self.log_reading(self.read_monitor())

    def on_train_epoch_end(self) -> None:
        """Read the epoch's records (see :class:`DistillationModule`), step epoch-wise schedulers."""
        super().on_train_epoch_end()
        if self._scheduler_interval == "epoch":
            self._step_schedulers()

    # ----------------------------------------------------------------- optimisation
    @property
    def _scheduler_interval(self) -> str | None:
        if self.lr_scheduler_factory is not None:
            return self.lr_scheduler_interval
        return "step" if self.cosine_decay else None

    def _step_schedulers(self) -> None:
        schedulers = self.lr_schedulers()
        for scheduler in schedulers if isinstance(schedulers, list) else [schedulers]:
            if scheduler is not None:
                scheduler.step()

    def configure_optimizers(self) -> Any:
        """Two optimizers, the student's (with its terms' adapters) and the generator's; a scheduler each."""
        generator_params = list(self.generator.parameters())
        ids = {id(p) for p in generator_params}
        student_params = [p for p in self.parameters() if p.requires_grad and id(p) not in ids]
        optimizers = [
            (factory or functools.partial(torch.optim.Adam, lr=1e-3))(params)
            for factory, params in (
                (self.optimizer_factory, student_params),
                (self.generator_optimizer_factory, generator_params),
            )
        ]
        if self.lr_scheduler_factory is not None:
            schedulers = [self.lr_scheduler_factory(optimizer) for optimizer in optimizers]
            if any(isinstance(s, torch.optim.lr_scheduler.ReduceLROnPlateau) for s in schedulers):
                raise ValueError(
                    "ReduceLROnPlateau needs a monitored metric, which data-free training steps without; "
                    "use a schedule of the step or epoch (e.g. CosineAnnealingLR)."
                )
        elif self.cosine_decay:
            schedulers = [default_schedule(optimizer, self.trainer) for optimizer in optimizers]
        else:
            return optimizers
        return optimizers, schedulers
