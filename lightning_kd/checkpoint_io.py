"""Checkpoint files: written atomically beside their target, checked against their CRC-32s when read.

Lightning's ``TorchCheckpointIO`` commits a checkpoint through an fsspec transaction whose
temporary file lives in the system temp dir and is moved with ``shutil.move``: when the
checkpoint directory is on another filesystem, that move is a copy into the target, so a kill
during it leaves a truncated (often 0-byte) ``last.ckpt``, and a killed run leaves its temporary
file behind in the temp dir. :class:`AtomicCheckpointIO` writes the temporary file in the
checkpoint's own directory, syncs it, renames it over the target (``os.replace``, atomic on one
filesystem) and syncs the directory; the target is always either the old or the new checkpoint.

``torch.save`` writes a zip archive whose every record carries the CRC-32 of its bytes
(``torch.utils.serialization.config.save.compute_crc32``, on by default), and ``torch.load`` does
not check them. :func:`checkpoint_problem` reads every record against its CRC-32, so flipped or
lost bytes anywhere in the file (tensors or pickled state) are reported before anything is loaded.
"""

from __future__ import annotations

import os
import re
import secrets
import socket
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

__all__ = [
    "AtomicCheckpointIO",
    "atomic_save",
    "checkpoint_problem",
    "earlier_checkpoints_hint",
    "remove_stale_temporaries",
    "use_atomic_checkpoint_io",
]

#: ``.<target name>.tmp-<host>-<pid>-<token>``: unique per save, and says which process wrote it
_TEMPORARY = re.compile(r"^\.(?P<target>.+)\.tmp-(?P<host>.+)-(?P<pid>\d+)-(?P<token>[0-9a-f]{8})$")
_HOST = socket.gethostname().replace("/", "_") or "localhost"
_READ_CHUNK = 1 << 24


def _temporary_path(target: Path) -> Path:
    return target.with_name(f".{target.name}.tmp-{_HOST}-{os.getpid()}-{secrets.token_hex(4)}")


def _process_is_alive(pid: int) -> bool:
    if os.name == "nt":  # signal 0 is not a probe there: never take a file for a dead process's
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, run by another user
        return True
    return True


def remove_stale_temporaries(directory: Path) -> list[Path]:
    """Delete the temporary files that killed saves on this host left in ``directory``; returns them.

    A file is removed only when its name says this host wrote it and the writing process is
    gone, so a save in progress elsewhere (another process, or another machine on a shared
    filesystem) keeps its file.
    """
    removed = []
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return removed
    for entry in entries:
        match = _TEMPORARY.match(entry.name)
        if match is None or match["host"] != _HOST:
            continue
        pid = int(match["pid"])
        if pid != os.getpid() and not _process_is_alive(pid):
            Path(entry.path).unlink(missing_ok=True)
            removed.append(Path(entry.path))
    return removed


def _fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable (POSIX; a no-op where directories cannot be opened)."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:  # some filesystems refuse fsync on a directory: the rename is still atomic
        pass
    finally:
        os.close(descriptor)


