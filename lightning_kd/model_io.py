"""Reading batches and calling models: the bottom layer every part of the package shares.

The two-view batch layout (:class:`TwoViewBatch`, read by MLKD); selecting inputs and targets
from a batch, calling a model on them (keyword inputs for mapping batches), finding the logits in
its output, inferring its class count, and naming the entries of a batch that hold NaN or Inf.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor, nn

__all__ = [
    "BatchKey",
    "InputKey",
    "TwoViewBatch",
    "call_model",
    "infer_num_classes",
    "logits_of",
    "non_finite_entries",
    "select",
]


class TwoViewBatch(NamedTuple):
    """A training batch of two views: rows ``[:N]`` the weak views, rows ``[N:]`` the strong views.

    Attributes:
        inputs: ``(2N, ...)``: the ``N`` weak views, then the ``N`` strong views of the same samples.
        targets: ``(2N,)``: the labels, twice.
    """

    inputs: Tensor
    targets: Tensor


BatchKey = int | str
#: where a model's inputs are in a batch: a key or index, several keys of a mapping batch (passed to
#: the model as keyword arguments), or ``None`` for the whole batch.
InputKey = int | str | list[str] | None


def call_model(model: nn.Module, inputs: Any) -> Any:
    """``model(**inputs)`` for a mapping batch (Hugging Face keyword inputs), else ``model(inputs)``."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    return model(inputs)


def logits_of(output: Any) -> Tensor:
    """The logits in a model's output.

    The tensor itself, ``output["logits"]`` / ``.logits`` (Hugging Face ``ModelOutput``), or
    the first element of a tuple.
    """
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping) and "logits" in output:
        return output["logits"]
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(
        f"Cannot find logits in a model output of type {type(output).__name__}; return a tensor, "
        "a mapping with 'logits', or a tuple whose first element is the logits."
    )


def infer_num_classes(model: nn.Module) -> int | None:
    """``model.num_classes`` if set (timm, lightning_kd models), else the last ``nn.Linear``'s width."""
    value = getattr(model, "num_classes", None)
    if isinstance(value, int) and value > 0:
        return value
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1].out_features if linears else None


def select(batch: Any, key: InputKey, option: str) -> Any:
    """``batch[key]`` for a mapping or sequence batch; the error names ``option`` and what fits.

    ``key=None`` gives the whole batch; a list of keys gives the sub-mapping of those keys.
    """
    if key is None:
        return batch
    if isinstance(key, list):
        if not isinstance(batch, Mapping):
            raise TypeError(
                f"{option}={key!r} (a list of keys) needs mapping batches, but the batch is a "
                f"{type(batch).__name__}; give a single key or index."
            )
        return {name: select(batch, name, option) for name in key}
    if isinstance(batch, Mapping):
        if key not in batch:
            raise KeyError(
                f"The batch is a mapping with keys {list(batch)}; set {option} to one of them (got {key!r})."
            )
        return batch[key]
    if isinstance(batch, Sequence) and not isinstance(batch, str):
        if not isinstance(key, int) or not -len(batch) <= key < len(batch):
            raise KeyError(
                f"The batch is a sequence of {len(batch)} items; set {option} to an index (got {key!r})."
            )
        return batch[key]
    raise TypeError(
        f"Cannot select {option}={key!r} from a batch of type {type(batch).__name__}; "
        "yield (inputs, targets) tuples or dicts, or override the module's unpack_batch."
    )


def non_finite_entries(batch: Any) -> str:
    """Which entries of ``batch`` hold NaN/Inf (``"batch[0] holds 3 NaN/Inf of 128 values"``), or ``""``."""
    if isinstance(batch, Mapping):
        entries = list(batch.items())
    elif isinstance(batch, list | tuple):
        entries = list(enumerate(batch))
    else:
        entries = [(None, batch)]
    causes = []
    for key, value in entries:
        tensors: list[Tensor] = []
        apply_to_collection(value, Tensor, tensors.append)
        floats = [t for t in tensors if t.is_floating_point()]
        bad = sum(int((~torch.isfinite(t)).sum()) for t in floats)
        if bad:
            name = "the batch" if key is None else f"batch[{key!r}]"
            causes.append(f"{name} holds {bad} NaN/Inf of {sum(t.numel() for t in floats)} values")
    return "; ".join(causes)
