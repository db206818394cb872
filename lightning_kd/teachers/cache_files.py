"""The files of a :class:`~lightning_kd.TeacherOutputCache` on disk: lock, check, (re)build, reserve, map.

A mixin of the cache: it reads and writes ``directory``, ``fingerprint``, ``_spec``, ``arrays``
and ``_lock`` of the cache object.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn

from lightning_kd.teachers.cache_lock import CacheDirectoryLock

__all__ = ["FORMAT_VERSION", "CacheFiles"]

#: version of the files' layout and meaning; a cache of another version is rebuilt, never read
FORMAT_VERSION = 2
#: names of the ``.npy`` files a cache owns (besides ``feature.<layer>.npy``); a rebuild removes only these
_OWN_ARRAYS = ("logits", "topk_values", "topk_indices", "tail_logsumexp", "signature", "checksum", "filled")


class CacheFiles:
    """The on-disk part of the teacher cache (one writer, verified headers, space reserved up front)."""

    directory: Path
    fingerprint: str | None
    _spec: dict[str, Any]

    def _prepare(self, fingerprint: str, layout: dict[str, Any]) -> str:
        """Lock, verify and (re)build the files for ``"write"``, or find them complete (``"read"``)."""
        directory = self.directory
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise PermissionError(
                f"Cannot create the teacher cache directory {directory}: {error.strerror}. "
                "Give TeacherOutputCache a directory this process can write."
            ) from None
        writable = os.access(directory, os.W_OK)
        self._lock = CacheDirectoryLock.shared(directory, writable)
        if self._lock is not None:
            self._lock.owner = self
        kind, reason = self._decide(fingerprint, layout)
        if kind != "read":
            if not writable:
                raise PermissionError(self._read_only_message(kind, reason, layout))
            self._lock.make_exclusive()
            kind, reason = self._decide(fingerprint, layout)  # again, now that no one else writes
        if kind == "read":
            return "read"
        if kind == "rebuild":
            rank_zero_warn(f"The teacher cache in {directory} {reason}: rebuilding it.")
        if kind in ("create", "rebuild"):
            self._create(fingerprint, layout)
        else:
            self._reserve(layout)
        return "write"

    def _decide(self, fingerprint: str, layout: dict[str, Any]) -> tuple[str, str]:
        """``("read" | "resume" | "create" | "rebuild", why a rebuild)`` for the files as they are."""
        meta, problem = self._read_meta()
        if problem is not None:
            return "rebuild", problem
        if meta is None:
            return "create", ""
        if meta["fingerprint"] != fingerprint:
            return "rebuild", "was built for another teacher, dataset or layout"
        damaged = self._damaged_files(layout)
        if damaged:
            return "rebuild", f"has damaged files ({'; '.join(damaged)})"
        return ("read" if meta["complete"] else "resume"), ""

    def _read_only_message(self, kind: str, reason: str, layout: dict[str, Any]) -> str:
        fix = (
            "Make the directory writable, or give TeacherOutputCache a writable directory "
            "(the cache is built there)."
        )
        if kind == "resume":
            filled = int(np.load(self.directory / "filled.npy", mmap_mode="r").sum())
            return (
                f"The teacher cache in {self.directory} is incomplete ({filled:,} of "
                f"{layout['filled'][1][0]:,} samples stored) and its directory is read-only, so it "
                f"cannot be finished. {fix}"
            )
        state = reason or "does not exist yet"
        return (
            f"The teacher cache in {self.directory} {state} and must be built, but the directory is "
            f"read-only. {fix}"
        )

    def _read_meta(self) -> tuple[dict[str, Any] | None, str | None]:
        """``(meta, None)``, ``(None, None)`` without a ``meta.json``, or ``(None, why it is unusable)``."""
        path = self.directory / "meta.json"
        if not path.exists():
            return None, None
        try:
            meta = json.loads(path.read_text())
        except ValueError:
            return None, "has an unreadable meta.json (truncated or garbled)"
        if (
            not isinstance(meta, dict)
            or not isinstance(meta.get("fingerprint"), str)
            or not isinstance(meta.get("complete"), bool)
        ):
            return None, "has a meta.json without its fields (format, fingerprint, complete)"
        if meta.get("format") != FORMAT_VERSION:
            return None, f"was written in format {meta.get('format')!r} (this version reads {FORMAT_VERSION})"
        return meta, None

    def _damaged_files(self, layout: dict[str, Any]) -> list[str]:
        """What is wrong with each file whose header or size does not match ``layout``."""
        found = []
        for name, (dtype, shape) in layout.items():
            path = self.directory / f"{name}.npy"
            try:
                with open(path, "rb") as file:
                    version = np.lib.format.read_magic(file)
                    read_header = {
                        (1, 0): np.lib.format.read_array_header_1_0,
                        (2, 0): np.lib.format.read_array_header_2_0,
                    }[version]
                    stored_shape, fortran_order, stored_dtype = read_header(file)
                    expected = file.tell() + math.prod(shape) * np.dtype(dtype).itemsize
            except FileNotFoundError:
                found.append(f"{name}.npy is missing")
                continue
            except (OSError, ValueError, KeyError):
                found.append(f"{name}.npy has no readable .npy header")
                continue
            if stored_shape != tuple(shape) or fortran_order or stored_dtype != np.dtype(dtype):
                found.append(
                    f"{name}.npy holds {stored_dtype} {stored_shape}, expected {dtype} {tuple(shape)}"
                )
            elif (size := path.stat().st_size) != expected:
                found.append(f"{name}.npy has {size:,} bytes, expected {expected:,}")
        return found

    def _create(self, fingerprint: str, layout: dict[str, Any]) -> None:
        """Remove the cache's own files and create empty ones, their blocks reserved."""
        for path in self.directory.iterdir():
            own_array = path.suffix == ".npy" and (
                path.stem in _OWN_ARRAYS or path.stem.startswith("feature.")
            )
            if own_array or path.name in ("meta.json", "meta.json.tmp"):
                path.unlink()
        needed = sum(math.prod(shape) * np.dtype(dtype).itemsize + 4096 for dtype, shape in layout.values())
        free = shutil.disk_usage(self.directory).free
        if needed > free:
            raise self._no_space(needed, free)
        created = []
        try:
            for name, (dtype, shape) in layout.items():
                created.append(self.directory / f"{name}.npy")
                # creates the file, sparse (the map is dropped at once): its blocks are reserved next
                np.lib.format.open_memmap(created[-1], mode="w+", dtype=dtype, shape=tuple(shape))
                self._reserve_file(created[-1])
        except OSError as error:
            if error.errno != errno.ENOSPC:
                raise
            for path in created:
                path.unlink(missing_ok=True)
            raise self._no_space(needed, shutil.disk_usage(self.directory).free) from None
        self.fingerprint = fingerprint
        self._write_meta(complete=False)

    def _reserve(self, layout: dict[str, Any]) -> None:
        """Reserve the blocks of a resumed cache's files (a sparse copy would otherwise fill up later)."""
        try:
            for name in layout:
                self._reserve_file(self.directory / f"{name}.npy")
        except OSError as error:
            if error.errno != errno.ENOSPC:
                raise
            needed = sum((self.directory / f"{name}.npy").stat().st_size for name in layout)
            raise self._no_space(needed, shutil.disk_usage(self.directory).free) from None

    @staticmethod
    def _reserve_file(path: Path) -> None:
        with open(path, "r+b") as file:
            try:
                os.posix_fallocate(file.fileno(), 0, os.fstat(file.fileno()).st_size)
            except OSError as error:  # a filesystem that cannot reserve: the free-space check stands
                if error.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                    raise

    def _no_space(self, needed: int, free: int) -> OSError:
        return OSError(
            errno.ENOSPC,
            f"The teacher cache needs {needed:,} bytes in {self.directory} but its filesystem has "
            f"{free:,} bytes free. Give TeacherOutputCache another directory, or store less per sample: "
            "top_k (e.g. top_k=5 keeps 5 logits of each sample) or dtype='float16' (half the bytes).",
        )

    def _write_meta(self, complete: bool) -> None:
        meta = {"format": FORMAT_VERSION, "fingerprint": self.fingerprint, "complete": complete}
        meta["bytes_per_sample"] = sum(
            math.prod(shape[1:]) * np.dtype(dtype).itemsize for dtype, shape in self._spec.values()
        )
        temporary = self.directory / "meta.json.tmp"
        temporary.write_text(json.dumps(meta, indent=1))
        os.replace(temporary, self.directory / "meta.json")

    def _map(self, layout: dict[str, Any], mode: str) -> None:
        """Memory-map every file: ``"r+"`` to write, ``"c"`` (copy-on-write, opened read-only) to read."""
        self._memmaps = [
            np.lib.format.open_memmap(self.directory / f"{name}.npy", mode=mode) for name in layout
        ]
        self.arrays = {
            name: torch.from_numpy(array) for name, array in zip(layout, self._memmaps, strict=True)
        }
