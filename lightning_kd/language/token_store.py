r"""TopKTokenStore: a causal-LM teacher's top-k next-token log-probabilities, computed once, on disk.

:func:`fill_token_store` runs the teacher over a dataset of token blocks (dict items with
``input_ids``, ``attention_mask`` and ``labels`` of one length ``L``, e.g.
:class:`~lightning_kd.data.text.PythonDocsText`'s training split) and writes, for each *counted*
predicting position of a block (position ``t`` predicts token ``t + 1``; it counts when the
causal-LM module's loss reads it: label ``t + 1`` not -100, ``t`` and ``t + 1`` inside the attention
mask, :func:`~lightning_kd.language.token_view.shifted_targets`), one
:class:`~lightning_kd.language.token_codec.TopKCodec` row: the ``k`` largest log-probabilities
(polynomial fit + quantised residuals), their ids at :math:`\lceil \log_2 V \rceil` bits and the
tail mass. Prompts of completion-only data and padding take no space. :class:`TopKTokenStore`
reads them back, memory-mapped, for
:class:`~lightning_kd.language.stored_teacher.TokenStoreDistillationModule`.

Files in the directory (``shard-<s>`` holds ``blocks_per_shard`` consecutive blocks):

- ``shard-<s>.rows.npy``: uint8 ``(positions, row_bytes)``, the counted positions of its blocks in order;
- ``shard-<s>.offsets.npy``: int64 ``(blocks + 1,)``, where each block's rows start (and the end);
- ``shard-<s>.signatures.npy``: int64 ``(blocks,)``, the exact input signature of each block
  (:func:`~lightning_kd.teachers.fingerprints.input_signature` of its ids, mask and labels: so the
  counted positions too), compared with every batch read;
- ``shard-<s>.tail.npy``: float64 ``(2, V)``, the shard's tail statistics (summed into the prior);
- ``meta.json``: format, fingerprint (teacher, tokenizer, data), codec, shape, and one CRC-32 per
  finished shard file; ``lock``: one writer (:class:`~lightning_kd.teachers.cache_lock.CacheDirectoryLock`).

A shard is listed in ``meta.json`` (replaced atomically) only after its files are written and
flushed, so a killed fill leaves every listed shard valid and the next fill with the same
fingerprint resumes at the first unlisted one. Another fingerprint is refused (``overwrite=True``
rebuilds, removing only the store's own files). Reading verifies the small files at open and each
shard's rows the first time a run reads them.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import warnings
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lightning_kd.language.token_codec import DEFAULT_RESIDUAL_BITS, TopKCodec
from lightning_kd.language.token_view import shifted_targets
from lightning_kd.model_io import call_model, logits_of
from lightning_kd.teachers.cache_lock import CacheDirectoryLock
from lightning_kd.teachers.fingerprints import dataset_fingerprint, input_signature, teacher_fingerprint

__all__ = ["FORMAT_VERSION", "TopKTokenStore", "fill_token_store", "tokenizer_fingerprint"]

#: version of the store's layout; a store of another version is refused (``overwrite=True`` rebuilds)
FORMAT_VERSION = 2
#: the tail prior is mixed with this share of the uniform distribution, so no id gets probability 0
PRIOR_FLOOR = 1e-4
_FILES = ("rows", "offsets", "signatures", "tail")
#: the item keys a store signs (those its items have), in this order; the teacher reads the first two
_SIGNED = ("input_ids", "attention_mask", "labels")
#: what the directory lock's refusal calls the store, and how a run gets its own directory
_LOCK_WORDS = (
    "top-k token store",
    "fill_token_store(directory=...) or lightning-kd cache-tokens --directory",
)


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """SHA-256 of a tokenizer's vocabulary (``get_vocab()``, sorted) and length; ``"none"`` without one."""
    if tokenizer is None:
        return "none"
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps([len(tokenizer), vocab]).encode()).hexdigest()


def _crc(array: np.ndarray) -> int:
    return zlib.crc32(memoryview(np.ascontiguousarray(array)).cast("B"))


