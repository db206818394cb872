"""Quantization-aware distillation: fake-quantize the student while a float teacher teaches it."""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import move_data_to_device, rank_zero_warn
from torch import Tensor, nn
from torch.ao.nn.intrinsic import qat as intrinsic_qat
from torch.ao.quantization import (
    FusedMovingAvgObsFakeQuantize,
    MovingAverageMinMaxObserver,
    QConfig,
    QConfigMapping,
    disable_observer,
    enable_observer,
    get_default_qat_qconfig_mapping,
    get_default_qconfig_mapping,
)
from torch.ao.quantization.fake_quantize import FakeQuantizeBase
from torch.ao.quantization.fx.custom_config import PrepareCustomConfig
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx, prepare_qat_fx
from torch.fx import GraphModule
from torch.fx.proxy import TraceError

from lightning_kd.callbacks.feature_hooks import FeatureHooks
from lightning_kd.callbacks.report_io import beside_checkpoints
from lightning_kd.model_io import call_model, logits_of

__all__ = [
    "BACKENDS",
    "QuantizationAwareTraining",
    "convert_to_int8",
    "evaluate_int8",
    "is_qat_prepared",
    "post_training_int8",
    "prepare_qat",
    "qat_qconfig_mapping",
    "restore_qat_student",
]

#: the int8 backends of ``torch.ao.quantization`` (the ``qconfig`` mapping and the CPU kernels)
BACKENDS = ("x86", "fbgemm", "qnnpack", "onednn")

# torch.ao.quantization warns on every call that it is deprecated in favour of torchao (pt2e), and its
# observers warn about ``reduce_range``; neither is actionable for a user of this callback.
_QUIET = (
    r".*torch\.ao\.quantization is deprecated.*",
    r".*reduce_range will be deprecated.*",
    r".*quantized tensor creation functions.*",
)


@contextlib.contextmanager
def _quiet_torch_ao() -> Iterator[None]:
    with warnings.catch_warnings():
        for message in _QUIET:
            warnings.filterwarnings("ignore", message=message)
        yield


@contextlib.contextmanager
def _engine(backend: str) -> Iterator[None]:
    """Run int8 kernels of ``backend`` (``torch.backends.quantized.engine``), then restore the engine.

    Quantized tensors are resized by an op without a deterministic implementation, so under
    ``Trainer(deterministic=True)`` (``torch.use_deterministic_algorithms(True)``) that setting
    is relaxed to ``warn_only`` for the int8 model's run, and restored afterwards.
    """
    previous = torch.backends.quantized.engine
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.backends.quantized.engine = backend
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*does not have a deterministic implementation.*")
            yield
    finally:
        torch.backends.quantized.engine = previous
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)


def _check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"Unknown quantization backend {backend!r}; use one of {list(BACKENDS)}.")
    supported = torch.backends.quantized.supported_engines
    if backend not in supported:
        raise ValueError(
            f"Quantization backend {backend!r} is not available in this PyTorch build "
            f"(supported engines: {supported}); pick one of those."
        )
    return backend


def _as_args(example_inputs: Any) -> tuple[Any, ...]:
    return example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)


def qat_qconfig_mapping(backend: str = "x86", reduce_range: bool = False) -> QConfigMapping:
    """The ``QConfigMapping`` of :func:`prepare_qat`: torch.ao's QAT default, with 8-bit activations.

    torch.ao's default for x86 / fbgemm fake-quantizes activations to 7 bits (``reduce_range``:
    ``[0, 127]``) so that older CPUs without VNNI cannot saturate their 16-bit accumulation, but the
    converted int8 kernels clamp activations to ``[0, 255]`` only: an activation above its observed
    range is clamped in training and not at inference, and the int8 student drifts from the trained
    one (measured on MNIST-1D after 4 epochs: max logit difference 3.7, 95% top-1 agreement).
    With ``reduce_range=False`` (default here) activations are fake-quantized to ``[0, 255]``, as
    the kernels compute them (max logit difference one output quantization step, 98% agreement).
    Weights keep the backend's default (per-channel symmetric int8 for x86 / fbgemm).
    """
    mapping = get_default_qat_qconfig_mapping(_check_backend(backend))
    if reduce_range:
        return mapping
    default = mapping.global_qconfig
    activation = FusedMovingAvgObsFakeQuantize.with_args(
        observer=MovingAverageMinMaxObserver,
        quant_min=0,
        quant_max=255,
        dtype=torch.quint8,
        reduce_range=False,
    )
    full_range = QConfig(activation=activation, weight=default.weight)
    mapping.set_global(full_range)
    for object_type, qconfig in list(mapping.object_type_qconfigs.items()):
        if qconfig is default:
            mapping.set_object_type(object_type, full_range)
    return mapping


