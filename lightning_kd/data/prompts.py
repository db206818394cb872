"""Prompts for generation: a batch's rows cut into a prompt and its continuation.

On-policy distillation (:class:`~lightning_kd.language.OnPolicyDistillationModule`) and
sequence-level KD (:class:`~lightning_kd.language.SequenceKDData`) sample completions for
prompts. :class:`PromptCollator` gives each training batch its prompts, LEFT-padded (generation
continues from the last column), next to the usual right-padded causal-LM batch whose labels
count only the continuation. :class:`PythonDocsPrompts` is :class:`~lightning_kd.data.PythonDocsText`
with it on the training split.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from lightning_kd.data.text import PythonDocsText

__all__ = ["PromptCollator", "PythonDocsPrompts", "left_padded"]

#: the label of a token no loss counts
_IGNORE = -100


def left_padded(rows: Sequence[Tensor], pad_token_id: int) -> tuple[Tensor, Tensor]:
    """``(ids, attention_mask)``: 1-D token rows left-padded with ``pad_token_id`` to the longest one."""
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        if len(row):
            ids[i, width - len(row) :] = row
            mask[i, width - len(row) :] = 1
    return ids, mask


class PromptCollator:
    """A ``collate_fn``: a causal-LM batch with its prompts (``prompt_input_ids``, ``prompt_attention_mask``).

    Samples are dicts of 1-D tensors ``input_ids``, ``attention_mask`` and ``labels`` (unshifted,
    -100 where nothing is learned; e.g. :class:`~lightning_kd.data.TokenBlocks` rows), right-padded
    to one length. Row ``i``'s prompt is its first ``p_i`` real tokens:

    * ``prompt_length=k``: ``p_i = min(k, real tokens - 1)`` (a block cut into prompt and
      continuation; a row keeps at least one continuation token when it has two real tokens);
    * ``prompt_length=None``: the real tokens before the first counted label (prompt/response
      rows whose labels are -100 on the prompt).

    The batch's labels become -100 on the prompt (the supervised continuation only).

    Args:
        pad_token_id: the id of padded prompt positions.
        prompt_length: tokens per prompt, or ``None`` to read the prompts from the labels.

    Raises:
        ValueError: a row with no prompt token (nothing to generate from).
    """

    def __init__(self, pad_token_id: int, prompt_length: int | None = None) -> None:
        if pad_token_id < 0:
            raise ValueError(f"pad_token_id must be a token id >= 0, got {pad_token_id}.")
        if prompt_length is not None and prompt_length < 1:
            raise ValueError(
                f"prompt_length must be >= 1 (generation starts from a prompt), got {prompt_length}."
            )
        self.pad_token_id = pad_token_id
        self.prompt_length = prompt_length

    def __call__(self, samples: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
        """The batch of ``samples``, with prompts."""
        batch = {
            key: torch.stack([torch.as_tensor(s[key]) for s in samples])
            for key in ("input_ids", "attention_mask", "labels")
        }
        real = batch["attention_mask"].bool()
        lengths = real.sum(dim=1)
        if self.prompt_length is not None:
            prompts = torch.clamp(lengths - 1, min=1).clamp(max=self.prompt_length)
        else:
            counted = (batch["labels"] != _IGNORE) & real
            first = torch.where(counted.any(dim=1), counted.long().argmax(dim=1), lengths)
            prompts = first
        empty = (prompts < 1).nonzero()
        if len(empty):
            row = int(empty[0])
            raise ValueError(
                f"Row {row} has no prompt token (its first real token is already learned): give each row a "
                "prompt (labels -100 on it) or set prompt_length."
            )
        positions = torch.arange(real.shape[1])
        batch["labels"] = batch["labels"].masked_fill(positions[None, :] < prompts[:, None], _IGNORE)
        rows = [ids[:length] for ids, length in zip(batch["input_ids"], prompts.tolist(), strict=True)]
        batch["prompt_input_ids"], batch["prompt_attention_mask"] = left_padded(rows, self.pad_token_id)
        return batch


class PythonDocsPrompts(PythonDocsText):
    """:class:`~lightning_kd.data.PythonDocsText` with prompts in its training batches (PromptCollator).

    Training rows are cut into a prompt (their first ``prompt_length`` tokens; ``None``: the
    ``"Topic: ..."`` line of ``format="prompt_response"``) and a continuation, the only tokens
    learned in supervised batches. Validation and test batches are :class:`PythonDocsText`'s
    (every token counted), so their perplexities compare with the other recipes'.

    Args:
        prompt_length: tokens per prompt; ``None``: the prompts of ``format="prompt_response"``.
        **kwargs: the arguments of :class:`~lightning_kd.data.PythonDocsText`.
    """

    def __init__(
        self,
        prompt_length: int | None = 32,
        format: Literal["blocks", "prompt_response"] = "blocks",
        **kwargs: Any,
    ) -> None:
        if prompt_length is None and format == "blocks":
            raise ValueError("format='blocks' has no prompts of its own: set prompt_length (e.g. 32).")
        super().__init__(format=format, **kwargs)
        if prompt_length is not None and prompt_length >= self.block_size:
            raise ValueError(
                f"prompt_length={prompt_length} leaves no continuation in block_size={self.block_size}: "
                "lower it."
            )
        self.prompt_length = prompt_length

    @property
    def prompt_collator(self) -> PromptCollator:
        """The training split's collator (after ``setup``: it needs the tokenizer's padding id)."""
        if self.tokenizer is None:
            raise RuntimeError("Call setup() first: the prompts are padded with the tokenizer's pad id.")
        return PromptCollator(self.tokenizer.pad_token_id, self.prompt_length)

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches with their prompts."""
        if not self.datasets:
            raise RuntimeError("Call setup() before asking for a dataloader.")
        return DataLoader(
            self.datasets["train"],
            batch_size=self.batch_size,
            shuffle=True,
            collate_fn=self.prompt_collator,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )
