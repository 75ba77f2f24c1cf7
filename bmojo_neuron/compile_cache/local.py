"""A compile cache on a local (or shared POSIX) filesystem: list, lock, install and remove entries safely.

Many processes may use one cache at once: the Neuron compiler of every rank, and
our own pulls and prunes. The rules here:

- An entry appears or disappears in one rename. `install` renames a fully written
  staging folder into place (never over an existing entry); `remove` renames the
  entry to a trash name first and deletes that, so a reader sees the whole entry
  or none of it.
- Our writers of one entry serialise on an ``fcntl`` lock file under
  ``<cache>/.bmojo-locks/``. Correctness does not depend on it (the renames are
  atomic on their own); it keeps N ranks from downloading the same entry N times.
- We never remove an entry another process may be writing: see `busy_reason`.
- The cache as a whole has a shared/exclusive lock (`use`, `maintain`): precompiles, pulls
  and Neuron training runs use it together; a prune runs alone, and is refused, naming
  them, while any of them is live.

Everything we create besides entries starts with ``.bmojo-`` and is ignored by the
layout (which only reads ``neuronxcc-*/MODULE_*``).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import shutil
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from bmojo_neuron.compile_cache.layout import Entry, group_entries, is_module_name, is_version_name
from bmojo_neuron.fsutil import fsync_dir, fsync_tree
from bmojo_neuron.locking import DirectoryLock

LOCK_DIR = ".bmojo-locks"
CACHE_LOCK = f"{LOCK_DIR}/cache.lock"
# How long a user of the cache waits for a prune to finish (a prune renames and deletes: seconds).
USE_WAIT_SECONDS = 300
STAGING_PREFIX = ".bmojo-tmp-"
TRASH_PREFIX = ".bmojo-trash-"
# An entry with a file written this recently may still be being written (HLO extraction, a NEFF).
QUIET_SECONDS = 10 * 60
# A Neuron lock file older than this is taken to be left behind by a killed compile.
STALE_LOCK_SECONDS = 24 * 3600
# A staging folder this old belongs to a pull that died; a live pull holds the entry lock meanwhile.
STALE_STAGING_SECONDS = 24 * 3600

_LOCK_UNSUPPORTED = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL)


class LocalCache:
    """The cache rooted at `root` (``<root>/neuronxcc-*/MODULE_*/...``)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root).expanduser()
        self._warned_no_lock = False

    def __str__(self) -> str:
        return str(self.root)

    # ---------------------------------------------------------------- reading
    def entries(self) -> list[Entry]:
        """Every entry with its files; FileNotFoundError when the cache folder does not exist."""
        if not self.root.is_dir():
            what = "is a file, not a folder" if self.root.exists() else "does not exist"
            raise FileNotFoundError(f"compile cache {self.root} {what}")
        return group_entries(self._listing(), lambda v, m: str(self.root / v / m))

    def entry(self, version: str, module: str) -> Entry | None:
        folder = self.root / version / module
        files = list(_files_under(folder, f"{version}/{module}/"))
        if not files and not folder.is_dir():
            return None
        found = group_entries([(f"{version}/{module}/", 0, _mtime(folder)), *files], lambda v, m: str(folder))
        return found[0]

    def _listing(self) -> Iterator[tuple[str, int, float]]:
        for version in _subdirs(self.root):
            if not is_version_name(version):
                continue
            for module in _subdirs(self.root / version):
                if not is_module_name(module):
                    continue
                yield f"{version}/{module}/", 0, _mtime(self.root / version / module)  # listed even when empty
                yield from _files_under(self.root / version / module, f"{version}/{module}/")

    # ---------------------------------------------------------------- whole-cache lock
    def use(self, purpose: str) -> DirectoryLock:
        """The shared lock of a process that adds to or reads the cache (precompile, pull, a Neuron run).

        Many may hold it at once; it waits up to USE_WAIT_SECONDS for a running prune.
        """
        return DirectoryLock(self.root, "compile cache", lock_file=CACHE_LOCK, shared=True, purpose=purpose,
                             wait=USE_WAIT_SECONDS)

    def maintain(self, purpose: str) -> DirectoryLock:
        """The exclusive lock of a prune: refused at once, naming the users, while any process uses the cache."""
        return DirectoryLock(self.root, "compile cache", lock_file=CACHE_LOCK, purpose=purpose)

    # ---------------------------------------------------------------- safety
    def busy_reason(self, entry: Entry, now: float | None = None, check_lock: bool = True) -> str | None:
        """Why `entry` may be in use by a writer right now, or None when it is safe to remove or replace.

        Busy: a Neuron ``*.lock`` file younger than STALE_LOCK_SECONDS (a compile holds it),
        any file modified in the last QUIET_SECONDS, or (with `check_lock`) our own entry
        lock held by another bmojo-neuron process. Pass ``check_lock=False`` while
        holding that lock yourself.
        """
        now = time.time() if now is None else now
        fresh_locks = [f.name for f in entry.locks if now - f.mtime < STALE_LOCK_SECONDS]
        if fresh_locks:
            return f"lock file {fresh_locks[0]} (a compile may be running)"
        if now - entry.mtime < QUIET_SECONDS:
            return f"modified {int(now - entry.mtime)} s ago (still being written?)"
        if check_lock:
            with self.entry_lock(entry.version, entry.module, blocking=False) as acquired:
                if not acquired:
                    return "another bmojo-neuron process holds its lock"
        return None

    @contextmanager
    def entry_lock(self, version: str, module: str, blocking: bool = True) -> Iterator[bool]:
        """Hold our ``fcntl`` lock of one entry; yields False when `blocking` is False and another holds it.

        On a filesystem without ``flock`` support (e.g. Lustre mounted without the
        ``flock`` option) this warns once and yields True: the atomic renames still keep
        the cache consistent, only duplicate downloads are no longer prevented.
        """
        lock_dir = self.root / LOCK_DIR
        lock_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_dir / f"{version}__{module}.lock", os.O_RDWR | os.O_CREAT, 0o666)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                acquired = False
            except OSError as exc:
                if exc.errno not in _LOCK_UNSUPPORTED:
                    raise
                self._warn_no_lock(exc)
                acquired = True
            else:
                acquired = True
            yield acquired
        finally:
            os.close(fd)  # closing releases the lock

    def _warn_no_lock(self, exc: OSError) -> None:
        if not self._warned_no_lock:
            print(f"warning: {self.root} does not support file locks ({exc.strerror}); continuing without them",
                  file=sys.stderr)
            self._warned_no_lock = True

    # ---------------------------------------------------------------- writing
    def new_staging_dir(self, version: str, module: str) -> Path:
        """An empty folder next to where the entry goes (same filesystem, so the final rename is atomic)."""
        parent = self.root / version
        parent.mkdir(parents=True, exist_ok=True)
        staging = parent / f"{STAGING_PREFIX}{module}-{uuid.uuid4().hex[:12]}"
        staging.mkdir()  # plain mkdir: the umask applies, as for the compiler's own folders
        return staging

    def install(self, staging: Path, version: str, module: str) -> bool:
        """Rename a complete staging folder into place; False (staging untouched) when the entry exists."""
        fsync_tree(staging)
        installed = rename_noreplace(staging, self.root / version / module)
        if installed:
            fsync_dir(self.root / version)
        return installed

    def remove(self, entry: Entry) -> None:
        """Delete an entry: rename it out of the layout first, so readers never see half of it."""
        folder = self.root / entry.version / entry.module
        trash = folder.parent / f"{TRASH_PREFIX}{entry.module}-{uuid.uuid4().hex[:12]}"
        os.rename(folder, trash)
        shutil.rmtree(trash, ignore_errors=True)  # leftovers are swept by clean_leftovers

    def clean_leftovers(self, now: float | None = None) -> list[Path]:
        """Remove trash folders (any age) and staging folders of dead pulls; returns what was removed."""
        now = time.time() if now is None else now
        removed = []
        if not self.root.is_dir():
            return removed
        for version in _subdirs(self.root):
            for name in _subdirs(self.root / version):
                path = self.root / version / name
                stale_staging = name.startswith(STAGING_PREFIX) and now - _mtime(path) > STALE_STAGING_SECONDS
                if name.startswith(TRASH_PREFIX) or stale_staging:
                    shutil.rmtree(path, ignore_errors=True)
                    removed.append(path)
        return removed


