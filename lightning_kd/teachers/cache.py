"""TeacherOutputCache: a frozen teacher's outputs computed once, reused on every later epoch."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

__all__ = ["TeacherOutputCache", "dataset_fingerprint", "teacher_fingerprint", "topk_logits"]

FORMAT_VERSION = 1
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


def _transforms(dataset: Any) -> str:
    """``repr`` of every ``transform`` / ``transforms`` attribute along a chain of wrapped datasets."""
    found, seen = [], set()
    while dataset is not None and id(dataset) not in seen:
        seen.add(id(dataset))
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


def topk_logits(values: Tensor, indices: Tensor, tail_logsumexp: Tensor, num_classes: int) -> Tensor:
    """Logits ``(N, C)`` rebuilt from the top-``k`` logits and the log-sum-exp of the other ``C - k``.

    Every class outside the top ``k`` gets the same logit ``tail_logsumexp - log(C - k)``, so at
    temperature 1 the rebuilt softmax keeps the top-``k`` probabilities exactly and spreads the rest
    of the mass uniformly over the other classes (the full log-sum-exp is unchanged). At a KD
    temperature ``T > 1`` the top-``k`` ratios stay exact; the tail's "dark knowledge" (which wrong
    classes are more likely) is flattened to its mean, as in the top-k teacher caches of
    Shen & Xing, "A Fast Knowledge Distillation Framework for Visual Recognition" (FKD, ECCV 2022).
    """
    k = values.shape[-1]
    if not 0 < k < num_classes:
        raise ValueError(f"top-k logits need 0 < k < num_classes, got k={k} and num_classes={num_classes}.")
    fill = tail_logsumexp.float() - math.log(num_classes - k)
    logits = fill.unsqueeze(-1).expand(*values.shape[:-1], num_classes).clone()
    return logits.scatter_(-1, indices.long(), values.float())


class TeacherOutputCache:
    """A frozen teacher's logits (and hooked features) per training sample, computed once.

    Give it to ``DistillationModule(..., teacher_cache=TeacherOutputCache(...))``. Batches must
    carry each sample's index (:class:`~lightning_kd.data.WithIndex`, ``return_index=True`` on the
    datamodules; ``index_key`` says where). The first epoch runs the teacher and stores its
    outputs by sample index; later steps whose samples are all stored skip the teacher forward.
    Validation and testing always run the teacher.

    Storage: in CPU memory (``directory=None``), or in ``.npy`` files memory-mapped with
    ``numpy.lib.format.open_memmap`` under ``directory`` (kept across runs and processes). Full
    logits take ``4 C`` bytes per sample in float32; ``top_k=k`` stores ``k`` values, ``k`` class
    indices (int16 / int32) and one log-sum-exp: see :func:`topk_logits` for the rebuilt
    distribution. Hooked teacher features (the layers the loss terms declare) are stored whole.
    :attr:`bytes_per_sample` says what a sample takes.

    Validity: a fingerprint (SHA-256 of the teacher's ``state_dict``, the dataset length, the
    ``repr`` of its transforms, a few samples, and the cache layout) is stored in ``meta.json``;
    a cache with another fingerprint is rebuilt. Random augmentation is refused: a few samples
    are read twice, and two different reads raise a ``ValueError`` (augmentation applied after
    the loader, e.g. in ``on_after_batch_transfer``, cannot be seen; do not combine it with a cache).

    Interruptions: a per-sample ``filled`` mask is written after the sample's outputs, and
    ``complete`` is set in ``meta.json`` only at an epoch end when every index is filled. A partial
    cache with the right fingerprint is resumed: stored samples are reused, and a batch with any
    missing sample runs the teacher (and fills the gaps).

    DDP: each process stores the samples it sees. With ``directory``, all processes share the
    files (global rank 0 creates them; the others open them after a barrier; processes write
    disjoint rows and their own bytes of the mask; rank 0 checks completeness after a barrier),
    so the directory must be on a filesystem that every process sees (one node, or a shared
    filesystem). In memory, each process keeps its own cache, filled by the samples its
    sampler gives it: later epochs run the teacher for samples it has not seen yet.

    Args:
        directory: where the memory-mapped files live; ``None`` keeps the cache in CPU memory.
        top_k: keep only the ``k`` largest logits per sample (``0 < k < C``); ``None``: all.
        dtype: storage dtype of logits and features, ``"float32"`` (exact) or ``"float16"``.
        index_key: where the sample index is in a batch (a position, or a key for dicts).
    """

    def __init__(
        self,
        directory: str | Path | None = None,
        top_k: int | None = None,
        dtype: Literal["float32", "float16"] = "float32",
        index_key: int | str = 2,
    ) -> None:
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be a positive number of classes (or None for all), got {top_k}.")
        if dtype not in ("float32", "float16"):
            raise ValueError(f"dtype must be 'float32' or 'float16', got {dtype!r}.")
        self.directory = Path(directory) if directory is not None else None
        self.top_k = top_k
        self.dtype = dtype
        self.index_key = index_key
        self.fingerprint: str | None = None
        self.complete = False
        self.num_classes = 0
        self.layers: list[str] = []
        self.arrays: dict[str, Tensor] = {}
        self._memmaps: list[np.memmap] = []

    # ----------------------------------------------------------------- set-up
    def open(
        self,
        fingerprint: str,
        num_samples: int,
        example_logits: Tensor,
        example_features: Mapping[str, Tensor],
        strategy: Any = None,
    ) -> None:
        """Open (or create) the storage for ``num_samples`` samples shaped like one example's outputs.

        ``fingerprint`` identifies teacher and data (:func:`teacher_fingerprint`,
        :func:`dataset_fingerprint`); a stored cache with another one is rebuilt. ``strategy`` (a
        Lightning strategy) coordinates processes on a shared ``directory``.
        """
        num_classes = int(example_logits.shape[-1])
        if self.top_k is not None and self.top_k >= num_classes:
            raise ValueError(
                f"top_k={self.top_k} keeps every one of the teacher's {num_classes} classes; use "
                f"top_k < {num_classes}, or top_k=None to store the full logits."
            )
        for path, feature in example_features.items():
            if not isinstance(feature, Tensor):
                raise TypeError(
                    f"The teacher feature at {path!r} is a {type(feature).__name__}; "
                    "the cache stores tensors only."
                )
        layout = self._layout(num_samples, num_classes, example_features)
        full = hashlib.sha256(f"{fingerprint}|{json.dumps(layout, sort_keys=True)}".encode()).hexdigest()
        self.num_classes, self.layers = num_classes, sorted(example_features)
        if self.directory is None:
            if self.fingerprint != full:
                self.arrays = {
                    name: torch.zeros(shape, dtype=getattr(torch, dt)) for name, (dt, shape) in layout.items()
                }
                self.fingerprint, self.complete = full, False
            return
        rank = getattr(strategy, "global_rank", 0)
        if rank == 0:
            meta = self._read_meta()
            if meta is None or meta.get("fingerprint") != full:
                if meta is not None:
                    rank_zero_warn(
                        f"The teacher cache in {self.directory} was built for another teacher, dataset or "
                        "layout: rebuilding it."
                    )
                self._create(full, layout)
        if strategy is not None:
            strategy.barrier("teacher_cache_open")
        self._map(layout)
        meta = self._read_meta()
        if meta is None or meta.get("fingerprint") != full:
            raise RuntimeError(f"The teacher cache in {self.directory} changed while it was being opened.")
        self.fingerprint, self.complete = full, bool(meta["complete"])

    def _layout(self, num_samples: int, num_classes: int, features: Mapping[str, Tensor]) -> dict[str, Any]:
        n, layout = num_samples, {}
        if self.top_k is None:
            layout["logits"] = (self.dtype, [n, num_classes])
        else:
            index_dtype = "int16" if num_classes <= torch.iinfo(torch.int16).max else "int32"
            layout["topk_values"] = (self.dtype, [n, self.top_k])
            layout["topk_indices"] = (index_dtype, [n, self.top_k])
            layout["tail_logsumexp"] = ("float32", [n])
        for path, feature in sorted(features.items()):
            layout[f"feature.{path}"] = (self.dtype, [n, *feature.shape[1:]])
        layout["filled"] = ("bool", [n])
        return layout

    def _read_meta(self) -> dict[str, Any] | None:
        path = self.directory / "meta.json"
        return json.loads(path.read_text()) if path.exists() else None

    def _write_meta(self, complete: bool) -> None:
        meta = {"format": FORMAT_VERSION, "fingerprint": self.fingerprint, "complete": complete}
        meta["bytes_per_sample"] = self.bytes_per_sample
        temporary = self.directory / "meta.json.tmp"
        temporary.write_text(json.dumps(meta, indent=1))
        os.replace(temporary, self.directory / "meta.json")

    def _create(self, fingerprint: str, layout: dict[str, Any]) -> None:
        if self.directory.exists():
            shutil.rmtree(self.directory)
        self.directory.mkdir(parents=True)
        for name, (dtype, shape) in layout.items():
            np.lib.format.open_memmap(
                self.directory / f"{name}.npy", mode="w+", dtype=dtype, shape=tuple(shape)
            )
        self.fingerprint = fingerprint
        self._write_meta(complete=False)

    def _map(self, layout: dict[str, Any]) -> None:
        self._memmaps = [
            np.lib.format.open_memmap(self.directory / f"{name}.npy", mode="r+") for name in layout
        ]
        self.arrays = {
            name: torch.from_numpy(array) for name, array in zip(layout, self._memmaps, strict=True)
        }

    @property
    def bytes_per_sample(self) -> int:
        """Bytes that one sample takes in storage (outputs, features and its ``filled`` flag)."""
        return sum(array[0].numel() * array.element_size() for array in self.arrays.values())

    # ----------------------------------------------------------------- use
    def indices_of(self, batch: Any) -> Tensor:
        """The sample indices of ``batch`` (at ``index_key``), checked against the cache size."""
        try:
            indices = batch[self.index_key]
        except (KeyError, IndexError, TypeError):
            raise KeyError(
                f"TeacherOutputCache reads each sample's index at index_key={self.index_key!r}, which the "
                "batch lacks. Wrap the training dataset in lightning_kd.data.WithIndex (or pass "
                "return_index=True to the datamodule) and set index_key (2 for (inputs, targets, index), "
                "'index' for dicts)."
            ) from None
        if not isinstance(indices, Tensor) or indices.dtype.is_floating_point or indices.dim() != 1:
            raise ValueError(
                f"TeacherOutputCache: the batch item at index_key={self.index_key!r} is not a 1-D integer "
                "tensor of sample indices. Is index_key pointing at the index?"
            )
        indices = indices.cpu()
        size = len(self.arrays["filled"])
        if len(indices) and (int(indices.min()) < 0 or int(indices.max()) >= size):
            raise IndexError(
                f"TeacherOutputCache holds {size} samples (the training dataset's length) but a batch has "
                f"index {int(indices.max())}: the indices must be positions in the training dataset."
            )
        return indices

    def lookup(
        self, indices: Tensor, device: torch.device | str = "cpu"
    ) -> tuple[Tensor, dict[str, Tensor]] | None:
        """``(logits, features)`` at ``indices`` (float32, on ``device``); ``None`` if one is missing."""
        if not self.complete and not bool(self.arrays["filled"][indices].all()):
            return None
        rows = {name: array[indices].to(device, non_blocking=True) for name, array in self.arrays.items()}
        if self.top_k is None:
            logits = rows["logits"].float()
        else:
            logits = topk_logits(
                rows["topk_values"], rows["topk_indices"], rows["tail_logsumexp"], self.num_classes
            )
        features = {path: rows[f"feature.{path}"].float() for path in self.layers}
        return logits, features

    @torch.no_grad()
    def store(self, indices: Tensor, logits: Tensor, features: Mapping[str, Tensor]) -> None:
        """Store the teacher's ``logits`` and ``features`` of the samples at ``indices``; mark them filled."""
        dtype = getattr(torch, self.dtype)
        logits = logits.detach().float().cpu()
        if self.top_k is None:
            self.arrays["logits"][indices] = logits.to(dtype)
        else:
            values, classes = logits.topk(self.top_k, dim=-1)
            tail = logits.scatter(-1, classes, float("-inf")).logsumexp(dim=-1)
            self.arrays["topk_values"][indices] = values.to(dtype)
            self.arrays["topk_indices"][indices] = classes.to(self.arrays["topk_indices"].dtype)
            self.arrays["tail_logsumexp"][indices] = tail
        for path in self.layers:
            self.arrays[f"feature.{path}"][indices] = features[path].detach().cpu().to(dtype)
        self.arrays["filled"][indices] = True

    def finish_epoch(self, strategy: Any = None) -> bool:
        """Flush to disk and mark the cache complete if every sample is filled; returns ``complete``."""
        if self.complete:
            return True
        if self.directory is None:
            self.complete = bool(self.arrays["filled"].all())
            return self.complete
        for array in self._memmaps:
            array.flush()
        if strategy is not None:
            strategy.barrier("teacher_cache_flush")
        if getattr(strategy, "global_rank", 0) == 0 and bool(self.arrays["filled"].all()):
            self._write_meta(complete=True)
        if strategy is not None:
            strategy.barrier("teacher_cache_complete")
        self.complete = bool(self._read_meta()["complete"])
        return self.complete

    def __repr__(self) -> str:
        where = str(self.directory) if self.directory is not None else "memory"
        settings = f"top_k={self.top_k}, dtype={self.dtype}, index_key={self.index_key!r}"
        return f"TeacherOutputCache({where}, {settings})"
