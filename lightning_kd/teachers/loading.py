"""Teachers: load trained weights from the checkpoint forms users have, freeze."""

from __future__ import annotations

import argparse
import pickle
import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from lightning_kd.checkpoint_io import checkpoint_problem

__all__ = ["freeze", "load_weights"]

#: prefixes preferred, in this order, when several fit a model equally well: a DistillationModule
#: keeps the network under ``student.`` (a saved teacher under ``teacher.``), a typical
#: LightningModule under ``model.``, DataParallel/DDP under ``module.``
CHECKPOINT_PREFIXES = ("student.", "model.", "module.", "")

#: where each checkpoint form keeps the weights, in the order looked up: Lightning and timm
#: training checkpoints under ``state_dict`` (timm's moving average under ``state_dict_ema``),
#: the CRD benchmark's teachers under ``model``; timm's ``load_checkpoint`` reads them alike
WEIGHT_KEYS = ("state_dict", "model")
EMA_WEIGHT_KEYS = ("state_dict_ema", "model_ema")

#: harmless globals of training checkpoints allowed in ``weights_only`` loading: timm saves its
#: command line as an ``argparse.Namespace`` under ``args`` (building one runs no code)
SAFE_GLOBALS = [argparse.Namespace]


def freeze(model: nn.Module) -> nn.Module:
    """Put ``model`` in eval mode and stop gradients to its parameters; returns it."""
    model.eval()
    model.requires_grad_(False)
    return model


def _preference(prefix: str) -> tuple[int, int]:
    known = CHECKPOINT_PREFIXES.index(prefix) if prefix in CHECKPOINT_PREFIXES else len(CHECKPOINT_PREFIXES)
    return (-known, -len(prefix))


def _network_state(state: Mapping[str, Any], model: nn.Module) -> dict[str, Any]:
    """The entries of ``state`` under the prefix that fits ``model`` best, with the prefix removed.

    Any prefix ending in ``.`` is considered (``student.``, ``model.``, DDP's ``module.``,
    ``torch.compile``'s ``_orig_mod.`` and their combinations): the one under which most of
    ``model``'s entries are found wins, ties going to :data:`CHECKPOINT_PREFIXES`' order.
    """
    expected = set(model.state_dict())
    found: Counter[str] = Counter()
    for key in state:
        if key in expected:
            found[""] += 1
        for match in re.finditer(r"\.", key):
            if key[match.end() :] in expected:
                found[key[: match.end()]] += 1
    if not found:
        return dict(state)
    prefix = max(found, key=lambda p: (found[p], _preference(p)))
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _read(path: Path, weights_only: bool) -> Any:
    """``torch.load`` of ``path`` on the CPU, its failures as errors that say what to do."""
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=weights_only)
    except pickle.UnpicklingError as error:
        unsupported = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(error))
        if not weights_only or unsupported is None:
            raise ValueError(f"Cannot read checkpoint {str(path)!r}: {error}") from error
        raise ValueError(
            f"Checkpoint {str(path)!r} holds a pickled {unsupported[1]} object, which only loads by running "
            "code from the file (a whole model saved with torch.save(model)?). Save its weights once, from "
            f"a Python where that class imports: `torch.save(torch.load({str(path)!r}, weights_only=False)"
            ".state_dict(), 'teacher_weights.pt')` and pass that file; or, if you trust the file, call "
            "load_weights(model, path, weights_only=False)."
        ) from None
    except Exception as error:  # torch raises several types for truncated or foreign files
        raise ValueError(f"Cannot read checkpoint {str(path)!r}: {error}") from error


