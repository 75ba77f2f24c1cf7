"""Exclusive locks on directories that one process at a time may write (run directories).

The lock is an ``flock`` on a ``.lock`` file inside the directory. The kernel drops it when the
holder exits, however it exits, so a lock left by a dead process is free to take without any
guessing from pids; the file only records who holds it so that the refused process can say so.
"""
from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path
from typing import IO

LOCK_NAME = ".lock"


class DirectoryLocked(ValueError):
    """Another live process holds the lock on this directory."""


class DirectoryLock:
    """Hold an exclusive lock on ``directory`` between ``acquire`` and ``release`` (or as a context)."""

    def __init__(self, directory: str | os.PathLike, what: str = "run directory") -> None:
        self.directory = Path(directory)
        self.what = what
        self._file: IO[str] | None = None

    @property
    def path(self) -> Path:
        return self.directory / LOCK_NAME

    def acquire(self) -> "DirectoryLock":
        self.directory.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "an unknown process"
            f.close()
            raise DirectoryLocked(
                f"{self.directory} is in use by {holder}; wait for it to finish, stop it, or pick another "
                f"{self.what}") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on host {socket.gethostname()}\n")
        f.flush()
        self._file = f
        return self

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None

    def __enter__(self) -> "DirectoryLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
