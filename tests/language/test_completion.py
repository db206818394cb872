"""completion_only_labels and CompletionOnlyCollator: prompts and padding get -100, completions their ids."""

from __future__ import annotations

import re

import pytest
import torch

from lightning_kd.language import IGNORE_INDEX, CompletionOnlyCollator, completion_only_labels

X = IGNORE_INDEX


def test_labels_mask_prompt_and_padding() -> None:
    ids = torch.tensor([[5, 6, 7, 8, 9], [1, 2, 3, 0, 0], [4, 4, 4, 4, 4]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    labels = completion_only_labels(ids, [2, 1, 5], mask)
    expected = torch.tensor([[X, X, 7, 8, 9], [X, 2, 3, X, X], [X, X, X, X, X]])
    assert torch.equal(labels, expected) and labels.dtype == torch.int64
    assert torch.equal(completion_only_labels(ids, torch.tensor([0, 0, 0])), ids)  # no prompt, no mask


@pytest.mark.parametrize(
    ("prompts", "mask", "message"),
    [
        (
            [2, 6],
            None,
            "prompt_lengths[1] = 6 is outside [0, 5], the sequence length: count the prompt's tokens",
        ),
        ([2, -1], None, "prompt_lengths[1] = -1 is outside [0, 5]"),
        ([2], None, "prompt_lengths must hold one integer per row (2), got shape (1,)"),
        (
            [1.5, 2.0],
            None,
            "prompt_lengths must hold one integer per row (2), got shape (2,) (torch.float32)",
        ),
        ([1, 1], torch.ones(2, 4), "attention_mask has shape (2, 4) but input_ids (2, 5)"),
    ],
)
def test_bad_prompt_lengths_name_the_fix(prompts: list, mask: torch.Tensor | None, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        completion_only_labels(torch.ones(2, 5, dtype=torch.long), prompts, mask)


def test_collator_pads_right_and_labels_completions() -> None:
    collate = CompletionOnlyCollator(pad_token_id=0)
    batch = collate(
        [{"input_ids": [3, 4, 5, 6], "prompt_length": 1}, {"input_ids": [7, 8], "prompt_length": 1}]
    )
    assert torch.equal(batch["input_ids"], torch.tensor([[3, 4, 5, 6], [7, 8, 0, 0]]))
    assert torch.equal(batch["attention_mask"], torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]]))
    assert torch.equal(batch["labels"], torch.tensor([[X, 4, 5, 6], [X, 8, X, X]]))


def test_collator_refuses_samples_it_cannot_label() -> None:
    collate = CompletionOnlyCollator(pad_token_id=0)
    with pytest.raises(KeyError, match=re.escape("Samples [1] lack 'input_ids' or 'prompt_length'")):
        collate([{"input_ids": [1, 2], "prompt_length": 1}, {"input_ids": [1, 2]}])
    with pytest.raises(ValueError, match=re.escape("Sample 0 has prompt_length 3 but only 2 tokens")):
        collate([{"input_ids": [1, 2], "prompt_length": 3}])
    with pytest.raises(ValueError, match=re.escape("pad_token_id must be a token id >= 0, got -1.")):
        CompletionOnlyCollator(pad_token_id=-1)
