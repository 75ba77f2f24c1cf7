"""Loop-carried dependencies in `nl.affine_range` (emulator/loops.py): the 0.2.0 stub calls them unsafe (the
compiler may reorder the iterations); the emulator refuses a read of what another iteration wrote, and accepts
independent iterations, buffers reused per iteration, and accumulation into one PSUM tile."""

from __future__ import annotations

import numpy as np
import pytest
from emulator_helpers import load, rand, run

from nki_kernels.emulator import NKIRuleError, nisa, nl

CARRIED = "an affine_range iteration must not read what another iteration wrote"


def chunked_scan(a, b, loop):
    """The stub's sequential_range example: a scan tiled in chunks of 4, the last value of one chunk the
    initial value of the next."""
    parts, n = a.shape
    out = nl.ndarray((parts, n), dtype=nl.float32, buffer=nl.shared_hbm)
    carry = nl.ndarray((parts, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.memset(dst=carry, value=0.0)
    for i in loop(n // 4):
        cols = slice(4 * i, 4 * i + 4)
        chunk = nl.ndarray((parts, 4), dtype=nl.float32, buffer=nl.sbuf)
        nisa.tensor_tensor_scan(dst=chunk, data0=load(a[:, cols]), data1=load(b[:, cols]), initial=carry,
                                op0=nl.multiply, op1=nl.add)
        nisa.dma_copy(dst=out[:, cols], src=chunk)
        nisa.tensor_copy(dst=carry, src=chunk[:, 3:4])
    return out


def naive_scan(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    out, state = np.zeros_like(a), np.zeros(a.shape[0], np.float32)
    for j in range(a.shape[1]):
        state = a[:, j] * state + b[:, j]
        out[:, j] = state
    return out


def test_a_carried_value_in_affine_range_is_refused_and_sequential_range_runs_it():
    a, b = rand(8, 16), rand(8, 16)
    np.testing.assert_allclose(run(chunked_scan, a, b, nl.sequential_range), naive_scan(a, b), rtol=1e-5, atol=1e-6)
    with pytest.raises(NKIRuleError, match=CARRIED) as info:
        run(chunked_scan, a, b, nl.affine_range)
    msg = str(info.value)
    assert msg.startswith("nisa.tensor_tensor_scan:")  # the instruction that reads the carried value
    assert "iteration 1 of the affine_range at" in msg and "written by iteration 0" in msg
    assert "test_nki_loops.py:" in msg and "use nl.sequential_range" in msg


def reused_buffer(a):
    """Independent iterations that share one scratch tile allocated outside the loop: each writes it, then
    reads only what it wrote."""
    parts, n = a.shape
    out = nl.ndarray((parts, n), dtype=nl.float32, buffer=nl.shared_hbm)
    scratch = nl.ndarray((parts, 4), dtype=nl.float32, buffer=nl.sbuf)
    for i in nl.affine_range(n // 4):
        cols = slice(4 * i, 4 * i + 4)
        nisa.tensor_scalar(dst=scratch, data=load(a[:, cols]), op0=nl.multiply, operand0=2.0)
        nisa.dma_copy(dst=out[:, cols], src=scratch)
    return out


def test_a_buffer_each_iteration_writes_before_reading_is_accepted():
    a = rand(8, 16)
    np.testing.assert_array_equal(run(reused_buffer, a), 2 * a)


def summed_products(x, y):
    """sum_k x_k.T @ y_k accumulated in one PSUM tile across an affine_range: the stub's associative
    reduction, which is not a loop-carried dependency."""
    k_tiles = x.shape[0] // 32
    acc = nl.ndarray((x.shape[1], y.shape[1]), dtype=nl.float32, buffer=nl.psum)
    for k in nl.affine_range(k_tiles):
        rows = slice(32 * k, 32 * k + 32)
        nisa.nc_matmul(dst=acc, stationary=load(x[rows, :]), moving=load(y[rows, :]))
    result = nl.ndarray(acc.shape, dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_copy(dst=result, src=acc)
    out = nl.ndarray(acc.shape, dtype=nl.float32, buffer=nl.shared_hbm)
    nisa.dma_copy(dst=out, src=result)
    return out


def test_matmuls_accumulating_into_one_psum_tile_are_accepted():
    x, y = rand(96, 16), rand(96, 8)
    np.testing.assert_allclose(run(summed_products, x, y), x.T @ y, rtol=1e-4, atol=1e-4)


def row_differences(a):
    """Outer affine loop over row blocks, inner affine loop over columns; the inner loop reads the previous
    column of `prev`, written by its own previous iteration."""
    parts, n = a.shape
    out = nl.ndarray((parts, n), dtype=nl.float32, buffer=nl.shared_hbm)
    for r in nl.affine_range(parts // 4):
        rows = slice(4 * r, 4 * r + 4)
        prev = nl.ndarray((4, 1), dtype=nl.float32, buffer=nl.sbuf)
        nisa.memset(dst=prev, value=0.0)
        for j in nl.affine_range(n):
            col = load(a[rows, j:j + 1])
            diff = nl.ndarray((4, 1), dtype=nl.float32, buffer=nl.sbuf)
            nisa.tensor_tensor(dst=diff, data1=col, data2=prev, op=nl.subtract)
            nisa.dma_copy(dst=out[rows, j:j + 1], src=diff)
            nisa.tensor_copy(dst=prev, src=col)
    return out


def test_the_message_names_the_inner_loop_that_carries_the_value():
    with pytest.raises(NKIRuleError, match=CARRIED) as info:
        run(row_differences, rand(8, 6))
    inner = row_differences.__code__.co_firstlineno + 9  # the line of `for j in nl.affine_range(n)`
    allocated = inner - 2  # `prev = nl.ndarray(...)`
    msg = str(info.value)
    assert msg.startswith("nisa.tensor_tensor:")
    assert f"iteration 1 of the affine_range at {__file__}:{inner} reads the tensor allocated at " \
           f"{__file__}:{allocated}, written by iteration 0" in msg


def test_the_outer_loop_may_read_what_its_finished_inner_loop_wrote():
    """An inner affine loop's iterations each fill one column; the outer iteration then reads them all."""

    def fill_then_read(a):
        parts, n = a.shape
        out = nl.ndarray((parts, n), dtype=nl.float32, buffer=nl.shared_hbm)
        for r in nl.affine_range(1):
            tile = nl.ndarray((parts, n), dtype=nl.float32, buffer=nl.sbuf)
            for j in nl.affine_range(n):
                nisa.tensor_scalar(dst=tile[:, j:j + 1], data=load(a[:, j:j + 1]), op0=nl.add, operand0=1.0)
            nisa.dma_copy(dst=out, src=tile)
        return out

    a = rand(8, 6)
    np.testing.assert_array_equal(run(fill_then_read, a), a + 1)


def test_an_instruction_accumulating_into_its_own_destination_is_accepted():
    """`acc = acc + x` by one instruction that reads and writes the same tile: an associative reduction."""

    def column_sums(a):
        parts, n = a.shape
        acc = nl.ndarray((parts, 1), dtype=nl.float32, buffer=nl.sbuf)
        nisa.memset(dst=acc, value=0.0)
        for j in nl.affine_range(n):
            nisa.tensor_tensor(dst=acc, data1=acc, data2=load(a[:, j:j + 1]), op=nl.add)
        out = nl.ndarray((parts, 1), dtype=nl.float32, buffer=nl.shared_hbm)
        nisa.dma_copy(dst=out, src=acc)
        return out

    a = rand(8, 6)
    np.testing.assert_allclose(run(column_sums, a), a.sum(axis=1, keepdims=True), rtol=1e-5, atol=1e-6)
