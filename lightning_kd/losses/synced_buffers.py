"""Keeping a term's buffers (memory banks, queues) identical across distributed processes.

DDP leaves such buffers alone (``LossTerm.synchronizes_own_buffers``); the terms broadcast rank
0's copy once and then apply every process's update on every process.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["all_gather_rows", "broadcast_from_rank_zero", "world_size"]


def world_size() -> int:
    """Processes in the default ``torch.distributed`` group; 1 when it is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def all_gather_rows(tensor: Tensor) -> Tensor:
    """``tensor`` of every process concatenated along dim 0 in rank order (row counts may differ)."""
    world = world_size()
    if world == 1:
        return tensor
    count = torch.tensor([tensor.shape[0]], dtype=torch.long, device=tensor.device)
    counts = [torch.empty_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    sizes = [int(c.item()) for c in counts]
    padded = tensor.new_zeros((max(sizes), *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    return torch.cat([rows[:size] for rows, size in zip(gathered, sizes, strict=True)])


def broadcast_from_rank_zero(buffers: Iterable[Tensor]) -> None:
    """Overwrite ``buffers`` in place with rank 0's values (in a distributed run)."""
    for buffer in buffers:
        dist.broadcast(buffer, src=0)
