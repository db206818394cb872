r"""Closed-form per-token gradients of the token divergences, for the chunked and fused paths.

The chunked and fused paths (:mod:`lightning_kd.losses._token_chunks`) compute each chunk's
values and their gradients w.r.t. the student's logits in the forward, so that the backward only
scales what was stored. The formulas (see :func:`token_values_and_grads`) follow from
:math:`\partial D / \partial s = p (g - \langle p, g \rangle) / \tau` with
:math:`g = \partial D / \partial p`; tests compare each with float64 autograd of
:func:`~lightning_kd.losses.token_divergence.token_values`.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["token_values_and_grads"]


def _softmaxes_(rows: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """``log_softmax(rows / T)``, written over ``rows``, and ``softmax(rows / T)`` (one new tensor)."""
    if temperature != 1.0:
        rows.div_(temperature)
    rows.sub_(rows.amax(dim=-1, keepdim=True))
    probs = rows.exp()
    sums = probs.sum(dim=-1, keepdim=True)
    return rows.sub_(sums.log()), probs.div_(sums)


def _row_dot(a: Tensor, b: Tensor) -> Tensor:
    r""":math:`\sum_v a_v b_v` per row, as a batched matmul (no ``(C, V)`` product is formed)."""
    return (a.unsqueeze(-2) @ b.unsqueeze(-1)).flatten()


def _masked_sum_(log_ratio: Tensor, p: Tensor) -> Tensor:
    r""":math:`\sum_v p_v \cdot` ``log_ratio`` over :math:`p_v \neq 0` (NaN stays), in place."""
    return log_ratio.mul_(p).masked_fill_(p == 0, 0.0).sum(dim=-1)


def _scaled(t: Tensor, factor: float) -> Tensor:
    """``t * factor``, in place (no pass over ``t`` when the factor is 1)."""
    return t if factor == 1.0 else t.mul_(factor)


def _through_softmax(p: Tensor, grad_p: Tensor) -> Tensor:
    r"""Gradient through :math:`p = \mathrm{softmax}(z)` w.r.t. z: :math:`p (g - \langle p, g \rangle)`.

    ``grad_p`` is the gradient w.r.t. :math:`p` (any constant shift of it gives the same result); it is
    overwritten.
    """
    grad_p.mul_(p)
    return grad_p.addcmul_(p, grad_p.sum(dim=-1, keepdim=True), value=-1.0)


def token_values_and_grads(
    student_logits: Tensor,
    teacher_logits: Tensor,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    skew: float = 0.1,
) -> tuple[Tensor, Tensor]:
    r""":func:`token_values` of ``(C, V)`` rows and their gradients w.r.t. the student's rows, in closed form.

    **Overwrites both rows** (they are scratch: the chunked and fused paths pass fresh float32 rows;
    pass copies to keep yours). Row :math:`i` of the gradient is :math:`\partial D_i / \partial s_i`.
    With :math:`p = p_S`, :math:`q = p_T` at temperature :math:`\tau` and :math:`g = \partial D / \partial p`,
    :math:`\partial D / \partial s = p (g - \langle p, g \rangle) / \tau`:

    - ``forward_kl``: :math:`(p - q) / \tau`;
    - ``reverse_kl``: :math:`p (\log p - \log q - \mathrm{KL}(p \| q)) / \tau`;
    - ``jsd``, :math:`m = \beta q + (1 - \beta) p`: :math:`g = (1 - \beta)(\log p - \log m)`, so
      :math:`(1 - \beta)\, p (\log p - \log m - \mathrm{KL}(p \| m)) / \tau`;
    - ``tvd``: :math:`g = \tfrac12 \mathrm{sign}(p - q)`;
    - ``skew_forward_kl``, :math:`m = \alpha q + (1 - \alpha) p`, :math:`r = p q / m`:
      :math:`(1 - \alpha)(p \sum_v r_v - r) / \tau`;
    - ``skew_reverse_kl``, :math:`m = \alpha p + (1 - \alpha) q`: :math:`g = \log p - \log m - \alpha p / m`.

    Entries with :math:`p_v = 0` get 0. The mixtures are formed from the probabilities (not by
    ``logsumexp`` as in :func:`token_values`): the values agree to rounding. Computed in the rows'
    dtype, mostly in place (on the CPU every new ``(C, V)`` tensor costs more than the arithmetic on it).
    """
    log_p, p = _softmaxes_(student_logits, temperature)
    log_q, q = _softmaxes_(teacher_logits, temperature)
    if divergence == "jsd" and beta in (0.0, 1.0):
        divergence = "forward_kl" if beta == 0.0 else "reverse_kl"
    if divergence in ("skew_forward_kl", "skew_reverse_kl") and skew == 0.0:
        divergence = divergence.removeprefix("skew_")
    scale = 1.0 / temperature
    if divergence == "forward_kl":
        return _masked_sum_(log_q.sub_(log_p), q), _scaled(p.sub_(q), scale)
    if divergence == "tvd":
        difference = torch.sub(p, q, out=q)
        values = 0.5 * torch.linalg.vector_norm(difference, 1, dim=-1)
        return values, _scaled(_through_softmax(p, difference.sign_()), 0.5 * scale)
    if divergence == "skew_forward_kl":
        m = torch.lerp(p, q, skew)
        values = _masked_sum_(log_q.sub_(torch.log(m)), q)
        r = torch.mul(p, q, out=q).div_(m).masked_fill_(m == 0, 0.0)  # p q / m
        total = r.sum(dim=-1, keepdim=True)
        return values, _scaled(r.neg_().addcmul_(p, total), (1 - skew) * scale)
    if divergence == "reverse_kl":
        log_m, factor = log_q, scale
    elif divergence == "jsd":
        log_m, factor = torch.lerp(p, q, beta).log_(), (1 - beta) * scale
        teacher_part = _masked_sum_(log_q.sub_(log_m), q)
    else:  # skew_reverse_kl
        m = torch.lerp(q, p, skew)
        log_m, factor = torch.log(m), scale
    log_ratio = log_p.sub_(log_m).masked_fill_(p == 0, 0.0)  # log p - log m, 0 where p = 0
    student_part = _row_dot(p, log_ratio)
    if divergence == "skew_reverse_kl":
        grad_p = log_ratio.sub_(torch.div(p, m, out=m), alpha=skew).masked_fill_(p == 0, 0.0)
        return student_part, _scaled(_through_softmax(p, grad_p), factor)
    grad = log_ratio.sub_(student_part[:, None]).mul_(p)
    values = student_part if divergence == "reverse_kl" else beta * teacher_part + (1 - beta) * student_part
    return values, _scaled(grad, factor)
