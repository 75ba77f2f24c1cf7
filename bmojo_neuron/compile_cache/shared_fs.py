"""Whether a local cache folder is on a network filesystem that several instances would share.

Neuron's training troubleshooting guide (aws-neuron-sdk 3c46990d,
frameworks/torch/torch-neuronx/training-troubleshooting.rst lines 198-207) warns that a
compile cache folder on an NFS drive shared by several instances can fail multi-instance
training (file not found, corruption, KeyError: file locking is limited on NFS, and
"EFS/FSx also exhibit similar limitation") and asks for one cache root per instance. A
multi-node run given one path on such a filesystem would put every node in one folder, so
`bmojo-neuron precompile --nodes N` refuses it, unless a folder of the path is the host's
name, the guide's own per-instance layout (docs/compile-cache.md, Multi-node).

The filesystem is read from /proc/self/mountinfo (Linux, proc(5)): the mount whose mount
point is the longest whole-component prefix of the folder. EFS and FSx for ONTAP / OpenZFS
mount as ``nfs4``, FSx for Lustre as ``lustre``.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from bmojo_neuron.compile_cache.location import is_s3

MOUNTINFO = Path("/proc/self/mountinfo")
NETWORK_FILESYSTEMS = ("nfs", "nfs4", "lustre")


def _unescape(field: str) -> str:
    r"""mountinfo writes space, tab, newline and backslash in paths as octal escapes (``\040`` ...)."""
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def _mounts(mountinfo: str) -> list[tuple[str, str]]:
    """(mount point, filesystem type) of every line: the 5th field, and the first field after the ``-``."""
    mounts = []
    for line in mountinfo.splitlines():
        fields = line.split()
        if "-" not in fields[6:]:
            continue
        dash = fields.index("-", 6)
        mounts.append((_unescape(fields[4]), fields[dash + 1]))
    return mounts


def filesystem_type(path: str | Path, mountinfo: str | None = None) -> str | None:
    """The type of the filesystem that holds, or will hold, `path`; None when unknown.

    The path is made absolute with its existing symlinks resolved (`os.path.realpath`; a cache folder may not
    exist yet, and every mount point does), then matched against the mount points.
    """
    if mountinfo is None:
        try:
            mountinfo = MOUNTINFO.read_text()
        except OSError:  # not Linux, or no /proc: nothing to say
            return None
    folder = Path(os.path.realpath(Path(path).expanduser()))
    best: tuple[int, str] | None = None
    for point, fs_type in _mounts(mountinfo):
        inside = folder == Path(point) or Path(point) in folder.parents
        if inside and (best is None or len(point) >= best[0]):  # later lines of an equal point mount over
            best = (len(point), fs_type)
    return best[1] if best else None


def names_this_host(path: str | Path, hostname: str | None = None) -> bool:
    """Whether a folder of `path` is this host's name (short or full), as in the guide's per-instance example
    ``--cache_dir=$HOME/neuron_cache/bert/`hostname``` (training-troubleshooting.rst line 207)."""
    host = socket.gethostname() if hostname is None else hostname
    return bool(host) and any(part in (host, host.split(".")[0]) for part in Path(path).parts)


def shared_cache_problem(cache_dir: str, nodes: int, mountinfo: str | None = None,
                         hostname: str | None = None) -> str | None:
    """Why `cache_dir` cannot serve a run on `nodes` nodes, or None: one folder on a network filesystem.

    A folder named after this host is the guide's own workaround (one folder per instance) and passes, and
    so does an ``s3://`` cache (each node's compiler reads and writes the bucket; no shared folder).
    """
    if nodes <= 1 or is_s3(cache_dir) or names_this_host(cache_dir, hostname):
        return None
    fs_type = filesystem_type(cache_dir, mountinfo)
    if fs_type not in NETWORK_FILESYSTEMS:
        return None
    return (f"the compile cache {cache_dir} is on {fs_type}, so all {nodes} nodes would share one cache folder, "
            "which Neuron's training troubleshooting guide warns fails multi-instance runs (file locking over "
            "NFS/EFS/FSx); give each node a local cache (the default /var/tmp/neuron-compile-cache) and share "
            "the compiled graphs with `bmojo-neuron cache push/pull`, or name a folder of the path after the "
            "host, e.g. .../$(hostname) (docs/compile-cache.md, Multi-node)")
