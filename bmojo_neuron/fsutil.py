"""Durable writes: fsync helpers, atomic text replace and directory publish (no torch, so the cache CLI stays fast).

Checkpoints (`bmojo_neuron.checkpoints`) and the compile cache
(`bmojo_neuron.compile_cache`) both build a folder aside, flush it, then rename it
into place, so a crash leaves either the old state or the new one.
"""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from pathlib import Path

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def fsync_dir(path: Path) -> None:
    """Persist a directory's entries (renames, new files); a no-op where unsupported."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """fsync every file under `path`, then the directories themselves."""
    for root, _dirs, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(Path(root))


def write_text_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` in one rename; readers see the old or the new content."""
    tmp = path.with_name(f".tmp-{path.name}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def publish_dir(tmp: Path, target: Path) -> None:
    """Move the complete directory `tmp` to `target`, replacing an existing one.

    A non-empty directory cannot be replaced by `os.replace`, so an old `target` is
    first renamed aside (to a ``.trash-`` name) and deleted after the new one is in place.
    """
    fsync_tree(tmp)
    trash = None
    if target.exists():
        trash = target.with_name(f".trash-{target.name}-{uuid.uuid4().hex[:8]}")
        os.replace(target, trash)
    os.replace(tmp, target)
    fsync_dir(target.parent)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


def nearest_existing(path: Path) -> Path:
    """`path` if it exists, else the nearest path above it that does: where a file in the way would be (the OS
    names one only as "File exists" / "Not a directory")."""
    return next(p for p in [path, *path.parents] if p.exists())


def unwritable_reason(path: Path) -> str | None:
    """Why a folder could not be made or filled at `path`, checked without creating anything (a dry run, or a
    check before long work): the nearest part of it that exists must be a folder this process may write
    into. None when it could."""
    existing = nearest_existing(path)
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not a writable folder"
    return None


def file_in_the_way(folder: Path) -> str | None:
    """Why no folder can be at `folder` because a file stands there or above it ("is a file", "cannot be made:
    <file> is a file"), or None. Creates nothing, so a command asks it before torch loads."""
    blocker = nearest_existing(folder)
    if blocker.is_dir():
        return None
    return "is a file" if blocker == folder else f"cannot be made: {blocker} is a file"


def check_new_output(output: Path, overwrite: bool) -> None:
    """ValueError when the folder `output` (a command's OUTPUT) cannot receive a new model: a file is in the way
    (at it or above it), or it holds files and `overwrite` (``--overwrite``) is not given. Reads the file system
    only, so a command asks it before torch loads."""
    problem = file_in_the_way(output)
    if problem:
        raise ValueError(f"OUTPUT {output} {problem}, not a folder; give a folder's path")
    if output.exists() and any(output.iterdir()) and not overwrite:
        raise ValueError(f"OUTPUT {output} exists and is not empty; pass --overwrite to replace it")


def disk_full_cause(exc: BaseException) -> OSError | None:
    """The "no space left" / "quota exceeded" OSError behind `exc`, if any.

    Writers wrap it: torch.save's zip writer, for one, raises a RuntimeError about file
    positions while handling the OSError, so the chain of causes is searched.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, OSError) and current.errno in DISK_FULL:
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None
