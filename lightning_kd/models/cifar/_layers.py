"""Parameter-free building blocks shared by the CIFAR models, and the benchmark's weight init."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["Add", "ChannelShuffle", "Concat", "init_weights"]


class Add(nn.Module):
    """``a + b`` as a module, so the sum (e.g. a residual block's pre-activation) can be hooked."""

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        """The element-wise sum (a new tensor; neither input is modified)."""
        return a + b


class Concat(nn.Module):
    """Channel concatenation ``torch.cat([a, b], dim=1)`` as a module, so its output can be hooked."""

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        """``(N, Ca + Cb, H, W)``: the channels of ``a`` first."""
        return torch.cat([a, b], dim=1)


class ChannelShuffle(nn.Module):
    """ShuffleNet's channel shuffle: ``(N, g * k, H, W) -> (N, k * g, H, W)`` (transpose of groups).

    Args:
        groups: number of channel groups ``g``; must divide the number of channels.
    """

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.groups = groups

    def forward(self, x: Tensor) -> Tensor:
        """The shuffled tensor, same shape as ``x``."""
        n, c, h, w = x.shape
        return x.view(n, self.groups, c // self.groups, h, w).transpose(1, 2).reshape(n, c, h, w)

    def extra_repr(self) -> str:
        """Show the number of groups."""
        return f"groups={self.groups}"


def init_weights(model: nn.Module, linear_std: float | None = None, zero_linear_bias: bool = False) -> None:
    """Initialise ``model`` in place as the CRD benchmark does (He init, unit BatchNorm).

    Convolutions get ``kaiming_normal_(mode="fan_out", nonlinearity="relu")`` (the same
    distribution as the benchmark's ``normal_(0, sqrt(2 / (k * k * out_channels)))``, depthwise
    convolutions included) and zero biases; BatchNorm weights 1 and biases 0.

    Args:
        model: the network.
        linear_std: if given, linear weights are drawn from ``N(0, linear_std^2)`` and their
            biases zeroed; otherwise linear weights keep PyTorch's default init.
        zero_linear_bias: zero the linear biases even when ``linear_std`` is None.
    """
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            if linear_std is not None:
                nn.init.normal_(module.weight, 0.0, linear_std)
            if (linear_std is not None or zero_linear_bias) and module.bias is not None:
                nn.init.zeros_(module.bias)