# ------------------------------------------------------------------- helpers
def _subdirs(folder: Path) -> list[str]:
    try:
        with os.scandir(folder) as it:
            return sorted(e.name for e in it if e.is_dir(follow_symlinks=False))
    except (FileNotFoundError, NotADirectoryError):
        return []


def _files_under(folder: Path, prefix: str) -> Iterator[tuple[str, int, float]]:
    """(prefix + relative path, size, mtime) of every file below `folder`; tolerates concurrent removal."""
    for dirpath, _, filenames in os.walk(folder):
        rel = os.path.relpath(dirpath, folder)
        for name in filenames:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except FileNotFoundError:
                continue
            relname = name if rel == "." else f"{rel}/{name}"
            yield prefix + relname.replace(os.sep, "/"), st.st_size, st.st_mtime


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return time.time()


_AT_FDCWD = -100
_RENAME_NOREPLACE = 1


def _load_renameat2():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    except OSError:
        return None


_renameat2 = _load_renameat2()


def rename_noreplace(src: Path, dst: Path) -> bool:
    """Rename `src` to `dst` unless `dst` exists (returns False then, `src` untouched).

    Atomic with Linux ``renameat2(RENAME_NOREPLACE)``. Where the kernel or filesystem
    lacks it, an existence check precedes a plain rename, which can only lose a race
    against a folder created empty in between (POSIX rename replaces an empty folder).
    """
    if _renameat2 is not None:
        if _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return True
        err = ctypes.get_errno()
        if err in (errno.EEXIST, errno.ENOTEMPTY):
            return False
        if err not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise OSError(err, os.strerror(err), str(dst))
    if os.path.lexists(dst):
        return False
    try:
        os.rename(src, dst)
    except OSError as exc:
        if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
            return False
        raise
    return True