def _block_inputs(items: Sequence[dict[str, Tensor]], keys: Sequence[str]) -> dict[str, Tensor]:
    return {key: torch.stack([torch.as_tensor(item[key]) for item in items]) for key in keys}


def _counted(inputs: dict[str, Tensor]) -> Tensor:
    """``(N, L - 1)`` bool: the predicting positions that count (the causal-LM module's rule)."""
    return shifted_targets(inputs.get("labels", inputs["input_ids"]), inputs.get("attention_mask"))[0]


def _signatures(inputs: dict[str, Tensor]) -> Tensor:
    ids = inputs["input_ids"]
    return input_signature(tuple(inputs[key].cpu() for key in sorted(inputs)), ids.shape[0])


class TopKTokenStore:
    """A finished top-k store, opened for reading (the module docstring says what it holds).

    Args:
        directory: the store's folder.
        tokenizer: when given, its :func:`tokenizer_fingerprint` must be the one the store recorded.

    Raises:
        FileNotFoundError: no store there.
        RuntimeError: the store is incomplete, damaged (a small file's CRC) or being written.
        ValueError: the tokenizer differs from the store's.
    """

    def __init__(self, directory: str | Path, tokenizer: Any = None) -> None:
        self.directory = Path(directory)
        meta_path = self.directory / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(
                f"No top-k token store in {self.directory} (no meta.json): build it with "
                "`lightning-kd cache-tokens` or lightning_kd.language.fill_token_store."
            )
        self.meta = json.loads(meta_path.read_text())
        if self.meta.get("format") != FORMAT_VERSION:
            raise RuntimeError(
                f"The token store in {self.directory} has format {self.meta.get('format')}, this version "
                f"reads {FORMAT_VERSION}: rebuild it (fill_token_store(..., overwrite=True), or "
                "lightning-kd cache-tokens --overwrite)."
            )
        if not self.meta["complete"]:
            done, total = len(self.meta["shards"]), self.meta["num_shards"]
            raise RuntimeError(
                f"The token store in {self.directory} is incomplete ({done} of {total} shards written; its "
                "fill was interrupted): run the same fill again to finish it, it resumes."
            )
        if (
            tokenizer is not None
            and tokenizer_fingerprint(tokenizer) != self.meta["fingerprint"]["tokenizer"]
        ):
            raise ValueError(
                f"The token store in {self.directory} was built with another tokenizer than the one given "
                "(their vocabularies differ): its token ids would mean other tokens. Rebuild the store with "
                "this tokenizer, or train with the store's."
            )
        self._lock = CacheDirectoryLock.shared(
            self.directory, os.access(self.directory, os.W_OK), *_LOCK_WORDS
        )
        if self._lock is not None:
            self._lock.owner = self
        self.codec = TopKCodec(**self.meta["codec"])
        self.num_blocks, self.block_size = self.meta["num_blocks"], self.meta["block_size"]
        self.blocks_per_shard = self.meta["blocks_per_shard"]
        self._rows: dict[int, np.ndarray] = {}
        self._offsets = [self._verified(shard, "offsets") for shard in range(self.meta["num_shards"])]
        #: rows stored: the counted positions of every block
        self.positions = int(sum(int(offsets[-1]) for offsets in self._offsets))
        signatures, tail = [], np.zeros((2, self.codec.vocab_size))
        for shard in range(self.meta["num_shards"]):
            signatures.append(self._verified(shard, "signatures"))
            tail += self._verified(shard, "tail")
        self.signatures = torch.from_numpy(np.concatenate(signatures))
        share = np.divide(tail[0], tail[1], out=np.zeros_like(tail[0]), where=tail[1] > 0)
        prior = share / max(share.sum(), 1e-300)
        prior = (1 - PRIOR_FLOOR) * prior + PRIOR_FLOOR / self.codec.vocab_size
        #: ``(V,)`` log of the tail prior: each id's mean share of the tail where it is in the tail
        self.log_prior = torch.from_numpy(np.log(prior)).float()

    def _path(self, shard: int, name: str) -> Path:
        return self.directory / f"shard-{shard:05d}.{name}.npy"

    def _verified(self, shard: int, name: str) -> np.ndarray:
        """A shard's file, memory-mapped, after checking its header and its CRC-32 against ``meta.json``."""
        path = self._path(shard, name)
        try:
            array = np.lib.format.open_memmap(path, mode="c")
        except (OSError, ValueError) as error:
            raise RuntimeError(
                f"The token store in {self.directory} is damaged: {path.name} cannot be read ({error}). "
                "Delete the directory (or fill with overwrite=True) to rebuild it."
            ) from None
        if _crc(array) != self.meta["shards"][str(shard)][name]:
            raise RuntimeError(
                f"The token store in {self.directory} is damaged: {path.name} (shard {shard}) does not match "
                "the CRC-32 recorded in meta.json when it was written (a byte was changed, zeroed or cut "
                "off). Delete the directory (or fill with overwrite=True) to rebuild it; it holds only the "
                "teacher's outputs."
            )
        return array

    @property
    def bytes_per_token(self) -> float:
        """Bytes of the store's files per stored (counted) position: rows, offsets, signatures, meta."""
        return self.size_bytes / max(self.positions, 1)

    @property
    def size_bytes(self) -> int:
        """Bytes of the store's files on disk (their lengths)."""
        return (
            sum(path.stat().st_size for path in self.directory.glob("shard-*.npy"))
            + (self.directory / "meta.json").stat().st_size
        )

    def rows(
        self,
        indices: Tensor,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
    ) -> Tensor:
        """The ``(N, L - 1, row_bytes)`` uint8 rows of the blocks at ``indices`` (host tensors).

        Counted positions get their stored rows; the others (prompts, padding) zero bytes, which
        decode to some finite distribution that no loss reads. Each shard's rows are checked against
        their CRC-32 the first time they are read; each block's inputs (ids, mask, labels) against
        the stored signature (every call: host work on CPU tensors).

        Raises:
            IndexError: an index outside the store.
            ValueError: the blocks have another length than the stored ones, or lack a signed input.
            RuntimeError: a shard is damaged, or a block's inputs are not those the teacher saw.
        """
        indices = indices.cpu().long()
        if len(indices) and (int(indices.min()) < 0 or int(indices.max()) >= self.num_blocks):
            raise IndexError(
                f"The token store holds {self.num_blocks} blocks but a batch has index {int(indices.max())}: "
                "the index must be the block's position in the dataset the store was filled from "
                "(lightning_kd.data.WithIndex)."
            )
        if input_ids.shape[-1] != self.block_size:
            raise ValueError(
                f"The batch's blocks have {input_ids.shape[-1]} tokens but the store's {self.block_size}: "
                "train on the dataset (block_size) the store was filled from."
            )
        given = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        inputs = {}
        for key in self.meta["signs"]:
            if given[key] is None:
                raise ValueError(
                    f"The token store was filled from blocks with {key}: give the batch's {key} (the "
                    "teacher's output and the stored positions depend on them), or fill the store from "
                    f"blocks without {key}."
                )
            inputs[key] = given[key].cpu()
        wrong = (_signatures(inputs) != self.signatures[indices]).numpy()
        if wrong.any():
            block = int(indices[int(np.flatnonzero(wrong)[0])])
            raise RuntimeError(
                f"The input of block {block} is not the one the token store in {self.directory} was filled "
                "from: the data changed since, or the batch's index is not the block's position in the "
                "dataset (wrap the dataset the store was filled from in lightning_kd.data.WithIndex)."
            )
        counted = _counted(inputs).numpy()
        out = np.zeros((len(indices), self.block_size - 1, self.codec.row_bytes), dtype=np.uint8)
        for row, index in enumerate(indices.tolist()):
            shard, block = divmod(index, self.blocks_per_shard)
            if shard not in self._rows:
                self._rows[shard] = self._verified(shard, "rows")
            start, stop = self._offsets[shard][block : block + 2]
            if stop - start != counted[row].sum():  # the signature covers the labels: a damaged offsets file
                raise RuntimeError(
                    f"The token store in {self.directory} holds {stop - start} positions of block {index} "
                    f"but its inputs count {counted[row].sum()}: the store is damaged; rebuild it."
                )
            out[row, counted[row]] = self._rows[shard][start:stop]
        return torch.from_numpy(out)

    def release(self) -> None:
        """Release the directory's shared lock (a writer may then rebuild it)."""
        if self._lock is not None and self._lock.owner is self:
            self._lock.release()
        self._lock = None

    def __repr__(self) -> str:
        return f"TopKTokenStore({self.directory}, k={self.codec.k}, V={self.codec.vocab_size})"


