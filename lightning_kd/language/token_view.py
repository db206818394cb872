"""The token view of a causal-LM batch: its labels read and checked, then shifted once.

Position ``t`` predicts token ``t + 1``. :func:`batch_labels` reads a dict batch's labels and
attention mask (checking them with messages that name the fix), :func:`shifted_targets` turns them
into the ``(mask, targets)`` of :class:`~lightning_kd.losses.base.TokenOutputs`, and :func:`shifted`
cuts a model's per-position tensors (logits or hidden states) to the positions that predict
something. The models are called without labels, so nothing is shifted twice and no Hugging Face
loss is computed for nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from lightning_kd.language.completion import IGNORE_INDEX

__all__ = ["batch_labels", "check_label_values", "shifted", "shifted_targets"]


def _entry(batch: Mapping[str, Any], key: str, what: str, fix: str) -> Tensor:
    if key not in batch:
        raise KeyError(f"The batch has keys {list(batch)} but no {key!r} ({what}): {fix}.")
    value = batch[key]
    if not isinstance(value, Tensor) or value.ndim != 2 or value.is_floating_point() or value.is_complex():
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        dtype = f" {value.dtype}" if isinstance(value, Tensor) else ""
        raise ValueError(
            f"batch[{key!r}] ({what}) must be an (N, L) integer tensor, got {shape}{dtype}: {fix}."
        )
    return value


def batch_labels(
    batch: Any, labels_key: str | None, attention_mask_key: str | None, input_ids_key: str = "input_ids"
) -> tuple[Tensor, Tensor | None]:
    """``(labels, attention_mask)`` of a dict batch, unshifted, shapes and dtypes checked (no value read).

    ``labels_key=None``: the labels are the input ids (every real token counts).
    ``attention_mask_key=None``: nothing is padded.

    Raises:
        TypeError: the batch is not a mapping.
        KeyError: a key is missing; ValueError: an entry of the wrong shape or dtype.
    """
    if not isinstance(batch, Mapping):
        raise TypeError(
            f"A causal-LM batch is a dict of (N, L) tensors (input_ids, attention_mask, labels), got a "
            f"{type(batch).__name__}: collate token ids into dicts (e.g. with CompletionOnlyCollator)."
        )
    ids = _entry(batch, input_ids_key, "token ids", "yield dict batches with the tokenizer's input_ids")
    mask = None
    if attention_mask_key is not None:
        mask = _entry(
            batch,
            attention_mask_key,
            "attention mask",
            "pass the tokenizer's attention mask, or attention_mask_key=None when nothing is padded",
        )
    if labels_key is None:
        labels = ids
    else:
        labels = _entry(
            batch,
            labels_key,
            "labels",
            "give labels (the input ids with -100 on tokens that do not count; completion_only_labels builds "
            "them), set labels_key to their key, or labels_key=None to count every real token",
        )
    for name, tensor in (("labels", labels), ("attention_mask", mask)):
        if tensor is not None and tensor.shape != ids.shape:
            raise ValueError(
                f"batch's {name} have shape {tuple(tensor.shape)} but input_ids {tuple(ids.shape)}: both are "
                "per token of the same (unshifted) sequences; the module shifts the labels itself."
            )
    return labels, mask


def check_label_values(labels: Tensor, vocab_size: int, stage: str) -> None:
    """Refuse label ids outside ``[0, vocab_size)`` other than -100 (reads the values: call on the host).

    Raises:
        ValueError: the message names the first bad id and the fix.
    """
    bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= vocab_size))
    if bad.any():
        value = int(labels[bad][0])
        raise ValueError(
            f"The {stage} labels hold token id {value}, outside [0, {vocab_size}), the ids the models share "
            f"(-100 marks tokens that do not count): tokenize with the models' tokenizer."
        )


def shifted(per_position: Tensor) -> Tensor:
    """``(N, L, ...)`` per-position outputs -> ``(N, L - 1, ...)``: the last position predicts nothing."""
    return per_position[:, :-1]


def shifted_targets(labels: Tensor, attention_mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """``(mask, targets)`` of the ``L - 1`` predicting positions of ``(N, L)`` labels.

    Position ``t`` counts when label ``t + 1`` is not -100 and both tokens ``t`` (the input) and
    ``t + 1`` (the target) are inside the attention mask (so left or right padding never counts).
    ``targets`` holds the next token's id where ``mask`` is True and -100 elsewhere.
    """
    targets = labels[:, 1:].long()
    mask = targets != IGNORE_INDEX
    if attention_mask is not None:
        real = attention_mask.bool()
        mask = mask & real[:, 1:] & real[:, :-1]
    return mask, torch.where(mask, targets, IGNORE_INDEX)
