"""`compile_cache.shared_fs`: the filesystem of a cache folder, read from a mountinfo table (proc(5))."""

from __future__ import annotations

import pytest

from bmojo_neuron.compile_cache.shared_fs import (cache_sharing, filesystem_type, shared_cache_doubt,
                                                  shared_cache_problem)

# A trn1 node of ParallelCluster: root on ext4, FSx for Lustre at /fsx, the head node's /home over NFS, EFS over
# nfs4 at a path with a space (mountinfo escapes it as \040), and /fsx/local over-mounted by a local disk.
MOUNTINFO = "\n".join([
    "22 1 259:1 / / rw,relatime shared:1 - ext4 /dev/nvme0n1p1 rw,discard",
    "25 22 0:22 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw",
    "90 22 0:50 / /fsx rw,relatime shared:40 - lustre 10.0.0.5@tcp:/abcdef rw,flock,lazystatfs",
    "91 22 0:51 / /home rw,relatime shared:41 - nfs 10.0.0.9:/home rw,vers=3",
    r"92 22 0:52 / /mnt/efs\040cache rw,relatime shared:42 - nfs4 fs-1.efs.us-east-1.amazonaws.com:/ rw,vers=4.1",
    "93 90 259:2 / /fsx/local rw,relatime shared:43 - xfs /dev/nvme1n1 rw",
    "94 22 0:53 / /var/tmp/neuron-compile-cache rw,relatime shared:44 master:2 - ext4 /dev/nvme2n1 rw",
]) + "\n"
# Network filesystems other than NFS and Lustre, as mountinfo names them: SMB (FSx for Windows) through the
# kernel's cifs client under both of its type names, and FUSE daemons, with their subtype or (none set) with
# their name as the mount source; beside them local FUSE mounts that must not count.
OTHER_MOUNTS = "\n".join([
    "22 1 259:1 / / rw,relatime shared:1 - ext4 /dev/nvme0n1p1 rw",
    "100 22 0:60 / /mnt/smb rw,relatime shared:50 - cifs //fs-1.corp.example.com/share rw,vers=3.1.1",
    "101 22 0:61 / /mnt/smb3 rw,relatime shared:51 - smb3 //10.0.0.12/cache rw,vers=3.0",
    "102 22 0:62 / /mnt/s3fs rw,nosuid,nodev,relatime shared:52 - fuse.s3fs s3fs rw,user_id=0,group_id=0",
    "103 22 0:63 / /mnt/bucket rw,nosuid,nodev,relatime shared:53 - fuse.mountpoint-s3 mountpoint-s3 rw,user_id=0",
    "104 22 0:64 / /mnt/bucket2 rw,nosuid,nodev,relatime shared:54 - fuse mountpoint-s3 rw,user_id=0,group_id=0",
    "105 22 0:65 / /mnt/ssh rw,nosuid,nodev,relatime shared:55 - fuse.sshfs ubuntu@10.0.0.9:/data rw,user_id=0",
    "106 22 0:66 / /var/lib/lxcfs rw,nosuid,nodev,relatime shared:56 - fuse.lxcfs lxcfs rw,user_id=0",
    "107 22 8:17 / /mnt/usb rw,relatime shared:57 - fuseblk /dev/sdb1 rw,user_id=0,group_id=0,allow_other",
    "108 22 0:67 / /mnt/local-fuse rw,nosuid,nodev,relatime shared:58 - fuse myfs rw,user_id=0",
    "109 22 0:68 / /mnt/c rw,noatime shared:59 - 9p drvfs rw,aname=drvfs;path=C:\\;uid=1000;gid=1000",
    "110 22 0:69 / /run/kata rw,relatime shared:60 - virtiofs kataShared rw",
    "111 22 0:70 / /containers rw,nodev,relatime shared:61 - fuse.fuse-overlayfs fuse-overlayfs rw,user_id=0",
    "112 22 8:33 / /mnt/exfat rw,relatime shared:62 - fuseblk.exfat /dev/sdc1 rw,user_id=0",
]) + "\n"


@pytest.mark.parametrize("path, fs_type", [
    ("/fsx/neuron-compile-cache", "lustre"),  # need not exist: its nearest existing parent decides
    ("/fsx", "lustre"),
    ("/fsxother/cache", "ext4"),  # /fsx is a prefix of the string, not a parent folder
    ("/fsx/local/cache", "xfs"),  # the deepest mount wins
    ("/home/ubuntu/neuron_cache", "nfs"),
    ("/mnt/efs cache/x", "nfs4"),
    ("/var/tmp/neuron-compile-cache", "ext4"),
    ("relative/cache", "ext4"),  # made absolute from the working directory (under /, here)
])
def test_filesystem_type(path, fs_type, monkeypatch, tmp_path):
    monkeypatch.chdir("/")
    assert filesystem_type(path, MOUNTINFO) == fs_type


@pytest.mark.parametrize("path, nodes, refused", [
    ("/fsx/neuron-compile-cache", 4, True),
    ("/home/ubuntu/neuron_cache", 2, True),
    ("/mnt/efs cache/x", 2, True),
    ("/fsx/neuron-compile-cache", 1, False),  # one instance: its own folder
    ("/var/tmp/neuron-compile-cache", 4, False),
    ("/fsx/local/cache", 4, False),
])
def test_shared_cache_problem(path, nodes, refused):
    problem = shared_cache_problem(path, nodes, MOUNTINFO, hostname="trn1-st-trn1-1")
    assert (problem is not None) == refused
    if refused:
        assert problem.startswith(f"the compile cache {path} is on ") and f"all {nodes} nodes" in problem