# --------------------------------------------------------------------------------------------- fill
def _write_meta(directory: Path, meta: dict[str, Any]) -> None:
    temporary = directory / "meta.json.tmp"
    temporary.write_text(json.dumps(meta, indent=1))
    os.replace(temporary, directory / "meta.json")


def _mismatch(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    """What differs between a stored meta and the one this fill would write (``None``: nothing)."""
    if old.get("format") != new["format"]:
        return f"has format {old.get('format')} (this version writes {new['format']})"
    for part in ("teacher", "tokenizer", "data"):
        if old["fingerprint"].get(part) != new["fingerprint"][part]:
            return f"was filled from another {part} (its fingerprint differs)"
    for key in ("codec", "num_blocks", "block_size", "blocks_per_shard", "signs"):
        if old.get(key) != new[key]:
            return f"has another {key} ({old.get(key)} instead of {new[key]})"
    return None


def _reserve(path: Path) -> None:
    """Allocate a new file's blocks now, so a full disk is an error here, not a ``SIGBUS`` later."""
    with open(path, "r+b") as file:
        try:
            os.posix_fallocate(file.fileno(), 0, os.fstat(file.fileno()).st_size)
        except OSError as error:
            if error.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise


@torch.no_grad()
def fill_token_store(
    teacher: nn.Module,
    dataset: Any,
    directory: str | Path,
    k: int = 128,
    residual_bits: Sequence[Sequence[int]] = DEFAULT_RESIDUAL_BITS,
    degree: int = 3,
    tokenizer: Any = None,
    batch_size: int = 8,
    blocks_per_shard: int = 64,
    device: str | torch.device | None = None,
    overwrite: bool = False,
    on_shard: Callable[[int, int], None] | None = None,
) -> TopKTokenStore:
    """Run ``teacher`` once over ``dataset`` and store its top-``k`` next-token log-probabilities.

    Resumes a partial store with the same fingerprint (teacher ``state_dict``, tokenizer
    vocabulary, dataset probe) and layout; refuses one that differs unless ``overwrite``.

    Args:
        teacher: the causal LM, called as ``teacher(input_ids=..., attention_mask=...)``.
        dataset: map-style dataset of dict items with ``input_ids`` (and ``attention_mask``,
            ``labels``), all of one length ``L`` (``PythonDocsText(...).datasets["train"]``); only the
            positions that count (see the module docstring) are stored.
        directory: the store's folder (created).
        k: log-probabilities kept per token.
        residual_bits: the codec's ``(bits, ranks)`` residual groups (:class:`TopKCodec`).
        degree: the codec's polynomial degree.
        tokenizer: the tokenizer of the ids (fingerprinted; optional).
        batch_size: blocks per teacher call.
        blocks_per_shard: blocks per shard (the unit of resumption and of verification).
        device: where the teacher runs (default: where its parameters are).
        overwrite: rebuild a store whose fingerprint or layout differs instead of refusing.
        on_shard: called as ``on_shard(shard, num_shards)`` after each finished shard.

    Raises:
        ValueError: another store is in the directory (and not ``overwrite``), or bad settings.
        RuntimeError: another process is writing the directory.
        OSError: the filesystem lacks the space the store needs.
    """
    directory = Path(directory)
    if len(dataset) == 0:
        raise ValueError("The dataset is empty: there is nothing to store.")
    if blocks_per_shard < 1 or batch_size < 1:
        raise ValueError(
            f"blocks_per_shard and batch_size must be >= 1, got {blocks_per_shard}, {batch_size}."
        )
    first = dataset[0]
    if not isinstance(first, dict) or "input_ids" not in first:
        raise ValueError(
            "fill_token_store reads dict items with 'input_ids' (and 'attention_mask') of one length, as "
            f"PythonDocsText's datasets give; got {type(first).__name__} items."
        )
    keys = [key for key in _SIGNED if key in first]
    block_size = int(torch.as_tensor(first["input_ids"]).shape[-1])
    if device is None:
        device = next((p.device for p in teacher.parameters()), torch.device("cpu"))
    teacher.eval()

    def logits_of_blocks(start: int, stop: int) -> tuple[Tensor, dict[str, Tensor]]:
        items = [dataset[i] for i in range(start, stop)]
        inputs = _block_inputs(items, keys)
        if inputs["input_ids"].shape[-1] != block_size:
            raise ValueError(f"Block {start} has another length than block 0 ({block_size} tokens).")
        model_inputs = {key: inputs[key].to(device) for key in _SIGNED[:2] if key in inputs}
        return logits_of(call_model(teacher, model_inputs))[:, :-1], inputs

    vocab_size = int(logits_of_blocks(0, 1)[0].shape[-1])
    codec = TopKCodec(vocab_size, k, tuple(tuple(int(x) for x in g) for g in residual_bits), degree)
    num_shards = -(-len(dataset) // blocks_per_shard)
    meta: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "fingerprint": {
            "teacher": teacher_fingerprint(teacher),
            "tokenizer": tokenizer_fingerprint(tokenizer),
            "data": dataset_fingerprint(dataset),
        },
        "codec": codec.config(),
        "num_blocks": len(dataset),
        "block_size": block_size,
        "blocks_per_shard": blocks_per_shard,
        "signs": keys,
        "row_bytes": codec.row_bytes,
        "num_shards": num_shards,
        "shards": {},
        "complete": False,
    }
    directory.mkdir(parents=True, exist_ok=True)
    lock = CacheDirectoryLock.shared(directory, True, *_LOCK_WORDS)
    assert lock is not None
    try:
        lock.make_exclusive()
        meta["shards"] = _resumable_shards(directory, meta, overwrite)
        _check_space(directory, meta, codec)
        for shard in range(num_shards):
            if str(shard) in meta["shards"]:
                continue
            counts = _shard_counts(dataset, shard, meta, keys, batch_size)
            meta["shards"][str(shard)] = _fill_shard(
                directory, shard, meta, codec, logits_of_blocks, batch_size, counts
            )
            meta["complete"] = len(meta["shards"]) == num_shards
            _write_meta(directory, meta)
            if on_shard is not None:
                on_shard(shard, num_shards)
        if not meta["complete"]:  # every shard was already there
            meta["complete"] = True
            _write_meta(directory, meta)
    finally:
        lock.release()
    return TopKTokenStore(directory, tokenizer)


def _resumable_shards(directory: Path, meta: dict[str, Any], overwrite: bool) -> dict[str, Any]:
    """The finished shards of a store with this fingerprint and layout; refuse (or clear) another store."""
    path = directory / "meta.json"
    if not path.is_file():
        return {}
    try:
        old = json.loads(path.read_text())
        problem = _mismatch(old, meta)
    except (ValueError, KeyError, TypeError, AttributeError):
        old, problem = {}, "has an unreadable meta.json"
    if problem is None:
        return {
            shard: crcs
            for shard, crcs in old.get("shards", {}).items()
            if all((directory / f"shard-{int(shard):05d}.{name}.npy").is_file() for name in _FILES)
        }
    if not overwrite:
        raise ValueError(
            f"The token store in {directory} {problem}: it is not this teacher's store of this data. Pass "
            "overwrite=True (--overwrite) to rebuild it, or give another directory."
        )
    warnings.warn(f"The token store in {directory} {problem}: rebuilding it.", UserWarning, stacklevel=3)
    for own in [*directory.glob("shard-*.npy"), path]:
        own.unlink()
    return {}


def _check_space(directory: Path, meta: dict[str, Any], codec: TopKCodec) -> None:
    """An ``OSError`` unless the missing shards fit, at most (every position counted)."""
    missing = meta["num_shards"] - len(meta["shards"])
    per_shard = (
        meta["blocks_per_shard"] * ((meta["block_size"] - 1) * codec.row_bytes + 16) + 16 * codec.vocab_size
    )
    needed, free = missing * (per_shard + 128 * len(_FILES)), shutil.disk_usage(directory).free
    if needed > free:
        raise OSError(
            errno.ENOSPC,
            f"The token store needs {needed:,} more bytes in {directory} but its filesystem has {free:,} "
            "free. "
            "Give it another directory, or store less per token (a smaller k, fewer residual_bits).",
        )


def _shard_blocks(shard: int, meta: dict[str, Any]) -> range:
    start = shard * meta["blocks_per_shard"]
    return range(start, min(start + meta["blocks_per_shard"], meta["num_blocks"]))


def _shard_counts(
    dataset: Any, shard: int, meta: dict[str, Any], keys: Sequence[str], batch_size: int
) -> np.ndarray:
    """The counted positions of each of the shard's blocks (read from the items, before the teacher runs)."""
    blocks = _shard_blocks(shard, meta)
    counts = []
    for first in range(blocks.start, blocks.stop, batch_size):
        items = [dataset[i] for i in range(first, min(first + batch_size, blocks.stop))]
        counts.append(_counted(_block_inputs(items, keys)).sum(dim=1).numpy())
    return np.concatenate(counts)


def _fill_shard(
    directory: Path,
    shard: int,
    meta: dict[str, Any],
    codec: TopKCodec,
    logits_of_blocks: Callable[[int, int], tuple[Tensor, dict[str, Tensor]]],
    batch_size: int,
    counts: np.ndarray,
) -> dict[str, int]:
    """Write one shard's files (reserved first), flush them, and return their CRC-32s."""
    blocks = _shard_blocks(shard, meta)
    start, stop = blocks.start, blocks.stop
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    shapes = {
        "rows": (np.uint8, (int(offsets[-1]), codec.row_bytes)),
        "offsets": (np.int64, (stop - start + 1,)),
        "signatures": (np.int64, (stop - start,)),
        "tail": (np.float64, (2, codec.vocab_size)),
    }
    arrays = {}
    for name, (dtype, shape) in shapes.items():
        path = directory / f"shard-{shard:05d}.{name}.npy"
        arrays[name] = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
        _reserve(path)
    arrays["offsets"][:] = offsets
    tail = torch.zeros(2, codec.vocab_size, dtype=torch.float64)
    for first in range(start, stop, batch_size):
        last = min(first + batch_size, stop)
        logits, inputs = logits_of_blocks(first, last)
        counted = _counted(inputs)
        if not np.array_equal(counted.sum(dim=1).numpy(), counts[first - start : last - start]):
            raise RuntimeError(
                f"The blocks {first}..{last - 1} changed while the store was filled (their counted positions "
                "differ between two reads): fill from a dataset whose items are fixed."
            )
        encoded, sums = codec.encode(logits[counted.to(logits.device)][..., : codec.vocab_size])
        rows = slice(offsets[first - start], offsets[last - start])
        arrays["rows"][rows] = encoded.cpu().numpy()
        arrays["signatures"][first - start : last - start] = _signatures(inputs).numpy()
        tail += sums.cpu()
    arrays["tail"][:] = tail.numpy()
    crcs = {}
    for name, array in arrays.items():
        array.flush()
        crcs[name] = _crc(array)
    return crcs
