"""What identifies a teacher, a training set and one sample's input: the teacher cache's keys.

:func:`teacher_fingerprint` and :func:`dataset_fingerprint` decide whether a stored cache belongs
to this run; :func:`input_signature` is stored per sample and compared whenever the sample is
served, so data changed in any sample is caught, not only in the probed ones.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    "PROBE_SAMPLES",
    "dataset_fingerprint",
    "input_signature",
    "teacher_fingerprint",
    "unwrapped_dataset",
]

#: samples of the training set read (twice) by :func:`dataset_fingerprint`
PROBE_SAMPLES = 5


def teacher_fingerprint(teacher: nn.Module) -> str:
    """SHA-256 of the teacher's ``state_dict`` (names, dtypes, shapes and bytes of every tensor)."""
    digest = hashlib.sha256()
    for name, value in teacher.state_dict().items():
        tensor = value.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _hash_item(item: Any, digest: Any) -> None:
    if isinstance(item, Tensor):
        tensor = item.detach().cpu().contiguous()
        digest.update(f"{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(item, np.ndarray):
        digest.update(f"{item.dtype}|{item.shape}|".encode() + np.ascontiguousarray(item).tobytes())
    elif isinstance(item, Mapping):
        for key in sorted(item, key=str):
            digest.update(f"{key}:".encode())
            _hash_item(item[key], digest)
    elif isinstance(item, (tuple, list)):
        for element in item:
            _hash_item(element, digest)
    else:
        digest.update(repr(item).encode())


def unwrapped_dataset(dataset: Any) -> Any:
    """``dataset`` without the wrappers that change no item (``fingerprint_transparent``: exact resume's)."""
    while getattr(type(dataset), "fingerprint_transparent", False):
        dataset = dataset.dataset
    return dataset


def _transforms(dataset: Any) -> str:
    """``repr`` of every ``transform`` / ``transforms`` attribute along a chain of wrapped datasets.

    A wrapper that changes no item (``fingerprint_transparent``, e.g. exact resume's) is skipped.
    """
    found, seen = [], set()
    while dataset is not None and id(dataset) not in seen:
        seen.add(id(dataset))
        if getattr(type(dataset), "fingerprint_transparent", False):
            dataset = dataset.dataset
            continue
        found.append(type(dataset).__qualname__)
        for name in ("transform", "transforms", "target_transform"):
            if getattr(dataset, name, None) is not None:
                found.append(f"{name}={getattr(dataset, name)!r}")
        dataset = getattr(dataset, "dataset", None)
    return ";".join(found)


def dataset_fingerprint(dataset: Any, probes: int = PROBE_SAMPLES) -> str:
    """SHA-256 of the dataset's length, its transforms' ``repr`` and ``probes`` evenly spaced items.

    Each probed item is read twice: two different reads of one index mean random augmentation,
    and a cache of teacher outputs would then freeze one random view per sample.

    Raises:
        ValueError: two reads of the same index differ (random augmentation).
    """
    length = len(dataset)
    if length == 0:
        raise ValueError("The training dataset is empty: there is nothing to cache.")
    digest = hashlib.sha256(f"{length}|{_transforms(dataset)}|".encode())
    positions = sorted({round(i * (length - 1) / max(probes - 1, 1)) for i in range(probes)})
    for position in positions:
        first, second = hashlib.sha256(), hashlib.sha256()
        _hash_item(dataset[position], first)
        _hash_item(dataset[position], second)
        if first.digest() != second.digest():
            raise ValueError(
                f"Two reads of training sample {position} differ: the dataset applies random augmentation, "
                "so the teacher's output changes every epoch and cannot be cached. Remove the random "
                "transforms from the training dataset, or train without `teacher_cache`."
            )
        digest.update(first.digest())
    return digest.hexdigest()


def _tensor_leaves(item: Any) -> Iterator[Tensor]:
    """The tensors in ``item`` (nested tuples, lists and mappings; mapping keys in sorted order)."""
    if isinstance(item, Tensor):
        yield item
    elif isinstance(item, Mapping):
        for key in sorted(item, key=str):
            yield from _tensor_leaves(item[key])
    elif isinstance(item, (tuple, list)):
        for element in item:
            yield from _tensor_leaves(element)


_WEIGHTS: dict[tuple[int, int, str], Tensor] = {}


def _signature_weights(length: int, position: int, device: torch.device) -> Tensor:
    """Fixed odd int32 weights (a seeded draw) for a leaf of ``length`` words at ``position``."""
    key = (length, position, str(device))
    if key not in _WEIGHTS:
        generator = torch.Generator().manual_seed(1_000_003 * position + length)
        odd = torch.randint(-(2**30), 2**30, (length,), generator=generator) * 2 + 1
        _WEIGHTS[key] = odd.to(device=device, dtype=torch.int32)
    return _WEIGHTS[key]


def input_signature(inputs: Any, batch_size: int) -> Tensor:
    """An int64 signature ``(batch_size,)`` of each sample's input bits, computed where the inputs are.

    Every tensor leaf of ``inputs`` whose first dimension is the batch is read as 32-bit words
    ``x_j`` (narrower dtypes widened, wider ones split) and reduced to ``sum_j w_j x_j`` with fixed
    odd weights ``w_j``: products wrap in int32, the sum is exact in int64, so the result does not
    depend on the batch's composition or the device's reduction order, and any single changed bit
    changes it (``w_j 2^k != 0 mod 2^32`` for odd ``w_j``). Leaves are combined by a polynomial in
    int64. Inputs without a batched tensor give zeros.
    """
    total = torch.zeros(batch_size, dtype=torch.int64)
    for position, leaf in enumerate(_tensor_leaves(inputs)):
        if leaf.dim() == 0 or leaf.shape[0] != batch_size:
            continue
        leaf = leaf.detach().contiguous().reshape(batch_size, -1)
        if leaf.element_size() >= 4:
            words = leaf.view(torch.int32)
        elif leaf.dtype == torch.bool or leaf.element_size() == 1:
            words = leaf.view(torch.uint8).to(torch.int32)
        else:
            words = leaf.view(torch.int16).to(torch.int32)
        weights = _signature_weights(words.shape[1], position, words.device)
        total = total.to(words.device) * 1_000_003 + (words * weights).sum(dim=1, dtype=torch.int64)
    return total
