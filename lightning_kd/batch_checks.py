"""What a training step requires of a batch and of the models' outputs, checked with messages naming the fix.

Class targets (class indices or class probabilities), the dtype of the models' inputs, the shape
of their logits, and logits that are really probabilities. Every check reads only shapes and
dtypes, except where noted: reading values waits for an accelerator, so the callers read values
on the CPU, at the first batch, or once a forward has already failed.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor, nn

__all__ = [
    "check_logits",
    "check_separate",
    "class_indices",
    "class_targets",
    "explain_forward_error",
    "probabilities_message",
    "probability_rows",
    "warn_if_probabilities",
]

#: how far a row of class probabilities may sum from 1 (float16 targets round to about 1e-3)
PROBABILITY_TOLERANCE = 2e-3

#: fragments of torch's errors for inputs of a dtype the model's weights do not have
_DTYPE_ERRORS = ("dtype", "scalar type", "Input type", "should be the same")
#: torch's error for BatchNorm in training mode on one value per channel
_ONE_SAMPLE_ERROR = "Expected more than 1 value per channel when training"


def class_targets(targets: Any, num_classes: int, stage: str, read_values: bool) -> Tensor:
    """``targets`` as the step reads them: ``(N,)`` int64 class indices or ``(N, C)`` float32 probabilities.

    Accepted as they are or converted without loss: integer or bool class indices of shape
    ``(N,)`` or ``(N, 1)`` (to int64, shape ``(N,)``), and class probabilities of shape
    ``(N, num_classes)`` (one-hot or soft rows >= 0 summing to 1, e.g. mixup or label smoothing;
    to float32). With ``read_values``, indices outside ``[0, num_classes)`` and probability rows
    that are not distributions are refused; without it only shapes and dtypes are checked (no
    wait for an accelerator).

    Raises:
        ValueError: targets of another dtype, shape or value range; the message names the fix.
    """
    if not isinstance(targets, Tensor):
        raise TypeError(
            f"The {stage} labels are a {type(targets).__name__}, not a tensor: return class indices as an "
            "int64 tensor from the dataset (the default collate stacks Python ints into one)."
        )
    shape = tuple(targets.shape)
    if targets.is_complex():
        raise ValueError(f"The {stage} labels are complex ({targets.dtype}): give int64 class indices.")
    if targets.is_floating_point() and targets.ndim == 2 and shape[1] == num_classes:
        return _probabilities(targets.float(), stage, read_values)
    if not targets.is_floating_point() and targets.ndim == 2 and shape[1] == num_classes > 1:
        return _probabilities(targets.float(), stage, read_values)  # one-hot integer rows
    if targets.ndim == 2 and shape[1] == 1:
        targets = targets.flatten()
    elif targets.ndim != 1:
        raise ValueError(
            f"The {stage} labels have shape {shape} ({targets.dtype}): expected (N,) class indices, or (N, "
            f"{num_classes}) class probabilities for num_classes={num_classes}. Multi-label targets are "
            "not supported; check the dataset's labels and num_classes."
        )
    if targets.is_floating_point():
        raise ValueError(_float_labels_message(targets, shape, stage))
    targets = targets.long()
    if read_values and targets.numel():
        _check_range(targets, num_classes, stage)
    return targets


def class_indices(targets: Tensor) -> Tensor:
    """Class indices of :func:`class_targets`' output: the argmax of probabilities, indices as they are."""
    return targets.argmax(dim=-1) if targets.is_floating_point() else targets


def _float_labels_message(targets: Tensor, shape: tuple[int, ...], stage: str) -> str:
    """Why ``(N,)`` floating-point labels are refused (reads the values: an error path only)."""
    integral = bool(torch.all(targets == targets.round())) if targets.numel() else True
    if integral:
        return (
            f"The {stage} labels are {targets.dtype} of shape {shape} with integral values: class indices "
            "must be integers. Convert them with .long() in the dataset (e.g. "
            "torch.tensor(label, dtype=torch.long))."
        )
    return (
        f"The {stage} labels are {targets.dtype} of shape {shape} with fractional values: classification "
        "needs (N,) int64 class indices or (N, num_classes) class probabilities; regression targets are "
        "not supported."
    )


def _check_range(targets: Tensor, num_classes: int, stage: str) -> None:
    """A ``ValueError`` naming a class index outside ``[0, num_classes)`` (reads the values)."""
    low, high = (int(value) for value in torch.aminmax(targets))
    if low < 0 or high >= num_classes:
        fix = (
            "labels must not be negative (map ignored samples out of the dataset)"
            if low < 0
            else f"or build the models with num_classes >= {high + 1} and pass num_classes="
        )
        raise ValueError(
            f"Label {low if low < 0 else high} in a {stage} batch is outside [0, num_classes) with "
            f"num_classes={num_classes}. Fix the dataset's labels (they must be 0 .. {num_classes - 1}), "
            f"{fix}."
        )


def _probabilities(targets: Tensor, stage: str, read_values: bool) -> Tensor:
    """``targets`` if every row is a distribution over the classes (checked with ``read_values``)."""
    if read_values and targets.numel():
        low, sums = targets.min(), targets.sum(dim=1)
        if float(low) < 0 or float((sums - 1).abs().max()) > PROBABILITY_TOLERANCE:
            bad = (targets.min(dim=1).values < 0) | ((sums - 1).abs() > PROBABILITY_TOLERANCE)
            row = targets[int(bad.nonzero()[0])]
            raise ValueError(
                f"The {stage} targets of shape {tuple(targets.shape)} are not class probabilities: a row "
                f"{[round(v, 4) for v in row.tolist()]} sums to {float(row.sum()):.4g} (rows must be >= 0 "
                "and sum to 1). Give (N,) int64 class indices, or one-hot / soft labels per sample; "
                "multi-label targets are not supported."
            )
    return targets


