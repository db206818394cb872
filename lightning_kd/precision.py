"""The float32 policy of the package's tensor math (losses, generator losses, report metrics).

Under ``bf16-mixed`` / ``16-mixed`` autocast, low-precision softmax and logarithms lose the small
probability mass that soft targets carry, and sums of squares over many features overflow or
round away. Every pure function of the package therefore runs in float32 (:func:`float32_math`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

import torch
from torch import Tensor

__all__ = ["float32_math"]

_Fn = TypeVar("_Fn", bound=Callable[..., Tensor])


def float32_math(fn: _Fn) -> _Fn:
    """Run ``fn`` with autocast disabled and its floating-point tensor arguments cast to float32."""

    def cast(value: object) -> object:
        if isinstance(value, Tensor) and value.is_floating_point():
            return value.float()
        return value

    @functools.wraps(fn)
    def wrapper(*args: object, **kwargs: object) -> Tensor:
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)]
        device_type = tensors[0].device.type if tensors else "cpu"
        if not torch.is_autocast_enabled(device_type) and all(
            t.dtype == torch.float32 or not t.is_floating_point() for t in tensors
        ):
            return fn(*args, **kwargs)  # already float32 math: no cast, no autocast context
        with torch.autocast(device_type=device_type, enabled=False):
            return fn(*map(cast, args), **{k: cast(v) for k, v in kwargs.items()})

    return wrapper  # type: ignore[return-value]
