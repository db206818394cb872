"""Int8 quantization of a student with ``torch.ao`` (FX graph mode): plain functions, no Lightning callback.

Prepare a model for quantization-aware training (:func:`prepare_qat`), convert it to real int8
kernels (:func:`convert_to_int8`), evaluate the int8 model on the CPU (:func:`evaluate_int8`),
quantize a float model after training (:func:`post_training_int8`) and reload a QAT run's
checkpoint (:func:`restore_qat_student`). The Lightning side, which trains the student of a
:class:`~lightning_kd.DistillationModule` through these functions, is
:class:`~lightning_kd.callbacks.QuantizationAwareTraining`.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import move_data_to_device
from torch import Tensor, nn
from torch.ao.quantization import (
    FusedMovingAvgObsFakeQuantize,
    MovingAverageMinMaxObserver,
    QConfig,
    QConfigMapping,
    disable_observer,
    get_default_qat_qconfig_mapping,
    get_default_qconfig_mapping,
)
from torch.ao.quantization.fake_quantize import FakeQuantizeBase
from torch.ao.quantization.fx.custom_config import PrepareCustomConfig
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx, prepare_qat_fx
from torch.fx import GraphModule
from torch.fx.proxy import TraceError

from lightning_kd.model_io import call_model, logits_of

__all__ = [
    "BACKENDS",
    "check_backend",
    "convert_to_int8",
    "evaluate_int8",
    "int8_counts",
    "int8_engine",
    "int8_rates",
    "is_qat_prepared",
    "post_training_int8",
    "prepare_qat",
    "qat_qconfig_mapping",
    "require_student",
    "restore_qat_student",
]

#: the int8 backends of ``torch.ao.quantization`` (the ``qconfig`` mapping and the CPU kernels)
BACKENDS = ("x86", "fbgemm", "qnnpack", "onednn")

# torch.ao.quantization warns on every call that it is deprecated in favour of torchao (pt2e), and its
# observers warn about ``reduce_range``; neither is actionable for a user of these functions.
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
def int8_engine(backend: str) -> Iterator[None]:
    """Run int8 kernels of ``backend`` (``torch.backends.quantized.engine``), then restore the engine.

    Quantized tensors are resized by an op without a deterministic implementation, so under
    ``Trainer(deterministic=True)`` (``torch.use_deterministic_algorithms(True)``) that setting
    is relaxed to ``warn_only`` for the int8 model's run, and restored afterwards.

    Args:
        backend: the engine to run under (one of :data:`BACKENDS`, see :func:`check_backend`).
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


def check_backend(backend: str) -> str:
    """Return ``backend`` if it is one of :data:`BACKENDS` and this PyTorch build supports it.

    Args:
        backend: ``"x86"``, ``"fbgemm"``, ``"qnnpack"`` or ``"onednn"``.

    Raises:
        ValueError: unknown or unavailable ``backend`` (the message lists the supported engines).
    """
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

    Args:
        backend: ``"x86"``, ``"fbgemm"``, ``"qnnpack"`` or ``"onednn"``.
        reduce_range: keep torch.ao's 7-bit activations (its default mapping, unchanged).
    """
    mapping = get_default_qat_qconfig_mapping(check_backend(backend))
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
    check_backend(backend)
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
    """Whether ``model`` holds fake-quantization modules (it went through :func:`prepare_qat`).

    Args:
        model: any network.
    """
    return any(isinstance(m, FakeQuantizeBase) for m in model.modules())


def convert_to_int8(model: nn.Module, backend: str = "x86") -> GraphModule:
    """A real int8 copy of a fake-quantized (or calibrated) ``GraphModule``, on the CPU, in eval mode.

    ``torch.ao.quantization.quantize_fx.convert_fx`` on a deep copy: weights are stored as int8
    with the scales and zero points the observers found, and Linear/Conv run as int8 kernels of
    ``backend``; inputs and outputs stay float (quantize at the input, dequantize at the output).
    ``model`` itself is not changed. Run the result under the same backend (:func:`evaluate_int8`
    does; or set ``torch.backends.quantized.engine``). Save it with ``torch.save(int8_model, path)``
    and reload with ``torch.load(path, weights_only=False)``.

    Args:
        model: the ``GraphModule`` of :func:`prepare_qat` (or an observed, calibrated one).
        backend: the int8 backend whose kernels the result uses.

    Raises:
        TypeError: ``model`` holds no observers or fake quantization.
    """
    check_backend(backend)
    if not isinstance(model, GraphModule) or not any(
        isinstance(m, FakeQuantizeBase | torch.ao.quantization.ObserverBase) for m in model.modules()
    ):
        raise TypeError(
            f"convert_to_int8 needs a model returned by prepare_qat (or post_training_int8's preparation), "
            f"got a {type(model).__name__} without observers; call prepare_qat(model, example_inputs) first."
        )
    with _quiet_torch_ao(), int8_engine(backend):
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

    Args:
        model: a symbolically traceable float network (not changed).
        calibration_inputs: input batches (a tensor, or a tuple of positional inputs, each).
        backend: ``"x86"``, ``"fbgemm"``, ``"qnnpack"`` or ``"onednn"``.
        non_traceable_modules: dotted paths of submodules that tracing skips; they stay float.

    Raises:
        ValueError: ``calibration_inputs`` is empty.
    """
    calibration = iter(calibration_inputs)
    first = next(calibration, None)
    if first is None:
        raise ValueError("post_training_int8 needs at least one calibration batch in calibration_inputs.")
    observed = _prepare(copy.deepcopy(model).cpu().eval(), first, backend, non_traceable_modules, qat=False)
    for inputs in (first, *calibration):
        observed(*_as_args(inputs))
    return convert_to_int8(observed, backend)


