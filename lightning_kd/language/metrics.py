r"""Perplexity over the counted tokens of an epoch, without waiting for the device in a step.

:math:`\mathrm{PPL} = \exp\big(\frac{1}{T} \sum_i \mathrm{NLL}_i\big)` over the :math:`T` counted
tokens of all batches (and processes). torchmetrics' ``Perplexity`` picks the counted tokens by
boolean indexing, whose size depends on the data, so on an accelerator the host waits for the
device in every validation step; here each batch adds its mean negative log-likelihood weighted
by its token count, which :class:`TokenMean` sums on the device and reduces across processes.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import MeanMetric

from lightning_kd.language.completion import IGNORE_INDEX

__all__ = ["TokenMean", "TokenPerplexity", "token_cross_entropy_sum"]


def token_cross_entropy_sum(logits: Tensor, targets: Tensor) -> Tensor:
    """Summed negative log-likelihood of ``(N, L, V)`` logits at ``(N, L)`` targets (-100 left out)."""
    return F.cross_entropy(
        logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )


class TokenMean(MeanMetric):
    """An epoch's token-weighted mean: ``update(batch_mean, count)`` per batch, no host read in ``update``.

    ``compute()`` is ``sum(batch_mean * count) / sum(count)``. torchmetrics' ``MeanMetric`` checks its
    input for NaN on the host unless ``nan_strategy="disable"``, and with ``"disable"`` (torchmetrics
    1.9) it replaces the weights by ones, so batches of unequal token counts (a partial last batch,
    padding, prompts) would count equally; this ``update`` adds ``value * weight`` and ``weight`` to
    the states itself. A NaN value makes the result NaN.

    Args:
        **kwargs: the ``Metric`` keyword arguments (``sync_on_compute``, ...).
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(nan_strategy="disable", **kwargs)

    def update(self, value: Tensor | float, weight: Tensor | float = 1.0) -> None:
        """Add ``value * weight`` and ``weight`` (broadcast to ``value``'s shape) to the sums."""
        value = torch.as_tensor(value, dtype=self.dtype, device=self.device)
        weight = torch.as_tensor(weight, dtype=self.dtype, device=self.device).broadcast_to(value.shape)
        self.mean_value += (value * weight).sum()
        self.weight += weight.sum()


class TokenPerplexity(TokenMean):
    """An epoch's perplexity: ``update(nll_sum / count, count)`` per batch, ``compute()`` = exp(mean)."""

    def compute(self) -> Tensor:
        """``exp`` of the token-weighted mean negative log-likelihood."""
        return super().compute().exp()
