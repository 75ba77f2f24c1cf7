"""`host_allocator`: when the glibc setting applies, that it does what it says, and that CPU training applies it."""

from __future__ import annotations

import ctypes
import os
import platform
import subprocess
import sys
import textwrap

import pytest

from bmojo_neuron import host_allocator
from bmojo_neuron.host_allocator import _should_apply

ON_GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def _has_mallinfo2() -> bool:
    try:
        return hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2")  # glibc >= 2.33
    except OSError:
        return False


def test_opt_out_and_user_tuning_leave_glibc_alone():
    assert not _should_apply({"BMOJO_NEURON_HOST_ALLOCATOR": "default"})
    assert not _should_apply({"BMOJO_NEURON_HOST_ALLOCATOR": " Default "})
    assert not _should_apply({"MALLOC_MMAP_THRESHOLD_": "131072"})
    assert not _should_apply({"MALLOC_TRIM_THRESHOLD_": "0"})
    assert not _should_apply({"MALLOC_TOP_PAD_": "0"})
    assert not _should_apply({"MALLOC_MMAP_MAX_": "0"})
    assert not _should_apply({"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=65536"})
    # Tunables of other parts of glibc are not a malloc choice.
    assert _should_apply({"GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX512F"}) == ON_GLIBC
    assert _should_apply({}) == ON_GLIBC
    assert _should_apply({"BMOJO_NEURON_HOST_ALLOCATOR": "keep"}) == ON_GLIBC


def _mmapped_blocks_after_malloc(env: dict[str, str], then_return: bool = False, mib: int = 16) -> tuple[bool, int]:
    """In a fresh interpreter: apply the setting (then `return_freed_memory` if asked), malloc `mib` MiB, and
    count the mmapped blocks it added."""
    script = textwrap.dedent("""
        import ctypes
        import sys
        from bmojo_neuron.host_allocator import keep_freed_memory, return_freed_memory

        class MallInfo2(ctypes.Structure):
            _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                        "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = MallInfo2
        libc.malloc.restype = ctypes.c_void_p
        libc.free.argtypes = [ctypes.c_void_p]
        applied = keep_freed_memory()
        if sys.argv[1] == "return":
            return_freed_memory()
        before = libc.mallinfo2().hblks
        block = libc.malloc(int(sys.argv[2]) << 20)
        print(applied, libc.mallinfo2().hblks - before)
        libc.free(block)
    """)
    env = {k: v for k, v in os.environ.items() if k != "BMOJO_NEURON_HOST_ALLOCATOR"} | env
    argv = [sys.executable, "-c", script, "return" if then_return else "keep", str(mib)]
    out = subprocess.run(argv, env=env, capture_output=True, text=True, check=True)
    applied, added = out.stdout.split()
    return applied == "True", int(added)


@pytest.mark.skipif(not ON_GLIBC or not _has_mallinfo2(), reason="needs glibc >= 2.33 (mallinfo2)")
def test_large_blocks_come_from_the_heap_once_applied():
    """glibc's default serves a first 16 MiB block by mmap (a fresh mapping, returned on free); applied, the heap,
    also for a 256 MiB block, above the 32 MiB glibc allows as mmap threshold."""
    assert _mmapped_blocks_after_malloc({"BMOJO_NEURON_HOST_ALLOCATOR": "default"}) == (False, 1)
    assert _mmapped_blocks_after_malloc({"BMOJO_NEURON_HOST_ALLOCATOR": "default"}, mib=256) == (False, 1)
    assert _mmapped_blocks_after_malloc({}) == (True, 0)
    assert _mmapped_blocks_after_malloc({}, mib=256) == (True, 0)


@pytest.mark.skipif(not ON_GLIBC or not _has_mallinfo2(), reason="needs glibc >= 2.33 (mallinfo2)")
def test_the_measuring_setting_maps_large_blocks_again():
    """`return_freed_memory` (the bench's memory probe) undoes it: a 16 MiB or 256 MiB block is a fresh mapping
    again."""
    assert _mmapped_blocks_after_malloc({}, then_return=True) == (True, 1)
    assert _mmapped_blocks_after_malloc({}, then_return=True, mib=256) == (True, 1)


def test_cpu_training_applies_it(monkeypatch):
    from bmojo_neuron.recipes import load_recipe
    from bmojo_neuron.training.backends import local

    calls = []
    monkeypatch.setattr(local, "keep_freed_memory", lambda: calls.append(True) or True)
    local.LocalBackend(load_recipe("cpu-tiny", ["run.device=cpu", "run.threads=1"]))
    assert calls == [True]


def test_applies_once_per_process(monkeypatch):
    """A second call does not call mallopt again (the setting holds for the process)."""
    monkeypatch.setattr(host_allocator, "_applied", True)
    monkeypatch.setattr(host_allocator.ctypes, "CDLL", lambda *_: pytest.fail("mallopt called again"))
    assert host_allocator.keep_freed_memory()
