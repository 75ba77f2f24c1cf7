"""Suite-wide settings: one intra-op thread; no step of the torch-xla double left open.

The test tensors are tiny, so extra threads only add synchronisation; on a loaded
2-core machine torch's worker threads wait on busy cores and a test can run 10x
slower. One thread also keeps results independent of the machine.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).parent))  # tests import the shared naive oracles from naive.py


def pytest_collection_finish(session):
    """Start the fork server of the multi-rank tests (`rank_processes`) when a collected module uses it: it
    imports torch, transformers and the package on the core the suite leaves idle while earlier tests run."""
    if "rank_processes" in sys.modules:
        sys.modules["rank_processes"].start_server()


@pytest.fixture
def stop_signals_caught():
    """SIGTERM / SIGINT recorded, not fatal, for a test that raises one in this process: if the code under test
    did not take it, the test fails on its assertions instead of the signal ending the whole session."""
    import signal

    caught: list[int] = []
    previous = {signum: signal.signal(signum, lambda signum, _frame: caught.append(signum))
                for signum in (signal.SIGTERM, signal.SIGINT)}
    yield caught
    for signum, handler in previous.items():
        signal.signal(signum, handler)


@pytest.fixture(autouse=True)
def no_step_left_open():
    """A test that leaves a step of the torch-xla double without its sync (an error, or NxD's run_train called
    alone) leaves the double's host-tensor mode on torch's mode stack: it is dropped before the next test."""
    yield
    from doubles.xla_host import drop_left_over_modes

    drop_left_over_modes()


@pytest.fixture(scope="session")
def c_cache(tmp_path_factory):
    """The ``cpu-c`` kernels built once per session, in a temporary cache folder (shared by the `test_cpu_c*`
    files: a build compiles every C file, seconds on a loaded machine)."""
    from bmojo_neuron.ops.cpu_c import build

    folder = tmp_path_factory.mktemp("cpu-c-cache")
    previous = os.environ.get(build.CACHE_ENV)
    os.environ[build.CACHE_ENV] = str(folder)
    build.reset()
    assert build.load().library is not None, build.load().reason
    yield folder
    if previous is None:
        os.environ.pop(build.CACHE_ENV)
    else:
        os.environ[build.CACHE_ENV] = previous
    build.reset()


@pytest.fixture
def fresh_build(c_cache, monkeypatch, tmp_path):
    """A ``cpu-c`` build that starts from nothing (its own empty cache folder), with no warning yet given;
    the session's library afterwards."""
    from bmojo_neuron.ops.cpu_c import build, common

    monkeypatch.setenv(build.CACHE_ENV, str(tmp_path / "cache"))
    common.warned.clear()
    build.reset()
    yield tmp_path / "cache"
    build.reset()
    common.warned.clear()