def atomic_save(obj: Any, path: str | Path, write: Callable[[Any, Any], None] = torch.save) -> None:
    """Write ``obj`` to ``path`` so that ``path`` holds either its old or its new content, never a part.

    ``write(obj, file)`` (default ``torch.save``) fills a temporary file beside ``path``
    (``.<name>.tmp-<host>-<pid>-<token>``); the file is flushed and synced, renamed over
    ``path`` with ``os.replace`` and the directory synced. On any error the temporary file is
    removed; temporary files of killed processes of this host are removed before each save.
    """
    target = Path(path)
    directory = target.parent
    directory.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(directory)
    temporary = _temporary_path(target)
    try:
        descriptor = os.open(
            temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666
        )
        with os.fdopen(descriptor, "wb") as file:
            write(obj, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_directory(directory)


def checkpoint_problem(path: str | Path) -> str | None:
    """What makes the file at ``path`` unloadable, or ``None`` if it is complete and intact.

    A ``torch.save`` zip archive is read record by record against the CRC-32 stored with each
    (records saved without one, ``compute_crc32=False``, are not checked); a file in the legacy
    pre-zip format has no checksums and is left to ``torch.load``. The answer reads as the end of
    "Cannot load checkpoint '...': ...", e.g. ``"it is empty (0 bytes)"``.
    """
    path = Path(path)
    if path.is_dir():
        return "it is a directory, not a checkpoint file"
    if not path.exists():
        return "it does not exist"
    size = path.stat().st_size
    if size == 0:
        return "it is empty (0 bytes), left by a save that was cut off"
    with path.open("rb") as file:
        head = file.read(4)
    if head[:1] == b"\x80":  # a pickle stream: torch's legacy format, which carries no checksums
        return None
    if head != b"PK\x03\x04":
        return f"it is truncated or not a checkpoint (a {size}-byte file that is no torch.save archive)"
    try:
        with zipfile.ZipFile(path) as archive:
            for record in archive.infolist():
                if record.CRC == 0 and record.file_size > 0:  # saved without checksums
                    continue
                with archive.open(record) as member:
                    while member.read(_READ_CHUNK):
                        pass
    except zipfile.BadZipFile as error:
        if "CRC" in str(error):
            return (
                f"its bytes changed after it was written ({error}: the file was damaged on disk or in a copy)"
            )
        return f"it is truncated or not a checkpoint ({error})"
    except (OSError, EOFError) as error:
        return f"it is truncated or not a checkpoint ({error})"
    return None


def earlier_checkpoints_hint(path: str | Path, limit: int = 3) -> str:
    """The other non-empty ``.ckpt`` files beside ``path`` (in it, for a folder) for an error message.

    Newest first, as ``", e.g. 'a.ckpt' in 'folder'"``; ``""`` if there are none.
    """
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    others = [
        p for p in folder.glob("*.ckpt") if p.name != path.name and p.is_file() and p.stat().st_size > 0
    ]
    if not others:
        return ""
    others.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    return f", e.g. {', '.join(repr(p.name) for p in others[:limit])} in {str(folder)!r}"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` with atomic local writes and checked reads.

    Local checkpoints are written with :func:`atomic_save` (temporary file in the checkpoint's
    own directory, never the system temp dir), and checked with :func:`checkpoint_problem`
    before they are loaded: a truncated, empty or damaged file raises a ``ValueError`` naming
    the file and an earlier checkpoint to use instead. Remote paths (``s3://``, ...) go through
    ``TorchCheckpointIO`` unchanged.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None
    ) -> None:
        """Write ``checkpoint`` to ``path`` atomically (see :func:`atomic_save`)."""
        fs, local_path = url_to_fs(str(path))
        if storage_options is not None or not isinstance(fs, LocalFileSystem):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        atomic_save(checkpoint, local_path)

    def load_checkpoint(
        self,
        path: _PATH,
        map_location: Any | None = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        """Check the file (see :func:`checkpoint_problem`), then load it as ``TorchCheckpointIO`` does.

        Raises:
            ValueError: the file is a directory, empty, truncated, not a checkpoint, or its bytes
                do not match their CRC-32s.
        """
        fs, local_path = url_to_fs(str(path))
        problem = (
            checkpoint_problem(local_path)
            if isinstance(fs, LocalFileSystem) and fs.exists(local_path)
            else None
        )
        if problem is not None:  # (a path that does not exist gets Lightning's own message)
            hint = earlier_checkpoints_hint(local_path)
            fix = (
                f"Pass a checkpoint file in it as ckpt_path (--ckpt_path){hint}."
                if Path(local_path).is_dir()
                else f"Pass an earlier checkpoint as ckpt_path (--ckpt_path){hint}, or run without it "
                "to start afresh."
            )
            raise ValueError(f"Cannot load checkpoint {str(path)!r}: {problem}. {fix}")
        return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)


def use_atomic_checkpoint_io(trainer: pl.Trainer) -> None:
    """Make :class:`AtomicCheckpointIO` the trainer's checkpoint IO where it has Lightning's default.

    Only a plain ``TorchCheckpointIO`` is replaced: a checkpoint IO the user chose (an
    ``AsyncCheckpointIO``, a cloud or XLA one, ...) is left alone; pass
    ``AsyncCheckpointIO(AtomicCheckpointIO())`` to have both. The training modules call this
    in ``setup``, before a checkpoint is read or written.
    """
    strategy = trainer.strategy
    if type(strategy.checkpoint_io) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()
