r"""Token losses over chunks of positions, their gradients computed in forward: the chunked and fused paths.

A token-level loss is the mean over counted positions of a per-token value
:math:`\ell(s_i, \cdot)` of the student's logits row :math:`s_i` (and the teacher's row, or the
target id). At a vocabulary of 128k, the float32 ``(N L, V)`` logits, their softmaxes and the
saved intermediates of autograd dominate a step's memory. :func:`chunked_token_mean` evaluates
the same per-token function over ``chunk_size`` positions at a time, and, when the student's
tensors need gradients, each chunk's gradient with it (no autograd graph, nothing recomputed):

- forward: the rows of one chunk, their values and, in closed form, the values' gradient :math:`g`
  w.r.t. the rows, weighted by :math:`\mathrm{mask}_i / |M|` (the count stays on the device); :math:`g`
  is written into the logits' gradient or, when the student's rows are computed from its last
  hidden states :math:`h` and LM head :math:`(W, b)` (the fused path, :class:`HeadRows`), carried
  through :math:`s = h W^\top + b` at once: :math:`\partial h = g W`,
  :math:`\partial W \mathrel{+}= g^\top h`, :math:`\partial b \mathrel{+}= \sum g`;
- backward: those gradients, scaled in place by the incoming gradient and handed over.

So the float32 intermediates alive at once are those of one chunk, ``(chunk_size, V)``; the fused
path never forms the student's ``(N L, V)`` logits at all, and computes each head's logits once
(the idea of Liger-Kernel's fused linear losses, Hsu et al., "Liger Kernel: Efficient Triton
Kernels for LLM Training", 2024). Every position is computed (an uncounted one gets weight 0 and its
gradient row is zeroed: non-finite logits there change nothing), so the number of chunks follows
from the shapes and no count is read from the device. Rows are cast to float32 and the math runs
with autocast off; the head's matmuls too run in float32; gradients are returned in the inputs'
dtypes.

The gradients are handed over once: a second backward through the same loss (``retain_graph=True``)
and double backward (``create_graph=True``) raise a ``RuntimeError``; use the plain path for those.
Without grad mode (evaluation), or when no student tensor requires grad, only the values are computed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "ALIGNMENT_HINT",
    "DEFAULT_CHUNK_SIZE",
    "ChunkValues",
    "DecodedRows",
    "HeadRows",
    "LogitRows",
    "TargetRows",
    "checked_decoded_rows",
    "chunked_token_mean",
    "checked_chunk_size",
    "head_parameters",
    "head_rows",
]

#: positions per chunk unless a term or call says otherwise: at a 128k vocabulary one float32
#: ``(256, V)`` tensor is 125 MiB, and a chunk's closed-form values and gradient hold a handful of
#: them (see benchmarks/results/lm_loss_memory.md).
DEFAULT_CHUNK_SIZE = 256
#: what a message about teacher and student logits of different vocabularies tells the user to do
ALIGNMENT_HINT = (
    "Teacher and student must share the token ids: the causal-LM module compares them over the shared "
    "vocabulary (TokenOutputs.vocab_size, logits[..., :vocab_size]); slice both logits to it."
)
#: a per-token loss: ``(student_rows (C, V) float32, teacher rows or target ids (C, ...), with_grads)``
#: -> ``(values (C,), d values_i / d student_rows_i (C, V) or None when not with_grads)``; it may
#: overwrite the rows (a buffer that the next chunk's rows reuse) and return them as the gradient.
ChunkValues = Callable[[Tensor, Tensor, bool], tuple[Tensor, Tensor | None]]
_SPENT = (
    "The chunked and fused token losses compute their gradients in forward and hand them over once: "
    "this is a second backward through the same loss (retain_graph=True). Compute the loss again, or "
    "use path='plain', to differentiate it twice."
)


def checked_chunk_size(chunk_size: int) -> int:
    """``chunk_size`` as an int; a ``ValueError`` unless it is a whole number >= 1."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(
            f"chunk_size must be a whole number >= 1 (positions per chunk, e.g. 256), got {chunk_size!r}."
        )
    return chunk_size