def _prepare(
    model: nn.Module,
    example_inputs: Any,
    backend: str,
    non_traceable: Sequence[str],
    qat: bool,
    reduce_range: bool = False,
) -> GraphModule:
    _check_backend(backend)
    if isinstance(example_inputs, Mapping):
        raise TypeError(
            "FX quantization calls the model with positional inputs, but the inputs are a mapping "
            f"(keys {list(example_inputs)}); wrap the model so that forward takes tensors."
        )
    custom = PrepareCustomConfig().set_non_traceable_module_names(list(non_traceable))
    mapping = qat_qconfig_mapping(backend, reduce_range) if qat else get_default_qconfig_mapping(backend)
    model.train(qat)
    try:
        with _quiet_torch_ao():
            prepare = prepare_qat_fx if qat else prepare_fx
            return prepare(model, mapping, _as_args(example_inputs), prepare_custom_config=custom)
    except TraceError as error:
        raise TypeError(
            f"{type(model).__name__} is not FX-traceable, which torch.ao's FX graph mode quantization needs: "
            f"{error}. Fix: remove Python control flow on tensor values from its forward (e.g. "
            "`if x.dim() == 2:` -> always reshape), or name the submodules that contain it in "
            "non_traceable_modules=[...] (they then stay in float)."
        ) from error


def prepare_qat(
    model: nn.Module,
    example_inputs: Any,
    backend: str = "x86",
    non_traceable_modules: Sequence[str] = (),
    reduce_range: bool = False,
) -> GraphModule:
    """``model`` made ready for quantization-aware training: a ``GraphModule`` with fake quantization.

    Jacob et al., "Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only
    Inference", CVPR 2018: weights and activations pass through fake quantization,
    ``x_hat = (clamp(round(x / s) + z, q_min, q_max) - z) * s``, in the forward pass, with a
    straight-through gradient, so training adapts to int8 rounding. This is
    ``torch.ao.quantization.quantize_fx.prepare_qat_fx`` with :func:`qat_qconfig_mapping` (torch.ao's
    QAT default of ``backend``: per-channel symmetric int8 weights, per-tensor affine uint8
    activations observed by moving-average min/max; 8-bit activations unless ``reduce_range``);
    Conv/Linear + BN + ReLU are fused first.

    The returned module shares parameters with ``model`` (use it, not ``model``, from now on). Its
    module paths follow ``model``'s, except that fused modules (a ReLU after a Linear, a BN after
    a Conv) disappear into the module before them.

    Args:
        model: a symbolically traceable network (``torch.fx``).
        example_inputs: one input batch (a tensor, or a tuple of positional inputs).
        backend: ``"x86"``, ``"fbgemm"``, ``"qnnpack"`` or ``"onednn"``.
        non_traceable_modules: dotted paths of submodules that tracing skips; they stay float.
        reduce_range: 7-bit activations, torch.ao's x86 / fbgemm default (see :func:`qat_qconfig_mapping`).

    Raises:
        TypeError: ``model`` is not FX-traceable (the message names the fix).
        ValueError: unknown or unavailable ``backend``.
    """
    return _prepare(
        model, example_inputs, backend, non_traceable_modules, qat=True, reduce_range=reduce_range
    )


def is_qat_prepared(model: nn.Module) -> bool:
    """Whether ``model`` holds fake-quantization modules (it went through :func:`prepare_qat`)."""
    return any(isinstance(m, FakeQuantizeBase) for m in model.modules())


def convert_to_int8(model: nn.Module, backend: str = "x86") -> GraphModule:
    """A real int8 copy of a fake-quantized (or calibrated) ``GraphModule``, on the CPU, in eval mode.

    ``torch.ao.quantization.quantize_fx.convert_fx`` on a deep copy: weights are stored as int8
    with the scales and zero points the observers found, and Linear/Conv run as int8 kernels of
    ``backend``; inputs and outputs stay float (quantize at the input, dequantize at the output).
    ``model`` itself is not changed. Run the result under the same backend (:func:`evaluate_int8`
    does; or set ``torch.backends.quantized.engine``). Save it with ``torch.save(int8_model, path)``
    and reload with ``torch.load(path, weights_only=False)``.
    """
    _check_backend(backend)
    if not isinstance(model, GraphModule) or not any(
        isinstance(m, FakeQuantizeBase | torch.ao.quantization.ObserverBase) for m in model.modules()
    ):
        raise TypeError(
            f"convert_to_int8 needs a model returned by prepare_qat (or post_training_int8's preparation), "
            f"got a {type(model).__name__} without observers; call prepare_qat(model, example_inputs) first."
        )
    with _quiet_torch_ao(), _engine(backend):
        return convert_fx(copy.deepcopy(model).cpu().eval())