def _weights_of(checkpoint: Any, path: Path, use_ema: bool) -> Mapping[str, Any]:
    """The state dict inside a loaded checkpoint: a model's, an EMA's or a training checkpoint's."""
    if isinstance(checkpoint, nn.Module):
        return checkpoint.state_dict()
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"Checkpoint {str(path)!r} holds no state dict (found {type(checkpoint).__name__}).")
    keys = EMA_WEIGHT_KEYS if use_ema else WEIGHT_KEYS
    for key in keys:
        weights = checkpoint.get(key)
        if isinstance(weights, nn.Module):
            return weights.state_dict()
        if isinstance(weights, Mapping):
            return weights
    if use_ema:
        raise ValueError(
            f"Checkpoint {str(path)!r} holds no moving-average weights (no {' or '.join(EMA_WEIGHT_KEYS)}; "
            f"it has {sorted(map(str, checkpoint))[:8]}): load it with use_ema=False."
        )
    return checkpoint


def load_weights(
    model: nn.Module,
    path: str | Path,
    *,
    use_ema: bool = False,
    weights_only: bool = True,
    role: Literal["teacher", "student"] = "teacher",
) -> nn.Module:
    """Load the weights of ``model`` from a checkpoint file; returns the model.

    Accepts the forms teachers come in:

    - a Lightning checkpoint, the network under any attribute prefix (``student.`` as
      :class:`~lightning_kd.DistillationModule` writes it, ``model.``, ...);
    - a plain state dict, also with DataParallel/DDP ``module.`` or ``torch.compile``
      ``_orig_mod.`` prefixes;
    - a timm training checkpoint (``state_dict``, ``state_dict_ema``, ``args``): like timm's
      ``load_checkpoint``, the trained weights (``state_dict``) unless ``use_ema=True`` asks
      for the moving average (``state_dict_ema``);
    - a CRD-benchmark teacher file (weights under ``"model"``);
    - a whole pickled model (``torch.save(model)``): only with ``weights_only=False``, since
      unpickling it runs code from the file; the default refuses it with the command that
      converts it to a state dict.

    BatchNorm's ``num_batches_tracked`` counters missing from state dicts of old PyTorch keep
    the model's own values (they only matter for ``momentum=None``). The file is checked
    against the CRC-32s ``torch.save`` stores before anything is unpickled. ``role`` names the
    model in the error messages (``"teacher"``, or ``"student"`` for a student's start weights).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``path`` is a directory, the checkpoint is damaged or cannot be read, it
            needs unpickling code, or its tensors do not fit ``model`` (missing, unexpected or
            differently shaped entries are listed).
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(p.name for p in path.iterdir() if p.suffix in (".ckpt", ".pt", ".pth", ".bin"))
        sharded = (path / ".metadata").is_file()
        fix = (
            "it is a sharded (distributed) checkpoint: consolidate it into one file with "
            f"`python -m lightning.pytorch.utilities.consolidate_checkpoint {path}` and pass that file"
            if sharded
            else f"pass a checkpoint file in it ({', '.join(files[:3]) or 'it holds no .ckpt/.pt/.pth file'})"
        )
        raise ValueError(
            f"{role.capitalize()} checkpoint {str(path)!r} is a directory, not a checkpoint file: {fix}."
        )
    if not path.is_file():
        fix = (
            "Train the teacher first (e.g. `lightning-kd fit --config mnist1d/teacher`) or fix the path."
            if role == "teacher"
            else "Train the model the student starts from first (e.g. its baseline recipe) or fix the path "
            "(student_checkpoint; in YAML `model.init_args.student_checkpoint`)."
        )
        raise FileNotFoundError(f"{role.capitalize()} checkpoint {str(path)!r} does not exist. {fix}")
    problem = checkpoint_problem(path)
    if problem is not None:
        raise ValueError(
            f"Cannot read checkpoint {str(path)!r}: {problem}. Point {role}_checkpoint at an intact copy "
            f"(e.g. the {role} run's epoch checkpoint) or train the {role} again."
        )
    state = _network_state(_weights_of(_read(path, weights_only), path, use_ema), model)
    own = model.state_dict()
    for key in own.keys() - state.keys():
        if key.endswith("num_batches_tracked"):
            state[key] = own[key]
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
            f"Check that the {role}'s architecture and num_classes match the ones it was trained with."
        )
    model.load_state_dict(state)
    return model
