"""Two hand-built tokenizers of one small vocabulary of words, splitting some words differently.

The student's is a WordPiece whose vocabulary lacks ``hello``, ``world`` and ``module`` (so they
become ``hel ##lo``, ``wor ##ld``, ``mod ##ule``); the teacher's a word-level tokenizer that has
them whole. Both drop whitespace (a ``Whitespace`` pre-tokenizer), so the spans are known by hand.
"""

from __future__ import annotations

import random

from tokenizers import Tokenizer, models, pre_tokenizers
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerFast

from lightning_kd.language import CrossTokenizerCollator

WORDS = ["hello", "world", ",", "the", "json", "module", "dumps", "loads", "objects", "."]
STUDENT_PIECES = ["hel", "##lo", "wor", "##ld", "mod", "##ule", ",", "the", "json", "dumps", "loads"]
STUDENT_PIECES += ["objects", "."]


def _fast(model: models.Model, name: str) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(model)
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]", name_or_path=name
    )


def student_tokenizer() -> PreTrainedTokenizerFast:
    """WordPiece: ``[PAD]`` 0, ``[UNK]`` 1, then :data:`STUDENT_PIECES`."""
    vocab = {token: i for i, token in enumerate(["[PAD]", "[UNK]", *STUDENT_PIECES])}
    return _fast(models.WordPiece(vocab, unk_token="[UNK]"), "student-pieces")


def teacher_tokenizer() -> PreTrainedTokenizerFast:
    """Whole words: ``[PAD]`` 0, ``[UNK]`` 1, then :data:`WORDS`."""
    vocab = {token: i for i, token in enumerate(["[PAD]", "[UNK]", *WORDS])}
    return _fast(models.WordLevel(vocab, unk_token="[UNK]"), "teacher-words")


def texts(count: int, seed: int = 0) -> list[str]:
    """Random sentences of 4 .. 9 words of :data:`WORDS`."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 9))) for _ in range(count)]


def cross_loader(count: int, batch_size: int = 4, seed: int = 0) -> DataLoader:
    """Batches of :class:`CrossTokenizerCollator` over :func:`texts`, in order."""
    collator = CrossTokenizerCollator(student_tokenizer(), teacher_tokenizer(), max_length=16)
    return DataLoader(texts(count, seed), batch_size=batch_size, collate_fn=collator)
