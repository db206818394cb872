"""Datasets whose items carry their own index, for methods with one memory slot per sample (CRD)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch.utils.data import Dataset

__all__ = ["WithIndex"]


class WithIndex(Dataset):
    """Wrap a map-style dataset so that every item also carries its index in the dataset.

    - tuple (or list) items ``(inputs, targets)`` become ``(inputs, targets, index)``;
    - dict items get the index under ``key`` (default ``"index"``): ``{**item, "index": index}``;
    - any other item ``x`` becomes ``(x, index)``.

    The default collate function turns the indices into a ``(N,)`` ``int64`` tensor. The index is
    the position in *this* dataset (``0 <= index < len(self)``), also under a
    ``DistributedSampler`` or a shuffled loader, which is what
    :class:`~lightning_kd.losses.CRDTerm` needs (``num_samples=len(dataset)``;
    ``index_key=2`` for ``(inputs, targets, index)``, ``index_key="index"`` for dicts). This is
    the role of ``CIFAR100Instance`` in the CRD authors' code (``dataset/cifar100.py`` of
    ``HobbitLong/RepDistiller``), for any dataset.

    Args:
        dataset: a map-style dataset with ``__len__`` and ``__getitem__``.
        key: the key of the index in dict items.

    Raises:
        KeyError: (when an item is read) a dict item already has ``key``.
    """

    def __init__(self, dataset: Dataset, key: str = "index") -> None:
        self.dataset = dataset
        self.key = key

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        item = self.dataset[index]
        if isinstance(item, Mapping):
            if self.key in item:
                raise KeyError(
                    f"The dataset's items already have a key {self.key!r}; pass WithIndex(dataset, key=...) "
                    "with a free key (and the same key as index_key of the loss term)."
                )
            return {**item, self.key: index}
        if isinstance(item, (tuple, list)):
            return (*item, index)
        return (item, index)
