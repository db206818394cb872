r"""The compressed row of one token in the top-k teacher store: encode on the host, decode on the device.

A teacher's next-token distribution :math:`p` over :math:`V` ids is kept as its :math:`k` largest
log-probabilities :math:`\ell_1 \ge \dots \ge \ell_k`, their ids, and the log of the tail mass
:math:`\tau = 1 - \sum_{i \le k} p_{(i)}`, in one row of bits (:class:`TopKCodec`):

- ids: ``k`` fields of :math:`\lceil \log_2 V \rceil` bits, in rank order;
- the sorted log-probability curve: a least-squares fit
  :math:`\ell_i \approx \sum_{j < m} c_j \phi_j(\log i / \log k)` on ``degree + 1`` orthonormal
  polynomials :math:`\phi_j` of the log-rank (QR of the Vandermonde matrix), the coefficients in
  float16; then the residuals :math:`\ell_i - \hat\ell_i` of the leading ranks, quantised in
  groups of ranks (``residual_bits``: ``(bits, ranks)`` per group, more bits first), each group with
  its float16 step (the midrise quantiser :math:`\hat r = (q + \tfrac12 - 2^{b-1}) s` with
  :math:`s = 2 \max |r| / 2^b`, error at most :math:`s / 2`); ranks after the groups keep the curve;
- :math:`\log \tau` in float16.

The idea of fitting the sorted log-probabilities with a polynomial and quantising the residuals is
DistillKit's (Arcee AI, ``distillkit.compression``); this layout, its basis and its bit allocation are
this package's. Decoding renormalises the :math:`k` values and the tail to sum to 1 and spreads the
tail over the other :math:`V - k` ids: uniformly (``log_prior=None``, the maximum-entropy choice), or in
proportion to a prior :math:`q` (:math:`\hat p_v = \tau q_v / \sum_{u \notin \text{top-}k} q_u`; the
store's prior is each id's mean share of the tail over the stored positions where it is in the tail).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["DEFAULT_RESIDUAL_BITS", "LOG_PROB_FLOOR", "TopKCodec", "pack_fields", "unpack_fields"]

#: ``(bits, ranks)`` groups of the default codec: 4 + 12 + 32 + 80 ranks at 8 / 6 / 4 / 2 bits (k >= 128)
DEFAULT_RESIDUAL_BITS: tuple[tuple[int, int], ...] = ((8, 4), (6, 12), (4, 32), (2, 80))
#: log-probabilities are stored clamped at this value (:math:`e^{-60} \approx 10^{-26}`)
LOG_PROB_FLOOR = -60.0
_MAX_FIELD_BITS = 25  # a field is read from 4 bytes, starting at any bit of the first


def pack_fields(values: Tensor, widths: Sequence[int]) -> Tensor:
    """``(P, F)`` non-negative integers, field ``f`` in ``widths[f]`` bits -> ``(P, ceil(sum / 8))`` uint8.

    Fields are written back to back, most significant bit first (``numpy.packbits`` order).
    """
    width = torch.tensor(list(widths), dtype=torch.int64, device=values.device)
    field_of_bit = torch.repeat_interleave(torch.arange(len(widths), device=values.device), width)
    starts = torch.cumsum(width, 0) - width
    shift = (
        width[field_of_bit]
        - 1
        - (torch.arange(len(field_of_bit), device=values.device) - starts[field_of_bit])
    )
    bits = (values[:, field_of_bit] >> shift) & 1
    row_bytes = -(-bits.shape[1] // 8)
    bits = F.pad(bits, (0, row_bytes * 8 - bits.shape[1])).view(len(values), row_bytes, 8)
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.int64, device=values.device)
    return (bits * weights).sum(-1).to(torch.uint8)


def unpack_fields(rows: Tensor, widths: Sequence[int]) -> Tensor:
    """The inverse of :func:`pack_fields`: ``(..., W)`` uint8 -> ``(..., F)`` int64 (no host reads)."""
    width = torch.tensor(list(widths), dtype=torch.int64, device=rows.device)
    starts = torch.cumsum(width, 0) - width
    first = (starts // 8).unsqueeze(1) + torch.arange(4, device=rows.device)  # (F, 4) byte positions
    padded = F.pad(rows, (0, 3)).to(torch.int64)
    four = padded[..., first]  # (..., F, 4)
    word = (four[..., 0] << 24) | (four[..., 1] << 16) | (four[..., 2] << 8) | four[..., 3]
    return (word >> (32 - starts % 8 - width)) & ((1 << width) - 1)


def _half_bits(values: Tensor) -> Tensor:
    """Float values -> the unsigned 16-bit patterns of their float16 (as int64)."""
    return values.to(torch.float16).view(torch.int16).to(torch.int64) & 0xFFFF


def _from_half_bits(bits: Tensor) -> Tensor:
    """The inverse of :func:`_half_bits`, as float32."""
    signed = bits - 65536 * (bits >= 32768).to(bits.dtype)
    return signed.to(torch.int16).view(torch.float16).float()


def _log_rank_basis(k: int, terms: int) -> Tensor:
    """``(k, terms)`` orthonormal columns spanning ``1, t, t^2, ...`` of ``t = log(rank) / log(k)``."""
    t = torch.log(torch.arange(1, k + 1, dtype=torch.float64)) / math.log(max(k, 2))
    vandermonde = torch.stack([t**j for j in range(terms)], dim=1)
    basis, _ = torch.linalg.qr(vandermonde)
    return basis.float()


@dataclass(frozen=True)
class TopKCodec:
    """The bit layout of one stored token (see the module docstring) and its encoder and decoder.

    Args:
        vocab_size: the teacher's vocabulary :math:`V` (at most :math:`2^{25}`).
        k: log-probabilities kept per token, ``1 <= k <= V``.
        residual_bits: ``(bits, ranks)`` groups of quantised residuals, rank 1 first (bits 1 to 16);
            groups past rank ``k`` are cut.
        degree: degree of the polynomial fit of the sorted log-probabilities (``degree + 1``
            float16 coefficients; at most ``k - 1``).
    """

    vocab_size: int
    k: int
    residual_bits: tuple[tuple[int, int], ...] = DEFAULT_RESIDUAL_BITS
    degree: int = 3
    groups: tuple[tuple[int, int], ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not 2 <= self.vocab_size <= 2**_MAX_FIELD_BITS:
            raise ValueError(f"vocab_size must be in [2, 2^25], got {self.vocab_size}.")
        if not 1 <= self.k <= self.vocab_size:
            raise ValueError(
                f"k must be between 1 and the vocabulary size {self.vocab_size} (log-probabilities kept per "
                f"token), got {self.k}."
            )
        if not 0 <= self.degree < 8:
            raise ValueError(f"degree must be in [0, 8), got {self.degree}.")
        groups, left = [], self.k
        for bits, ranks in self.residual_bits:
            if not (1 <= int(bits) <= 16 and int(ranks) >= 1):
                raise ValueError(
                    f"residual_bits holds (bits, ranks) pairs with 1 <= bits <= 16 and ranks >= 1, got "
                    f"{(bits, ranks)}."
                )
            if left > 0:
                groups.append((int(bits), min(int(ranks), left)))
                left -= min(int(ranks), left)
        object.__setattr__(self, "groups", tuple(groups))

    @property
    def terms(self) -> int:
        """Coefficients of the polynomial fit: ``min(degree, k - 1) + 1``."""
        return min(self.degree, self.k - 1) + 1

    @property
    def id_bits(self) -> int:
        r"""Bits per stored id: :math:`\lceil \log_2 V \rceil`."""
        return max(1, math.ceil(math.log2(self.vocab_size)))

    @property
    def widths(self) -> list[int]:
        """Bit widths of a row's fields: ids, residuals, then the float16 coefficients, steps and tail."""
        residuals = [bits for bits, ranks in self.groups for _ in range(ranks)]
        halves = self.terms + len(self.groups) + 1
        return [self.id_bits] * self.k + residuals + [16] * halves

    @property
    def row_bytes(self) -> int:
        """Bytes per stored token."""
        return -(-sum(self.widths) // 8)

    def config(self) -> dict[str, object]:
        """The codec's settings (what the store's ``meta.json`` records)."""
        return {
            "vocab_size": self.vocab_size,
            "k": self.k,
            "residual_bits": [list(group) for group in self.residual_bits],
            "degree": self.degree,
        }

    # ----------------------------------------------------------------- encode
    @torch.no_grad()
    def encode(self, logits: Tensor) -> tuple[Tensor, Tensor]:
        r"""``(P, V)`` logits -> ``(P, row_bytes)`` uint8 rows and ``(2, V)`` float64 tail statistics.

        The statistics are, per id :math:`v`, :math:`\sum_t p_t(v) / \tau_t` and
        :math:`\sum_t 1` over the positions :math:`t` where :math:`v` is in the tail, summed into the
        store's tail prior (their ratio: the mean share of the tail that :math:`v` takes when it is there).
        """
        log_p = F.log_softmax(logits.float(), dim=-1)
        top, ids = log_p.topk(self.k, dim=-1)
        rest = log_p.scatter(-1, ids, -math.inf)
        log_tail = (
            torch.logsumexp(rest, dim=-1)
            if self.k < self.vocab_size
            else torch.full_like(top[:, 0], -math.inf)
        )
        in_tail = torch.isfinite(rest)
        shares = (rest - log_tail.unsqueeze(1)).exp().double().where(in_tail, 0.0)
        tail_sums = torch.stack([shares.sum(0), in_tail.double().sum(0)])
        y = top.clamp_min(LOG_PROB_FLOOR)
        basis = _log_rank_basis(self.k, self.terms).to(y.device)
        coefficients = (y @ basis).to(torch.float16).float()
        residual = y - coefficients @ basis.T
        quantised, steps, start = [], [], 0
        for bits, ranks in self.groups:
            part = residual[:, start : start + ranks]
            levels = 2**bits
            step = (2 * part.abs().amax(dim=1) / levels * (1 + 2**-9)).clamp_min(2**-14).to(torch.float16)
            q = torch.floor(part / step.float().unsqueeze(1) + levels / 2).clamp(0, levels - 1)
            quantised.append(q.to(torch.int64))
            steps.append(step)
            start += ranks
        halves = torch.cat([coefficients, torch.stack(steps, 1).float(), log_tail.unsqueeze(1)], dim=1)
        fields = torch.cat([ids, *quantised, _half_bits(halves)], dim=1)
        return pack_fields(fields, self.widths), tail_sums

    # ----------------------------------------------------------------- decode
    def decode_top(self, rows: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(..., row_bytes)`` uint8 -> ids and normalised log-probs ``(..., k)``, log tail ``(...)``."""
        fields = unpack_fields(rows, self.widths)
        ids = fields[..., : self.k]
        residual_count = sum(ranks for _, ranks in self.groups)
        q = fields[..., self.k : self.k + residual_count]
        halves = _from_half_bits(fields[..., self.k + residual_count :])
        terms = self.terms
        basis = _log_rank_basis(self.k, terms).to(rows.device)
        y = halves[..., :terms] @ basis.T
        parts, start = [], 0
        for group, (bits, ranks) in enumerate(self.groups):
            step = halves[..., terms + group].unsqueeze(-1)
            parts.append((q[..., start : start + ranks].float() + 0.5 - 2 ** (bits - 1)) * step)
            start += ranks
        if parts:
            residual = torch.cat(parts, dim=-1)
            y = torch.cat([y[..., :start] + residual, y[..., start:]], dim=-1)
        log_tail = halves[..., -1]
        total = torch.logsumexp(torch.cat([y, log_tail.unsqueeze(-1)], dim=-1), dim=-1)
        return ids, y - total.unsqueeze(-1), log_tail - total

    def decode(self, rows: Tensor, log_prior: Tensor | None = None, out: Tensor | None = None) -> Tensor:
        """``(..., row_bytes)`` uint8 -> ``(..., V)`` float32 log-probabilities of the reconstruction.

        The top-k ids get their stored log-probabilities; every other id its share of the tail mass,
        uniform (``log_prior=None``) or in proportion to ``exp(log_prior)`` (``(V,)``, normalised).
        Written into ``out`` when given. With ``k = V`` there is no tail.
        """
        ids, top, log_tail = self.decode_top(rows)
        shape = (*rows.shape[:-1], self.vocab_size)
        out = torch.empty(shape, dtype=torch.float32, device=rows.device) if out is None else out
        if self.k == self.vocab_size:
            out.fill_(-math.inf)
        elif log_prior is None:
            out.copy_((log_tail - math.log(self.vocab_size - self.k)).unsqueeze(-1).expand(shape))
        else:
            prior = log_prior.exp()
            tail_prior = (1 - prior[ids].sum(-1)).clamp_min(1e-12)  # the prior's mass off the top k
            out.copy_(log_prior + (log_tail - tail_prior.log()).unsqueeze(-1))
        return out.scatter_(-1, ids, top)