@pytest.mark.parametrize("path, named", [
    ("/mnt/smb/neuron-cache", "cifs"),
    ("/mnt/smb3/neuron-cache", "smb3"),
    ("/mnt/s3fs/neuron-cache", "fuse.s3fs"),
    ("/mnt/bucket/neuron-cache", "fuse.mountpoint-s3"),
    ("/mnt/bucket2/neuron-cache", "fuse (mountpoint-s3)"),  # no subtype: the daemon's name is the source
    ("/mnt/ssh/neuron-cache", "fuse.sshfs"),
])
def test_smb_and_network_fuse_mounts_are_shared_filesystems(path, named):
    problem = shared_cache_problem(path, 2, OTHER_MOUNTS, hostname="trn1-st-trn1-1")
    assert problem is not None and problem.startswith(f"the compile cache {path} is on {named}, so all 2 nodes")
    assert shared_cache_problem(path, 1, OTHER_MOUNTS, hostname="trn1-st-trn1-1") is None


@pytest.mark.parametrize("path, sharing, named", [
    ("/var/lib/lxcfs/cache", "local", "fuse.lxcfs"),  # the host's /proc view for containers
    ("/containers/cache", "local", "fuse.fuse-overlayfs"),  # a rootless container's root filesystem
    ("/mnt/usb/cache", "local", "fuseblk"),  # ntfs-3g: fuseblk always mounts a block device of this machine
    ("/mnt/exfat/cache", "local", "fuseblk.exfat"),
    ("/opt/cache", "local", "ext4"),
    ("/mnt/local-fuse/cache", "maybe", "fuse (myfs)"),  # a daemon on neither list: the type does not say
    ("/mnt/c/cache", "maybe", "9p"),  # WSL2's Windows drive; QEMU's virtfs
    ("/run/kata/cache", "maybe", "virtiofs"),  # a host folder in a VM or a Kata pod
    ("/mnt/s3fs/cache", "network", "fuse.s3fs"),
])
def test_local_fuse_mounts_pass_and_undecidable_ones_get_a_warning(path, sharing, named):
    """Only a network store is refused; a filesystem that may or may not be one folder for all nodes gets a
    warning naming it (and not for one node, nor for a folder named after the host)."""
    assert cache_sharing(path, OTHER_MOUNTS) == (sharing, named)
    problem = shared_cache_problem(path, 4, OTHER_MOUNTS, hostname="trn1-st-trn1-1")
    doubt = shared_cache_doubt(path, 4, OTHER_MOUNTS, hostname="trn1-st-trn1-1")
    assert (problem is not None, doubt is not None) == (sharing == "network", sharing == "maybe")
    if doubt:
        assert doubt.startswith(f"the compile cache {path} is on {named}, ") and "if the 4 nodes see one" in doubt
        assert shared_cache_doubt(path, 1, OTHER_MOUNTS, hostname="h") is None
        assert shared_cache_doubt(f"{path}/trn1-st-trn1-1", 4, OTHER_MOUNTS, hostname="trn1-st-trn1-1") is None


def test_an_s3_cache_is_never_a_shared_folder(monkeypatch):
    """An s3:// URL is not a path: under a working directory on Lustre it would otherwise read as one there."""
    monkeypatch.chdir("/")
    on_lustre = "22 1 259:1 / / rw,relatime shared:1 - lustre 10.0.0.5@tcp:/fsx rw\n"
    assert shared_cache_problem("s3://bucket/neuron-cache", 4, on_lustre, hostname="h") is None
    assert shared_cache_problem("s3:/bucket/neuron-cache", 4, on_lustre, hostname="h") is not None


def test_unreadable_mountinfo_says_nothing(monkeypatch, tmp_path):
    import bmojo_neuron.compile_cache.shared_fs as shared_fs

    monkeypatch.setattr(shared_fs, "MOUNTINFO", tmp_path / "absent")
    assert filesystem_type("/fsx") is None and shared_cache_problem("/fsx", 4) is None


def test_the_deepest_mount_wins_whatever_the_line_order(monkeypatch):
    monkeypatch.chdir("/")
    reordered = "\n".join(reversed(MOUNTINFO.splitlines())) + "\n"
    assert filesystem_type("/fsx/local/cache", reordered) == "xfs"
    assert filesystem_type("/fsx/cache", reordered) == "lustre"
    assert filesystem_type("/opt/x", reordered) == "ext4"


@pytest.mark.parametrize("path, host", [
    ("/home/ubuntu/neuron_cache/bert/trn1-st-trn1-1", "trn1-st-trn1-1"),
    ("/home/ubuntu/neuron_cache/bert/trn1-st-trn1-1", "trn1-st-trn1-1.ec2.internal"),  # the short name
    ("/fsx/cache/trn1-st-trn1-1.ec2.internal/x", "trn1-st-trn1-1.ec2.internal"),
])
def test_a_folder_named_after_the_host_is_the_guides_per_instance_layout(path, host):
    """training-troubleshooting.rst:207: --cache_dir=$HOME/neuron_cache/bert/`hostname` on a shared home."""
    assert shared_cache_problem(path, 4, MOUNTINFO, hostname=host) is None
    for other in ("/fsx/cache/trn1-st-trn1-2", "/fsx/cache/trn1-st-trn1-10"):  # another host's, not a prefix
        assert shared_cache_problem(other, 4, MOUNTINFO, hostname=host) is not None