@torch.no_grad()
def post_training_int8(
    model: nn.Module,
    calibration_inputs: Iterable[Any],
    backend: str = "x86",
    non_traceable_modules: Sequence[str] = (),
) -> GraphModule:
    """Post-training static int8 quantization of a float model (no retraining), for comparison with QAT.

    A copy of ``model`` is prepared with observers (``prepare_fx``, the default post-training
    ``QConfigMapping`` of ``backend``), run on ``calibration_inputs`` (input batches) in eval mode so
    the observers record activation ranges, then converted (:func:`convert_to_int8`).
    """
    calibration = iter(calibration_inputs)
    first = next(calibration, None)
    if first is None:
        raise ValueError("post_training_int8 needs at least one calibration batch in calibration_inputs.")
    observed = _prepare(copy.deepcopy(model).cpu().eval(), first, backend, non_traceable_modules, qat=False)
    for inputs in (first, *calibration):
        observed(*_as_args(inputs))
    return convert_to_int8(observed, backend)


def _int8_counts(
    int8_model: nn.Module, inputs: Any, targets: Tensor | None, reference_logits: Tensor | None
) -> tuple[int, int, int, int]:
    """(correct, labelled, agreeing with the reference, seen) of the int8 model on one CPU batch."""
    predicted = logits_of(call_model(int8_model, move_data_to_device(inputs, "cpu"))).argmax(dim=-1)
    size = predicted.numel()
    correct = int((predicted == targets.cpu()).sum()) if targets is not None else 0
    agreeing = (
        int((predicted == reference_logits.cpu().argmax(dim=-1)).sum()) if reference_logits is not None else 0
    )
    return correct, size if targets is not None else 0, agreeing, size


@torch.no_grad()
def evaluate_int8(
    int8_model: nn.Module,
    batches: Iterable[tuple[Any, Tensor | None]],
    reference: nn.Module | None = None,
    backend: str = "x86",
) -> dict[str, float]:
    """Top-1 accuracy of an int8 model on CPU, and its top-1 agreement with a float ``reference``.

    ``batches`` yields ``(inputs, targets)`` (``targets`` may be ``None``); ``reference`` (e.g. the
    fake-quantized student with its observers off, see :func:`torch.ao.quantization.disable_observer`)
    runs on the same CPU inputs. Returns ``{"acc": ..., "agreement": ...}``: fractions over all
    samples; ``acc`` only with targets, ``agreement`` only with a ``reference``.
    """
    totals = [0, 0, 0, 0]
    with _engine(_check_backend(backend)):
        for inputs, targets in batches:
            inputs = move_data_to_device(inputs, "cpu")
            reference_logits = logits_of(call_model(reference, inputs)) if reference is not None else None
            counts = _int8_counts(int8_model, inputs, targets, reference_logits)
            totals = [total + count for total, count in zip(totals, counts, strict=True)]
    return _rates(*totals, with_reference=reference is not None)


def _rates(correct: int, labelled: int, agreeing: int, seen: int, with_reference: bool) -> dict[str, float]:
    if seen == 0:
        raise ValueError("The int8 evaluation got no batches; give it a non-empty loader.")
    rates = {"acc": correct / labelled} if labelled else {}
    if with_reference:
        rates["agreement"] = agreeing / seen
    return rates


def restore_qat_student(
    module: nn.Module, checkpoint: str | Path | Mapping[str, Any], example_inputs: Any, backend: str = "x86"
) -> nn.Module:
    """Prepare ``module.student`` for QAT and load the ``student.*`` weights of a QAT run's checkpoint.

    A checkpoint of a run with :class:`QuantizationAwareTraining` holds the prepared student
    (keys such as ``student.features.1.weight_fake_quant.scale``), which a float student cannot
    load. Outside a Trainer, build the module as for training and call this; then
    ``convert_to_int8(module.student)`` gives the int8 student. (Inside a Trainer with the
    callback, ``ckpt_path=`` works as usual: the callback prepares the student before the restore.)
    The observers are switched off, so the quantization ranges stay as trained
    (``module.student.apply(torch.ao.quantization.enable_observer)`` to train on). Returns ``module``.
    """
    state = checkpoint
    if not isinstance(state, Mapping):
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    student_state = {k.removeprefix("student."): v for k, v in state.items() if k.startswith("student.")}
    if not any(".activation_post_process" in k or "_fake_quant." in k for k in student_state):
        raise ValueError(
            "The checkpoint's student has no fake-quantization state: it is not from a QAT run. "
            "Load it with the float student as usual (e.g. DistillationModule.load_from_checkpoint)."
        )
    _require_student(module)
    if not is_qat_prepared(module.student):
        module.student = prepare_qat(module.student, example_inputs, backend)
    module.student.load_state_dict(student_state)
    module.student.apply(disable_observer)
    return module