@dataclass(frozen=True)
class LogitRows:
    """Rows ``[start:stop, :vocab_size]`` of flattened ``(P, V)`` logits, in float32."""

    logits: Tensor
    vocab_size: int

    def tensors(self) -> tuple[Tensor, ...]:
        """The tensors the rows are computed from (what receives gradients)."""
        return (self.logits,)

    def prepared(self, tensors: tuple[Tensor, ...], chunk_size: int) -> tuple[Tensor, ...]:
        """The detached logits and a float32 ``(chunk_size, vocab_size)`` buffer for the rows."""
        logits = tensors[0].detach()
        rows = logits.new_empty((min(chunk_size, logits.shape[0]), self.vocab_size), dtype=torch.float32)
        return (logits, rows)

    def rows(self, prepared: tuple[Tensor, ...], start: int, stop: int) -> Tensor:
        """The float32 rows of positions ``start:stop``, copied (cast) into the buffer."""
        logits, rows = prepared
        chunk = logits[start:stop, : self.vocab_size]
        return rows[: chunk.shape[0]].copy_(chunk)

    def new_grads(self, tensors: tuple[Tensor, ...], needs: tuple[bool, ...]) -> list[Tensor | None]:
        """The logits' gradient, in their dtype: every row is written; columns past ``vocab_size`` are 0."""
        grad = torch.empty_like(tensors[0])
        grad[:, self.vocab_size :] = 0
        return [grad]

    def add_grad(
        self, prepared: tuple[Tensor, ...], grads: list[Tensor | None], start: int, stop: int, g: Tensor
    ) -> None:
        """Write the rows' gradient ``g`` into the logits' gradient (cast once to their dtype)."""
        grads[0][start:stop, : self.vocab_size] = g


@dataclass(frozen=True)
class HeadRows:
    """Rows ``h[start:stop] W[:vocab_size]^T + b[:vocab_size]`` of an LM head, in float32.

    ``hidden``: flattened ``(P, H)`` last hidden states; ``weight``: ``(V, H)``; ``bias``: ``(V,)`` or None.
    """

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None
    vocab_size: int

    def tensors(self) -> tuple[Tensor, ...]:
        """Hidden states, weight (and bias): what receives gradients."""
        return (self.hidden, self.weight) if self.bias is None else (self.hidden, self.weight, self.bias)

    def prepared(self, tensors: tuple[Tensor, ...], chunk_size: int) -> tuple[Tensor, ...]:
        """A float32 ``(chunk_size, vocab_size)`` buffer for the logits, and the head's inputs in float32.

        Hidden states, ``weight[:vocab_size]`` (and bias), detached, cast once per call.
        """
        hidden, weight, *bias = (t.detach() for t in tensors)
        rows = hidden.new_empty((min(chunk_size, hidden.shape[0]), self.vocab_size), dtype=torch.float32)
        vocab = slice(0, self.vocab_size)
        return (rows, hidden.float(), weight[vocab].float(), *(b[vocab].float() for b in bias))

    def rows(self, prepared: tuple[Tensor, ...], start: int, stop: int) -> Tensor:
        """The float32 logits of positions ``start:stop``, computed into the buffer."""
        rows, hidden, weight, *bias = prepared
        chunk = hidden[start:stop]
        out = rows[: chunk.shape[0]]
        if bias:
            return torch.addmm(bias[0], chunk, weight.T, out=out)
        return torch.mm(chunk, weight.T, out=out)

    def new_grads(self, tensors: tuple[Tensor, ...], needs: tuple[bool, ...]) -> list[Tensor | None]:
        """Float32 gradients for the tensors that need one (the hidden states' rows are all written)."""
        hidden, *parameters = tensors
        grads: list[Tensor | None] = [torch.empty_like(hidden, dtype=torch.float32) if needs[0] else None]
        for tensor, need in zip(parameters, needs[1:], strict=True):
            grads.append(torch.zeros_like(tensor, dtype=torch.float32) if need else None)
        return grads

    def add_grad(
        self, prepared: tuple[Tensor, ...], grads: list[Tensor | None], start: int, stop: int, g: Tensor
    ) -> None:
        """Carry the logits' gradient ``g`` through ``s = h W^T + b``."""
        hidden, weight = prepared[1], prepared[2]
        grad_hidden, grad_weight, *grad_bias = grads
        if grad_hidden is not None:
            torch.mm(g, weight, out=grad_hidden[start:stop])
        if grad_weight is not None:
            grad_weight[: self.vocab_size].addmm_(g.T, hidden[start:stop])
        if grad_bias and grad_bias[0] is not None:
            grad_bias[0][: self.vocab_size] += g.sum(dim=0)


