"""QuantizationAwareTraining: fake-quantize the student while a float teacher teaches it.

The Lightning callback only; the ``torch.ao`` functions it calls (``prepare_qat``,
``convert_to_int8``, ``evaluate_int8``, ...) are in :mod:`lightning_kd.quantization`.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.ao.nn.intrinsic import qat as intrinsic_qat
from torch.ao.quantization import disable_observer, enable_observer
from torch.fx import GraphModule

from lightning_kd.callbacks.feature_hooks import FeatureHooks
from lightning_kd.callbacks.report.io import log_metrics, output_directory, validation_loader
from lightning_kd.model_io import call_model, logits_of
from lightning_kd.module_setup import first_batch
from lightning_kd.quantization import (
    check_backend,
    convert_to_int8,
    evaluate_int8,
    int8_counts,
    int8_engine,
    int8_rates,
    is_qat_prepared,
    prepare_qat,
    require_student,
)

__all__ = ["QuantizationAwareTraining"]


def _require_observed(model: nn.Module) -> None:
    """Raise unless the observers of ``model`` have seen data (a finite min/max range was recorded)."""
    ranges = [m.min_val for m in model.modules() if isinstance(getattr(m, "min_val", None), Tensor)]
    if not any(r.numel() > 0 and bool(torch.isfinite(r).all()) for r in ranges):
        raise ValueError(
            "The student's quantization ranges were never observed: fit with QuantizationAwareTraining "
            "first, or evaluate a QAT run's checkpoint (trainer.test(..., ckpt_path=...))."
        )


def _freeze_bn(module: nn.Module) -> None:
    if isinstance(module, intrinsic_qat.ConvBn1d | intrinsic_qat.ConvBn2d | intrinsic_qat.ConvBn3d):
        module.freeze_bn_stats()


class QuantizationAwareTraining(pl.Callback):
    """Train the student of a :class:`~lightning_kd.DistillationModule` with int8 fake quantization.

    Quantization-aware training (Jacob et al., "Quantization and Training of Neural Networks for
    Efficient Integer-Arithmetic-Only Inference", CVPR 2018) under distillation: the student is
    trained through fake quantization (:func:`~lightning_kd.quantization.prepare_qat`, torch.ao
    FX graph mode) while the teacher, if any, stays float and untouched; without a teacher it is
    plain QAT (the baseline on the same code path).

    - ``setup``: ``pl_module.student`` is replaced by its QAT-prepared ``GraphModule``, traced on
      the first batch of the Trainer call's data (else ``pl_module.example_input_array``), before the
      optimizer is built. Feature hooks already attached are re-attached to the new student; paths of
      layers fused away (a ReLU after a Linear) no longer exist, and a fused Linear/Conv's hook
      captures the output after its ReLU/BN.
    - Observers update in training only (off during validation, test and prediction). From epoch
      ``freeze_observers_epoch`` on they stay off (quantization ranges fixed), and from
      ``freeze_bn_epoch`` on fused Conv-BN layers use their running statistics (as in Jacob et al.).
    - ``on_fit_end`` (global rank 0): a copy of the student is converted to int8
      (:func:`~lightning_kd.quantization.convert_to_int8`) and run on the validation data on the
      CPU; logged through every logger: ``quantized/val_acc`` and ``quantized/val_agreement``
      (top-1 agreement of the int8 student with the fake-quantized float student); kept in
      :attr:`metrics`. The int8 student is saved whole (``torch.save``) to ``filename`` beside
      the checkpoints (:attr:`path`); reload with ``torch.load(path, weights_only=False)``.
    - ``trainer.test`` after fit: the int8 student (converted from the student as tested, e.g.
      the best checkpoint) also runs on each test batch; ``quantized/test_acc`` and
      ``quantized/test_agreement`` appear in the test results.

    Checkpoints hold the prepared student; resuming with ``ckpt_path`` works with this callback
    in the Trainer. Outside a Trainer, load one with
    :func:`~lightning_kd.quantization.restore_qat_student`.

    Args:
        backend: int8 backend: ``"x86"``, ``"fbgemm"``, ``"qnnpack"`` or ``"onednn"``.
        freeze_observers_epoch: first epoch with frozen quantization ranges; ``None``: never.
        freeze_bn_epoch: first epoch with frozen BatchNorm statistics; ``None``: never.
        non_traceable_modules: student submodules (dotted paths) that FX tracing skips; they stay float.
        reduce_range: 7-bit activations, torch.ao's x86 / fbgemm default (see
            :func:`~lightning_kd.quantization.qat_qconfig_mapping`).
        filename: file name of the saved int8 student; ``None``: not saved.
        directory: where it goes; default: the checkpoint directory, else the log directory.
    """

    def __init__(
        self,
        backend: str = "x86",
        freeze_observers_epoch: int | None = None,
        freeze_bn_epoch: int | None = None,
        non_traceable_modules: Sequence[str] = (),
        reduce_range: bool = False,
        filename: str | None = "student_int8.pt",
        directory: str | Path | None = None,
    ) -> None:
        super().__init__()
        self.backend = check_backend(backend)
        for name, epoch in (
            ("freeze_observers_epoch", freeze_observers_epoch),
            ("freeze_bn_epoch", freeze_bn_epoch),
        ):
            if epoch is not None and epoch < 0:
                raise ValueError(f"{name} must be a non-negative epoch or None, got {epoch}.")
        self.freeze_observers_epoch = freeze_observers_epoch
        self.freeze_bn_epoch = freeze_bn_epoch
        self.non_traceable_modules = list(non_traceable_modules)
        self.reduce_range = reduce_range
        self.filename = filename
        self.directory = Path(directory) if directory is not None else None
        self.metrics: dict[str, float] = {}
        self.path: Path | None = None
        self.int8_student: GraphModule | None = None
        self._test_counts: list[int] = []

    # ----------------------------------------------------------------- preparation
    @staticmethod
    def _probe_inputs(trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> Any:
        batch = first_batch(trainer, stage)
        if batch is not None:
            return pl_module.unpack_batch(batch)[0]
        if pl_module.example_input_array is not None:
            return pl_module.example_input_array
        stage = getattr(stage, "value", stage)  # Lightning passes a TrainerFn
        raise ValueError(
            f"QuantizationAwareTraining traces the student on one input batch, but the Trainer's {stage} "
            "call has no data: pass dataloaders or a datamodule to it, or set `module.example_input_array` "
            "to an input of the student."
        )

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Replace ``pl_module.student`` by its QAT-prepared version (before the optimizer exists)."""
        require_student(pl_module)
        role = getattr(pl_module, "teacher_role", None)
        if getattr(pl_module, "teacher", None) is not None and role is not None and role.copies_student:
            raise ValueError(
                f"QuantizationAwareTraining does not support teacher_mode={role.mode!r}: the teacher is a "
                "float copy of the student whose weights no longer match the fake-quantized student. Use a "
                "frozen or trainable teacher."
            )
        if is_qat_prepared(pl_module.student):
            return
        inputs = self._probe_inputs(trainer, pl_module, stage)
        pl_module.student = prepare_qat(
            pl_module.student, inputs, self.backend, self.non_traceable_modules, self.reduce_range
        )
        pl_module.student.to(pl_module.device)
        for hooks in [c for c in trainer.callbacks if isinstance(c, FeatureHooks)]:
            if hooks.attached:
                hooks.attach(pl_module)

    # ----------------------------------------------------------------- observers and BN
    def _training_observers(self, epoch: int) -> bool:
        return self.freeze_observers_epoch is None or epoch < self.freeze_observers_epoch

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Observers on until ``freeze_observers_epoch``; BN statistics frozen from ``freeze_bn_epoch``."""
        epoch = trainer.current_epoch
        pl_module.student.apply(enable_observer if self._training_observers(epoch) else disable_observer)
        if self.freeze_bn_epoch is not None and epoch >= self.freeze_bn_epoch:
            pl_module.student.apply(_freeze_bn)

    def _observers_off(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl_module.student.apply(disable_observer)

    def _observers_back(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING and self._training_observers(trainer.current_epoch):
            pl_module.student.apply(enable_observer)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Observers off; ``trainer.validate`` needs observed ranges (a fit, or a QAT checkpoint)."""
        self._observers_off(trainer, pl_module)
        if trainer.state.fn == TrainerFn.VALIDATING:
            _require_observed(pl_module.student)

    on_validation_end = _observers_back
    on_predict_start = _observers_off

    # ----------------------------------------------------------------- int8 at the end of fit
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Convert the student to int8, evaluate it on the validation data (CPU), log and save it."""
        if not trainer.is_global_zero:
            return
        student = pl_module.student
        student.apply(disable_observer)
        self.int8_student = convert_to_int8(student, self.backend)
        loader = validation_loader(trainer)
        if loader is None or (isinstance(loader, list | tuple) and not loader):
            rank_zero_warn(
                "QuantizationAwareTraining found no validation data; the int8 student is not evaluated."
            )
        else:
            loaders = loader if isinstance(loader, list | tuple) else [loader]
            reference = copy.deepcopy(student).cpu().eval()
            batches = (pl_module.unpack_batch(batch) for data in loaders for batch in data)
            found = evaluate_int8(self.int8_student, batches, reference, self.backend)
            self.metrics.update({f"quantized/val_{key}": value for key, value in found.items()})
            log_metrics(trainer, self.metrics)
        if self.filename is not None:
            self.path = output_directory(trainer, self.directory) / self.filename
            torch.save(self.int8_student, self.path)

    # ----------------------------------------------------------------- int8 in trainer.test
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Convert the student as tested (e.g. the best checkpoint's) to int8."""
        self._observers_off(trainer, pl_module)
        _require_observed(pl_module.student)
        self.int8_student = convert_to_int8(pl_module.student, self.backend)
        self._test_counts = [0, 0, 0, 0]  # correct, labelled, agreeing, seen

    def on_test_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Run the int8 student on the batch (CPU) beside the fake-quantized student."""
        inputs, targets = pl_module.unpack_batch(batch)
        with torch.no_grad(), int8_engine(self.backend):
            reference_logits = logits_of(call_model(pl_module.student, inputs))
            counts = int8_counts(self.int8_student, inputs, targets, reference_logits)
        self._test_counts = [total + count for total, count in zip(self._test_counts, counts, strict=True)]

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Log ``quantized/test_acc`` and ``quantized/test_agreement`` (averaged over processes)."""
        rates = int8_rates(*self._test_counts, with_reference=True)
        for key, value in rates.items():
            pl_module.log(f"quantized/test_{key}", value, sync_dist=True)
            self.metrics[f"quantized/test_{key}"] = value
