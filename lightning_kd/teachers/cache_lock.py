"""One writer per store directory (teacher cache, top-k token store): a ``fcntl.flock`` naming its holder."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

__all__ = ["CacheDirectoryLock"]


class CacheDirectoryLock:
    """``fcntl.flock`` on ``<directory>/lock``: shared while a complete cache is read, else exclusive.

    One process holds one lock per directory (``_HELD``): a later cache object of the same
    process takes it over (fits in one process run one after another). The writer records its pid,
    host and start time in the file, so a refused process can name it.

    ``store`` names what the directory holds and ``own_directory`` how a run gets its own; the
    refusal's message says both (default: the classification :class:`~lightning_kd.TeacherOutputCache`).
    """

    def __init__(
        self,
        path: Path,
        descriptor: int,
        store: str = "teacher cache",
        own_directory: str = "TeacherOutputCache(directory=...)",
    ) -> None:
        self.path, self.descriptor, self.exclusive, self.owner = path, descriptor, False, None
        self.store, self.own_directory = store, own_directory
        self.pid = os.getpid()  # a forked child inherits the registry, not the right to the lock

    @classmethod
    def shared(
        cls,
        directory: Path,
        writable: bool,
        store: str = "teacher cache",
        own_directory: str = "TeacherOutputCache(directory=...)",
    ) -> CacheDirectoryLock | None:
        """A shared lock on ``directory`` (``None``: read-only and never locked, so nothing writes there).

        ``store`` and ``own_directory``: the refusal's wording (see the class docstring).
        """
        path = directory / "lock"
        key = os.path.realpath(path)
        if key in _HELD and _HELD[key].pid == os.getpid():
            return _HELD[key]
        try:
            descriptor = os.open(path, os.O_RDWR | os.O_CREAT if writable else os.O_RDONLY, 0o644)
        except FileNotFoundError:
            return None
        lock = cls(path, descriptor, store, own_directory)
        lock._flock(fcntl.LOCK_SH)
        _HELD[key] = lock
        return lock

    def make_exclusive(self) -> None:
        """Upgrade to the writer's exclusive lock and record this process as the writer."""
        if not self.exclusive:
            self._flock(fcntl.LOCK_EX)
            self.exclusive = True
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        os.ftruncate(self.descriptor, 0)
        os.pwrite(self.descriptor, json.dumps(holder).encode(), 0)

    def _flock(self, operation: int) -> None:
        try:
            fcntl.flock(self.descriptor, operation | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self.holder()
            self.release()  # a failed upgrade has dropped the shared lock as well
            raise RuntimeError(
                f"The {self.store} directory {self.path.parent} is in use by another process ({holder}). "
                f"Two runs cannot build one {self.store} at the same time: wait for the other run to "
                f"finish, or give this run its own directory ({self.own_directory})."
            ) from None

    def holder(self) -> str:
        """Who holds the lock, as its last writer recorded it."""
        try:
            found = json.loads(os.pread(self.descriptor, 4096, 0) or b"null")
            return f"pid {found['pid']} on host {found['host']}, writing since {found['since']}"
        except (ValueError, TypeError, KeyError):
            return f"a run reading the complete {self.store}"

    def release(self) -> None:
        """Unlock (a writer first clears its record) and close the lock file."""
        if self.exclusive:
            os.ftruncate(self.descriptor, 0)
        _HELD.pop(os.path.realpath(self.path), None)
        os.close(self.descriptor)


#: the directory locks this process holds, by the lock file's real path
_HELD: dict[str, CacheDirectoryLock] = {}
