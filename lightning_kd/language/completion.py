"""Completion-only labels: the prompt's tokens are read by the models but never counted in a loss.

Instruction and chat distillation trains on the answer only (the prompt is given, not predicted):
its labels are the input ids with -100 on the prompt and on padding, so every token-level term and
metric of :class:`~lightning_kd.language.CausalLMDistillationModule` skips them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["IGNORE_INDEX", "CompletionOnlyCollator", "completion_only_labels"]

#: the label of a token no loss counts (PyTorch's and Hugging Face's ``ignore_index``)
IGNORE_INDEX = -100


def completion_only_labels(
    input_ids: Tensor, prompt_lengths: Tensor | Sequence[int], attention_mask: Tensor | None = None
) -> Tensor:
    """Labels for next-token training on the completions: ``input_ids`` with -100 on prompts and padding.

    Row ``i``'s first ``prompt_lengths[i]`` tokens are its prompt (right-padded rows: the tokens
    at positions ``< prompt_lengths[i]``). The labels are not shifted: the module shifts them once
    (position ``t`` predicts label ``t + 1``), so the first completion token is predicted from the
    last prompt token.

    Args:
        input_ids: ``(N, L)`` integer token ids, right-padded.
        prompt_lengths: ``(N,)`` numbers of prompt tokens per row, each in ``[0, L]``.
        attention_mask: ``(N, L)``, 1 for real tokens and 0 for padding; ``None``: nothing is padded.

    Returns:
        ``(N, L)`` int64 labels.

    Raises:
        ValueError: shapes that do not match, or a prompt length outside ``[0, L]``.
    """
    if input_ids.ndim != 2 or input_ids.is_floating_point():
        raise ValueError(
            f"input_ids must be (N, L) integer token ids, got shape {tuple(input_ids.shape)} "
            f"({input_ids.dtype})."
        )
    n, length = input_ids.shape
    lengths = torch.as_tensor(prompt_lengths, device=input_ids.device)
    if tuple(lengths.shape) != (n,) or lengths.is_floating_point():
        raise ValueError(
            f"prompt_lengths must hold one integer per row ({n}), got shape {tuple(lengths.shape)} "
            f"({lengths.dtype})."
        )
    outside = (lengths < 0) | (lengths > length)
    if outside.any():
        row = int(outside.nonzero()[0])
        raise ValueError(
            f"prompt_lengths[{row}] = {int(lengths[row])} is outside [0, {length}], the sequence length: "
            "count the prompt's tokens with the same tokenizer and truncation as the input ids."
        )
    labels = input_ids.long().clone()
    positions = torch.arange(length, device=input_ids.device)
    labels[positions[None, :] < lengths[:, None]] = IGNORE_INDEX
    if attention_mask is not None:
        if tuple(attention_mask.shape) != (n, length):
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids {(n, length)}: pass "
                "the tokenizer's attention_mask of the same batch."
            )
        labels[~attention_mask.bool()] = IGNORE_INDEX
    return labels


class CompletionOnlyCollator:
    """A ``DataLoader`` ``collate_fn``: right-pads samples and labels only their completions.

    Each sample is a mapping with ``input_ids`` (a sequence of ints or a 1-D tensor: prompt and
    completion, tokenized together) and ``prompt_length`` (the prompt's number of tokens). The
    batch is ``{"input_ids", "attention_mask", "labels"}``, padded to the longest sample with
    ``pad_token_id``, labels from :func:`completion_only_labels`.

    Args:
        pad_token_id: the id written into padded positions (never counted: they are masked).
    """

    def __init__(self, pad_token_id: int) -> None:
        if pad_token_id < 0:
            raise ValueError(f"pad_token_id must be a token id >= 0, got {pad_token_id}.")
        self.pad_token_id = pad_token_id

    def __call__(self, samples: Sequence[Mapping[str, Any]]) -> dict[str, Tensor]:
        """The padded batch of ``samples``."""
        missing = [i for i, s in enumerate(samples) if "input_ids" not in s or "prompt_length" not in s]
        if missing:
            raise KeyError(
                f"Samples {missing[:5]} lack 'input_ids' or 'prompt_length': each sample is a mapping with "
                "both (the prompt and completion's token ids, and the prompt's number of tokens)."
            )
        rows = [torch.as_tensor(s["input_ids"], dtype=torch.long).reshape(-1) for s in samples]
        length = max(len(row) for row in rows)
        input_ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros(len(rows), length, dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, : len(row)] = row
            attention_mask[i, : len(row)] = 1
        prompt_lengths = [int(s["prompt_length"]) for s in samples]
        for i, (row, prompt) in enumerate(zip(rows, prompt_lengths, strict=True)):
            if prompt > len(row):
                raise ValueError(
                    f"Sample {i} has prompt_length {prompt} but only {len(row)} tokens: the prompt is part "
                    "of input_ids (tokenize prompt and completion together)."
                )
        labels = completion_only_labels(input_ids, prompt_lengths, attention_mask)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
