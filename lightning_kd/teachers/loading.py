"""Teachers: load trained weights, freeze."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = ["freeze", "load_weights"]

#: prefixes under which a Lightning checkpoint keeps the network: a DistillationModule's
#: ``student``, a typical LightningModule's ``model``, or none (a plain state dict).
CHECKPOINT_PREFIXES = ("student.", "model.", "")


def freeze(model: nn.Module) -> nn.Module:
    """Put ``model`` in eval mode and stop gradients to its parameters; returns it."""
    model.eval()
    model.requires_grad_(False)
    return model


def _network_state(state: Mapping[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """The entries of ``state`` that belong to ``model``, with the wrapper prefix removed."""
    expected = set(model.state_dict())
    best: dict[str, Tensor] = {}
    for prefix in CHECKPOINT_PREFIXES:
        candidate = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if len(expected & candidate.keys()) > len(expected & best.keys()):
            best = candidate
    return best


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load the weights of ``model`` from a checkpoint file; returns the model.

    Accepts a Lightning checkpoint (``state_dict`` under ``student.`` as written by
    :class:`~lightning_kd.DistillationModule`, or under ``model.``), a CRD-benchmark teacher
    file (weights under ``"model"``), or a plain state dict.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the checkpoint cannot be read, or its tensors do not fit ``model``
            (missing, unexpected, or differently shaped entries are listed).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"Teacher checkpoint {str(path)!r} does not exist. Train the teacher first "
            "(e.g. `lightning-kd fit --config mnist1d/teacher`) or fix the path."
        )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for truncated or foreign files
        raise ValueError(f"Cannot read checkpoint {str(path)!r}: {error}") from error
    # Lightning keeps the weights under "state_dict", the CRD benchmark's teachers under "model"
    state = None
    if isinstance(checkpoint, Mapping):
        state = checkpoint.get("state_dict", checkpoint.get("model", checkpoint))
    if not isinstance(state, Mapping):
        raise ValueError(f"Checkpoint {str(path)!r} holds no state dict (found {type(checkpoint).__name__}).")
    state = _network_state(state, model)
    own = model.state_dict()
    missing = sorted(own.keys() - state.keys())
    unexpected = sorted(state.keys() - own.keys())
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(own.keys() & state.keys())
        if state[k].shape != own[k].shape
    ]
    if missing or unexpected or mismatched:
        raise ValueError(
            f"Checkpoint {str(path)!r} does not fit {type(model).__name__}: "
            f"{len(missing)} missing {missing[:5]}, {len(unexpected)} unexpected {unexpected[:5]}, "
            f"{len(mismatched)} of another shape {mismatched[:5]}. "
            "Check that the teacher's architecture and num_classes match the ones it was trained with."
        )
    model.load_state_dict(state)
    return model
