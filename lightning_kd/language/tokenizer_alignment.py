"""Pairing a student's and a teacher's token positions on the text, when their tokenizers differ.

Both tokenizers read the same text; fast tokenizers (``tokenizers``-backed) report each token's
character span (``return_offsets_mapping``). The rule:

* a token's **anchor** is the character offset of its first non-whitespace character (its start
  when it is all whitespace): byte-level BPE puts the space before a word into the word's token
  (``" world"``) where WordPiece or a whitespace pre-tokenizer drops it (``"world"``), and both
  tokens then begin the same word. Tokens with an empty span (special tokens, padding) have none,
  and so does a token whose anchor an earlier token of the same sequence already has (the second
  byte of a character that byte-level BPE split in two: its context already holds the first).
* position ``i`` of a causal LM predicts token ``i + 1``; student position ``i`` is **paired** with
  teacher position ``j`` when the tokens they predict, student token ``i + 1`` and teacher token
  ``j + 1``, have the same anchor. Both models have then read the same text (up to whitespace)
  and predict what starts at the same character; the tokens they predict may still differ in
  length (``"hel"`` against ``"hello"``): ULD compares the distributions' shapes, not the tokens.
* positions without a partner (a token that starts inside one of the other tokenizer's tokens,
  whitespace the other drops, text the other's truncation cut off) are masked out.

:class:`CrossTokenizerCollator` builds the batch on the CPU, in the data loader's workers: both
tokenizations and the index tensor of the partners, so the training step only gathers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_kd.language.completion import IGNORE_INDEX
from lightning_kd.language.vocabulary import tokenizer_name

__all__ = ["NO_PARTNER", "CrossTokenizerCollator", "aligned_positions", "token_anchors"]

#: the partner index of a student position that has none
NO_PARTNER = -1


def token_anchors(text: str, offsets: Sequence[Sequence[int]]) -> list[int]:
    """Each token's anchor in ``text`` (see the module docstring), :data:`NO_PARTNER` where it has none.

    Args:
        text: the text that was tokenized.
        offsets: one ``(start, end)`` character span per token (a fast tokenizer's ``offset_mapping``).
    """
    anchors: list[int] = []
    seen: set[int] = set()
    for start, end in offsets:
        span = text[start:end]
        if end <= start or not span:
            anchors.append(NO_PARTNER)
            continue
        anchor = start + len(span) - len(span.lstrip()) if span.strip() else start
        anchors.append(NO_PARTNER if anchor in seen else anchor)
        seen.add(anchor)
    return anchors


def aligned_positions(student_anchors: Sequence[int], teacher_anchors: Sequence[int]) -> list[int]:
    """For each of the student's ``len(student_anchors) - 1`` predicting positions, its teacher partner.

    Student position ``i`` (predicting student token ``i + 1``) gets the teacher position ``j``
    whose predicted token ``j + 1`` has the same anchor, or :data:`NO_PARTNER`.

    Args:
        student_anchors: :func:`token_anchors` of the student's tokens.
        teacher_anchors: :func:`token_anchors` of the teacher's tokens of the same text.
    """
    teacher_position = {anchor: j for j, anchor in enumerate(teacher_anchors[1:]) if anchor != NO_PARTNER}
    return [
        NO_PARTNER if anchor == NO_PARTNER else teacher_position.get(anchor, NO_PARTNER)
        for anchor in student_anchors[1:]
    ]


def _checked_fast(tokenizer: Any, role: str) -> Any:
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"The {role}'s tokenizer {type(tokenizer).__name__} is not a fast tokenizer: aligning two "
            "tokenizers needs each token's character span (return_offsets_mapping), which only "
            "tokenizers-backed tokenizers give. Load it with AutoTokenizer.from_pretrained(..., "
            "use_fast=True) or wrap a tokenizers.Tokenizer in transformers.PreTrainedTokenizerFast."
        )
    if tokenizer.pad_token_id is None:
        raise ValueError(
            f"The {role}'s tokenizer {tokenizer_name(tokenizer)} has no padding token: set one "
            "(e.g. tokenizer.pad_token = tokenizer.eos_token) so rows of different lengths can be batched."
        )
    return tokenizer


class CrossTokenizerCollator:
    """A ``DataLoader`` ``collate_fn``: texts -> the student's and the teacher's tokens and their pairing.

    Each sample is a text (``str``) or a mapping with ``text_key``. The batch holds:

    * ``input_ids``, ``attention_mask``, ``labels``: the student's ``(N, L_s)`` tokens, right-padded;
      labels are the ids with -100 on padding (unshifted);
    * ``teacher_input_ids``, ``teacher_attention_mask``: the teacher's ``(N, L_t)`` tokens;
    * ``teacher_positions``: ``(N, L_s - 1)`` int64, the teacher position paired with each of the
      student's predicting positions (:func:`aligned_positions`), -1 where none.

    Args:
        tokenizer: the student's fast tokenizer.
        teacher_tokenizer: the teacher's fast tokenizer.
        max_length: the student's longest row (longer texts are truncated).
        teacher_max_length: the teacher's longest row; default: ``max_length``.
        text_key: the key of the text in mapping samples.
        add_special_tokens: whether each tokenizer adds its special tokens (a BOS, ...); they have no
            character span and are never paired.
    """

    def __init__(
        self,
        tokenizer: Any,
        teacher_tokenizer: Any,
        max_length: int,
        teacher_max_length: int | None = None,
        text_key: str = "text",
        add_special_tokens: bool = True,
    ) -> None:
        self.tokenizer = _checked_fast(tokenizer, "student")
        self.teacher_tokenizer = _checked_fast(teacher_tokenizer, "teacher")
        self.max_length = max_length
        self.teacher_max_length = max_length if teacher_max_length is None else teacher_max_length
        if min(self.max_length, self.teacher_max_length) < 2:
            raise ValueError(
                f"max_length={max_length} and teacher_max_length={teacher_max_length} must be >= 2 "
                "(one token predicts the next)."
            )
        self.text_key = text_key
        self.add_special_tokens = add_special_tokens

    def texts(self, samples: Sequence[Any]) -> list[str]:
        """The samples' texts; a ``TypeError`` naming the first sample that holds none."""
        texts = []
        for index, sample in enumerate(samples):
            text = sample.get(self.text_key) if isinstance(sample, Mapping) else sample
            if not isinstance(text, str):
                raise TypeError(
                    f"Sample {index} is a {type(sample).__name__} without a text: the cross-tokenizer "
                    f"collator tokenizes raw text with both tokenizers, so samples are strings or mappings "
                    f"with a {self.text_key!r} string (got {type(text).__name__})."
                )
            texts.append(text)
        return texts

    def _encode(self, tokenizer: Any, texts: list[str], max_length: int) -> Any:
        return tokenizer(
            texts,
            padding=True,
            truncation=True,
            max_length=max_length,
            return_offsets_mapping=True,
            return_tensors="pt",
            padding_side="right",
            add_special_tokens=self.add_special_tokens,
        )

    def __call__(self, samples: Sequence[Any]) -> dict[str, Tensor]:
        """The batch of ``samples`` (see the class docstring)."""
        texts = self.texts(samples)
        student = self._encode(self.tokenizer, texts, self.max_length)
        teacher = self._encode(self.teacher_tokenizer, texts, self.teacher_max_length)
        ids, mask = _at_least_two(student, self.tokenizer.pad_token_id)
        teacher_ids, teacher_mask = _at_least_two(teacher, self.teacher_tokenizer.pad_token_id)
        positions = torch.full((len(texts), ids.shape[1] - 1), NO_PARTNER, dtype=torch.long)
        for row, text in enumerate(texts):
            pairs = aligned_positions(
                token_anchors(text, _real_offsets(student, row)),
                token_anchors(text, _real_offsets(teacher, row)),
            )
            positions[row, : len(pairs)] = torch.tensor(pairs, dtype=torch.long)
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "labels": ids.masked_fill(~mask.bool(), IGNORE_INDEX),
            "teacher_input_ids": teacher_ids,
            "teacher_attention_mask": teacher_mask,
            "teacher_positions": positions,
        }


def _at_least_two(encoding: Any, pad_id: int) -> tuple[Tensor, Tensor]:
    """``(input_ids, attention_mask)``, padded to two columns at least (one token predicts nothing)."""
    ids, mask = encoding["input_ids"], encoding["attention_mask"]
    missing = max(0, 2 - ids.shape[1])
    return F.pad(ids, (0, missing), value=pad_id), F.pad(mask, (0, missing))


def _real_offsets(encoding: Any, row: int) -> list[tuple[int, int]]:
    """The character spans of row ``row``'s real tokens (padding is on the right, after them)."""
    length = int(encoding["attention_mask"][row].sum())
    return [tuple(span) for span in encoding["offset_mapping"][row, :length].tolist()]
