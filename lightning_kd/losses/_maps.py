"""Reshaping shared by the loss math of several methods: per-sample rows, pooling, attention maps."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def _rows(x: Tensor) -> Tensor:
    """Flatten everything but the batch dimension: ``(N, ...) -> (N, D)``."""
    return x.reshape(x.shape[0], -1)


def _pool_to_common_size(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Average-pool the larger of two ``(N, C, H, W)`` (or ``(N, C, L)``) maps down to the smaller size.

    Each spatial dimension is matched separately: each map is pooled to
    ``(min(H_a, H_b), min(W_a, W_b))`` with :func:`torch.nn.functional.adaptive_avg_pool2d`
    (``adaptive_avg_pool1d`` for 1-D maps), and a map already of that size is left untouched.
    """
    size = tuple(min(x, y) for x, y in zip(a.shape[2:], b.shape[2:], strict=True))
    pool = F.adaptive_avg_pool2d if a.ndim == 4 else F.adaptive_avg_pool1d
    if tuple(a.shape[2:]) != size:
        a = pool(a, size)
    if tuple(b.shape[2:]) != size:
        b = pool(b, size)
    return a, b


def _attention_map(feature: Tensor, p: float) -> Tensor:
    """``(N, H * W)``: channel mean of ``|f| ** p``, flattened, L2-normalised per sample."""
    return F.normalize(feature.abs().pow(p).mean(dim=1).reshape(feature.shape[0], -1), p=2, dim=1)
