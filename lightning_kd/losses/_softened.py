r"""Temperature-softened KL divergences that stay accurate at every temperature.

KD-style losses compute :math:`T^2 \mathrm{KL}(\mathrm{softmax}(t / T) \,\|\, \mathrm{softmax}(s / T))`.
Evaluated directly, the two log-softmaxes (each of size :math:`\log C`) agree to
:math:`O(|t - s| / T)` and their difference loses every digit once :math:`|t - s| / T` nears the
square root of the rounding error: in float32 the logged value is noise from :math:`T \approx 10^3`
on (negative, or orders of magnitude off), in float64 from :math:`T \approx 10^8`.

Here the teacher's distribution is written as a tilt of the student's,
:math:`p \propto q\, e^{u / T}` with :math:`u = t - s`, and :math:`T^2 \mathrm{KL}(p \| q)` is computed
in float64 from :math:`u` itself. Where the tilt is small (the spread of :math:`u / T` over a row
below :data:`SERIES_MAX_SPREAD`) the cumulant series of the log-partition function is used:

.. math::
    T^2 \mathrm{KL}(p \,\|\, q) = \sum_{n \ge 2} \frac{n - 1}{n!} \frac{\kappa_n(u)}{T^{n - 2}}
    = \frac{\kappa_2}{2} + \frac{\kappa_3}{3 T} + \frac{\kappa_4}{8 T^2} + \frac{\kappa_5}{30 T^3}
    + O(\kappa_6 / T^4)

with :math:`\kappa_n` the cumulants of :math:`u` under :math:`q` (from
:math:`\mathrm{KL}(p \| q) = K'(1) - K(1)`, :math:`K(\lambda) = \log E_q[e^{\lambda u / T}]`), whose
limit as :math:`T \to \infty` is :math:`\tfrac12 \mathrm{Var}_{\mathrm{uniform}}(t - s)`; elsewhere the
direct log-softmax formula in float64 is exact enough. Both are smooth, so autograd's gradients
are those of the loss. The losses keep their float32 direct formula for
:math:`0.1 \le T \le 16` (:func:`uses_direct_formula`), where it is accurate and fastest.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["scaled_kl", "scaled_log_mean_exp", "softened_kl", "uses_direct_formula"]

#: between these temperatures the losses evaluate their float32 direct formula (the usual T of 1-10);
#: outside, float64 from the logit gaps (:func:`uses_direct_formula`).
DIRECT_MIN_TEMPERATURE = 0.1
DIRECT_MAX_TEMPERATURE = 16.0
#: a row whose ``(max u - min u) / T`` is below this uses the cumulant series (truncation error
#: ~ spread^4 / 144 relative; the float64 direct formula loses ~1e-14 / spread^2): ~1e-10 at worst.
SERIES_MAX_SPREAD = 1e-2
#: above this temperature T^2 overflows float64: every row uses the series (exact for float32
#: inputs, whose spread over T is then below 1e-100).
_SERIES_ONLY_TEMPERATURE = 1e140


def _moments(log_weights: Tensor, values: Tensor, dim: int) -> tuple[Tensor, ...]:
    """Support, weights, mean, centred values (0 off the support), spread and log-weights along ``dim``.

    The support is where ``log_weights > -inf`` (not where the weight underflows to 0).
    """
    support = ~torch.isneginf(log_weights)
    log_weights = log_weights - torch.logsumexp(log_weights, dim, True)
    weights = log_weights.exp()
    values = torch.where(support, values, 0.0)
    mean = (weights * values).sum(dim=dim, keepdim=True)
    centred = torch.where(support, values - mean, 0.0)
    detached = centred.detach()
    spread = detached.amax(dim=dim) - detached.amin(dim=dim)
    return support, weights, mean.squeeze(dim), centred, spread, log_weights


def uses_direct_formula(temperature: float) -> bool:
    """Whether the float32 direct formula is accurate (and fastest) at ``temperature``."""
    return DIRECT_MIN_TEMPERATURE <= temperature <= DIRECT_MAX_TEMPERATURE


def _cumulants(weights: Tensor, centred: Tensor, dim: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Cumulants 2 to 5 of ``centred`` (mean 0) under ``weights``, from its central moments."""
    weighted = weights * centred * centred
    m2 = weighted.sum(dim=dim)
    weighted = weighted * centred
    m3 = weighted.sum(dim=dim)
    weighted = weighted * centred
    m4 = weighted.sum(dim=dim)
    m5 = (weighted * centred).sum(dim=dim)
    return m2, m3, m4 - 3 * m2**2, m5 - 10 * m3 * m2


def scaled_log_mean_exp(log_weights: Tensor, values: Tensor, temperature: float, dim: int = -1) -> Tensor:
    r""":math:`T \log \sum_i w_i e^{v_i / T}` along ``dim``, weights normalised to sum to 1.

    Series :math:`\sum_{n=1}^{5} \kappa_n / (n!\, T^{n-1})` (cumulants of
    :math:`v` under :math:`w`) for rows of small spread over :math:`T`, ``logsumexp`` otherwise.
    Compute in float64; ``log_weights`` may hold ``-inf`` (weight 0).
    """
    _, weights, mean, centred, spread, log_weights = _moments(log_weights, values, dim)
    k2, k3, k4, k5 = _cumulants(weights, centred, dim)
    series = (
        mean
        + (k2 / 2 + (k3 / 6 + (k4 / 24 + k5 / 120 / temperature) / temperature) / temperature) / temperature
    )
    if temperature > _SERIES_ONLY_TEMPERATURE:
        return series
    direct = mean + temperature * torch.logsumexp(log_weights + centred / temperature, dim=dim)
    return torch.where(spread < SERIES_MAX_SPREAD * temperature, series, direct)


def scaled_kl(log_q: Tensor, u: Tensor, temperature: float) -> Tensor:
    r""":math:`T^2 \mathrm{KL}(p \,\|\, q)` per row (last dimension), :math:`p \propto q\, e^{u / T}`.

    ``log_q``: the reference's log-probabilities (``-inf`` for classes outside its support);
    ``u``: ``T`` times the log-ratio of ``p`` to ``q`` up to a constant per row (``t - s`` for
    two models' logits). Compute in float64.
    """
    support, weights, _, centred, spread, log_q = _moments(log_q, u, -1)
    k2, k3, k4, k5 = _cumulants(weights, centred, -1)
    series = k2 / 2 + (k3 / 3 + (k4 / 8 + k5 / 30 / temperature) / temperature) / temperature
    if temperature > _SERIES_ONLY_TEMPERATURE:
        return series
    log_p = torch.log_softmax(log_q + centred / temperature, dim=-1)
    log_ratio = torch.where(support, log_p - log_q, 0.0)
    direct = (log_p.exp() * log_ratio).sum(dim=-1) * temperature**2
    return torch.where(spread < SERIES_MAX_SPREAD * temperature, series, direct)


def softened_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    r""":math:`T^2 \mathrm{KL}(\mathrm{softmax}(t / T) \,\|\, \mathrm{softmax}(s / T))` per row.

    For (M, C) logits; computed in float64 (the result too), accurate at any finite temperature.
    """
    student, teacher = student_logits.double(), teacher_logits.double()
    return scaled_kl(torch.log_softmax(student / temperature, dim=-1), teacher - student, temperature)
