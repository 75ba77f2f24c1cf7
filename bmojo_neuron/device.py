"""Which torch device a run uses (``run.device``, the ``--device`` of eval / generate), and how many CPU threads."""

from __future__ import annotations

import os
import re

import torch


def resolve_device(name: str | None, key: str = "run.device", neuron: bool = True) -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:N``, ``auto`` (CUDA when available, else CPU), or, where `neuron`, ``neuron``
    (the XLA device: only training runs there; eval, inspect and generate pass False).

    ValueError naming `key` (the recipe key or the option) for an unknown name, or CUDA asked for where it
    is not available.
    """
    name = (name or "auto").lower()
    if name == "neuron" and neuron:
        return torch.device("xla")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if re.fullmatch(r"cuda(:\d+)?", name):
        if not torch.cuda.is_available():
            raise ValueError(f"{key}={name} but CUDA is not available here; use cpu or auto")
        return torch.device(name)
    choices = "cpu, cuda, auto or neuron" if neuron else "cpu, cuda or auto"
    raise ValueError(f"{key} must be {choices}, got {name!r}")


THREAD_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity; the CPU count where affinity is unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_cpu_threads(cores: int | None = None) -> int:
    """Torch intra-op threads when nothing says otherwise: every usable core but one, at least one.

    Every op waits at an OpenMP barrier for all its threads; when another process
    holds one of the cores, the thread sharing that core runs only in scheduler slices
    and every barrier waits for it, so a step of many small ops gets many times slower
    (measured in `docs/benchmarks.md`). Leaving one core free keeps a machine with one
    busy core (a CI runner, a neighbour's job, our own data loader) near quiet speed.
    """
    return max(1, (usable_cores() if cores is None else cores) - 1)


def set_cpu_threads(threads: int | None = None) -> int:
    """Set torch's intra-op threads and return the count in use.

    `threads` >= 1 is used as given. None or 0 means the default, `default_cpu_threads`,
    but never more threads than are set already (a caller that chose fewer keeps them),
    and nothing changes when ``OMP_NUM_THREADS`` or ``MKL_NUM_THREADS`` is set: torch has
    applied that already.
    """
    if threads:
        torch.set_num_threads(threads)
    elif not any(os.environ.get(name) for name in THREAD_ENV_VARS):
        torch.set_num_threads(min(torch.get_num_threads(), default_cpu_threads()))
    return torch.get_num_threads()
