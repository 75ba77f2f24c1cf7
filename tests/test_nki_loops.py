"""Loop-carried dependencies in `nl.affine_range` (emulator/loops.py): the 0.2.0 stub calls them unsafe (the
compiler may reorder the iterations) and no source names a compile error, so the emulator runs such a loop in order
and warns (NKILoopDependencyWarning) of a read of what another iteration wrote, a write over what another iteration
read or wrote; it says nothing of independent iterations, buffers allocated per iteration and accumulation into one
tile (matmuls into PSUM, accumulating DMAs, in-place updates that are associative reductions such as `acc = acc + x`,
but not `x - acc`, `exp(acc)` or `acc * x + 1`)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import emulator_helpers
from emulator_helpers import load, rand, run, store

from nki_kernels.emulator import NKILoopDependencyWarning, loops, nisa, nki, nl

CARRIED = "a loop-carried dependency in affine_range: an iteration reads what another iteration wrote"
OVERWRITTEN = "a loop-carried dependency in affine_range: an iteration overwrites what another iteration wrote"
READ_THEN_OVERWRITTEN = "a loop-carried dependency in affine_range: an iteration overwrites what another iteration read"


def carried(kernel, *args, match: str) -> str:
    """Run `kernel`, which carries a dependency across an affine_range: it runs through and warns. Returns the
    warning's message that matches `match`."""
    with pytest.warns(NKILoopDependencyWarning, match=match) as record:
        run(kernel, *args)
    return next(str(w.message) for w in record if re.search(match, str(w.message)))


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


def test_a_carried_value_in_affine_range_runs_in_order_with_a_warning():
    """neuronx-cc accepts the loop (no source names an error; the guides: every range gives the basic range
    loop's result), so the emulator computes what sequential_range does and warns once for the loop and tile."""
    a, b = rand(8, 16), rand(8, 16)
    expected = naive_scan(a, b)
    np.testing.assert_allclose(run(chunked_scan, a, b, nl.sequential_range), expected, rtol=1e-5, atol=1e-6)
    with pytest.warns(NKILoopDependencyWarning, match=CARRIED) as record:
        out = run(chunked_scan, a, b, nl.affine_range)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    assert len(record) == 1  # four iterations read and overwrite `carry`: one warning per affine_range and tensor
    msg = str(record[0].message)
    assert msg.startswith("nisa.tensor_tensor_scan:")  # the instruction that reads the carried value
    assert "iteration 1 of the affine_range at" in msg and "written by iteration 0" in msg
    assert "test_nki_loops.py:" in msg and "use nl.sequential_range" in msg
    assert "neuronx-cc accepts it" in msg and "'unsafe'" in msg
    assert record[0].filename == __file__  # attributed to the kernel line