def int8_counts(
    int8_model: nn.Module, inputs: Any, targets: Tensor | None, reference_logits: Tensor | None
) -> tuple[int, int, int, int]:
    """``(correct, labelled, agreeing with the reference, seen)`` of the int8 model on one CPU batch.

    Run it under :func:`int8_engine`; sum the counts over batches and turn them into fractions
    with :func:`int8_rates`.

    Args:
        int8_model: the model of :func:`convert_to_int8` (runs on the CPU).
        inputs: one input batch (moved to the CPU).
        targets: the batch's labels, or ``None`` (then ``correct`` and ``labelled`` are 0).
        reference_logits: a reference model's logits on the batch, or ``None`` (then ``agreeing`` is 0).
    """
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

    Args:
        int8_model: the model of :func:`convert_to_int8`.
        batches: ``(inputs, targets)`` pairs.
        reference: a float model to compare top-1 predictions with, or ``None``.
        backend: the int8 backend the model was converted for.
    """
    totals = [0, 0, 0, 0]
    with int8_engine(check_backend(backend)):
        for inputs, targets in batches:
            inputs = move_data_to_device(inputs, "cpu")
            reference_logits = logits_of(call_model(reference, inputs)) if reference is not None else None
            counts = int8_counts(int8_model, inputs, targets, reference_logits)
            totals = [total + count for total, count in zip(totals, counts, strict=True)]
    return int8_rates(*totals, with_reference=reference is not None)


def int8_rates(
    correct: int, labelled: int, agreeing: int, seen: int, with_reference: bool
) -> dict[str, float]:
    """``{"acc": correct / labelled, "agreement": agreeing / seen}`` from summed :func:`int8_counts`.

    Args:
        correct: samples the int8 model classified correctly.
        labelled: samples with a label (``acc`` is left out when 0).
        agreeing: samples where the int8 model's top-1 matched the reference's.
        seen: all samples.
        with_reference: whether to give ``agreement``.

    Raises:
        ValueError: no sample was seen.
    """
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

    A checkpoint of a run with :class:`~lightning_kd.callbacks.QuantizationAwareTraining` holds the
    prepared student (keys such as ``student.features.1.weight_fake_quant.scale``), which a float
    student cannot load. Outside a Trainer, build the module as for training and call this; then
    ``convert_to_int8(module.student)`` gives the int8 student. (Inside a Trainer with the
    callback, ``ckpt_path=`` works as usual: the callback prepares the student before the restore.)
    The observers are switched off, so the quantization ranges stay as trained
    (``module.student.apply(torch.ao.quantization.enable_observer)`` to train on). Returns ``module``.

    Args:
        module: a module with a float (or already prepared) ``student``, built as for training.
        checkpoint: a Lightning checkpoint path, or its loaded dict (or a bare state dict).
        example_inputs: one input batch to trace the student on.
        backend: the backend of the QAT run.

    Raises:
        ValueError: the checkpoint's student has no fake-quantization state.
        TypeError: ``module`` has no student network.
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
    require_student(module)
    if not is_qat_prepared(module.student):
        module.student = prepare_qat(module.student, example_inputs, backend)
    module.student.load_state_dict(student_state)
    module.student.apply(disable_observer)
    return module


def require_student(pl_module: nn.Module) -> None:
    """Raise ``TypeError`` unless ``pl_module.student`` is a network (what QAT quantizes).

    Args:
        pl_module: the module whose ``student`` is quantized.
    """
    if not isinstance(getattr(pl_module, "student", None), nn.Module):
        raise TypeError(
            f"QuantizationAwareTraining quantizes `pl_module.student`, but {type(pl_module).__name__} has no "
            "student network; use it with lightning_kd.DistillationModule (with or without a teacher)."
        )
