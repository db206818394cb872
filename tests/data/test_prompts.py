"""PromptCollator and PythonDocsPrompts: rows cut into left-padded prompts and learned continuations."""

from __future__ import annotations

import pytest
import torch

from lightning_kd.data import PromptCollator, PythonDocsPrompts

X = -100
PAD = 1


def test_the_collator_cuts_prompts_and_pads_them_on_the_left() -> None:
    samples = [
        {"input_ids": torch.tensor([5, 6, 7, 8, 9]), "attention_mask": torch.tensor([1, 1, 1, 1, 1])},
        {"input_ids": torch.tensor([2, 3, 4, 1, 1]), "attention_mask": torch.tensor([1, 1, 1, 0, 0])},
    ]
    for sample in samples:
        sample["labels"] = sample["input_ids"].masked_fill(sample["attention_mask"] == 0, X)
    batch = PromptCollator(PAD, prompt_length=3)(samples)
    assert batch["prompt_input_ids"].tolist() == [[5, 6, 7], [1, 2, 3]]  # row 2 keeps one continuation token
    assert batch["prompt_attention_mask"].tolist() == [[1, 1, 1], [0, 1, 1]]
    assert batch["labels"].tolist() == [[X, X, X, 8, 9], [X, X, 4, X, X]]
    # prompt_length=None: the prompt is what the labels leave out (prompt/response rows)
    samples[0]["labels"] = torch.tensor([X, X, 7, 8, 9])
    samples[1]["labels"] = torch.tensor([X, 3, 4, X, X])
    batch = PromptCollator(PAD)(samples)
    assert batch["prompt_input_ids"].tolist() == [[5, 6], [1, 2]]
    assert batch["labels"].tolist() == [[X, X, 7, 8, 9], [X, 3, 4, X, X]]
    samples[1]["labels"] = torch.tensor([2, 3, 4, X, X])
    with pytest.raises(ValueError, match="Row 1 has no prompt token"):
        PromptCollator(PAD)(samples)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"prompt_length": None}, "format='blocks' has no prompts of its own: set prompt_length"),
        ({"prompt_length": 32, "block_size": 32}, "prompt_length=32 leaves no continuation in block_size=32"),
        ({"prompt_length": 0}, "prompt_length must be >= 1"),
    ],
)
def test_bad_prompt_settings_stop_at_construction(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        if kwargs.get("prompt_length") == 0:
            PromptCollator(PAD, prompt_length=0)
        else:
            PythonDocsPrompts(**kwargs)
