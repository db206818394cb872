"""Which token ids a teacher and a student share: the rule for vocabularies of different sizes.

Token-level distillation compares the two models' distributions id by id, so both must read and
predict ids of one tokenizer. Their output sizes may still differ when one embedding is padded
(to a multiple of 64 or 128 for fast matrix products): ids past the tokenizer's length are never
produced by it. The rule (:func:`shared_vocabulary`):

1. Given both tokenizers, they must have the same vocabulary (token -> id), else the run stops.
2. Equal output sizes: every id is shared (a tokenizer given must fit into them).
3. Different output sizes: allowed only when a tokenizer is given and its length fits into the
   smaller one; then the models are compared on the ids ``[0, smaller)`` with a warning naming
   both sizes. Without a tokenizer the module cannot tell padding from another tokenizer, so the
   run stops and the message names both sizes and the fix.

A teacher of another tokenizer is distilled by
:class:`~lightning_kd.language.CrossTokenizerDistillationModule` with terms that need no shared
ids (:class:`~lightning_kd.ULDTerm`); the messages above name it.
"""

from __future__ import annotations

import warnings
from typing import Any

from torch import nn

__all__ = ["output_vocabulary_size", "shared_vocabulary", "tokenizer_name"]


def output_vocabulary_size(model: nn.Module) -> int | None:
    """The number of logits ``model`` predicts: rows of ``get_output_embeddings()``; ``None`` when unknown."""
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    weight = getattr(head, "weight", None)
    return int(weight.shape[0]) if weight is not None and weight.ndim == 2 else None


def tokenizer_name(tokenizer: Any) -> str:
    """How messages name a tokenizer: its class, its ``name_or_path`` if set, and its length."""
    path = getattr(tokenizer, "name_or_path", "")
    where = f" {path!r}" if path else ""
    return f"{type(tokenizer).__name__}{where} ({len(tokenizer)} ids)"


def _same_vocabulary(first: Any, second: Any) -> bool:
    if first is second:
        return True
    if len(first) != len(second):
        return False
    vocab = getattr(first, "get_vocab", None)
    other = getattr(second, "get_vocab", None)
    return callable(vocab) and callable(other) and vocab() == other()


def shared_vocabulary(
    student_size: int,
    teacher_size: int | None,
    tokenizer: Any = None,
    teacher_tokenizer: Any = None,
) -> int:
    """The number of token ids both models share (``TokenOutputs.vocab_size``), by the module's rule above.

    Args:
        student_size: the student's number of logits.
        teacher_size: the teacher's, or ``None`` without a teacher.
        tokenizer: the student's tokenizer (anything with ``len()`` and ``get_vocab()``), or ``None``.
        teacher_tokenizer: the teacher's; default: the student's.

    Raises:
        ValueError: different tokenizers, a tokenizer longer than a model's output, or output sizes
            that differ without a tokenizer that explains them; the message names both sizes.
    """
    if (
        tokenizer is not None
        and teacher_tokenizer is not None
        and not _same_vocabulary(tokenizer, teacher_tokenizer)
    ):
        raise ValueError(
            f"The student's tokenizer {tokenizer_name(tokenizer)} and the teacher's "
            f"{tokenizer_name(teacher_tokenizer)} differ (student {student_size}, teacher {teacher_size} "
            "output ids): token-level distillation compares the models id by id, so both need one "
            "tokenizer. Distil from a teacher of the student's tokenizer (or train the student with the "
            "teacher's), or across tokenizers with CrossTokenizerDistillationModule and a ULDTerm "
            "(Universal Logit Distillation; batches from CrossTokenizerCollator)."
        )
    known = tokenizer if tokenizer is not None else teacher_tokenizer
    sizes = f"student {student_size}" + ("" if teacher_size is None else f", teacher {teacher_size}")
    smaller = student_size if teacher_size is None else min(student_size, teacher_size)
    if known is not None and len(known) > smaller:
        raise ValueError(
            f"The tokenizer {tokenizer_name(known)} has more ids than the models predict ({sizes} output "
            "ids): the models were built for another tokenizer; pass the tokenizer they were trained with."
        )
    if teacher_size is None or teacher_size == student_size:
        return student_size
    if known is None:
        raise ValueError(
            f"The student predicts {student_size} token ids but the teacher {teacher_size}. If both use one "
            "tokenizer and one output embedding is padded, pass it as tokenizer= (its length must fit into "
            f"{smaller}) and the models are compared on the shared ids; models of different tokenizers "
            "cannot be distilled token by token. For a teacher of another tokenizer use "
            "CrossTokenizerDistillationModule with a ULDTerm (batches from CrossTokenizerCollator)."
        )
    warnings.warn(
        f"The student predicts {student_size} token ids and the teacher {teacher_size}: the tokenizer "
        f"{tokenizer_name(known)} fits into both, so the larger output embedding is taken as padded and the "
        f"models are compared on the shared ids [0, {smaller}).",
        UserWarning,
        stacklevel=2,
    )
    return smaller