def reused_buffer(a, inside: bool):
    """Iterations that each write a scratch tile, then read only what they wrote: one tile allocated outside
    the loop (`inside=False`, nki-migration-guide.rst's `sb_blocks_migrated_incorrect`) or one per iteration."""
    parts, n = a.shape
    out = nl.ndarray((parts, n), dtype=nl.float32, buffer=nl.shared_hbm)
    shared = nl.ndarray((parts, 4), dtype=nl.float32, buffer=nl.sbuf)
    for i in nl.affine_range(n // 4):
        cols = slice(4 * i, 4 * i + 4)
        scratch = nl.ndarray((parts, 4), dtype=nl.float32, buffer=nl.sbuf) if inside else shared
        nisa.tensor_scalar(dst=scratch, data=load(a[:, cols]), op0=nl.multiply, operand0=2.0)
        nisa.dma_copy(dst=out[:, cols], src=scratch)
    return out


def test_a_buffer_every_iteration_reuses_is_reported_and_one_per_iteration_is_not():
    """Output dependency: iteration 1 overwrites the scratch tile iteration 0 wrote (and read)."""
    a = rand(8, 16)
    np.testing.assert_array_equal(run(reused_buffer, a, True), 2 * a)
    msg = carried(reused_buffer, a, False, match=OVERWRITTEN)
    first = reused_buffer.__code__.co_firstlineno
    assert msg.startswith("nisa.tensor_scalar:")
    assert f"iteration 1 of the affine_range at {__file__}:{first + 6} writes the tensor allocated at " \
           f"{__file__}:{first + 5}, also written by iteration 0" in msg
    assert "allocate it inside the loop body" in msg and "nl.sequential_range" in msg


def placed_scratch(a, step: int):
    """A scratch tile placed inside the loop at byte `step * i`: one memory for every iteration when step is 0."""
    parts, n = a.shape
    out = nl.ndarray((parts, n), dtype=nl.float32, buffer=nl.shared_hbm)
    for i in nl.affine_range(n // 4):
        scratch = nl.ndarray((parts, 4), dtype=nl.float32, buffer=nl.sbuf, address=(0, step * i))
        nisa.tensor_scalar(dst=scratch, data=load(a[:, 4 * i:4 * i + 4]), op0=nl.multiply, operand0=2.0)
        nisa.dma_copy(dst=out[:, 4 * i:4 * i + 4], src=scratch)
    return out


def test_placed_tiles_at_one_address_are_one_buffer_to_the_loop_check():
    """Tiles placed at the same address share their bytes (docs/kernels.md, "address="): allocating one per
    iteration there is the reused buffer above; at distinct addresses the iterations are independent."""
    a = rand(8, 16)
    np.testing.assert_array_equal(run(placed_scratch, a, 16), 2 * a)
    carried(placed_scratch, a, 0, match=OVERWRITTEN)


def shift_left(a, loop):
    """x[:, i] = x[:, i + 1] in place: each iteration overwrites the column the previous one read."""
    parts, n = a.shape
    x = load(a)
    for i in loop(n - 1):
        nisa.tensor_copy(dst=x[:, i:i + 1], src=x[:, i + 1:i + 2])
    return store(x)


def test_overwriting_what_another_iteration_read_is_reported():
    """Anti-dependency: run in another order, iteration 0 would read the value iteration 1 wrote."""
    a = rand(8, 5)
    np.testing.assert_array_equal(run(shift_left, a, nl.sequential_range), np.concatenate([a[:, 1:], a[:, 4:]], 1))
    msg = carried(shift_left, a, nl.affine_range, match=READ_THEN_OVERWRITTEN)
    loop = shift_left.__code__.co_firstlineno + 4
    assert msg.startswith("nisa.tensor_copy:")
    assert f"iteration 1 of the affine_range at {__file__}:{loop} writes the tensor allocated at " \
           f"{emulator_helpers.__file__}:" in msg and "read by iteration 0" in msg


def read_by_all_overwritten_by_last(a):
    """Every iteration reads column 0; the last one then overwrites it."""
    parts, n = a.shape
    x = load(a)
    out = nl.ndarray((parts, n), dtype=nl.float32, buffer=nl.shared_hbm)
    for i in nl.affine_range(n):
        nisa.dma_copy(dst=out[:, i:i + 1], src=x[:, 0:1])
        if i == n - 1:
            nisa.memset(dst=x[:, 0:1], value=0.0)
    return out


def test_an_overwrite_is_checked_against_every_earlier_reader_not_only_the_last():
    """Iterations 0..3 read the column and iteration 3 writes it: its own read is no excuse for iteration 0's."""
    msg = carried(read_by_all_overwritten_by_last, rand(4, 4), match=READ_THEN_OVERWRITTEN)
    assert msg.startswith("nisa.memset:") and "iteration 3 of the affine_range" in msg
    assert "read by iteration 0" in msg


def last_row_wins(a, loop):
    """Every iteration stores its row into the same HBM row: the result is whichever iteration ran last."""
    rows, n = a.shape
    out = nl.ndarray((1, n), dtype=nl.float32, buffer=nl.shared_hbm)
    for i in loop(rows):
        nisa.dma_copy(dst=out, src=load(a[i:i + 1, :]))
    return out


def test_two_iterations_writing_one_element_are_reported():
    """Output dependency in HBM: sequential_range keeps the last row; affine_range leaves it to the schedule."""
    a = rand(3, 8)
    np.testing.assert_array_equal(run(last_row_wins, a, nl.sequential_range), a[2:3])
    msg = carried(last_row_wins, a, nl.affine_range, match=OVERWRITTEN)
    first = last_row_wins.__code__.co_firstlineno
    assert msg.startswith("nisa.dma_copy:")
    assert f"iteration 1 of the affine_range at {__file__}:{first + 4} writes the tensor allocated at " \
           f"{__file__}:{first + 3}, also written by iteration 0" in msg


def zeroed_in_every_iteration(a):
    """An accumulator cleared inside the loop: the clear overwrites the previous iteration's accumulation."""
    parts, n = a.shape
    acc = nl.ndarray((parts, 1), dtype=nl.float32, buffer=nl.sbuf)
    for j in nl.affine_range(n):
        nisa.memset(dst=acc, value=0.0)
        nisa.tensor_tensor(dst=acc, data1=acc, data2=load(a[:, j:j + 1]), op=nl.add)
    return store(acc)


def test_an_overwrite_of_an_accumulation_is_not_a_reduction():
    msg = carried(zeroed_in_every_iteration, rand(4, 3), match=OVERWRITTEN)
    assert msg.startswith("nisa.memset:") and "iteration 1 of the affine_range" in msg
    assert "also written by iteration 0" in msg


def accumulated_dma(a):
    """Every iteration adds its row into one HBM row (dma_copy dst_rmw_op=nl.add): an associative reduction."""
    rows, n = a.shape
    out = nl.ndarray((1, n), dtype=nl.float32, buffer=nl.shared_hbm)
    zero = nl.ndarray((1, n), dtype=nl.float32, buffer=nl.sbuf)
    nisa.memset(dst=zero, value=0.0)
    nisa.dma_copy(dst=out, src=zero)
    for i in nl.affine_range(rows):
        nisa.dma_copy(dst=out, src=load(a[i:i + 1, :]), dst_rmw_op=nl.add)
    return out


def test_dmas_accumulating_into_one_tensor_are_accepted():
    a = rand(5, 8)
    np.testing.assert_allclose(run(accumulated_dma, a), a.sum(axis=0, keepdims=True), rtol=1e-5, atol=1e-6)


def previous_column_bits(a, loop):
    """Column i of an fp32 tile is written by iteration i; iteration i reads column i - 1 through a bfloat16
    access pattern (nki-aps.rst: `.ap(..., dtype=)`), two bf16 halves per fp32 element."""
    parts, n = a.shape
    t = nl.ndarray((parts, n), dtype=nl.float32, buffer=nl.sbuf)
    nisa.memset(dst=t, value=0.0)
    out = nl.ndarray((parts, 2 * (n - 1)), dtype=nl.bfloat16, buffer=nl.shared_hbm)
    for i in loop(1, n):
        nisa.dma_copy(dst=t[:, i:i + 1], src=a[:, i:i + 1])
        halves = nl.ndarray((parts, 2), dtype=nl.bfloat16, buffer=nl.sbuf)
        nisa.tensor_copy(dst=halves, src=t.ap(pattern=[[2 * n, parts], [1, 2]], offset=2 * (i - 1), dtype=nl.bfloat16))
        nisa.dma_copy(dst=out[:, 2 * (i - 1):2 * i], src=halves)
    return out


def test_the_check_follows_a_view_that_reinterprets_the_dtype():
    a = rand(4, 4)
    a.view(np.uint32)[...] &= ~np.uint32(1 << 14)  # no low bf16 half is a NaN, which an engine copy would canonicalise
    before = np.concatenate([np.zeros((4, 1), np.float32), a[:, 1:3]], axis=1)
    np.testing.assert_array_equal(run(previous_column_bits, a, nl.sequential_range).view(np.uint16),
                                  before.view(np.uint16))
    msg = carried(previous_column_bits, a, nl.affine_range, match=CARRIED)
    assert msg.startswith("nisa.tensor_copy:")
    assert "iteration 2 of the affine_range" in msg and "written by iteration 1" in msg


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


def guarded_initialisation(a, where: str, loop):
    """Column sums of `a` accumulated across a loop with an in-place add into one SBUF tile, the accumulator
    set to 0 before the loop (`where="before"`, the stub's example 2 zeroes result_psum so) or by the first
    iteration (`"first"`: `if k == 0: memset(acc)`), whole or only its first column (`"first, one column"`,
    the accumulation then spanning more than was set), or by iteration 1 while iteration 0 accumulates
    before it (`"second"`)."""
    parts, n = a.shape
    acc = nl.ndarray((parts, 4), dtype=nl.float32, buffer=nl.sbuf)
    if where == "before":
        nisa.memset(dst=acc, value=0.0)
    elif where == "first, one column":
        nisa.memset(dst=acc[:, 1:4], value=0.0)
    for k in loop(n // 4):
        if where.startswith("first") and k == 0:
            nisa.memset(dst=acc[:, 0:1] if where == "first, one column" else acc, value=0.0)
        if where == "second" and k == 1:
            nisa.memset(dst=acc, value=0.0)
        nisa.tensor_tensor(dst=acc, data1=acc, data2=load(a[:, 4 * k:4 * k + 4]), op=nl.add)
    return store(acc)


def test_an_accumulator_set_by_one_iteration_is_reported_and_one_set_before_the_loop_is_not():
    a = rand(4, 12)
    sums = a.reshape(4, 3, 4).sum(axis=1)
    np.testing.assert_allclose(run(guarded_initialisation, a, "before", nl.affine_range), sums, rtol=1e-6)
    np.testing.assert_allclose(run(guarded_initialisation, a, "first", nl.sequential_range), sums, rtol=1e-6)
    for where in ("first", "first, one column"):
        msg = carried(guarded_initialisation, a, where, nl.affine_range, match=OVERWRITTEN)
        assert msg.startswith("nisa.tensor_tensor:") and "iteration 1 of the affine_range" in msg
        assert "which iteration 0 set before accumulating into it" in msg and "before the loop" in msg
    msg = carried(guarded_initialisation, a, "second", nl.affine_range, match=OVERWRITTEN)
    assert msg.startswith("nisa.memset:") and "also written by iteration 0" in msg


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
    msg = carried(row_differences, rand(8, 6), match=CARRIED)
    inner = row_differences.__code__.co_firstlineno + 9  # the line of `for j in nl.affine_range(n)`
    allocated = inner - 2  # `prev = nl.ndarray(...)`
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


# In-place updates across the iterations of an affine_range: the stub exempts associative reductions only
# (loops.associative_update): acc = acc op x with op associative and commutative, or acc - x (an add
# reduction of -x). Each case: (update of the (P, 1) accumulator `acc` by the column `x`, dtype, initial value,
# the same update in NumPy).
F32, I32 = nl.float32, nl.int32


def activation_bias_and_scale(acc, x):
    one = nl.ndarray(acc.shape, dtype=nl.float32, buffer=nl.sbuf)
    nisa.memset(dst=one, value=1.0)
    nisa.activation(dst=acc, op=nl.copy, data=acc, scale=x, bias=one)


ASSOCIATIVE_UPDATES = {
    "acc + x": (lambda acc, x: nisa.tensor_tensor(dst=acc, data1=acc, data2=x, op=nl.add), F32, 0.0, np.add),
    "x + acc": (lambda acc, x: nisa.tensor_tensor(dst=acc, data1=x, data2=acc, op=nl.add), F32, 0.0, np.add),
    "acc - x": (lambda acc, x: nisa.tensor_tensor(dst=acc, data1=acc, data2=x, op=nl.subtract), F32, 0.0,
                np.subtract),
    "x * acc": (lambda acc, x: nisa.tensor_tensor(dst=acc, data1=x, data2=acc, op=nl.multiply), F32, 1.0,
                np.multiply),
    "max(acc, x)": (lambda acc, x: nisa.tensor_tensor(dst=acc, data1=acc, data2=x, op=nl.maximum), F32, -9.0,
                    np.maximum),
    "min(x, acc)": (lambda acc, x: nisa.tensor_tensor(dst=acc, data1=x, data2=acc, op=nl.minimum), F32, 9.0,
                    np.minimum),
    "acc & x": (lambda acc, x: nisa.tensor_tensor(dst=acc, data1=acc, data2=x, op=nl.bitwise_and), I32, -1,
                np.bitwise_and),
    "x | acc": (lambda acc, x: nisa.tensor_tensor(dst=acc, data1=x, data2=acc, op=nl.bitwise_or), I32, 0,
                np.bitwise_or),
    "acc ^ x": (lambda acc, x: nisa.tensor_tensor(dst=acc, data1=acc, data2=x, op=nl.bitwise_xor), I32, 0,
                np.bitwise_xor),
    "tensor_scalar acc + x - 1": (
        lambda acc, x: nisa.tensor_scalar(dst=acc, data=acc, op0=nl.add, operand0=x, op1=nl.subtract, operand1=1.0),
        F32, 0.0, lambda acc, x: acc + x - 1),
    "tensor_scalar x * acc": (
        lambda acc, x: nisa.tensor_scalar(dst=acc, data=acc, op0=nl.multiply, operand0=x, reverse0=True),
        F32, 1.0, np.multiply),
    "scalar_tensor_tensor acc + 2x": (
        lambda acc, x: nisa.scalar_tensor_tensor(dst=acc, data=x, op0=nl.multiply, operand0=2.0, op1=nl.add,
                                                 operand1=acc),
        F32, 0.0, lambda acc, x: acc + 2 * x),
    "activation copy acc * x": (lambda acc, x: nisa.activation(dst=acc, op=nl.copy, data=acc, scale=x), F32, 1.0,
                                np.multiply),
    "activation copy acc + x": (lambda acc, x: nisa.activation(dst=acc, op=nl.copy, data=acc, bias=x), F32, 0.0,
                                np.add),
}

NOT_ASSOCIATIVE = {
    "x - acc": ("nisa.tensor_tensor",
                lambda acc, x: nisa.tensor_tensor(dst=acc, data1=x, data2=acc, op=nl.subtract)),
    "acc ** x": ("nisa.tensor_tensor", lambda acc, x: nisa.tensor_tensor(dst=acc, data1=acc, data2=x, op=nl.power)),
    "acc + acc": ("nisa.tensor_tensor", lambda acc, x: nisa.tensor_tensor(dst=acc, data1=acc, data2=acc, op=nl.add)),
    "exp(acc)": ("nisa.activation", lambda acc, x: nisa.activation(dst=acc, op=nl.exp, data=acc)),
    "activation copy acc * x + 1": ("nisa.activation", activation_bias_and_scale),
    "tensor_scalar x - acc": (
        "nisa.tensor_scalar",
        lambda acc, x: nisa.tensor_scalar(dst=acc, data=acc, op0=nl.subtract, operand0=x, reverse0=True)),
    "tensor_scalar acc * x + 1": (
        "nisa.tensor_scalar",
        lambda acc, x: nisa.tensor_scalar(dst=acc, data=acc, op0=nl.multiply, operand0=x, op1=nl.add, operand1=1.0)),
    "scalar_tensor_tensor 2x - acc": (
        "nisa.scalar_tensor_tensor",
        lambda acc, x: nisa.scalar_tensor_tensor(dst=acc, data=x, op0=nl.multiply, operand0=2.0, op1=nl.subtract,
                                                 operand1=acc)),
}


def test_the_associative_operators_are_the_alu_tables_legal_reduction_ops():
    """An in-place update counts as an associative reduction exactly for the operators the ALU table marks
    "Legal Reduction op" (nki.api.shared.rst lines 61-118; `nl` keeps the column as `reducible`): with the
    accumulator first every one of them does, subtract as an add of the negated operand; with it second,
    all but subtract; no other operator of the table either way."""
    table = [op for op in vars(nl).values() if isinstance(op, nl._Op) and op.kinds & {"arith", "bitvec"}]
    assert len(table) >= 20
    for op in table:
        first, second = loops.associative_update([(op.name, True)]), loops.associative_update([(op.name, False)])
        assert bool(first) == op.reducible, op.name
        assert bool(second) == (op.reducible and op.name != "subtract"), op.name
        assert first == ("add" if op.name == "subtract" else op.name if op.reducible else ""), op.name


def updated_in_place(a, update, dtype, initial):
    """`update(acc, x)` for every column x of `a` in an affine_range, into one accumulator allocated before it."""
    parts, n = a.shape
    acc = nl.ndarray((parts, 1), dtype=dtype, buffer=nl.sbuf, name="acc")
    nisa.memset(dst=acc, value=initial)
    for j in nl.affine_range(n):
        update(acc, load(a[:, j:j + 1], dtype=dtype))
    return store(acc)


@pytest.mark.parametrize("case", ASSOCIATIVE_UPDATES)
def test_an_associative_update_of_an_accumulator_in_place_is_accepted(case):
    update, dtype, initial, numpy_update = ASSOCIATIVE_UPDATES[case]
    a = rand(8, 5) if dtype == F32 else np.random.default_rng(7).integers(-2 ** 20, 2 ** 20, (8, 5), np.int32)
    expected = np.full((8, 1), initial, a.dtype)
    for j in range(a.shape[1]):
        expected = numpy_update(expected, a[:, j:j + 1])
    np.testing.assert_allclose(run(updated_in_place, a, update, dtype, initial), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", NOT_ASSOCIATIVE)
def test_an_in_place_update_that_is_not_an_associative_reduction_is_reported(case):
    instr, update = NOT_ASSOCIATIVE[case]
    msg = carried(updated_in_place, np.abs(rand(8, 5)) + 0.5, update, F32, 1.0, match=CARRIED)
    assert msg.startswith(f"{instr}:")
    assert "iteration 1 of the affine_range at" in msg and "updates acc in place, written by iteration 0" in msg
    assert "not an associative reduction" in msg and "use nl.sequential_range" in msg


def test_accumulations_of_two_operators_into_one_tile_are_reported():
    """acc = acc * x + 1 as two in-place instructions, each an associative update on its own: together a scan
    (the order of the iterations matters), so the second iteration's multiply over the first's add is reported."""

    def multiply_then_add(acc, x):
        nisa.tensor_scalar(dst=acc, data=acc, op0=nl.multiply, operand0=x)
        nisa.tensor_scalar(dst=acc, data=acc, op0=nl.add, operand0=1.0)

    msg = carried(updated_in_place, rand(8, 5), multiply_then_add, F32, 0.0, match=OVERWRITTEN)
    assert msg.startswith("nisa.tensor_scalar:") and "iteration 1 of the affine_range at" in msg
    assert "accumulates into acc with another operator than iteration 0 did" in msg and "a scan" in msg


# ---------------------------------------------------------------- accesses compared as boxes (loops._meet)
def interleaved(a, second_start):
    """Two iterations fill one tile allocated before the loop, column by column with step 2: iteration 0 the
    columns 0, 2, 4, ..., iteration 1 those from `second_start` on (1: the odd ones, disjoint; 2: even ones
    again, overlapping iteration 0's)."""
    parts, n = a.shape
    t = nl.ndarray((parts, 2 * n), dtype=nl.float32, buffer=nl.sbuf)
    for i in nl.affine_range(2):
        first = 0 if i == 0 else second_start
        count = (2 * n - first + 1) // 2
        nisa.tensor_scalar(dst=t[:, first:first + 2 * count - 1:2], data=load(a[:, 0:count]), op0=nl.add,
                           operand0=float(i + 1))
    return store(t)


def test_even_and_odd_columns_written_by_two_iterations_are_independent():
    a = rand(4, 3)
    expected = np.empty((4, 6), np.float32)
    expected[:, 0::2], expected[:, 1::2] = a + 1, a + 2
    np.testing.assert_array_equal(run(interleaved, a, 1), expected)


def test_strided_writes_that_share_a_column_are_reported():
    """Iteration 1 writes columns 2, 4 over iteration 0's 0, 2, 4: an output dependency on two elements."""
    msg = carried(interleaved, rand(4, 3), 2, match=OVERWRITTEN)
    assert msg.startswith("nisa.tensor_scalar:") and "iteration 1 of the affine_range" in msg
    assert "also written by iteration 0" in msg


def test_a_dependency_is_reported_in_a_cost_only_run():
    """The check stays on where no values are computed (bench shapes run cost-only)."""
    a = rand(8, 16)
    with pytest.warns(NKILoopDependencyWarning, match=CARRIED):
        nki.simulate(chunked_scan, a, a, nl.affine_range, cost_only=True)
    nki.simulate(chunked_scan, a, a, nl.sequential_range, cost_only=True)
    nki.simulate(interleaved, rand(4, 3), 1, cost_only=True)


def _random_view(rng: np.random.Generator, data: np.ndarray) -> np.ndarray:
    """A view of `data` a kernel could make: slices with steps (some reversed), a reshape, a dtype view."""
    view = data
    if view.dtype.itemsize == 4 and view.shape[-1] % 2 == 0 and rng.random() < 0.3:
        view = view.view(np.uint16)  # two halves per element, as .ap(dtype=) reinterprets
    elif view.dtype.itemsize == 2 and view.shape[-1] % 2 == 0 and rng.random() < 0.2:
        view = view.view(np.float32)  # one element over two
    key = []
    for n in view.shape:
        lo = int(rng.integers(0, n))
        hi = int(rng.integers(lo + 1, n + 1))
        step = int(rng.integers(1, 4))
        key.append(slice(hi - 1, lo - 1 if lo else None, -step) if rng.random() < 0.1 else slice(lo, hi, step))
    view = view[tuple(key)]
    if view.ndim >= 2 and view.flags.c_contiguous and rng.random() < 0.3:
        view = view.reshape(view.shape[0], -1)
        if view.shape[1] % 2 == 0 and rng.random() < 0.5:
            view = view.reshape(view.shape[0], 2, -1)
    return view


def _bytes_of(data: np.ndarray, view: np.ndarray) -> set[int]:
    """The naive answer: every byte offset the view covers, element by element."""
    base = view.__array_interface__["data"][0] - data.__array_interface__["data"][0]
    covered = set()
    for index in np.ndindex(*view.shape):
        start = base + sum(i * s for i, s in zip(index, view.strides))
        covered.update(range(start, start + view.dtype.itemsize))
    return covered


def test_two_accesses_meet_exactly_when_they_share_a_byte():
    """loops._meet (boxes of progressions, or elements where a view is no box) against byte sets, on random
    views of random allocations: even/odd interleaves, steps 2 and 3, reversed slices, reshapes, dtype views."""
    from nki_kernels.emulator.loops import _meet, _Track

    rng = np.random.default_rng(3)
    boxes = tried = 0
    for _ in range(1000):
        shape = tuple(int(n) for n in rng.integers(1, 7, size=int(rng.integers(1, 4))))
        data = np.zeros(shape, [np.float32, np.uint16, np.uint8][int(rng.integers(0, 3))])
        track = _Track(0, _Track.axes_of(data))
        views = [_random_view(rng, data) for _ in range(2)]
        if any(v.size == 0 for v in views):
            continue
        accesses = [track.access(v.__array_interface__["data"][0] - data.__array_interface__["data"][0],
                                 v.shape, v.strides, v.dtype.itemsize) for v in views]
        expected = bool(_bytes_of(data, views[0]) & _bytes_of(data, views[1]))
        assert _meet(*accesses) == expected, (shape, data.dtype, [(v.shape, v.strides) for v in views])
        boxes += all(a.box is not None for a in accesses)
        tried += 1
    assert boxes > tried // 2  # most pairs took the box path, the rest the element path


@pytest.mark.parametrize("first, second, shared", [
    ((0, 2), (1, 2), False), ((1, 2), (0, 2), False), ((0, 2), (2, 2), True), ((0, 3), (1, 2), True),
    ((1, 4), (2, 4), False), ((0, 4), (2, 6), True), ((0, 4), (1, 6), False), ((0, 6), (3, 6), False)])
def test_strided_columns_meet_where_their_progressions_share_a_column(first, second, shared):
    """Columns start::step of a (4, 40) tile: even/odd interleaves and steps with a common multiple."""
    from nki_kernels.emulator.loops import _meet, _Track

    data = np.zeros((4, 40), np.float32)
    track = _Track(0, _Track.axes_of(data))
    views = [data[:, start::step] for start, step in (first, second)]
    accesses = [track.access(v.__array_interface__["data"][0] - data.__array_interface__["data"][0],
                             v.shape, v.strides, v.dtype.itemsize) for v in views]
    assert all(a.box is not None for a in accesses)
    assert bool(set(range(40)[first[0]::first[1]]) & set(range(40)[second[0]::second[1]])) == shared
    assert _meet(*accesses) == shared
