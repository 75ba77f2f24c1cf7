"""Start the gloo ranks of a multi-process test as forks of a fork server that imported the heavy modules once.

Why not ``spawn``: a spawned rank is a fresh interpreter that imports the test module, and with it
torch, transformers and the package, before its work; on two busy cores that is 10-35 s per
spawn of two ranks, most of those tests' time. Why not ``fork`` of pytest: by then the parent
has trained its one-process reference, and libgomp's thread pool does not survive ``fork()`` of
a process that used it. The ``forkserver`` start method gives both: one server per session
imports `PRELOAD` but never computes, and each rank forks from it in under a second (the
benchmark probes do the same, `bmojo_neuron/bench/harness.py`).

The server is process-wide and the first user's preload list is the one it keeps, so
`tests/conftest.py` starts it once collection is over (before any test runs) when a collected
module imported this one, with the benchmark probes' list included: its preload then runs on
the core the single-threaded suite leaves idle, and `tests/test_bench.py`'s probes fork from it
as they would from their own.

What a rank gets from the parent, as a spawned one would: ``sys.path`` and the working directory
(multiprocessing sends them: ``spawn.get_preparation_data`` / ``spawn.prepare`` in CPython 3.11's
``multiprocessing/spawn.py``), and the arguments. The environment is the one thing a fork-server
child would instead inherit from the server, so `start_ranks` sends the parent's and the rank
takes it before the worker runs. The server itself starts under the environment the session
started with (`_SESSION_ENVIRONMENT`), so what the preloaded modules read at import does not
depend on which test happened to start it.
"""

from __future__ import annotations

import gc
import multiprocessing
import multiprocessing.forkserver
import os
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch.multiprocessing as mp

from bmojo_neuron.bench.harness import PRELOAD as BENCH_PRELOAD

# What every rank worker of the suite imports before its work (a name that fails to import is skipped by
# multiprocessing's server, so a wrong one only costs time). Tests' own modules are not importable
# from the server: CPython 3.11's forkserver ignores the parent's sys.path (`forkserver.main`).
PRELOAD = [
    *BENCH_PRELOAD, "pytest", "torch", "torch.distributed", "torch.fx", "safetensors.torch", "transformers",
    "transformers.models.llama.modeling_llama", "bmojo_neuron", "bmojo_neuron.training", "bmojo_neuron.cli",
    "bmojo_neuron.checkpoints.convert", "bmojo_neuron.evaluation", "bmojo_neuron.generation",
    "bmojo_neuron.priming", "bmojo_neuron.parallel.nxd_pipeline",
    # what a training run imports late, matplotlib (the metrics plot): seconds in each rank's first run otherwise.
    # The MQAR runs here never import ``datasets`` (only text data does), so it is not preloaded.
    "matplotlib.pyplot",
]
_SESSION_ENVIRONMENT = dict(os.environ)  # this module is imported at collection, before any test changes it


def start_ranks(worker: Callable[..., None], args: tuple = (), nprocs: int = 2, join: bool = True
                ) -> mp.ProcessContext | None:
    """`torch.multiprocessing.start_processes` of ``worker(rank, *args)`` on `nprocs` ranks forked from the
    fork server, each in this process's current environment. Same return and errors as `start_processes`."""
    start_server()
    return mp.start_processes(_in_environment, args=(dict(os.environ), worker, *args), nprocs=nprocs, join=join,
                              start_method="forkserver")


def _in_environment(rank: int, environment: dict[str, str], worker: Callable[..., None], *args: Any) -> None:
    os.environ.clear()
    os.environ.update(environment)
    # what the server preloaded lives as long as the rank: out of the collector's way, so a full collection (the
    # one-device initialisation runs one per model built) walks only what the rank makes
    gc.freeze()
    worker(rank, *args)


def start_server() -> None:
    """Start the session's fork server (once; it keeps running) under the session's starting environment.
    Returns at once: the first rank to fork waits for the preload."""
    multiprocessing.forkserver.set_forkserver_preload(PRELOAD)
    with _environment(_SESSION_ENVIRONMENT):
        multiprocessing.forkserver.ensure_running()


@contextmanager
def _environment(environment: dict[str, str]) -> Iterator[None]:
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(environment)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)

