"""Tiny causal LMs, token batches and plain-torch token terms for the causal-LM tests.

The terms are written here in plain torch (the package's own token terms are tested in
tests/losses/): cross-entropy and forward KL as means over the counted tokens of ``outputs.tokens``.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from typing import Any  # noqa: E402

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from lightning_kd.language import CompletionOnlyCollator  # noqa: E402
from lightning_kd.losses import LossTerm, StepOutputs  # noqa: E402

VOCAB = 48
LENGTH = 12


def tiny_gpt2(
    hidden: int = 16, layers: int = 2, vocab: int = VOCAB, seed: int = 0, **config: Any
) -> nn.Module:
    """A GPT-2 LM of a few thousand parameters, no dropout (runs compare exactly)."""
    torch.manual_seed(seed)
    settings = dict(
        vocab_size=vocab, n_positions=32, n_embd=hidden, n_layer=layers, n_head=2, bos_token_id=0,
        eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    settings.update(config)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**settings))


def tiny_llama(hidden: int = 16, vocab: int = VOCAB, seed: int = 0) -> nn.Module:
    """A Llama LM of a few thousand parameters."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32, bos_token_id=0,
        eos_token_id=0, pad_token_id=0,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config)


class TinyLM(nn.Module):
    """Not a Hugging Face model: ``(N, L, V)`` logits from embeddings and a cumulative mean over positions."""

    def __init__(self, vocab: int = VOCAB, hidden: int = 8, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(vocab, hidden)
        self.out = nn.Linear(hidden, vocab)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        states = self.embed(input_ids).cumsum(dim=1)
        return self.out(states / torch.arange(1, input_ids.shape[1] + 1)[None, :, None])


class TokenCE(LossTerm):
    """Next-token cross-entropy, mean over counted tokens (plain torch)."""

    needs_teacher = False

    def forward(self, outputs: StepOutputs) -> Tensor:
        tokens = outputs.tokens
        logits = tokens.student_logits[..., : tokens.vocab_size].float()
        total = F.cross_entropy(logits.flatten(0, 1), tokens.targets.flatten(), reduction="sum")
        return total / tokens.mask.sum().clamp_min(1)


def token_kl(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor) -> Tensor:
    """Forward KL(teacher || student) per token, mean over ``mask``."""
    student = F.log_softmax(student_logits.float(), dim=-1)
    teacher = F.log_softmax(teacher_logits.float(), dim=-1)
    per_token = (teacher.exp() * (teacher - student)).sum(dim=-1)
    return torch.where(mask, per_token, 0.0).sum() / mask.sum().clamp_min(1)


class TokenKL(LossTerm):
    """Forward KL from the teacher's next-token distribution, mean over counted tokens, from the logits."""

    def forward(self, outputs: StepOutputs) -> Tensor:
        tokens = outputs.tokens
        vocab = tokens.vocab_size
        return token_kl(tokens.student_logits[..., :vocab], tokens.teacher_logits[..., :vocab], tokens.mask)


class FusedTokenKL(LossTerm):
    """TokenKL on the fused path: logits from the hidden states and the heads' weights (F.linear)."""

    reads_hidden_states = True

    def forward(self, outputs: StepOutputs) -> Tensor:
        tokens = outputs.tokens
        vocab = tokens.vocab_size
        student = F.linear(tokens.student_hidden, tokens.student_head.weight[:vocab])
        teacher = F.linear(tokens.teacher_hidden, tokens.teacher_head.weight[:vocab])
        return token_kl(student, teacher, tokens.mask)


def token_samples(
    count: int, length: int = LENGTH, vocab: int = VOCAB, seed: int = 0
) -> list[dict[str, Any]]:
    """Random sequences of 3 .. ``length`` tokens (ids >= 1; 0 pads), each with a prompt of 1 .. len - 2."""
    generator = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(count):
        size = int(torch.randint(3, length + 1, (1,), generator=generator))
        prompt = int(torch.randint(1, size - 1, (1,), generator=generator))
        ids = torch.randint(1, vocab, (size,), generator=generator)
        samples.append({"input_ids": ids, "prompt_length": prompt})
    return samples


def token_loader(samples: list[dict[str, Any]], batch_size: int) -> DataLoader:
    """Right-padded completion-only batches, in order."""
    return DataLoader(samples, batch_size=batch_size, collate_fn=CompletionOnlyCollator(pad_token_id=0))


class RandomTokenData(pl.LightningDataModule):
    """Random completion-only token batches (train, val and test), for fits and the YAML test."""

    def __init__(self, samples: int = 16, batch_size: int = 4, vocab: int = VOCAB, seed: int = 0) -> None:
        super().__init__()
        self.samples = token_samples(samples, vocab=vocab, seed=seed)
        self.held_out = token_samples(samples // 2, vocab=vocab, seed=seed + 1)
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        return token_loader(self.samples, self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return token_loader(self.held_out, self.batch_size)

    test_dataloader = val_dataloader
