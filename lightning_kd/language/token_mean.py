r"""Gradients of the mean over ALL counted tokens of a global batch, whatever its split into micro-batches.

A causal-LM term is a mean over the counted tokens of its micro-batch. Averaging those means (over
``accumulate_grad_batches`` micro-batches, and over DDP processes) weighs a token of a short
micro-batch more than one of a long micro-batch, so the result depends on how the global batch was
cut. The objective wanted is the token mean of the whole global batch:

.. math::
    \mathcal{L} = \frac{1}{T} \sum_i n_i \bar{\ell}_i, \qquad T = \sum_i n_i,

where micro-batch :math:`i` (of any process and any accumulation step) has :math:`n_i` counted
tokens and term mean :math:`\bar{\ell}_i`. Each training step therefore returns the token sum
:math:`n_i \bar{\ell}_i` for the backward (:meth:`TokenMeanGradients.token_sum`) while the logs keep
the mean. Lightning divides every returned loss by ``accumulate_grad_batches`` = :math:`k` (also in
a partial window at an epoch's end) and DDP averages gradients over the :math:`W` processes, so
the accumulated gradient is :math:`\frac{1}{kW} \sum_i \nabla (n_i \bar{\ell}_i)`;
:meth:`TokenMeanGradients.rescale`, run in ``on_before_optimizer_step`` (after the backward and
AMP's unscaling, before gradient clipping), multiplies it by :math:`kW / T`, with :math:`T` summed
over the processes by one ``all_reduce`` of a device tensor (no host read). A window without any
counted token (:math:`T = 0`) has zero gradients and stays zero.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["TokenMeanGradients"]


class TokenMeanGradients:
    """Counts the tokens of an optimizer step's micro-batches and rescales its gradients to the token mean.

    Use: :meth:`count` each training micro-batch's mask, return :meth:`token_sum` of its mean loss
    from ``training_step``, and call :meth:`rescale` in ``on_before_optimizer_step``.
    """

    def __init__(self) -> None:
        self.tokens: Tensor | None = None  # counted tokens since the last optimizer step, this process
        self.latest: Tensor | None = None  # those of the last micro-batch

    def count(self, mask: Tensor) -> None:
        """Add a training micro-batch's counted tokens (``mask``: ``(N, L)`` bool), on the device."""
        self.latest = mask.sum()
        self.tokens = self.latest if self.tokens is None else self.tokens + self.latest

    def token_sum(self, mean: Tensor) -> Tensor:
        """``mean * n`` of the last counted micro-batch: what its backward must see.

        Raises:
            RuntimeError: no micro-batch was counted.
        """
        if self.latest is None:
            raise RuntimeError(
                "TokenMeanGradients.token_sum was called before count(mask) of the micro-batch."
            )
        return mean * self.latest

    def rescale(
        self, parameters: Iterable[nn.Parameter], accumulate_grad_batches: int, world_size: int
    ) -> None:
        """Multiply the gradients of ``parameters`` by ``accumulate_grad_batches * world_size / T``.

        ``T`` is the count since the last call, summed over the processes (``all_reduce`` of a
        device tensor: no barrier and no wait for the device, unlike Lightning's
        ``strategy.reduce``); the count then starts anew. Nothing counted (no training step since the
        last call): unchanged.
        """
        tokens, self.tokens, self.latest = self.tokens, None, None
        if tokens is None:
            return
        total = tokens.clone()
        if world_size > 1 and dist.is_available() and dist.is_initialized():
            dist.all_reduce(total, op=dist.ReduceOp.SUM)
        factor = (accumulate_grad_batches * world_size) / total.clamp_min(1).to(torch.float32)
        for parameter in parameters:
            if parameter.grad is not None:
                parameter.grad.mul_(factor.to(parameter.grad.dtype))
