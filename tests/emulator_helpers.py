"""Small NKI 0.2.0 building blocks for the emulator tests: load / store tiles, run a kernel, expect a rule."""

from __future__ import annotations

import numpy as np
import pytest

from nki_kernels.emulator import NKIRuleError, nisa, nki, nl

RNG = np.random.default_rng(0)


def rand(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def load(src, dtype=nl.float32):
    """An SBUF tile holding the HBM tensor `src` (cast by the DMA)."""
    t = nl.ndarray(src.shape, dtype=dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=t, src=src)
    return t


def store(t):
    """A new HBM tensor holding the SBUF tile `t`."""
    out = nl.ndarray(t.shape, dtype=t.dtype, buffer=nl.shared_hbm)
    nisa.dma_copy(dst=out, src=t)
    return out


def run(kernel, *args):
    return nki.simulate_kernel(kernel, *args)


def raises(kernel, *args, match: str) -> str:
    """Run `kernel`; it must break a rule whose message matches `match`. Returns the message."""
    with pytest.raises(NKIRuleError, match=match) as info:
        run(kernel, *args)
    return str(info.value)
