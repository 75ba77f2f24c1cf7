"""The run-directory lock: refused while a live process holds it, free once that process dies."""
import subprocess
import sys

import pytest

from bmojo_neuron import cli
from bmojo_neuron.locking import DirectoryLock, DirectoryLocked

HOLD = ("import sys, time; from bmojo_neuron.locking import DirectoryLock; "
        "lock = DirectoryLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(60)")


def hold_in_child(directory):
    child = subprocess.Popen([sys.executable, "-c", HOLD, str(directory)], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "held"
    return child


def test_a_live_holder_is_named_and_a_dead_one_is_taken_over(tmp_path):
    child = hold_in_child(tmp_path)
    try:
        with pytest.raises(DirectoryLocked, match=f"pid {child.pid} on host"):
            DirectoryLock(tmp_path).acquire()
    finally:
        child.kill()
        child.wait()
    with DirectoryLock(tmp_path):  # killed with SIGKILL: the kernel dropped its lock
        pass


def test_train_on_a_live_run_directory_is_refused_in_one_line(tmp_path, capsys):
    child = hold_in_child(tmp_path / "cpu-tiny")  # the first run of cpu-tiny's compare
    try:
        assert cli.main(["train", "cpu-tiny", "--output-dir", str(tmp_path)]) == 2
    finally:
        child.kill()
        child.wait()
    err = capsys.readouterr().err
    assert err.startswith("error:") and f"pid {child.pid}" in err and "in use" in err