@dataclass(frozen=True)
class TargetRows:
    """Target ids ``[start:stop]`` of flattened ``(P,)`` targets (the cross-entropy's "teacher")."""

    targets: Tensor

    def tensors(self) -> tuple[Tensor, ...]:
        """The targets."""
        return (self.targets,)

    def prepared(self, tensors: tuple[Tensor, ...], chunk_size: int) -> tuple[Tensor, ...]:
        """The targets, as they are."""
        return tensors

    def rows(self, prepared: tuple[Tensor, ...], start: int, stop: int) -> Tensor:
        """The ids of positions ``start:stop``."""
        return prepared[0][start:stop]


@dataclass(frozen=True)
class DecodedRows:
    """Teacher rows decoded chunk by chunk from a compact form (a top-k store's packed rows).

    ``packed``: ``(P, ...)``, one entry per flattened position; ``decode(packed[start:stop], out)``
    writes the float32 ``(stop - start, vocab_size)`` rows into ``out`` and returns them. Only one
    chunk's rows exist at a time: the full ``(P, V)`` teacher tensor is never formed.
    """

    packed: Tensor
    decode: Callable[[Tensor, Tensor], Tensor]
    vocab_size: int

    def tensors(self) -> tuple[Tensor, ...]:
        """The packed rows."""
        return (self.packed,)

    def prepared(self, tensors: tuple[Tensor, ...], chunk_size: int) -> tuple[Tensor, ...]:
        """The packed rows and a float32 ``(chunk_size, vocab_size)`` buffer each chunk is decoded into."""
        packed = tensors[0]
        rows = packed.new_empty((min(chunk_size, packed.shape[0]), self.vocab_size), dtype=torch.float32)
        return (packed, rows)

    def rows(self, prepared: tuple[Tensor, ...], start: int, stop: int) -> Tensor:
        """The decoded float32 rows of positions ``start:stop``."""
        packed, rows = prepared
        chunk = packed[start:stop]
        return self.decode(chunk, rows[: chunk.shape[0]])


Rows = Any  # LogitRows | HeadRows | TargetRows | DecodedRows


