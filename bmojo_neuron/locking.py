"""Locks on directories that several processes may write: run directories and the compile cache.

A lock is an ``flock`` on a lock file. The kernel drops it when the holder exits, however it
exits, so a lock left by a dead process is free to take without any guessing from pids; the
files only record who holds a lock so that a refused process can name the holder.

Two modes:

- exclusive (`DirectoryLock`, the default): one holder, e.g. the `train` of a run directory,
  or a `cache prune`;
- shared (``shared=True``): any number of users at once, none while an exclusive holder has
  it, e.g. the precompiles, pulls and Neuron training runs of one compile cache. Each shared
  holder also keeps an exclusive lock on a file of its own under ``<lock file>.users/``, which
  is how the exclusive side can tell live users (named in its error) from files left by dead
  ones (deleted).

An exclusive holder may delete the lock file as it releases it (``leave_no_trace``, for a run
directory its run never wrote). It deletes it while still holding the lock, and `acquire` checks,
once it has the lock, that the file it locked is still the one at the path (else it locks that
one), so a process that opened the old file meanwhile never ends up holding a deleted file beside
a holder of the new one.
"""
from __future__ import annotations

import errno
import fcntl
import os
import socket
import sys
import time
import uuid
from pathlib import Path
from typing import IO

LOCK_NAME = ".lock"
OPEN_TRIES = 5  # a directory removed between our mkdir and open each time this often is not a race: fail
USERS_SUFFIX = ".users"
# errno of a filesystem without flock (e.g. Lustre mounted without the flock option)
LOCK_UNSUPPORTED = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL)


class DirectoryLocked(ValueError):
    """Another live process holds the lock on this directory."""


def holder_text(purpose: str = "") -> str:
    """How a lock file names its holder: ``pid 123 on host node-1 (precompile)``."""
    return f"pid {os.getpid()} on host {socket.gethostname()}" + (f" ({purpose})" if purpose else "")


