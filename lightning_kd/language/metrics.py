r"""Perplexity over the counted tokens of an epoch, without waiting for the device in a step.

:math:`\mathrm{PPL} = \exp\big(\frac{1}{T} \sum_i \mathrm{NLL}_i\big)` over the :math:`T` counted
tokens of all batches (and processes). torchmetrics' ``Perplexity`` picks the counted tokens by
boolean indexing, whose size depends on the data, so on an accelerator the host waits for the
device in every validation step; here each batch adds its mean negative log-likelihood weighted
by its token count, which ``MeanMetric`` sums on the device and reduces across processes.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor
from torchmetrics import MeanMetric

from lightning_kd.language.completion import IGNORE_INDEX

__all__ = ["TokenPerplexity", "token_cross_entropy_sum"]


def token_cross_entropy_sum(logits: Tensor, targets: Tensor) -> Tensor:
    """Summed negative log-likelihood of ``(N, L, V)`` logits at ``(N, L)`` targets (-100 left out)."""
    return F.cross_entropy(
        logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )


class TokenPerplexity(MeanMetric):
    """An epoch's perplexity: ``update(nll_sum / count, count)`` per batch, ``compute()`` = exp(mean)."""

    def compute(self) -> Tensor:
        """``exp`` of the token-weighted mean negative log-likelihood."""
        return super().compute().exp()
