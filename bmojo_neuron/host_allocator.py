"""How the host's C allocator treats freed memory in a CPU run: keep it for reuse (training, timing),
or hand it back at once (the bench's memory probe).

An eager training step allocates and frees the same large activation and gradient
buffers every step. glibc serves blocks above its ``mmap`` threshold (128 KiB at
start, raised as blocks are freed) with fresh ``mmap`` pages and returns the top of
its heap to the kernel once more than the trim threshold is free, so the next step
touches new pages again: a page fault and a zeroed page per 4 KiB, paid in every op
that writes a fresh output. glibc raises its threshold as it goes, so a long run
loses little (0-3 % of a cpu-tiny step through `train`, up to 7 % of a bench step at
1K; docs/training.md, "Host memory on CPU"). Raising both thresholds keeps
the freed blocks in the heap for the next step: the resident size stays at the step's
peak instead of falling between steps, which is what a training process does anyway.
glibc caps the ``mmap`` threshold at 32 MiB, so blocks above it (a (16K, 512) float32
activation already) would still be fresh mappings every time, at a cost that grows with
the sequence; allowing no mapped blocks (``M_MMAP_MAX = 0``) serves them from the heap
too. glibc still maps a block the heap cannot hold (a thread's arena is 64 MiB), so
no request fails for it.

glibc only (other C libraries, macOS and Windows are left alone); a user who sets any
``MALLOC_*_`` tuning variable, or ``BMOJO_NEURON_HOST_ALLOCATOR=default``, keeps glibc's
own behaviour (as does one who sets ``glibc.malloc.*`` in ``GLIBC_TUNABLES``).

`return_freed_memory` is the opposite, for measuring: every large block a fresh ``mmap``
returned to the kernel on ``free``, so the peak resident size counts what a unit of work
allocated, not what an earlier one left in the heap.
"""

from __future__ import annotations

import ctypes
import os
import platform
from collections.abc import Mapping

# mallopt(3) parameter numbers (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4

# glibc refuses an mmap threshold above HEAP_MAX_SIZE / 2: 32 MiB on 64-bit Linux.
MMAP_THRESHOLD = 32 << 20
MEASURING_MMAP_THRESHOLD = 64 << 10
TRIM_THRESHOLD = 1 << 30
TOP_PAD = 64 << 20
DEFAULT_MMAP_MAX = 65536  # glibc's own limit on live mapped blocks

OPT_OUT_ENV = "BMOJO_NEURON_HOST_ALLOCATOR"
GLIBC_TUNING_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")

_applied = False


def keep_freed_memory() -> bool:
    """Set glibc to serve large blocks from the heap, not ``mmap``, and keep 1 GiB of free top; True if applied.

    Idempotent, per process (a child started by ``fork`` inherits the setting; one
    started by ``spawn`` calls this again). Returns False, changing nothing, off glibc,
    when the user tuned malloc through the environment, or when opted out.
    """
    global _applied
    if _applied:
        return True
    if not _should_apply(os.environ):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    # Each call returns 1 on success. Setting any of them also stops glibc from moving
    # the thresholds by itself as blocks are freed, so these values hold from here.
    done = all(libc.mallopt(param, value) == 1 for param, value in (
        (M_TRIM_THRESHOLD, TRIM_THRESHOLD), (M_TOP_PAD, TOP_PAD), (M_MMAP_THRESHOLD, MMAP_THRESHOLD),
        (M_MMAP_MAX, 0)))
    _applied = done
    return done


def _should_apply(environ: Mapping[str, str]) -> bool:
    if environ.get(OPT_OUT_ENV, "").strip().lower() == "default":
        return False
    if any(name in environ for name in GLIBC_TUNING_ENV) or "glibc.malloc." in environ.get("GLIBC_TUNABLES", ""):
        return False
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def return_freed_memory() -> None:
    """Set glibc to serve every block above 64 KiB by ``mmap`` and return it on free; trim the heap now.

    For a process that measures peak memory (`bench.harness`); a no-op where there is
    no glibc. Undoes `keep_freed_memory` in this process.
    """
    global _applied
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)
        libc.mallopt(M_MMAP_THRESHOLD, MEASURING_MMAP_THRESHOLD)
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        return
    _applied = False
