"""Whether a local cache folder is on a network filesystem that several instances would share.

Neuron's training troubleshooting guide (aws-neuron-sdk 3c46990d,
frameworks/torch/torch-neuronx/training-troubleshooting.rst lines 198-207) warns that a
compile cache folder on an NFS drive shared by several instances can fail multi-instance
training (file not found, corruption, KeyError: file locking is limited on NFS, and
"EFS/FSx also exhibit similar limitation") and asks for one cache root per instance. A
multi-node run given one path on such a filesystem would put every node in one folder, so
`bmojo-neuron precompile --nodes N` and a multi-node Trainium `train` refuse it, unless a
folder of the path is the host's name, the guide's own per-instance layout
(docs/compile-cache.md, Multi-node).

The filesystem is read from /proc/self/mountinfo (Linux, proc(5)): the mount whose mount
point is the longest whole-component prefix of the folder. EFS and FSx for ONTAP / OpenZFS
mount as ``nfs4``, FSx for Lustre as ``lustre``, SMB shares (FSx for Windows, FSx for ONTAP
over SMB) as ``cifs`` or ``smb3``. A FUSE filesystem shows as ``fuse.<subtype>`` (or
``fuse`` with the daemon's name as the mount source, when it sets no subtype), and the type
alone does not say where its files are, so the daemons are named: `NETWORK_FUSE` serve a
network store (refused), `LOCAL_FUSE` serve files of this machine. ``fuseblk`` is local: the
kernel registers it with ``FS_REQUIRES_DEV`` (Linux fs/fuse/inode.c, ``fuseblk_fs_type``), so
it always mounts a block device here (ntfs-3g, exfat-fuse).

Some filesystems may or may not be one folder for all nodes, and get a warning, not a refusal
(`Sharing.MAYBE`): a FUSE daemon on neither list, and the host-to-guest shares ``9p`` (QEMU's
virtfs, WSL2's Windows drives) and ``virtiofs`` (a host folder in a VM; a Kata Containers pod's
root filesystem). Guests of one host may mount the same host folder, but a container's own
``/var/tmp`` on them is its own, so refusing them would refuse Neuron's default cache folder
there.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import NamedTuple

from bmojo_neuron.compile_cache.location import is_s3

MOUNTINFO = Path("/proc/self/mountinfo")
# Kernel filesystems whose files live on a server other instances mount too.
NETWORK_FILESYSTEMS = frozenset({"nfs", "nfs4", "lustre", "cifs", "smb3", "smbfs", "ceph", "gpfs", "beegfs", "afs"})
# FUSE daemons that serve a network store: SSH, object stores (S3, GCS, Azure Blob), and cluster filesystems.
NETWORK_FUSE = frozenset({"sshfs", "s3fs", "mountpoint-s3", "goofys", "rclone", "gcsfuse", "blobfuse",
                          "blobfuse2", "juicefs", "ceph-fuse", "glusterfs"})
# FUSE daemons whose files are on this machine: the host's /proc view for containers (lxcfs), a rootless
# container's root filesystem over local layers (fuse-overlayfs), a squashfs image file (squashfuse).
LOCAL_FUSE = frozenset({"lxcfs", "fuse-overlayfs", "squashfuse"})
# A folder of the host shared into a VM or container sandbox (see the module docstring).
HOST_SHARES = frozenset({"9p", "virtiofs"})


class Sharing:
    """Whether a mount's folder may be one folder for several instances."""

    NETWORK = "network"  # a network store: every node that mounts it sees one folder
    MAYBE = "maybe"  # cannot tell from the mount table: an unknown FUSE daemon, a host-to-guest share
    LOCAL = "local"


class Mount(NamedTuple):
    point: str
    fs_type: str  # mountinfo's filesystem type: "ext4", "nfs4", "fuse.s3fs", ...
    source: str  # mountinfo's mount source: a device, "server:/export", a FUSE daemon's name

    def sharing(self) -> str:
        """`Sharing.NETWORK`, `Sharing.MAYBE` or `Sharing.LOCAL` (the module docstring says which is which)."""
        if self.fs_type in NETWORK_FILESYSTEMS:
            return Sharing.NETWORK
        if self.fs_type in HOST_SHARES:
            return Sharing.MAYBE
        kind, _, subtype = self.fs_type.partition(".")
        if kind != "fuse":  # fuseblk (a block device here) and every other kernel filesystem
            return Sharing.LOCAL
        daemon = subtype or self.source
        return (Sharing.NETWORK if daemon in NETWORK_FUSE else Sharing.LOCAL if daemon in LOCAL_FUSE
                else Sharing.MAYBE)

    def describe(self) -> str:
        """The type as messages name it: ``fuse (<daemon>)`` for a FUSE mount without a subtype."""
        return f"fuse ({self.source})" if self.fs_type == "fuse" else self.fs_type


