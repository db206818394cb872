"""Naming the cause of a non-finite loss, once one was found: batch, settings, weights, cache or outputs.

Nothing here runs on the normal path: a training module calls :func:`non_finite_cause` after it
found the loss NaN or infinite (wherever that detection happens: in the step, or later at a
logging step), and raises :func:`non_finite_loss_error`. Each cause is ruled out in turn, the
first that applies is named with its fix, and only when none does is the learning rate blamed.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from itertools import chain
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_kd.model_io import non_finite_entries

__all__ = ["CheckFinite", "non_finite_cause", "non_finite_loss_error"]

#: ``True``: a device flag read at the logging steps, the epoch end, checkpoint saves and the end of
#: training (no wait per step); ``"step"``: read in every step (one wait each, stops at the exact
#: step); ``False``: off
CheckFinite = bool | Literal["step"]


def non_finite_cause(
    batch: Any,
    models: Mapping[str, nn.Module | None],
    outputs: Mapping[str, Tensor | None],
    *,
    settings: Mapping[str, float] | None = None,
    trained: Collection[str] = (),
    samples: int | None = None,
) -> str:
    """What made a loss NaN/Inf, with its fix, in one sentence.

    Checked in this order, the first that applies named: an empty batch; NaN/Inf in the batch;
    a setting that is not finite (a temperature or weight, e.g. set by a schedule); NaN/Inf in
    a model's weights, the fixed models' first (their loaded weights are broken: once a loss is
    NaN, the gradients make every ``trained`` model NaN too, so a trained model is blamed, for a
    diverged earlier step, only when the fixed ones are finite); a model's outputs that are not
    finite on finite inputs and weights; otherwise the terms' math.

    Args:
        batch: the batch of the step, or ``None`` when it is no longer at hand (the loss was found
            non-finite steps later).
        models: the models of the step by role (``{"student": ..., "teacher": ...}``).
        outputs: their outputs (logits) in the step, by the same roles.
        settings: named scalar settings the loss used (``{"loss term 'kd' temperature": 4.0}``).
        trained: the roles whose weights the optimizer changes.
        samples: the number of samples in the batch, if known.
    """
    if samples == 0:
        return (
            "The batch holds 0 samples, and a mean over no samples is NaN: the data pipeline yields an "
            "empty batch (a batch_sampler or collate_fn that filters samples out); skip empty batches there."
        )
    entries = non_finite_entries(batch)
    if entries:
        return (
            f"The inputs are not finite: {entries}. Clean the dataset (drop or impute those samples, e.g. "
            "torch.nan_to_num in the dataset's transform)."
        )
    for name, value in (settings or {}).items():
        if not math.isfinite(value) or ("temperature" in name and value <= 0):
            return f"The {name} is {value}: a schedule or an assignment set it so. Give it a finite value" + (
                " > 0." if "temperature" in name else "."
            )
    for role, model in sorted(models.items(), key=lambda item: item[0] in trained):  # fixed ones first
        broken = _non_finite_weight(model)
        if broken is None:
            continue
        if role in trained:
            return (
                f"The {role}'s weight {broken!r} holds NaN/Inf: an earlier optimizer step diverged. Lower "
                "the learning rate, or clip the gradients (Trainer(gradient_clip_val=1.0))."
            )
        return (
            f"The {role}'s weight {broken!r} holds NaN/Inf, and it is not trained here: its weights were "
            f"loaded so. Load the {role} from a checkpoint of a run that did not diverge."
        )
    for role, output in outputs.items():
        if output is None or _finite(output):
            continue
        overflow = (
            f"The {role}'s outputs are not finite although its inputs and weights are: its forward overflows"
        )
        if role in trained:
            return (
                f"{overflow}, as weights grown by a diverging run do. Lower the learning rate, or clip the "
                "gradients (Trainer(gradient_clip_val=1.0)); under '16-mixed' precision use 'bf16-mixed'."
            )
        return (
            f"{overflow} (e.g. activations beyond the float16 range under '16-mixed' precision: use "
            "'bf16-mixed' or 32-bit, or normalise the inputs)."
        )
    if batch is None:
        return (
            "The weights, the settings and the models' outputs are finite now, and the batch of that step "
            "is no longer at hand: a NaN/Inf in that batch or a term's math is the cause."
        )
    return (
        "The inputs, the weights and the models' outputs are finite: a term's math overflowed. Lower the "
        "learning rate, or fix the term's settings."
    )


def non_finite_loss_error(
    what: str,
    step: int,
    values: Mapping[str, Tensor | float],
    cause: str,
    found_at: int | None = None,
    where: str | None = None,
) -> FloatingPointError:
    """The error for a non-finite loss: its step, its parts (``what``: "terms", "peer losses"), the cause.

    ``found_at``: the step at which a deferred check (``check_finite=True``) found it, when later
    than ``step``: the cause was then diagnosed on the state of that step. ``where``: the place
    named instead of ``step {step}`` (a held-out batch).
    """
    numbers = {
        name: float(value.detach() if isinstance(value, Tensor) else value) for name, value in values.items()
    }
    shown = {name: value for name, value in numbers.items() if not math.isfinite(value)} or numbers
    late = ""
    if found_at is not None and found_at > step:
        late = (
            f" Training ran on {found_at - step} step(s) after step {step} until the check read it (at step "
            f"{found_at}), so this cause was diagnosed then; check_finite='step' stops at step {step} itself "
            "and diagnoses its batch."
        )
    return FloatingPointError(
        f"The loss is not finite at {where or f'step {step}'}: {what} {shown} gave NaN/Inf. {cause}{late} "
        "(check_finite=False turns this check off)."
    )


def _finite(tensor: Tensor) -> bool:
    return bool(torch.isfinite(tensor).all())


def _non_finite_weight(model: nn.Module | None) -> str | None:
    """The name of the first parameter or floating-point buffer of ``model`` holding NaN/Inf, or ``None``."""
    if model is None:
        return None
    for name, tensor in chain(model.named_parameters(), model.named_buffers()):
        if tensor.is_floating_point() and not _finite(tensor.detach()):
            return name
    return None
