r"""The student's next-token cross-entropy, per counted token, on the plain, chunked or fused path.

The supervised part of LLM distillation objectives (e.g. the SFT term beside GKD's divergence,
Agarwal et al., ICLR 2024):
:math:`\mathcal{L} = -\frac{1}{|M|} \sum_{i \in M} \log \mathrm{softmax}(s_i)_{y_i}` over the counted
positions :math:`M`. The fused path computes it from the last hidden states and
the LM head chunk by chunk (:mod:`lightning_kd.losses._token_chunks`), never forming the full logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_kd.losses._token_chunks import (
    DEFAULT_CHUNK_SIZE,
    LogitRows,
    TargetRows,
    checked_chunk_size,
    chunked_token_mean,
    head_rows,
)
from lightning_kd.losses.base import StepOutputs
from lightning_kd.losses.token_divergence import TokenTerm, check_token_mask
from lightning_kd.precision import float32_math

__all__ = ["TokenCrossEntropyTerm", "token_cross_entropy", "token_cross_entropy_fused"]


@float32_math
def _cross_entropy_values(student_logits: Tensor, targets: Tensor) -> Tensor:
    """``-log softmax(s)[y]`` per row of ``(M, V)`` logits, 0 where ``y`` is -100."""
    return F.cross_entropy(student_logits, targets, reduction="none", ignore_index=-100)


def cross_entropy_values_and_grads(student_logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    r"""``-log softmax(s)[y]`` per ``(M, V)`` row, its gradient :math:`\mathrm{softmax}(s) - e_y`.

    Both are 0 in rows whose target is -100. **Overwrites the logits** (with the gradient, which is
    returned; the chunked and fused paths pass fresh float32 rows). Computed in the logits' dtype.
    """
    counted = targets != -100
    ids = torch.where(counted, targets, 0)[:, None]
    rows = student_logits.sub_(student_logits.amax(dim=-1, keepdim=True))
    picked = rows.gather(1, ids)[:, 0]
    sums = rows.exp_().sum(dim=-1, keepdim=True)
    values = torch.where(counted, sums[:, 0].log() - picked, 0.0)
    grad = rows.div_(sums).scatter_add_(1, ids, torch.full_like(ids, -1, dtype=rows.dtype))
    return values, grad.mul_(counted[:, None])


def _chunk_values(student_rows: Tensor, targets: Tensor, with_grads: bool) -> tuple[Tensor, Tensor | None]:
    """Per-chunk function (a :data:`~lightning_kd.losses._token_chunks.ChunkValues`)."""
    if with_grads:
        return cross_entropy_values_and_grads(student_rows, targets)
    return _cross_entropy_values(student_rows, targets), None


def _checked_targets(targets: Tensor, mask: Tensor | None, positions: tuple[int, ...]) -> Tensor:
    """Flat targets, -100 wherever ``mask`` is False; ``ValueError`` for a wrong shape or dtype."""
    if tuple(targets.shape) != positions or targets.is_floating_point() or targets.dtype == torch.bool:
        raise ValueError(
            f"targets have shape {tuple(targets.shape)} and dtype {targets.dtype}: expected integer "
            f"next-token ids (-100 where the token does not count) of shape {positions}."
        )
    check_token_mask(mask, positions, "the logits")
    if mask is not None:
        targets = torch.where(mask, targets, -100)
    return targets.reshape(-1)


def token_cross_entropy(
    student_logits: Tensor,
    targets: Tensor,
    mask: Tensor | None = None,
    path: str = "plain",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Tensor:
    """Mean next-token cross-entropy over the counted tokens (``mask``, and ``targets != -100``).

    Args:
        student_logits: ``(N, L, V)``.
        targets: ``(N, L)`` next-token ids, -100 where the token does not count.
        mask: ``(N, L)`` bool; ``None``: every position with a target counts.
        path: ``"plain"`` or ``"chunked"`` (``chunk_size`` positions at a time, their gradient
            computed in forward).
        chunk_size: positions per chunk.

    Returns:
        Scalar float32; 0 (connected to the graph) when no token counts.
    """
    positions = tuple(student_logits.shape[:-1])
    if path not in ("plain", "chunked"):
        raise ValueError(
            f"Unknown path {path!r} for logits; choose plain or chunked (the fused path is "
            "token_cross_entropy_fused, from hidden states and the LM head)."
        )
    flat = _checked_targets(targets, mask, positions)
    counted = flat != -100
    vocab_size = student_logits.shape[-1]
    rows = student_logits.reshape(-1, vocab_size)
    if path == "chunked":
        chunk_size = checked_chunk_size(chunk_size)
        return chunked_token_mean(
            _chunk_values, LogitRows(rows, vocab_size), TargetRows(flat), counted, chunk_size
        )
    return _cross_entropy_values(rows, flat).sum() / counted.sum().clamp_min(1)


def token_cross_entropy_fused(
    student_hidden: Tensor,
    student_weight: Tensor,
    student_bias: Tensor | None,
    targets: Tensor,
    mask: Tensor | None = None,
    vocab_size: int | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Tensor:
    r""":func:`token_cross_entropy` of the logits :math:`h W[:V]^\top + b[:V]`, chunk by chunk.

    ``vocab_size``: the rows of the head to use (``None``: all); gradients reach the hidden states,
    the weight and the bias.
    """
    checked_chunk_size(chunk_size)
    vocab_size = student_weight.shape[0] if vocab_size is None else vocab_size
    student = head_rows(student_hidden, student_weight, student_bias, vocab_size, "student")
    flat = _checked_targets(targets, mask, tuple(student_hidden.shape[:-1]))
    return chunked_token_mean(_chunk_values, student, TargetRows(flat), flat != -100, chunk_size)


class TokenCrossEntropyTerm(TokenTerm):
    """The student's next-token cross-entropy on ``outputs.tokens.targets``, mean over counted tokens.

    Needs no teacher. On the fused path (``path="fused"``) it reads the student's last hidden states
    and LM head, so the full logits are never formed (with a fused divergence term beside it, the
    causal-LM module then forms no logits at all).

    Args:
        name: key of the term (``train/loss_<name>``).
        weight: factor in the total loss.
        path: ``"plain"``, ``"chunked"`` or ``"fused"`` (see
            :class:`~lightning_kd.losses.token_divergence.TokenTerm`).
        chunk_size: positions per chunk of the chunked and fused paths.
    """

    needs_teacher = False

    def __init__(
        self,
        name: str = "token_ce",
        weight: float = 1.0,
        path: str = "plain",
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ):
        super().__init__(name, weight, path, chunk_size)

    def forward(self, outputs: StepOutputs) -> Tensor:
        """The cross-entropy of this step's counted tokens."""
        tokens = self.required_tokens(outputs)
        if self.path == "fused":
            hidden, weight, bias = self.student_head_inputs(tokens)
            return token_cross_entropy_fused(
                hidden, weight, bias, tokens.targets, tokens.mask, tokens.vocab_size, self.chunk_size
            )
        logits = self.required(tokens.student_logits, "the student's logits")
        logits = self.vocab_logits(logits, tokens, "student")
        return token_cross_entropy(logits, tokens.targets, tokens.mask, self.path, self.chunk_size)
