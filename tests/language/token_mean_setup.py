"""The runs that tests/language/test_token_mean.py compares, shared with tests/scripts/ddp_token_mean.py.

Four sequences of very different counted-token numbers (11, 2, 6 and 2: different lengths and
prompts), a tiny GPT-2 student taught by a wider one with CE 0.3 + forward KL 0.7, and one SGD step.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from lightning_kd.language import CausalLMDistillationModule, CompletionOnlyCollator
from tests.language.helpers import TokenCE, TokenKL, tiny_gpt2

LR = 0.5
WEIGHTS = {"ce": 0.3, "kd": 0.7}
#: (length, prompt length) of each sequence: counted tokens = length - max(prompt, 1)
SHAPES = [(12, 1), (4, 2), (9, 3), (3, 1)]


def samples() -> list[dict[str, Any]]:
    generator = torch.Generator().manual_seed(3)
    return [
        {"input_ids": torch.randint(1, 48, (length,), generator=generator), "prompt_length": prompt}
        for length, prompt in SHAPES
    ]


def models() -> tuple[nn.Module, nn.Module]:
    return tiny_gpt2(16, seed=0), tiny_gpt2(24, seed=1)


def module() -> CausalLMDistillationModule:
    student, teacher = models()
    return CausalLMDistillationModule(
        student,
        teacher,
        losses=[TokenCE("ce", weight=WEIGHTS["ce"]), TokenKL("kd", weight=WEIGHTS["kd"])],
        optimizer=lambda params: torch.optim.SGD(params, lr=LR),
        cosine_decay=False,
    )


def trainer(**kwargs: Any) -> pl.Trainer:
    settings: dict[str, Any] = dict(
        accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
    )  # fmt: skip
    settings.update(kwargs)
    return pl.Trainer(**settings)


def batch_of(chosen: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    return CompletionOnlyCollator(pad_token_id=0)(chosen)
