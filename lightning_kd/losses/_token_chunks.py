r"""Token losses over chunks of positions, recomputed in backward: the chunked and fused LM-head paths.

A token-level loss is the mean over counted positions of a per-token value
:math:`\ell(s_i, \cdot)` of the student's logits row :math:`s_i` (and the teacher's row, or the
target id). At a vocabulary of 128k, the float32 ``(N L, V)`` logits, their softmaxes and the
saved intermediates of autograd dominate a step's memory. :func:`chunked_token_mean` evaluates
the same per-token function over ``chunk_size`` positions at a time:

- forward, under ``no_grad``: the rows of one chunk, their values, summed; nothing is saved but
  the inputs;
- backward: each chunk again, its rows' gradient by autograd through the same per-token
  function, written into the inputs' gradient (the logits'), or, when the student's rows are
  computed from its last hidden states :math:`h` and LM head :math:`(W, b)` (the fused path,
  :class:`HeadRows`), carried through :math:`s = h W^\top + b` by hand:
  :math:`\partial h = g W`, :math:`\partial W \mathrel{+}= g^\top h`, :math:`\partial b \mathrel{+}= \sum g`.

So the float32 intermediates alive at once are those of one chunk, ``(chunk_size, V)``; the fused
path never forms the student's ``(N L, V)`` logits at all (the idea of Liger-Kernel's fused
linear losses, Hsu et al., "Liger Kernel: Efficient Triton Kernels for LLM Training", 2024).
Every position is computed (uncounted ones are zeroed after their value), so the number of
chunks follows from the shapes and no count is read from the device. Rows are cast to float32
and the math runs with autocast off; the head's matmul too runs in float32.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "HeadRows",
    "LogitRows",
    "TargetRows",
    "chunked_token_mean",
    "checked_chunk_size",
]

#: positions per chunk unless a term or call says otherwise: at a 128k vocabulary one float32
#: ``(256, V)`` tensor is 125 MiB, and the autograd graph of one chunk of the generalized JSD holds
#: about fifteen of them (see benchmarks/results/lm_loss_memory.md).
DEFAULT_CHUNK_SIZE = 256
#: a per-token loss: ``(student_rows (C, V) float32, teacher rows or target ids (C, ...))`` -> ``(C,)``.
TokenValues = Callable[[Tensor, Tensor], Tensor]


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

    def rows(self, tensors: tuple[Tensor, ...], start: int, stop: int) -> Tensor:
        """The float32 rows of positions ``start:stop``."""
        return tensors[0][start:stop, : self.vocab_size].float()

    def zero_grads(self, tensors: tuple[Tensor, ...]) -> list[Tensor]:
        """Zero gradients for ``tensors``."""
        return [torch.zeros_like(tensors[0])]

    def add_grad(
        self, tensors: tuple[Tensor, ...], grads: list[Tensor], start: int, stop: int, g: Tensor
    ) -> None:
        """Write the rows' gradient ``g`` into the logits' gradient."""
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

    def rows(self, tensors: tuple[Tensor, ...], start: int, stop: int) -> Tensor:
        """The float32 logits of positions ``start:stop``."""
        hidden, weight, *bias = tensors
        vocab_bias = bias[0][: self.vocab_size].float() if bias else None
        return F.linear(hidden[start:stop].float(), weight[: self.vocab_size].float(), vocab_bias)

    def zero_grads(self, tensors: tuple[Tensor, ...]) -> list[Tensor]:
        """Zero float32 gradients for hidden states, weight (and bias)."""
        return [torch.zeros_like(t, dtype=torch.float32) for t in tensors]

    def add_grad(
        self, tensors: tuple[Tensor, ...], grads: list[Tensor], start: int, stop: int, g: Tensor
    ) -> None:
        """Carry the logits' gradient ``g`` through ``s = h W^T + b``."""
        hidden, weight = tensors[0], tensors[1]
        vocab_weight = weight[: self.vocab_size].float()
        grads[0][start:stop] = g @ vocab_weight
        grads[1][: self.vocab_size].addmm_(g.T, hidden[start:stop].float())
        if len(grads) == 3:
            grads[2][: self.vocab_size] += g.sum(dim=0)


@dataclass(frozen=True)
class TargetRows:
    """Target ids ``[start:stop]`` of flattened ``(P,)`` targets (the cross-entropy's "teacher")."""

    targets: Tensor

    def tensors(self) -> tuple[Tensor, ...]:
        """The targets."""
        return (self.targets,)

    def rows(self, tensors: tuple[Tensor, ...], start: int, stop: int) -> Tensor:
        """The ids of positions ``start:stop``."""
        return tensors[0][start:stop]


Rows = Any  # LogitRows | HeadRows | TargetRows


class _ChunkedMean(torch.autograd.Function):
    """Mean over counted positions of ``values(student_rows, teacher_rows)``, chunk by chunk."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        values: TokenValues,
        student: Rows,
        teacher: Rows,
        mask: Tensor,
        chunk_size: int,
        *student_tensors: Tensor,
    ) -> Tensor:
        device_type = mask.device.type
        count = mask.sum().clamp_min(1)
        teacher_tensors = tuple(t.detach() for t in teacher.tensors())
        total = torch.zeros((), device=mask.device)
        with torch.no_grad(), torch.autocast(device_type, enabled=False):
            for start in range(0, mask.shape[0], chunk_size):
                stop = start + chunk_size
                chunk = values(
                    student.rows(student_tensors, start, stop), teacher.rows(teacher_tensors, start, stop)
                )
                total += torch.where(mask[start:stop], chunk, 0.0).sum()
        ctx.values, ctx.student, ctx.teacher, ctx.chunk_size = values, student, teacher, chunk_size
        ctx.teacher_tensors = teacher_tensors
        ctx.save_for_backward(mask, count, *student_tensors)
        return total / count

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        mask, count, *student_tensors = ctx.saved_tensors
        student_tensors = tuple(t.detach() for t in student_tensors)
        student, teacher = ctx.student, ctx.teacher
        scale = grad_output.float() / count
        grads = student.zero_grads(student_tensors)
        with torch.autocast(mask.device.type, enabled=False):
            for start in range(0, mask.shape[0], ctx.chunk_size):
                stop = start + ctx.chunk_size
                rows = student.rows(student_tensors, start, stop).detach().requires_grad_(True)
                teacher_rows = teacher.rows(ctx.teacher_tensors, start, stop)
                with torch.enable_grad():
                    chunk = torch.where(mask[start:stop], ctx.values(rows, teacher_rows), 0.0)
                    (g,) = torch.autograd.grad(chunk.sum(), rows)
                student.add_grad(student_tensors, grads, start, stop, g * scale)
        grads = [g.to(t.dtype) for g, t in zip(grads, student_tensors, strict=True)]
        return (None, None, None, None, None, *grads)


def chunked_token_mean(
    values: TokenValues, student: Rows, teacher: Rows, mask: Tensor, chunk_size: int
) -> Tensor:
    """Mean of ``values(student rows, teacher rows)`` over the positions where the flat ``mask`` is True.

    Computed ``chunk_size`` positions at a time and recomputed in backward (see the module
    docstring); 0, connected to the graph, when no position counts.
    """
    return _ChunkedMean.apply(values, student, teacher, mask, chunk_size, *student.tensors())
