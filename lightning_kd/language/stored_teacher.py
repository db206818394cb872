"""TokenStoreDistillationModule: causal-LM distillation from a top-k token store, no teacher in memory."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_kd.language.causal_lm import CausalLMDistillationModule
from lightning_kd.language.token_store import TopKTokenStore
from lightning_kd.language.token_view import batch_labels, shifted, shifted_targets
from lightning_kd.language.vocabulary import output_vocabulary_size
from lightning_kd.losses._token_chunks import DecodedRows
from lightning_kd.losses.base import LossTerm, StepOutputs
from lightning_kd.losses.token_cross_entropy import TokenCrossEntropyTerm
from lightning_kd.losses.token_divergence import TokenDivergenceTerm
from lightning_kd.model_io import call_model, logits_of
from lightning_kd.module import DistillationModule

__all__ = ["StoredTeacher", "TokenStoreDistillationModule"]

#: the parent's teacher arguments, refused unless left at these defaults
_TEACHER_DEFAULTS = {
    "teacher": None,
    "teacher_mode": "frozen",
    "teacher_checkpoint": None,
    "teacher_tokenizer": None,
}
_DISTILLATION_TARGET_KEY = inspect.signature(DistillationModule.__init__).parameters["target_key"].default
#: the batch key under which the stored rows of a training batch travel to the device
ROWS_KEY = "teacher_topk_rows"


class StoredTeacher(nn.Module):
    """Stands in for the teacher: ``(N, L - 1, row_bytes)`` stored rows -> ``(N, L, V)`` log-probabilities.

    The rows are decoded on their device (:meth:`TopKCodec.decode
    <lightning_kd.language.token_codec.TopKCodec.decode>`); the last position, which predicts nothing,
    is 0. It has no parameters; the tail prior is a non-persistent buffer.

    Args:
        store: the opened store.
        tail: ``"prior"`` (the tail mass spread as the store's tail prior) or ``"uniform"``.
    """

    def __init__(self, store: TopKTokenStore, tail: Literal["prior", "uniform"] = "prior") -> None:
        super().__init__()
        if tail not in ("prior", "uniform"):
            raise ValueError(f"tail must be 'prior' or 'uniform', got {tail!r}.")
        self.store, self.tail = store, tail
        self.register_buffer("log_prior", store.log_prior.clone(), persistent=False)

    def forward(self, rows: Tensor) -> Tensor:
        """The reconstructed log-probabilities of every position (see the class docstring)."""
        codec = self.store.codec
        out = torch.zeros((rows.shape[0], rows.shape[1] + 1, codec.vocab_size), device=rows.device)
        self.decode_into(rows, out[:, :-1])
        return out

    def decode_into(self, rows: Tensor, out: Tensor) -> Tensor:
        """``(..., row_bytes)`` stored rows -> their ``(..., V)`` log-probabilities, written into ``out``."""
        return self.store.codec.decode(rows, self.log_prior if self.tail == "prior" else None, out=out)

    def decoded_rows(self, rows: Tensor) -> DecodedRows:
        """``(N, L - 1, row_bytes)`` stored rows as the chunked path's teacher, decoded chunk by chunk."""
        return DecodedRows(rows.reshape(-1, rows.shape[-1]), self.decode_into, self.store.codec.vocab_size)

    def extra_repr(self) -> str:
        """The store and the tail rule."""
        return f"{self.store!r}, tail={self.tail!r}"


class TokenStoreDistillationModule(CausalLMDistillationModule):
    """:class:`~lightning_kd.language.CausalLMDistillationModule` whose teacher is read from a top-k store.

    The store (:func:`~lightning_kd.language.fill_token_store`, or ``lightning-kd cache-tokens``) was
    filled from the training dataset; batches must carry each block's position in it
    (:class:`~lightning_kd.data.WithIndex` on the dict items: ``batch[index_key]``). Before each
    training batch moves to the device its rows are read from the memory map (shards CRC-checked
    at first read, each block's inputs against its stored signature) and added to the batch; the
    step decodes them on the device (no host read). When every term that reads the teacher is a
    :class:`~lightning_kd.losses.TokenDivergenceTerm` on the chunked path (the cross-entropy reads
    only the labels), each chunk of positions is decoded inside the loss and the teacher's
    ``(N, L - 1, V)`` float32 tensor is never formed (:attr:`decodes_by_chunk`); otherwise the rows are
    decoded into it once and every divergence reads it, on the plain and chunked paths. The fused
    path needs the teacher's head and is refused.

    Validation and test report the student's loss and perplexity (the store holds the training
    data's teacher only).

    Args:
        student: the causal LM being trained.
        store: the store's directory.
        losses: default: next-token cross-entropy 0.5 + forward KL 0.5 (as
            :func:`~lightning_kd.language.default_causal_lm_losses`).
        tail: how the tail mass is spread over the ids outside the top k (:class:`StoredTeacher`).
        index_key: the batch key of the block index.
        tokenizer: the student's tokenizer; when given, it must be the store's.
        **kwargs: the other arguments of :class:`~lightning_kd.language.CausalLMDistillationModule`
            (not ``teacher`` or ``teacher_mode``).
    """

    def __init__(
        self,
        student: nn.Module,
        store: str | Path,
        losses: Sequence[LossTerm] | None = None,
        tail: Literal["prior", "uniform"] = "prior",
        index_key: str = "index",
        tokenizer: Any = None,
        **kwargs: Any,
    ) -> None:
        # the command line fills in the parents' defaults: only other values are refused
        if kwargs.get("target_key") == _DISTILLATION_TARGET_KEY:
            del kwargs["target_key"]  # DistillationModule's; a causal LM reads labels_key
        for name, default in _TEACHER_DEFAULTS.items():
            if kwargs.pop(name, default) != default:
                raise ValueError(
                    f"TokenStoreDistillationModule takes no {name}: the teacher is the store. Remove it."
                )
        if losses is None:
            losses = [
                TokenCrossEntropyTerm("ce", weight=0.5),
                TokenDivergenceTerm("kd", weight=0.5, divergence="forward_kl"),
            ]
        fused = [term.name for term in losses if term.reads_hidden_states]
        if fused:
            raise ValueError(
                f"Loss terms {fused} take the fused LM-head path, which needs the teacher's hidden states "
                "and head; a stored teacher has neither. Use path='chunked' (the same memory profile for the "
                "student's loss) or 'plain'."
            )
        opened = TopKTokenStore(store, tokenizer)
        student_size = output_vocabulary_size(student)
        if student_size is not None and student_size != opened.codec.vocab_size:
            raise ValueError(
                f"The student predicts {student_size} token ids but the store holds a teacher of "
                f"{opened.codec.vocab_size}: train a student of the store's vocabulary."
            )
        super().__init__(student, StoredTeacher(opened, tail), losses=losses, tokenizer=tokenizer, **kwargs)
        self.store_path, self.index_key = str(store), index_key

    @property
    def store(self) -> TopKTokenStore:
        """The opened store."""
        return self.teacher.store

    @property
    def decodes_by_chunk(self) -> bool:
        """Whether the loss decodes the stored rows chunk by chunk: every teacher-reading term is chunked."""
        return all(
            isinstance(term, TokenCrossEntropyTerm)
            or (isinstance(term, TokenDivergenceTerm) and term.path == "chunked")
            for term in self.loss_terms.values()
        )

    def call_teacher(self, batch: Any, inputs: Any) -> tuple[Any, None]:
        """The stored rows decoded into ``(N, L, V)``; ``None`` when the loss decodes them by chunk."""
        if self.decodes_by_chunk:
            return None, None
        return super().call_teacher(batch, inputs)

    def step_outputs(self, batch: Any, teacher_output: Any = None) -> StepOutputs:
        """The parent's; with :attr:`decodes_by_chunk`, the tokens carry the packed rows (``teacher_rows``).

        ``teacher_output`` is then the batch's ``(N, L - 1, row_bytes)`` stored rows.
        """
        outputs = super().step_outputs(batch, teacher_output)
        if outputs.teacher_output is None and self.decodes_by_chunk:
            assert outputs.tokens is not None
            rows = self.teacher_inputs(batch, None)
            outputs.teacher_output = rows
            outputs.tokens.teacher_rows = self.teacher.decoded_rows(rows)
        return outputs

    def build_metrics(self) -> nn.ModuleDict:
        """The student's loss and perplexity (no teacher metrics: the store covers the training data)."""
        metrics = super().build_metrics()
        return nn.ModuleDict(
            {k: v for k, v in metrics.items() if "teacher" not in k and "agreement" not in k}
        )

    def check_batch(self, batch: Any, stage: str) -> None:
        """The parent's checks; a training batch also gets its blocks' stored rows (read on the host)."""
        super().check_batch(batch, stage)
        if stage != "training":
            return
        if not isinstance(batch, dict) or self.index_key not in batch:
            raise KeyError(
                f"A training batch for the token store must be a dict with the blocks' indices at "
                f"{self.index_key!r}: wrap the training dataset in lightning_kd.data.WithIndex (dict items "
                "get 'index'), or set index_key."
            )
        ids = batch["input_ids"]
        rows = self.store.rows(
            batch[self.index_key],
            ids,
            batch.get(self.attention_mask_key or ""),
            batch.get(self.labels_key or ""),
        )
        batch[ROWS_KEY] = rows if ids.device.type == "cpu" else rows.to(ids.device)

    def teacher_inputs(self, batch: Any, inputs: Any) -> Any:
        """The batch's stored rows (added by :meth:`check_batch`)."""
        if ROWS_KEY not in batch:
            raise RuntimeError(
                "This batch has no stored teacher rows: only training batches are read from the token store "
                "(they get them in on_before_batch_transfer)."
            )
        return batch[ROWS_KEY]

    def evaluate(self, batch: Any, stage: str) -> None:
        """The student's next-token cross-entropy and perplexity over the batch's counted tokens."""
        inputs, _ = self.unpack_batch(batch)
        labels, attention_mask = batch_labels(batch, self.labels_key, self.attention_mask_key)
        mask, targets = shifted_targets(labels, attention_mask)
        student = shifted(logits_of(call_model(self.student, inputs)))
        self.log_student_perplexity(student, targets, mask, stage)

    def on_fit_end(self) -> None:
        """The parent's end of fit; the store's shared lock is released."""
        super().on_fit_end()
        self.store.release()
