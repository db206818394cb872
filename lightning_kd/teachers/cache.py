"""TeacherOutputCache: a frozen teacher's outputs computed once, reused on every later epoch."""

from __future__ import annotations

import hashlib
import json
import math
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_kd.teachers.cache_files import FORMAT_VERSION, CacheFiles
from lightning_kd.teachers.cache_lock import CacheDirectoryLock
from lightning_kd.teachers.fingerprints import PROBE_SAMPLES

__all__ = ["FORMAT_VERSION", "TeacherOutputCache", "topk_logits"]


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


class TeacherOutputCache(CacheFiles):
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
    Each sample also takes an 8-byte input signature and a 1-byte ``filled`` flag, and on disk a
    4-byte checksum per file. :attr:`bytes_per_sample` says what a sample takes.

    What the fingerprint covers (checked at open; another fingerprint rebuilds the cache with a
    warning): the SHA-256 of the teacher's ``state_dict``, the dataset's length, the ``repr`` of
    its transforms, the bytes of :data:`PROBE_SAMPLES` evenly spaced samples (each read twice:
    two different reads mean random augmentation, refused with a ``ValueError``), the storage
    layout (top-k, dtype, feature shapes) and :data:`FORMAT_VERSION`.

    What the per-row checks catch, for every sample served:

    - its input: an exact signature of the input the teacher would receive
      (:func:`~lightning_kd.teachers.fingerprints.input_signature`, computed on the batch's
      device) is stored with the row and compared at every lookup. A sample whose data changed
      since the cache was built (also one the fingerprint does not probe), augmentation applied
      after the loader, or an ``index_key`` that is not the dataset position (e.g. the labels)
      raise a ``RuntimeError`` naming the sample. The comparison stays on the device: it is read
      at the first served batch and at every epoch end, so a mismatch found later in an epoch
      stops the run at that epoch's end (before epoch-end checkpoints). Within a batch, two
      samples with one index and different inputs raise at once.
    - on disk, its bytes: a CRC-32 of each file's row (seeded with the index) is stored in
      ``checksum.npy`` and recomputed from the rows read the first time a run serves them (host
      work on the memory map); a row that was zeroed, bit-flipped or moved raises a
      ``RuntimeError`` naming the sample and file. (The lock keeps other runs from writing
      while this one runs; a row is not verified again within one run.)
    - at open, every file's ``.npy`` header (dtype, shape) and size: a missing, truncated or
      reshaped file, or an unreadable ``meta.json``, rebuilds the cache with a warning naming it.

    Not caught: a change in a sample the teacher does not see (the teacher's input is what is
    signed, not the labels), and two different inputs with equal 64-bit signatures.

    Interruptions: a per-sample ``filled`` mask is written after the sample's outputs, and
    ``complete`` is set in ``meta.json`` only at an epoch end when every index is filled. A partial
    cache with the right fingerprint is resumed: stored samples are reused, and a batch with any
    missing sample runs the teacher (and fills the gaps). An epoch that passed at least as many
    samples as the dataset holds and still left rows empty warns that ``index_key`` may not be
    the dataset position.

    Files: the blocks of a new cache are reserved (``os.posix_fallocate``) after a free-space
    check, so a full disk is an ``OSError`` naming the bytes needed, never a ``SIGBUS`` later; a
    rebuild removes only the cache's own files. A complete cache is opened read-only
    (copy-on-write maps), also in a read-only directory; an incomplete one there is an error.

    Locking: ``<directory>/lock`` is held with ``fcntl.flock`` from open until the end of
    training (or process exit): shared while a complete cache is read (many runs may read one
    cache), exclusive while it is built, with the writer's pid and host in the file; a second
    process that would write is refused with a ``RuntimeError`` naming the holder. In one
    process, a later cache object on the same directory takes the lock over.

    DDP: each process stores the samples it sees. With ``directory``, all processes share the
    files (global rank 0 locks and creates them and sends any error to all ranks; the others open
    them after it; each process writes the rows of the samples it sees that are not stored yet,
    with their bytes of the mask; rank 0 checks completeness after a barrier), so the directory
    must be on a filesystem that every process sees (one node, or a shared filesystem). A sample
    that two processes see in one epoch (a ``DistributedSampler`` pads an epoch with repeated
    samples) is written by the first; not guaranteed: two processes storing one sample in the
    same step (only when each process's epoch is a single batch) may both write its row, and
    if their values differ in the last bits, a later read stops naming the row as damaged. In
    memory, each process keeps its own cache, filled by the samples its sampler gives it: later
    epochs run the teacher for samples it has not seen.

    Args:
        directory: where the memory-mapped files live; ``None`` keeps the cache in CPU memory.
        top_k: keep only the ``k`` largest logits per sample (``0 < k < C``); ``None``: all.
        dtype: storage dtype of logits and features, ``"float32"`` (exact) or ``"float16"``
            (values beyond 65504 raise an ``OverflowError`` when stored).
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
        self._spec: dict[str, Any] = {}  # name -> (dtype, shape) of every array
        self._checked: list[str] = []  # the arrays that the checksum covers, in column order
        self._lock: CacheDirectoryLock | None = None
        self._first_mismatch: Tensor | None = None  # smallest index whose input differed (on device)
        self._served = False  # whether a batch has been served since open
        self._seen = 0  # samples passed through the cache this epoch (this process)
        self._verified: Tensor | None = None  # on disk: rows whose checksums this run has verified

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

        ``fingerprint`` identifies teacher and data
        (:func:`~lightning_kd.teachers.fingerprints.teacher_fingerprint`,
        :func:`~lightning_kd.teachers.fingerprints.dataset_fingerprint`); a stored cache with
        another one, another format, damaged files or an unreadable ``meta.json`` is rebuilt
        with a warning. ``strategy`` (a Lightning strategy) coordinates processes on a shared ``directory``.

        Raises:
            RuntimeError: another process is writing the directory (its lock names it).
            PermissionError: the cache must be written but the directory is read-only.
            OSError: the filesystem lacks the space the cache needs.
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
        full = hashlib.sha256(
            f"{fingerprint}|{FORMAT_VERSION}|{json.dumps(layout, sort_keys=True)}".encode()
        ).hexdigest()
        self.num_classes, self.layers = num_classes, sorted(example_features)
        self._spec, self._checked = layout, [name for name in layout if name not in ("checksum", "filled")]
        self._first_mismatch, self._served, self._seen = None, False, 0
        if self.directory is None:
            if self.fingerprint != full:
                self.arrays = {
                    name: torch.zeros(shape, dtype=getattr(torch, dt)) for name, (dt, shape) in layout.items()
                }
                self.fingerprint, self.complete = full, False
            return
        outcome: tuple[str, Exception | None] = ("", None)
        if getattr(strategy, "global_rank", 0) == 0:
            try:
                outcome = (self._prepare(full, layout), None)
            except Exception as error:  # sent to every process, then raised there
                outcome = ("", error)
        if strategy is not None:
            outcome = strategy.broadcast(outcome, 0)
        mode, error = outcome
        if error is not None:
            raise error
        self._map(layout, "r+" if mode == "write" else "c")
        meta, problem = self._read_meta()
        if problem is not None or meta is None or meta["fingerprint"] != full:
            raise RuntimeError(f"The teacher cache in {self.directory} changed while it was being opened.")
        self.fingerprint, self.complete = full, meta["complete"]
        self._verified = torch.zeros(num_samples, dtype=torch.bool)

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
        layout["signature"] = ("int64", [n])
        if self.directory is not None:  # one CRC-32 per file and row, stored as int32
            layout["checksum"] = ("int32", [n, len(layout)])
        layout["filled"] = ("bool", [n])
        return layout

    @property
    def bytes_per_sample(self) -> int:
        """Bytes that one sample takes in storage (outputs, features, signature, checksums, ``filled``)."""
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
        self, indices: Tensor, signature: Tensor, device: torch.device | str = "cpu"
    ) -> tuple[Tensor, dict[str, Tensor]] | None:
        """``(logits, features)`` at ``indices`` (float32, on ``device``); ``None`` if one is missing.

        ``signature`` is :func:`~lightning_kd.teachers.fingerprints.input_signature` of the
        samples' inputs, compared on its device with the stored one (read at the first served
        batch and by :meth:`finish_epoch`); on disk, the rows read are checked against their checksums first.

        Raises:
            RuntimeError: a row does not match its checksum (the files were damaged), or (at the
                first served batch) a sample's input is not the one stored.
        """
        self._seen += len(indices)
        if not self.complete and not bool(self.arrays["filled"][indices].all()):
            return None
        rows = {name: row.to(device, non_blocking=True) for name, row in self._checked_rows(indices).items()}
        mismatch = rows["signature"] != signature.to(device)
        first = torch.where(mismatch, indices.to(device, non_blocking=True), len(self.arrays["filled"])).min()
        self._first_mismatch = (
            first if self._first_mismatch is None else torch.minimum(self._first_mismatch, first)
        )
        if not self._served:  # read the comparison once per run; later ones wait for the epoch end
            self._served = True
            self.check_inputs()
        return self._decoded(rows)

    def served(self, indices: Tensor, device: torch.device | str = "cpu") -> tuple[Tensor, dict[str, Tensor]]:
        """``(logits, features)`` of the stored rows ``indices`` as :meth:`lookup` serves them.

        What a step gets on a batch the teacher has just run on and :meth:`store` has stored: the
        values as stored (``top_k`` rebuilt by :func:`topk_logits`, rounded to ``dtype``; a row
        stored before keeps its first values), so the student's targets never depend on whether a
        sample was stored before the step or by it (a killed run that stored it after its last
        checkpoint, another process, a separate fill pass).
        """
        return self._decoded(
            {name: row.to(device, non_blocking=True) for name, row in self._checked_rows(indices).items()}
        )

    def _checked_rows(self, indices: Tensor) -> dict[str, Tensor]:
        """The stored rows ``indices`` of every checksummed array, checked against their CRC-32 once.

        Raises:
            RuntimeError: a row does not match its checksum (the files were damaged).
        """
        rows = {name: self.arrays[name][indices] for name in self._checked}
        if self._verified is not None and not bool(self._verified[indices].all()):
            self._verify_rows(indices, rows)
            self._verified[indices] = True
        return rows

    def _decoded(self, rows: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """Float32 logits (top-k rebuilt) and features of stored rows."""
        if self.top_k is None:
            logits = rows["logits"].float()
        else:
            logits = topk_logits(
                rows["topk_values"], rows["topk_indices"], rows["tail_logsumexp"], self.num_classes
            )
        return logits, {path: rows[f"feature.{path}"].float() for path in self.layers}

    def check_inputs(self, first_mismatch: int | None = None) -> None:
        """Raise if a served sample's input differed from the stored one (reads the device flag).

        ``first_mismatch`` (the smallest such index, gathered over processes) replaces this
        process's own flag.
        """
        if first_mismatch is None:
            first_mismatch = int(self._first_mismatch) if self._first_mismatch is not None else None
        self._first_mismatch = None
        if first_mismatch is None or first_mismatch >= len(self.arrays["filled"]):
            return
        fix = f"delete {self.directory} to rebuild it" if self.directory else "use a new TeacherOutputCache"
        raise RuntimeError(
            f"The input of training sample {first_mismatch} is not the input the teacher cache stored for "
            f"that index: either the training data changed since the cache was built (the fingerprint "
            f"reads only {PROBE_SAMPLES} samples; {fix}), or the batch values at "
            f"index_key={self.index_key!r} are not the samples' positions in the training dataset (wrap "
            "it in lightning_kd.data.WithIndex and point index_key at the index)."
        )

    def _checksums(self, indices: Tensor, rows: Mapping[str, Tensor]) -> np.ndarray:
        """CRC-32 (seeded with the sample index) of each checked array's row, ``(B, files)`` as int32."""
        sums = np.empty((len(indices), len(self._checked)), dtype=np.uint32)
        seeds = [index & 0xFFFFFFFF for index in indices.tolist()]
        for column, name in enumerate(self._checked):
            data = rows[name].contiguous().numpy().reshape(len(seeds), -1).view(np.uint8)
            sums[:, column] = np.fromiter(map(zlib.crc32, data, seeds), dtype=np.uint32, count=len(seeds))
        return sums.view(np.int32)

    def _verify_rows(self, indices: Tensor, rows: Mapping[str, Tensor]) -> None:
        stored = self.arrays["checksum"][indices].numpy()
        wrong = stored != self._checksums(indices, rows)
        bad = np.flatnonzero(wrong.any(axis=1))
        if len(bad):
            files = ", ".join(f"{self._checked[c]}.npy" for c in np.flatnonzero(wrong[bad[0]]))
            raise RuntimeError(
                f"The teacher cache in {self.directory} is damaged: the row of training sample "
                f"{int(indices[bad[0]])} in {files} does not match the checksum stored with it in "
                "checksum.npy (a file was changed, zeroed or corrupted after it was written). Delete "
                f"{self.directory} to rebuild the cache; it holds only the teacher's outputs."
            )

    def _storable(self, values: Tensor, what: str) -> Tensor:
        """``values`` in the storage dtype; float16 overflow is an error, not a stored ``inf``."""
        stored = values.to(getattr(torch, self.dtype))
        overflow = torch.isinf(stored) & torch.isfinite(values)
        if bool(overflow.any()):
            raise OverflowError(
                f"The teacher's {what} reach {float(values[overflow].abs().max()):.6g}, beyond float16's "
                "largest value 65504: the cache would store them as inf. Use "
                "TeacherOutputCache(dtype='float32')."
            )
        return stored

    @torch.no_grad()
    def store(
        self, indices: Tensor, logits: Tensor, features: Mapping[str, Tensor], signature: Tensor
    ) -> None:
        """Store the teacher's ``logits`` and ``features`` and the inputs' ``signature`` at ``indices``.

        A row is marked filled after its outputs, signature and checksums are written. Samples
        that share an index in the batch must share their input (then the first is stored). A
        stored row is never written again: its first values stay (the teacher's outputs for one
        sample differ in their last bits with the batch they were computed in), so every step that
        reads it gets the same values; under DDP a sample that two processes see in one epoch (a
        ``DistributedSampler`` pads the epoch with repeated items) is written by the first (not
        guaranteed for two processes storing it in the same step: see the class docstring). The
        stored rows of the batch are checked instead: their input must be the batch's.

        Raises:
            RuntimeError: two samples of the batch have one index but different inputs, or a
                stored sample's input is not the batch's.
            OverflowError: float16 storage cannot hold a value.
        """
        signature = signature.cpu()
        order = torch.argsort(indices, stable=True)
        repeated = indices[order][1:] == indices[order][:-1]
        differs = repeated & (signature[order][1:] != signature[order][:-1])
        if bool(differs.any()):
            index = int(indices[order][1:][differs][0])
            raise RuntimeError(
                f"Two samples of one batch have index {index} at index_key={self.index_key!r} but different "
                "inputs: the values there are not the samples' positions in the training dataset (are they "
                "the labels?). Wrap the dataset in lightning_kd.data.WithIndex and point index_key at the "
                "index."
            )
        keep = order[torch.cat([torch.tensor([True]), ~repeated])] if len(order) else order
        stored = self.arrays["filled"][indices[keep]]
        if bool(stored.any()):
            rows_before = self._checked_rows(indices[keep[stored]])  # a damaged row is named as such
            first = keep[stored][rows_before["signature"] != signature[keep[stored]]]
            if len(first):
                self.check_inputs(int(indices[first].min()))
            keep = keep[~stored]
            if not len(keep):
                return
        indices, logits = indices[keep], logits.detach().float().cpu()[keep]
        rows: dict[str, Tensor] = {}
        if self.top_k is None:
            rows["logits"] = self._storable(logits, "logits")
        else:
            values, classes = logits.topk(self.top_k, dim=-1)
            rows["topk_values"] = self._storable(values, "logits")
            rows["topk_indices"] = classes.to(self.arrays["topk_indices"].dtype)
            rows["tail_logsumexp"] = logits.scatter(-1, classes, float("-inf")).logsumexp(dim=-1)
        for path in self.layers:
            rows[f"feature.{path}"] = self._storable(
                features[path].detach().cpu()[keep], f"features at {path!r}"
            )
        rows["signature"] = signature[keep]
        rows.update(self._batch_rows(keep))
        for name, value in rows.items():
            self.arrays[name][indices] = value
        if "checksum" in self.arrays:
            self.arrays["checksum"][indices] = torch.from_numpy(self._checksums(indices, rows))
            self._verified[indices] = True  # checksummed from these very values
        self.arrays["filled"][indices] = True

    def _batch_rows(self, keep: Tensor) -> dict[str, Tensor]:
        """Rows of a subclass's own arrays for the batch positions ``keep`` that :meth:`store` writes."""
        return {}

    def finish_epoch(self, strategy: Any = None) -> bool:
        """Check the epoch's inputs, flush, and mark the cache complete once every sample is filled.

        Reads the input comparisons of the epoch (one device read, gathered over processes) and
        warns when an epoch passed at least as many samples as the cache has rows yet left some
        empty. Returns ``complete``.
        """
        size = len(self.arrays["filled"])
        device = getattr(strategy, "root_device", torch.device("cpu"))
        first = self._first_mismatch if self._first_mismatch is not None else torch.tensor(size)
        stats = torch.stack([first.to(device), torch.tensor(self._seen, device=device)])
        local_seen, self._seen = self._seen, 0
        if strategy is not None:
            stats = strategy.all_gather(stats)
        stats = stats.reshape(-1, 2).cpu()
        self.check_inputs(int(stats[:, 0].min()))
        seen = int(stats[:, 1].sum()) if self.directory is not None else local_seen
        if not self.complete:
            self._complete_if_filled(strategy)
        if not self.complete and seen >= size:
            rank_zero_warn(
                f"An epoch passed {seen:,} samples through the teacher cache, as many as it has rows, but "
                "only "
                f"{int(self.arrays['filled'].sum()):,} of {size:,} rows are filled: are the values at "
                f"index_key={self.index_key!r} the samples' positions in the training dataset "
                "(lightning_kd.data.WithIndex)? (A sampler that draws with replacement also leaves rows "
                "empty; they are filled in later epochs.)"
            )
        return self.complete

    def _complete_if_filled(self, strategy: Any) -> None:
        if self.directory is None:
            self.complete = bool(self.arrays["filled"].all())
            return
        for array in self._memmaps:
            array.flush()
        if strategy is not None:
            strategy.barrier("teacher_cache_flush")
        if getattr(strategy, "global_rank", 0) == 0 and bool(self.arrays["filled"].all()):
            self._write_meta(complete=True)
        if strategy is not None:
            strategy.barrier("teacher_cache_complete")
        meta, problem = self._read_meta()
        if meta is None:
            raise RuntimeError(
                f"The teacher cache in {self.directory} {problem or 'lost its meta.json'} during training."
            )
        self.complete = meta["complete"]

    def release(self) -> None:
        """Flush the files and release the directory's lock (the arrays stay readable)."""
        for array in self._memmaps:
            if array.mode == "r+":
                array.flush()
        if self._lock is not None and self._lock.owner is self:
            self._lock.release()
        self._lock = None

    def __repr__(self) -> str:
        where = str(self.directory) if self.directory is not None else "memory"
        settings = f"top_k={self.top_k}, dtype={self.dtype}, index_key={self.index_key!r}"
        return f"TeacherOutputCache({where}, {settings})"
