"""Directory locks: refused while a live process holds them, free once that process dies.

The holders are real child processes, so the kernel's flock semantics are what is tested.
"""
import os
import signal
import subprocess
import sys

import pytest

from bmojo_neuron import cli
from bmojo_neuron.compile_cache.local import LocalCache
from bmojo_neuron.locking import DirectoryLock, DirectoryLocked

RUN_DIR = "from bmojo_neuron.locking import DirectoryLock; lock = DirectoryLock(sys.argv[1]).acquire()"
CACHE_USE = "from bmojo_neuron.compile_cache.local import LocalCache; lock = LocalCache(sys.argv[1]).use('precompile').acquire()"
CACHE_PRUNE = "from bmojo_neuron.compile_cache.local import LocalCache; lock = LocalCache(sys.argv[1]).maintain('cache prune').acquire()"


def hold_in_child(directory, take=RUN_DIR):
    """A child process that takes a lock on `directory` and sleeps until killed."""
    code = f"import sys, time; {take}; print('held', flush=True); time.sleep(60)"
    child = subprocess.Popen([sys.executable, "-c", code, str(directory)], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "held"
    return child


def kill(*children):
    for child in children:
        child.send_signal(signal.SIGKILL)
        child.wait()


def test_a_live_holder_is_named_and_a_dead_one_is_taken_over(tmp_path):
    child = hold_in_child(tmp_path)
    try:
        with pytest.raises(DirectoryLocked, match=f"pid {child.pid} on host"):
            DirectoryLock(tmp_path).acquire()
    finally:
        kill(child)
    with DirectoryLock(tmp_path):  # killed with SIGKILL: the kernel dropped its lock
        pass


def test_a_lock_file_its_holder_deleted_is_never_held_beside_the_new_one(tmp_path):
    """``leave_no_trace`` deletes the lock file as its holder releases it. A process that opened the old file
    before then gets a lock on a deleted file: it must see that and lock the file now at the path (held by
    another process here), not go on as a second holder."""
    first = DirectoryLock(tmp_path, leave_no_trace=True).acquire()
    late = DirectoryLock(tmp_path)
    opened_early = late._open()  # opened while `first` still held it
    first.release()
    assert list(tmp_path.iterdir()) == []  # the directory held nothing else: the file went with the lock
    holder = hold_in_child(tmp_path)  # a new process locks a new file at the path
    try:
        opens = iter([opened_early])
        late._open = lambda: next(opens, None) or DirectoryLock._open(late)
        with pytest.raises(DirectoryLocked, match=f"pid {holder.pid} on host"):
            late.acquire()
    finally:
        kill(holder)


def test_leave_no_trace_keeps_the_lock_file_beside_anything_else(tmp_path):
    with DirectoryLock(tmp_path, leave_no_trace=True):
        (tmp_path / "notes.txt").write_text("kept")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "notes.txt"]
    with pytest.raises(ValueError, match="only an exclusive lock"):
        DirectoryLock(tmp_path, shared=True, leave_no_trace=True)


def test_train_on_a_live_run_directory_is_refused_in_one_line(tmp_path, capsys):
    child = hold_in_child(tmp_path / "bmojo")  # the first run of cpu-tiny's suite
    try:
        assert cli.main(["train", "cpu-tiny", "--output-dir", str(tmp_path)]) == 2
    finally:
        kill(child)
    err = capsys.readouterr().err
    assert err.startswith("error:") and f"pid {child.pid}" in err and "in use" in err


def test_cache_users_share_it_and_a_prune_is_refused_naming_them(tmp_path):
    users = [hold_in_child(tmp_path, CACHE_USE) for _ in range(2)]
    try:
        with LocalCache(tmp_path).use("cache pull"):  # a third user is let in at once
            pass
        with pytest.raises(DirectoryLocked) as refused:
            LocalCache(tmp_path).maintain("cache prune").acquire()
        message = str(refused.value)
        assert all(f"pid {u.pid} on host" in message for u in users) and "(precompile)" in message
    finally:
        kill(*users)
    with LocalCache(tmp_path).maintain("cache prune") as lock:  # both users died: the prune goes ahead
        assert lock.live_users() == [] and list(lock.users_dir.iterdir()) == []  # their records are swept


def test_a_cache_user_waits_for_a_prune_then_is_refused_naming_it(tmp_path):
    pruner = hold_in_child(tmp_path, CACHE_PRUNE)
    try:
        lock = LocalCache(tmp_path).use("precompile")
        lock.wait = 0.5
        with pytest.raises(DirectoryLocked, match=f"pid {pruner.pid} on host .* \\(cache prune\\)"):
            lock.acquire()
    finally:
        kill(pruner)
    with LocalCache(tmp_path).use("precompile"):  # the prune was killed: its stale line is not read as a holder
        with pytest.raises(DirectoryLocked, match=f"pid {os.getpid()} .*\\(precompile\\)"):
            LocalCache(tmp_path).maintain("cache prune").acquire()


def test_cache_prune_during_a_precompile_is_refused_in_one_line(tmp_path, capsys):
    (tmp_path / "neuronxcc-2.23.6484.0+ab12cd34").mkdir()
    user = hold_in_child(tmp_path, CACHE_USE)
    try:
        code = cli.main(["cache", "prune", "--older-than", "0", "--cache-dir", str(tmp_path)])
    finally:
        kill(user)
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("error:") and f"pid {user.pid}" in err
    assert cli.main(["cache", "prune", "--older-than", "0", "--cache-dir", str(tmp_path)]) == 0