class DirectoryLock:
    """Hold a lock on ``directory`` between ``acquire`` and ``release`` (or as a context).

    `lock_file` (relative to `directory`, default ``.lock``) is the file that is locked; `what`
    names the directory in errors ("run directory", "compile cache"); `purpose` is recorded with
    the holder's pid and host. ``shared=True`` takes a shared lock (see the module docstring);
    `wait` is how many seconds `acquire` keeps trying before it refuses. ``leave_no_trace=True``
    (exclusive only): `release` deletes the lock file when `directory` holds nothing else.
    """

    def __init__(self, directory: str | os.PathLike, what: str = "run directory", *, lock_file: str = LOCK_NAME,
                 shared: bool = False, purpose: str = "", wait: float = 0.0, leave_no_trace: bool = False) -> None:
        if shared and leave_no_trace:
            raise ValueError("only an exclusive lock may delete its lock file")
        self.directory = Path(directory)
        self.what, self.lock_file, self.shared, self.purpose, self.wait = what, lock_file, shared, purpose, wait
        self.leave_no_trace = leave_no_trace
        self._file: IO[str] | None = None
        self._user_file: IO[str] | None = None

    @property
    def path(self) -> Path:
        return self.directory / self.lock_file

    @property
    def users_dir(self) -> Path:
        return self.path.with_name(self.path.name + USERS_SUFFIX)

    def acquire(self) -> DirectoryLock:
        deadline, waited = time.monotonic() + self.wait, False
        while True:
            f = self._open()
            try:
                fcntl.flock(f, (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
            except BlockingIOError:
                if time.monotonic() < deadline:
                    if not waited:
                        print(f"waiting up to {self.wait:.0f} s for {'; '.join(self._holders(f)) or 'another process'}"
                              f" to release {self.directory}", file=sys.stderr, flush=True)
                        waited = True
                    f.close()
                    time.sleep(0.2)
                    continue
                holders = self._holders(f)
                f.close()
                raise DirectoryLocked(
                    f"{self.directory} is in use by {'; '.join(holders) or 'an unknown process'}; wait for it to "
                    f"finish, stop it, or pick another {self.what}") from None
            except OSError as exc:
                f.close()
                if exc.errno not in LOCK_UNSUPPORTED:
                    raise
                print(f"warning: {self.path.parent} does not support file locks ({exc.strerror}); nothing keeps "
                      f"a second process out of this {self.what}", file=sys.stderr)
                return self
            if self._still_at_path(f):
                break
            f.close()  # its holder deleted it as it released it (`leave_no_trace`): lock the file now at the path
        self._file = f
        f.seek(0)
        f.truncate()  # shared: an exclusive holder's leftover line (it was killed) no longer applies
        if self.shared:
            self._register_user()
        else:
            f.write(holder_text(self.purpose) + "\n")
            f.flush()
            self._remove_dead_users()
        return self

    def _open(self) -> IO[str]:
        """The lock file, opened (created if missing) for reading and appending."""
        for _ in range(OPEN_TRIES - 1):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                return open(self.path, "a+")
            except FileNotFoundError:  # the directory was removed since mkdir (a `leave_no_trace` holder's): again
                continue
        self.path.parent.mkdir(parents=True, exist_ok=True)
        return open(self.path, "a+")

    def _still_at_path(self, f: IO[str]) -> bool:
        """Whether the file `f` locked is still the one at the lock's path."""
        try:
            at_path = os.stat(self.path)
        except FileNotFoundError:
            return False
        held = os.fstat(f.fileno())
        return (held.st_dev, held.st_ino) == (at_path.st_dev, at_path.st_ino)

    def release(self) -> None:
        if self._file is not None and self.leave_no_trace and self._alone():
            self.path.unlink(missing_ok=True)  # still locked: see the module docstring
        if self._user_file is not None:
            Path(self._user_file.name).unlink(missing_ok=True)
            self._user_file.close()
            self._user_file = None
        if self._file is not None:
            if not self.shared:
                self._file.truncate(0)
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None

    def _alone(self) -> bool:
        """Whether the lock file is all there is in the directory."""
        try:
            return [entry.name for entry in self.directory.iterdir()] == [self.lock_file]
        except OSError:
            return False

    def __enter__(self) -> DirectoryLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    # ------------------------------------------------------------------ holders
    def _holders(self, f: IO[str]) -> list[str]:
        """Who holds the lock: the exclusive holder's line, else the live shared users."""
        f.seek(0)
        exclusive = f.read().strip()
        return [exclusive] if exclusive else self.live_users()

    def live_users(self) -> list[str]:
        """The recorded holders of shared locks still alive (their user file is locked)."""
        users = []
        for path in sorted(self.users_dir.glob("*")) if self.users_dir.is_dir() else []:
            if self._user_file is not None and path.name == Path(self._user_file.name).name:
                continue
            alive, text = _probe_user(path)
            if alive:
                users.append(text or "an unknown process")
        return users

    def _register_user(self) -> None:
        self.users_dir.mkdir(exist_ok=True)
        path = self.users_dir / f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        user = open(path, "w")
        fcntl.flock(user, fcntl.LOCK_EX)  # nobody else opens this name: never blocks
        user.write(holder_text(self.purpose) + "\n")
        user.flush()
        self._user_file = user

    def _remove_dead_users(self) -> None:
        """Holding the lock exclusively, every user file is a dead process's leftover."""
        if self.users_dir.is_dir():
            for path in self.users_dir.glob("*"):
                path.unlink(missing_ok=True)


def exclusive_holder(directory: str | os.PathLike, lock_file: str = LOCK_NAME) -> str | None:
    """Who holds `directory`'s exclusive lock now (``pid 123 on host node-1``), or None; writes nothing.

    For a dry run, which must neither create the lock file nor record itself in it: a shared probe of the
    existing file, dropped at once, fails only while an exclusive holder has it.
    """
    try:
        with open(Path(directory) / lock_file) as f:
            try:
                fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return f.read().strip() or "an unknown process"
            except OSError as exc:
                if exc.errno in LOCK_UNSUPPORTED:
                    return None
                raise
            return None
    except (FileNotFoundError, NotADirectoryError):
        return None


def _probe_user(path: Path) -> tuple[bool, str]:
    """(whether the shared user that wrote `path` is alive, what it recorded)."""
    try:
        with open(path) as f:
            text = f.read().strip()
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True, text
            return False, text
    except FileNotFoundError:
        return False, ""