class _ChunkedMean(torch.autograd.Function):
    """Mean over counted positions of ``values(student_rows, teacher_rows)``, chunk by chunk."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        values: ChunkValues,
        student: Rows,
        teacher: Rows,
        mask: Tensor,
        chunk_size: int,
        grad_enabled: bool,
        *student_tensors: Tensor,
    ) -> Tensor:
        needs = tuple(grad_enabled and need for need in ctx.needs_input_grad[6:])
        count = mask.sum().clamp_min(1)
        weights = mask / count  # mask_i / |M|, on the device
        total = torch.zeros((), device=mask.device)
        grads = student.new_grads(student_tensors, needs) if any(needs) else None
        with torch.autocast(mask.device.type, enabled=False):
            student_inputs = student.prepared(student_tensors, chunk_size)
            teacher_inputs = teacher.prepared(tuple(t.detach() for t in teacher.tensors()), chunk_size)
            for start in range(0, mask.shape[0], chunk_size):
                stop = start + chunk_size
                chunk, g = values(
                    student.rows(student_inputs, start, stop),
                    teacher.rows(teacher_inputs, start, stop),
                    grads is not None,
                )
                total += torch.where(mask[start:stop], chunk, 0.0).sum()
                if grads is not None:  # uncounted rows add nothing, even non-finite ones (padding)
                    g = g.masked_fill_(~mask[start:stop, None], 0.0).mul_(weights[start:stop, None])
                    student.add_grad(student_inputs, grads, start, stop, g)
        if grads is not None:
            ctx.grads = [
                None if g is None else g.to(t.dtype) for g, t in zip(grads, student_tensors, strict=True)
            ]
        return total / count

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        if torch.is_grad_enabled():
            raise RuntimeError(
                "The chunked and fused token losses do not support double backward (create_graph=True): "
                "their gradients are computed in forward, without a graph. Use path='plain'."
            )
        grads = getattr(ctx, "grads", None)
        if grads is None:
            raise RuntimeError(_SPENT)
        ctx.grads = None  # handed over: the engine may take the tensors as the .grad of leaves
        for g in grads:
            if g is not None:
                g.mul_(grad_output)
        return (None,) * 6 + tuple(grads)


def chunked_token_mean(
    values: ChunkValues, student: Rows, teacher: Rows, mask: Tensor, chunk_size: int
) -> Tensor:
    """Mean of ``values(student rows, teacher rows)`` over the positions where the flat ``mask`` is True.

    Computed ``chunk_size`` positions at a time, the gradients with it (see the module docstring);
    0, connected to the graph, when no position counts.
    """
    grad_enabled = torch.is_grad_enabled()
    return _ChunkedMean.apply(values, student, teacher, mask, chunk_size, grad_enabled, *student.tensors())


def checked_decoded_rows(rows: DecodedRows, positions: tuple[int, ...], vocab_size: int) -> DecodedRows:
    """``rows`` if they hold one entry per position and decode to ``vocab_size`` ids, else a ValueError."""
    if rows.packed.shape[0] != math.prod(positions) or rows.vocab_size != vocab_size:
        raise ValueError(
            f"The teacher's decoded rows hold {rows.packed.shape[0]} positions of {rows.vocab_size} token "
            f"ids but the student's logits {math.prod(positions)} positions of {vocab_size}: both must "
            f"cover the same (N, L) positions and vocabulary. {ALIGNMENT_HINT}"
        )
    return rows


def head_parameters(head: nn.Module, role: str) -> tuple[Tensor, Tensor | None]:
    """The ``(V, H)`` weight and ``(V,)`` bias (or None) of an LM head (an ``nn.Linear``)."""
    weight, bias = getattr(head, "weight", None), getattr(head, "bias", None)
    if not isinstance(weight, Tensor) or weight.ndim != 2:
        raise ValueError(
            f"The {role}'s LM head {type(head).__name__} has no 2-D weight: the fused path computes the "
            "logits as hidden @ weight.T (+ bias) from an nn.Linear output embedding; use path='chunked'."
        )
    return weight, bias if isinstance(bias, Tensor) else None


def head_rows(hidden: Tensor, weight: Tensor, bias: Tensor | None, vocab_size: int, role: str) -> HeadRows:
    """The fused path's rows of one model, after checking the shapes of its hidden states and head."""
    if hidden.ndim < 2 or weight.ndim != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"The {role}'s hidden states have shape {tuple(hidden.shape)} but its LM head weight "
            f"{tuple(weight.shape)}: expected (N, L, H) hidden states and a (V, H) weight."
        )
    if weight.shape[0] < vocab_size:
        raise ValueError(
            f"The {role}'s LM head has {weight.shape[0]} rows but vocab_size is {vocab_size}. "
            f"{ALIGNMENT_HINT}"
        )
    return HeadRows(hidden.reshape(-1, hidden.shape[-1]), weight, bias, vocab_size)