def explain_forward_error(
    error: Exception, calls: Sequence[tuple[str, nn.Module | None, Any]]
) -> Exception | None:
    """The error naming the fix for a forward that failed on its inputs, or ``None`` for another cause.

    A ``ValueError`` for a training batch of one sample under BatchNorm, a ``TypeError`` for
    inputs of a dtype that the model's weights do not have (uint8 images, float64 arrays).

    Args:
        error: what the forward raised.
        calls: ``(role, model, inputs)`` of each model the failed step called, e.g.
            ``[("student", student, x), ("teacher", teacher, x)]``.
    """
    text = str(error)
    if _ONE_SAMPLE_ERROR in text:
        return ValueError(
            "A training batch holds 1 sample, and BatchNorm in training mode cannot normalise a single "
            "value per channel. Pass drop_last=True to the training DataLoader, or choose a batch size that "
            "does not leave a last batch of 1 sample."
        )
    if not any(fragment in text for fragment in _DTYPE_ERRORS):
        return None
    for role, model, inputs in calls:
        if model is None:
            continue
        weights = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
        tensors: list[Tensor] = []
        apply_to_collection(inputs, Tensor, tensors.append)
        for tensor in tensors:
            if tensor.dtype == torch.uint8:
                return TypeError(
                    f"The {role}'s input is uint8 (raw bytes, e.g. image pixels) but its weights are "
                    f"{weights}: convert it in the dataset's transform to floats, e.g. x.float() / 255 for "
                    "images in [0, 1] (torchvision: v2.ToDtype(torch.float32, scale=True), or ToTensor())."
                )
            if tensor.is_floating_point() and weights is not None and tensor.dtype != weights:
                return TypeError(
                    f"The {role}'s input is {tensor.dtype} but its weights are {weights}: cast the input in "
                    f"the dataset's transform (x.to({weights})), or use the Trainer's precision= setting "
                    "for the models' dtype (e.g. '64-true')."
                )
    return None


def check_separate(models: Mapping[str, nn.Module | None], why: str) -> None:
    """A ``ValueError`` when two of ``models`` are one object or share a parameter (``why``: the harm)."""
    seen: dict[int, tuple[str, str]] = {}
    for role, model in models.items():
        if model is None:
            continue
        for name, parameter in [("", model), *model.named_parameters()]:
            other = seen.get(id(parameter))
            if other is not None and other[0] != role:
                what = "are the same module object" if not name else f"share the parameter {name!r}"
                raise ValueError(
                    f"The {other[0]} and the {role} {what}: {why}. Give each its own network "
                    "(copy.deepcopy(model) makes an independent copy)."
                )
            seen[id(parameter)] = (role, name)


def check_logits(logits: Tensor, role: str, num_classes: int) -> None:
    """A ``ValueError`` unless ``logits`` has shape ``(..., num_classes)``, num_classes >= 2."""
    if logits.ndim >= 2 and logits.shape[-1] == num_classes and num_classes >= 2:
        return
    raise ValueError(
        f"The {role}'s output has shape {tuple(logits.shape)}: expected (N, C) logits with C = "
        f"num_classes = {num_classes} >= 2, one score per class. For a binary task return 2 logits "
        "(e.g. nn.Linear(features, 2)) and use labels 0/1, not one sigmoid score."
    )


def probability_rows(logits: Tensor) -> Tensor:
    """A device bool: whether every row of ``logits`` is a probability distribution (in [0, 1], sum 1).

    Computed without reading the values (see :func:`warn_if_probabilities`).
    """
    rows = logits.detach().float().reshape(-1, logits.shape[-1])
    if rows.numel() == 0 or rows.shape[-1] < 2:
        return torch.zeros((), dtype=torch.bool, device=logits.device)
    inside = ((rows >= 0) & (rows <= 1)).all()
    return inside & ((rows.sum(dim=-1) - 1).abs().max() <= PROBABILITY_TOLERANCE)


def probabilities_message(role: str) -> str:
    """The warning for a ``role`` whose outputs are probabilities, not logits."""
    return (
        f"The {role}'s outputs are probabilities (every row is in [0, 1] and sums to 1), not logits: the "
        "loss terms apply the softmax themselves (at temperature T), so these give nearly flat targets. "
        f"Return logits from the {role}'s forward (remove its final softmax)."
    )


def warn_if_probabilities(logits: Tensor, role: str) -> bool:
    """Warn when the rows of ``logits`` are probabilities (each in [0, 1], summing to 1); reads the values.

    Softmax-based losses soften logits at temperature T; probabilities there give nearly flat
    targets. Log-probabilities (rows whose logsumexp is 0) are logits shifted by a constant per
    row, which every softmax leaves unchanged, so they pass. Returns whether it warned. The
    training modules compute :func:`probability_rows` in their first step and warn at their next
    reading of the device instead.
    """
    if not bool(probability_rows(logits)):
        return False
    warnings.warn(probabilities_message(role), UserWarning, stacklevel=2)
    return True
