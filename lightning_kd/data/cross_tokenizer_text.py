"""Python's documentation as text for a student and a teacher of two different tokenizers."""

from __future__ import annotations

from bisect import bisect_right
from typing import Any

from lightning_kd.data.python_docs import Document
from lightning_kd.data.text import PythonDocsText
from lightning_kd.language.tokenizer_alignment import CrossTokenizerCollator

__all__ = ["PythonDocsCrossTokenizerText", "text_chunks"]


def text_chunks(text: str, student_ends: list[int], teacher_ends: list[int], block_size: int) -> list[str]:
    """``text`` cut between the student's tokens into pieces of at most ``block_size - 1`` tokens of each.

    ``student_ends`` / ``teacher_ends`` are the end offsets of each tokenizer's tokens of the whole
    text. A piece ends after a student token when one more student token, or the teacher's tokens
    up to its end, would pass ``block_size - 1`` (one token of margin: a piece tokenized on its own
    may split its first word differently).
    """
    limit = block_size - 1
    pieces, start, first = [], 0, 0
    for index, end in enumerate(student_ends):
        teacher_tokens = bisect_right(teacher_ends, end) - bisect_right(teacher_ends, start)
        if index - first >= limit or (teacher_tokens > limit and index > first):
            pieces.append(text[start : student_ends[index - 1]])
            start, first = student_ends[index - 1], index
    pieces.append(text[start:])
    return [piece for piece in pieces if piece.strip()]


class PythonDocsCrossTokenizerText(PythonDocsText):
    """:class:`~lightning_kd.data.PythonDocsText` for a student and a teacher of different BPE vocabularies.

    Both tokenizers are trained on the training split (:func:`~lightning_kd.data.trained_bpe_tokenizer`,
    cached under the same names as :class:`~lightning_kd.data.PythonDocsText`'s: the student's is
    the one a ``PythonDocsText(vocab_size=vocab_size)`` run uses, the teacher's the one of
    ``PythonDocsText(vocab_size=teacher_vocab_size)``, so a teacher trained by that datamodule reads
    exactly these tokens). Every document is cut into pieces of text that fit ``block_size`` tokens
    of both (:func:`text_chunks`); batches come from
    :class:`~lightning_kd.language.CrossTokenizerCollator` (the student's tokens, the teacher's and
    the partners). ``tokenizer`` and ``teacher_tokenizer`` hold the tokenizers after ``setup``.

    Args:
        vocab_size: the student's tokenizer's largest vocabulary.
        teacher_vocab_size: the teacher's (it must differ from ``vocab_size``).
        block_size: the longest row of each model.
        batch_size: rows per batch.
        **kwargs: ``val_fraction``, ``test_fraction``, ``cache_dir``, ``stdlib``, ``max_documents``,
            ``num_workers`` of :class:`~lightning_kd.data.PythonDocsText`.
    """

    def __init__(
        self,
        vocab_size: int = 4096,
        teacher_vocab_size: int = 2048,
        block_size: int = 128,
        batch_size: int = 32,
        **kwargs: Any,
    ) -> None:
        if teacher_vocab_size == vocab_size:
            raise ValueError(
                f"teacher_vocab_size={teacher_vocab_size} equals vocab_size: both models would share one "
                "tokenizer; use PythonDocsText with CausalLMDistillationModule for that."
            )
        super().__init__(
            format="blocks", block_size=block_size, vocab_size=vocab_size, batch_size=batch_size, **kwargs
        )
        self.teacher_vocab_size_limit = teacher_vocab_size
        self.teacher_tokenizer: Any = None

    def setup(self, stage: str | None = None) -> None:
        """Build the corpus, train (or load) both tokenizers, and cut every split into text pieces."""
        if self.datasets:
            return
        self.documents = self.split_documents()
        train_texts = [document.text for document in self.documents["train"]]
        self.tokenizer = self.trained_tokenizer(train_texts, self.vocab_size_limit)
        self.teacher_tokenizer = self.trained_tokenizer(train_texts, self.teacher_vocab_size_limit)
        for split, documents in self.documents.items():
            self.datasets[split] = self._pieces(documents)  # type: ignore[assignment]
        self.collate_fn = CrossTokenizerCollator(self.tokenizer, self.teacher_tokenizer, self.block_size)

    def _pieces(self, documents: list[Document]) -> list[str]:
        texts = [document.text for document in documents]
        if not texts:
            return []
        ends = []
        for tokenizer in (self.tokenizer, self.teacher_tokenizer):
            spans = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
            ends.append([[end for _, end in row] for row in spans])
        return [
            piece
            for text, student, teacher in zip(texts, *ends, strict=True)
            for piece in text_chunks(text, student, teacher, self.block_size)
        ]