def _require_student(pl_module: nn.Module) -> None:
    if not isinstance(getattr(pl_module, "student", None), nn.Module):
        raise TypeError(
            f"QuantizationAwareTraining quantizes `pl_module.student`, but {type(pl_module).__name__} has no "
            "student network; use it with lightning_kd.DistillationModule (with or without a teacher)."
        )


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
    trained through fake quantization (:func:`prepare_qat`, torch.ao FX graph mode) while the
    teacher, if any, stays float and untouched; without a teacher it is plain QAT (the baseline
    on the same code path).

    - ``setup``: ``pl_module.student`` is replaced by its QAT-prepared ``GraphModule``, traced on
      one batch of the datamodule (else ``pl_module.example_input_array``), before the optimizer
      is built. Feature hooks already attached are re-attached to the new student; paths of
      layers fused away (a ReLU after a Linear) no longer exist, and a fused Linear/Conv's hook
      captures the output after its ReLU/BN.
    - Observers update in training only (off during validation, test and prediction). From epoch
      ``freeze_observers_epoch`` on they stay off (quantization ranges fixed), and from
      ``freeze_bn_epoch`` on fused Conv-BN layers use their running statistics (as in Jacob et al.).
    - ``on_fit_end`` (global rank 0): a copy of the student is converted to int8
      (:func:`convert_to_int8`) and run on the validation data on the CPU; logged through every
      logger: ``quantized/val_acc`` and ``quantized/val_agreement`` (top-1 agreement of the int8
      student with the fake-quantized float student); kept in :attr:`metrics`. The int8 student
      is saved whole (``torch.save``) to ``filename`` beside the checkpoints (:attr:`path`);
      reload with ``torch.load(path, weights_only=False)``.
    - ``trainer.test`` after fit: the int8 student (converted from the student as tested, e.g.
      the best checkpoint) also runs on each test batch; ``quantized/test_acc`` and
      ``quantized/test_agreement`` appear in the test results.

    Checkpoints hold the prepared student; resuming with ``ckpt_path`` works with this callback
    in the Trainer. Outside a Trainer, load one with :func:`restore_qat_student`.

    Args:
        backend: int8 backend: ``"x86"``, ``"fbgemm"``, ``"qnnpack"`` or ``"onednn"``.
        freeze_observers_epoch: first epoch with frozen quantization ranges; ``None``: never.
        freeze_bn_epoch: first epoch with frozen BatchNorm statistics; ``None``: never.
        non_traceable_modules: student submodules (dotted paths) that FX tracing skips; they stay float.
        reduce_range: 7-bit activations, torch.ao's x86 / fbgemm default (see :func:`qat_qconfig_mapping`).
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
        self.backend = _check_backend(backend)
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
        datamodule = trainer.datamodule
        loader_name = {"fit": "train", "validate": "val", "test": "test"}.get(stage, "predict")
        if datamodule is not None and hasattr(datamodule, f"{loader_name}_dataloader"):
            return pl_module.unpack_batch(next(iter(getattr(datamodule, f"{loader_name}_dataloader")())))[0]
        if pl_module.example_input_array is not None:
            return pl_module.example_input_array
        raise ValueError(
            "QuantizationAwareTraining traces the student on one input batch: pass a datamodule to the "
            "Trainer call, or set `module.example_input_array` to an input batch."
        )

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Replace ``pl_module.student`` by its QAT-prepared version (before the optimizer exists)."""
        _require_student(pl_module)
        if getattr(pl_module, "teacher_mode", None) == "ema":
            raise ValueError(
                "QuantizationAwareTraining does not support teacher_mode='ema': the mean teacher is a float "
                "copy of the student whose weights no longer match the fake-quantized student. Use a frozen "
                "or trainable teacher."
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
        loader = (
            trainer.datamodule.val_dataloader() if trainer.datamodule is not None else trainer.val_dataloaders
        )
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
            for logger in trainer.loggers:
                logger.log_metrics(self.metrics, step=trainer.global_step)
        if self.filename is not None:
            directory = self.directory or beside_checkpoints(trainer)
            directory.mkdir(parents=True, exist_ok=True)
            self.path = directory / self.filename
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
        with torch.no_grad(), _engine(self.backend):
            reference_logits = logits_of(call_model(pl_module.student, inputs))
            counts = _int8_counts(self.int8_student, inputs, targets, reference_logits)
        self._test_counts = [total + count for total, count in zip(self._test_counts, counts, strict=True)]

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Log ``quantized/test_acc`` and ``quantized/test_agreement`` (averaged over processes)."""
        rates = _rates(*self._test_counts, with_reference=True)
        for key, value in rates.items():
            pl_module.log(f"quantized/test_{key}", value, sync_dist=True)
            self.metrics[f"quantized/test_{key}"] = value