def _unescape(field: str) -> str:
    r"""mountinfo writes space, tab, newline and backslash in paths as octal escapes (``\040`` ...)."""
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def _mounts(mountinfo: str) -> list[Mount]:
    """Every line's mount: its 5th field, and the two fields after the ``-`` (type and source)."""
    mounts = []
    for line in mountinfo.splitlines():
        fields = line.split()
        if "-" not in fields[6:] or len(fields) < fields.index("-", 6) + 3:
            continue
        dash = fields.index("-", 6)
        mounts.append(Mount(_unescape(fields[4]), fields[dash + 1], _unescape(fields[dash + 2])))
    return mounts


def mount_of(path: str | Path, mountinfo: str | None = None) -> Mount | None:
    """The mount that holds, or will hold, `path`; None when unknown.

    The path is made absolute with its existing symlinks resolved (`os.path.realpath`; a cache folder may not
    exist yet, and every mount point does), then matched against the mount points.
    """
    if mountinfo is None:
        try:
            mountinfo = MOUNTINFO.read_text()
        except OSError:  # not Linux, or no /proc: nothing to say
            return None
    folder = Path(os.path.realpath(Path(path).expanduser()))
    best: Mount | None = None
    for mount in _mounts(mountinfo):
        inside = folder == Path(mount.point) or Path(mount.point) in folder.parents
        # ">=": of two mounts on one point, the later line is the one mounted on top
        if inside and (best is None or len(mount.point) >= len(best.point)):
            best = mount
    return best


def filesystem_type(path: str | Path, mountinfo: str | None = None) -> str | None:
    """The type of the filesystem that holds, or will hold, `path`; None when unknown (`mount_of`)."""
    mount = mount_of(path, mountinfo)
    return mount.fs_type if mount else None


def names_this_host(path: str | Path, hostname: str | None = None) -> bool:
    """Whether a folder of `path` is this host's name (short or full), as in the guide's per-instance example
    ``--cache_dir=$HOME/neuron_cache/bert/`hostname``` (training-troubleshooting.rst line 207)."""
    host = socket.gethostname() if hostname is None else hostname
    return bool(host) and any(part in (host, host.split(".")[0]) for part in Path(path).parts)


def cache_sharing(path: str | Path, mountinfo: str | None = None) -> tuple[str, str]:
    """(`Sharing` value, filesystem as messages name it) of the folder that holds, or will hold, `path`;
    (``local``, ``unknown``) when the mount table cannot be read. `infra/slurm/train.sbatch` asks this."""
    mount = mount_of(path, mountinfo)
    return (mount.sharing(), mount.describe()) if mount else (Sharing.LOCAL, "unknown")


def _checked_mount(cache_dir: str, nodes: int, mountinfo: str | None, hostname: str | None) -> Mount | None:
    """The mount of `cache_dir` when a shared folder would matter: several nodes, a path (not ``s3://``) and no
    folder of it named after this host (the guide's per-instance layout); otherwise None."""
    if nodes <= 1 or is_s3(cache_dir) or names_this_host(cache_dir, hostname):
        return None
    return mount_of(cache_dir, mountinfo)


def shared_cache_problem(cache_dir: str, nodes: int, mountinfo: str | None = None,
                         hostname: str | None = None) -> str | None:
    """Why `cache_dir` cannot serve a run on `nodes` nodes, or None: one folder on a network filesystem.

    A folder named after this host is the guide's own workaround (one folder per instance) and passes, and
    so does an ``s3://`` cache (each node's compiler reads and writes the bucket; no shared folder).
    """
    mount = _checked_mount(cache_dir, nodes, mountinfo, hostname)
    if mount is None or mount.sharing() != Sharing.NETWORK:
        return None
    return (f"the compile cache {cache_dir} is on {mount.describe()}, so all {nodes} nodes would share one cache "
            "folder, which Neuron's training troubleshooting guide warns fails multi-instance runs (file locking "
            "over NFS/EFS/FSx); give each node a local cache (the default /var/tmp/neuron-compile-cache) and "
            "share the compiled graphs with `bmojo-neuron cache push/pull`, or name a folder of the path after "
            "the host, e.g. .../$(hostname) (docs/compile-cache.md, Multi-node)")


def shared_cache_doubt(cache_dir: str, nodes: int, mountinfo: str | None = None,
                       hostname: str | None = None) -> str | None:
    """A warning when `cache_dir` may be one folder for all `nodes` nodes (`Sharing.MAYBE`), or None.

    Not a refusal: these filesystems are often a container's or VM's own (module docstring).
    """
    mount = _checked_mount(cache_dir, nodes, mountinfo, hostname)
    if mount is None or mount.sharing() != Sharing.MAYBE:
        return None
    what = ("a host folder shared into this VM or container" if mount.fs_type in HOST_SHARES
            else "a FUSE filesystem whose daemon is not known to be local or networked")
    return (f"the compile cache {cache_dir} is on {mount.describe()}, {what}: if the {nodes} nodes see one "
            "folder there, Neuron's training troubleshooting guide warns that multi-instance runs fail; a cache "
            "on each node's own disk (the default /var/tmp/neuron-compile-cache) or a folder of the path named "
            "after the host (.../$(hostname)) is safe (docs/compile-cache.md, Multi-node)")
