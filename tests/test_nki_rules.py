"""Every NeuronCore-v2 instruction rule the emulator enforces: a small kernel that breaks it and one
that honours it (docs/kernels.md, "Rules", cites the NKI 0.2.0 source of each).

The honouring kernels also check their numbers against NumPy where the rule is about values.
"""

from __future__ import annotations

import re

import ml_dtypes
import numpy as np
import pytest
from emulator_helpers import load, rand, raises, run, store

from nki_kernels.emulator import NKIRuleError, NKISpillWarning, nisa, nki, nl
from nki_kernels.emulator.core import SBUF_USABLE_BYTES_PER_PARTITION


# ----------------------------------------------------------------------------- engines per instruction
def test_tensor_copy_engines_on_v2():
    def scalar_copy(a):
        out = nl.ndarray(a.shape, dtype=nl.float32)
        nisa.tensor_copy(dst=out, src=load(a), engine=nisa.engine.scalar)

    raises(scalar_copy, rand(8, 8), match="tensor_copy: runs on vector/gpsimd only")

    def gpsimd_copy(a):
        out = nl.ndarray(a.shape, dtype=nl.float32)
        nisa.tensor_copy(dst=out, src=load(a), engine=nisa.engine.gpsimd)
        return store(out)

    a = rand(8, 8)
    np.testing.assert_array_equal(run(gpsimd_copy, a), a)


def test_tensor_scalar_on_gpsimd_only_for_rsqrt():
    def gpsimd_multiply(a):
        out = nl.ndarray(a.shape, dtype=nl.float32)
        nisa.tensor_scalar(dst=out, data=load(a), op0=nl.multiply, operand0=2.0, engine=nisa.engine.gpsimd)

    raises(gpsimd_multiply, rand(8, 8), match="GpSimd engine tensor_scalar is allowed only for op0=nl.rsqrt")

    def gpsimd_rsqrt(a):
        out = nl.ndarray(a.shape, dtype=nl.float32)
        nisa.tensor_scalar(dst=out, data=load(a), op0=nl.rsqrt, operand0=0.0, engine=nisa.engine.gpsimd)
        return store(out)

    a = np.abs(rand(8, 8)) + 0.5
    np.testing.assert_allclose(run(gpsimd_rsqrt, a), 1 / np.sqrt(a), rtol=1e-6)


def test_tensor_scalar_on_scalar_engine_operator_pairs():
    def subtract_on_scalar(a):
        out = nl.ndarray(a.shape, dtype=nl.float32)
        nisa.tensor_scalar(dst=out, data=load(a), op0=nl.subtract, operand0=1.0, engine=nisa.engine.scalar)

    raises(subtract_on_scalar, rand(8, 8), match="Scalar engine tensor_scalar supports only")

    def multiply_add_on_scalar(a):
        out = nl.ndarray(a.shape, dtype=nl.float32)
        nisa.tensor_scalar(dst=out, data=load(a), op0=nl.multiply, operand0=3.0, op1=nl.add, operand1=1.0,
                           engine=nisa.engine.scalar)
        return store(out)

    a = rand(8, 8)
    np.testing.assert_allclose(run(multiply_add_on_scalar, a), a * 3 + 1, rtol=1e-6)


def test_gpsimd_cannot_reach_psum():
    def gpsimd_psum():
        p = nl.ndarray((8, 8), dtype=nl.float32, buffer=nl.psum)
        nisa.memset(dst=p, value=0.0, engine=nisa.engine.gpsimd)

    raises(gpsimd_psum, match="GpSimd engine cannot access PSUM")

    def vector_psum():
        p = nl.ndarray((8, 8), dtype=nl.float32, buffer=nl.psum)
        nisa.memset(dst=p, value=2.0, engine=nisa.engine.vector)
        out = nl.ndarray((8, 8), dtype=nl.float32)
        nisa.tensor_copy(dst=out, src=p)
        return store(out)

    assert (run(vector_psum) == 2.0).all()


def test_memset_of_a_value_the_dtype_cannot_hold():
    """No source says what memset makes of a value the tile's dtype cannot hold ([isa] memset: "all valid NKI
    dtypes", nothing more): an integer tile takes whole values in range and refuses the rest, in cost-only
    runs too (the value is a compile-time constant); a float tile rounds as every engine output does."""

    def fill(dtype, value):
        def kernel():
            t = nl.ndarray((4, 8), dtype=dtype)
            nisa.memset(dst=t, value=value)
            out = nl.ndarray((4, 8), dtype=dtype, buffer=nl.shared_hbm)
            nisa.dma_copy(dst=out, src=t)
            return out
        return kernel

    for dtype, value in ((nl.uint8, 255), (nl.uint8, 0.0), (nl.int8, -128), (nl.int32, 2 ** 31 - 1),
                         (nl.uint32, 2 ** 32 - 1), (nl.int16, -7.0)):
        assert (run(fill(dtype, value)) == value).all(), (dtype, value)
    for dtype, value in ((nl.uint8, 256), (nl.uint8, -1), (nl.int8, 128), (nl.int32, 0.5), (nl.int32, 2 ** 31),
                         (nl.int16, float("nan")), (nl.uint16, float("inf"))):
        for cost_only in (False, True):
            with pytest.raises(NKIRuleError, match=rf"nisa.memset: what a {np.dtype(dtype)} tile holds after a "
                                                   "memset of a value it cannot hold .* is not documented"):
                nki.simulate(fill(dtype, value), cost_only=cost_only)
    assert (run(fill(nl.bfloat16, -9948.0)).astype(np.float32) == -9920.0).all()  # nearest: bf16 steps by 64 there
    with np.errstate(over="ignore"):  # NumPy's cast notes the overflow to infinity
        assert (run(fill(nl.float16, 1e6)) == np.inf).all()
    assert (run(fill(nl.float32, -3.4028235e38)) == np.float32(-3.4028235e38)).all()


def test_power_runs_on_gpsimd():
    def power_on_vector(a):
        out = nl.ndarray(a.shape, dtype=nl.float32)
        nisa.tensor_tensor(dst=out, data1=load(a), data2=load(a), op=nl.power, engine=nisa.engine.vector)

    raises(power_on_vector, rand(4, 4), match="nl.power runs on the GpSimd engine")

    def power(a, b):
        out = nl.ndarray(a.shape, dtype=nl.float32)
        nisa.tensor_tensor(dst=out, data1=load(a), data2=load(b), op=nl.power)
        return store(out)

    a, b = np.abs(rand(4, 4)) + 0.5, rand(4, 4)
    np.testing.assert_allclose(run(power, a, b), a ** b, rtol=1e-5)


# ----------------------------------------------------------------------------- operator tables
def test_alu_table_has_no_divide():
    def divide(a, d):
        out = nl.ndarray(a.shape, dtype=nl.float32)
        nisa.tensor_scalar(dst=out, data=load(a), op0=nl.divide, operand0=load(d))

    raises(divide, rand(8, 4), rand(8, 1), match="op must be listed in the ALU operator table")

    def logical_not(a):  # in the 0.2.0 nki.language stub, in neither table
        t = load(a, nl.uint8)
        nisa.tensor_tensor(dst=nl.ndarray(a.shape, dtype=nl.uint8), data1=t, data2=t, op=nl.logical_not)

    raises(logical_not, np.ones((8, 4), np.float32), match="tensor_tensor: op must be listed in the ALU operator table")

    def reciprocal_then_multiply(a, d):
        inv = nl.ndarray(d.shape, dtype=nl.float32)
        nisa.reciprocal(dst=inv, data=load(d))
        out = nl.ndarray(a.shape, dtype=nl.float32)
        nisa.tensor_scalar(dst=out, data=load(a), op0=nl.multiply, operand0=inv)
        return store(out)

    a, d = rand(8, 4), np.abs(rand(8, 1)) + 0.5
    np.testing.assert_allclose(run(reciprocal_then_multiply, a, d), a / d, rtol=1e-6)


def test_activation_takes_only_activation_functions_and_alu_only_alu_ops():
    def add_as_activation(a):
        out = nl.ndarray(a.shape, dtype=nl.float32)
        nisa.activation(dst=out, op=nl.add, data=load(a))

    raises(add_as_activation, rand(4, 4), match="activation-function table")

    def exp_as_alu(a):
        out = nl.ndarray(a.shape, dtype=nl.float32)
        nisa.tensor_tensor(dst=out, data1=load(a), data2=load(a), op=nl.exp)

    raises(exp_as_alu, rand(4, 4), match="ALU operator table")

    def numpy_op(a):
        out = nl.ndarray(a.shape, dtype=nl.float32)
        nisa.tensor_tensor(dst=out, data1=load(a), data2=load(a), op=np.add)

    raises(numpy_op, rand(4, 4), match="nki.language operator identifier")

    def gelu(a):
        out = nl.ndarray(a.shape, dtype=nl.float32)
        nisa.activation(dst=out, op=nl.gelu_apprx_tanh, data=load(a))
        return store(out)

    a = rand(4, 4)
    expected = 0.5 * a * (1 + np.tanh(np.sqrt(2 / np.pi) * (a + 0.044715 * a ** 3)))
    np.testing.assert_allclose(run(gelu, a), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("op,bad,good", [(nl.log, 0.0, 1e-3), (nl.reciprocal, 1e-13, 1e-12),
                                         (nl.sqrt, 1e-36, 1e-30), (nl.sin, 3.2, 3.1)])
def test_activation_input_ranges(op, bad, good):
    """nki.api.shared.rst: outside its valid input range the Scalar engine returns invalid results."""

    def kernel(a):
        out = nl.ndarray(a.shape, dtype=nl.float32)
        nisa.activation(dst=out, op=op, data=load(a))
        return store(out)

    raises(kernel, np.full((4, 4), bad, np.float32), match="outside its valid range")
    a = np.full((4, 4), good, np.float32)
    reference = {"log": np.log, "reciprocal": lambda x: 1 / x, "sqrt": np.sqrt, "sin": np.sin}[op.name]
    np.testing.assert_allclose(run(kernel, a), reference(a), rtol=1e-6)


def test_activation_range_is_checked_after_scale_and_bias():
    def kernel(a, s):
        out = nl.ndarray(a.shape, dtype=nl.float32)
        nisa.activation(dst=out, op=nl.log, data=load(a), scale=load(s))
        return store(out)

    a = np.ones((4, 4), np.float32)
    raises(kernel, a, -np.ones((4, 1), np.float32), match="outside its valid range")
    np.testing.assert_allclose(run(kernel, a, 2 * np.ones((4, 1), np.float32)), np.log(2 * a), rtol=1e-6)


def test_bitvec_operators_need_integers_and_the_vector_engine():
    def float_and(a):
        out = nl.ndarray(a.shape, dtype=nl.float32)
        nisa.tensor_tensor(dst=out, data1=load(a), data2=load(a), op=nl.bitwise_and)

    raises(float_and, rand(4, 4), match="bitvec operator nl.bitwise_and needs integer tiles")

    def int_and(a, b):
        out = nl.ndarray(a.shape, dtype=nl.int32)
        nisa.tensor_tensor(dst=out, data1=load(a, nl.int32), data2=load(b, nl.int32), op=nl.bitwise_and)
        return store(out)

    a, b = np.arange(16, dtype=np.int32).reshape(4, 4), np.full((4, 4), 6, np.int32)
    np.testing.assert_array_equal(run(int_and, a, b), a & b)


# ----------------------------------------------------------------------------- activation specifics (v2)
def test_activation_bias_is_a_vector_on_v2():
    def scalar_bias(a):
        out = nl.ndarray(a.shape, dtype=nl.float32)
        nisa.activation(dst=out, op=nl.exp, data=load(a), bias=1.0)

    raises(scalar_bias, rand(8, 8), match="bias must be a .partitions, 1. vector, not a scalar")

    def reciprocal_with_bias(a, b):
        out = nl.ndarray(a.shape, dtype=nl.float32)
        nisa.activation(dst=out, op=nl.reciprocal, data=load(a), bias=load(b))

    raises(reciprocal_with_bias, rand(8, 8), rand(8, 1), match="reciprocal. takes no bias on NeuronCore-v2")

    def vector_bias(a, b):
        out = nl.ndarray(a.shape, dtype=nl.float32)
        nisa.activation(dst=out, op=nl.exp, data=load(a), bias=load(b, nl.bfloat16))
        return store(out)

    a, b = rand(8, 8), rand(8, 1)
    bb = b.astype(ml_dtypes.bfloat16).astype(np.float32)
    np.testing.assert_allclose(run(vector_bias, a, b), np.exp(a + bb), rtol=1e-5)


def test_activation_scale_is_fp32_and_reduce_op_is_add():
    def bf16_scale(a):
        out = nl.ndarray(a.shape, dtype=nl.float32)
        nisa.activation(dst=out, op=nl.exp, data=load(a), scale=load(a[:, 0:1], nl.bfloat16))

    raises(bf16_scale, rand(8, 8), match="scale must be float32")

    def max_reduce(a):
        out = nl.ndarray(a.shape, dtype=nl.float32)
        red = nl.ndarray((8, 1), dtype=nl.float32)
        nisa.activation(dst=out, op=nl.exp, data=load(a), reduce_op=nl.maximum, reduce_res=red,
                        reduce_cmd=nisa.reduce_cmd.reset_reduce)

    raises(max_reduce, rand(8, 8), match="reduce_op must be nl.add on NeuronCore-v2")


# ----------------------------------------------------------------------------- tensor_reduce axes
def test_tensor_reduce_axes_are_numbered_from_the_most_minor():
    """nki-library's cascaded_max reduces the last axis of a 3-D tile with axis=1; NumPy's axis=2 is illegal."""

    def numpy_numbering(a):
        out = nl.ndarray((4, 3), dtype=nl.float32)
        nisa.tensor_reduce(dst=out, op=nl.maximum, data=load(a), axis=2)

    raises(numpy_numbering, rand(4, 3, 5), match="axis counts free axes from the most minor one")

    def partition_axis(a):
        out = nl.ndarray((1, 5), dtype=nl.float32)
        nisa.tensor_reduce(dst=out, op=nl.add, data=load(a), axis=0)

    raises(partition_axis, rand(4, 5), match="never 0, the partition axis")

    def nki_numbering(a):
        out = nl.ndarray((4, 3), dtype=nl.float32)
        nisa.tensor_reduce(dst=out, op=nl.maximum, data=load(a), axis=1)
        return store(out)

    a = rand(4, 3, 5)
    np.testing.assert_array_equal(run(nki_numbering, a), a.max(axis=2))


def test_tensor_reduce_needs_a_legal_reduction_operator():
    def compare(a):
        out = nl.ndarray((4, 1), dtype=nl.float32)
        nisa.tensor_reduce(dst=out, op=nl.equal, data=load(a), axis=1)

    raises(compare, rand(4, 5), match="not a legal reduction operator")

    def minimum(a):
        out = nl.ndarray((4, 1), dtype=nl.float32)
        nisa.tensor_reduce(dst=out, op=nl.minimum, data=load(a), axis=1)
        return store(out)

    a = rand(4, 5)
    np.testing.assert_array_equal(run(minimum, a)[:, 0], a.min(axis=1))


# ----------------------------------------------------------------------------- Tensor engine
def test_matmul_operand_limits():
    def wide_stationary(a):
        ps = nl.ndarray((128, 16), dtype=nl.float32, buffer=nl.psum)
        nisa.nc_matmul(dst=ps, stationary=load(a), moving=load(a[:, 0:16]))

    raises(wide_stationary, rand(64, 256), match="stationary free size must be <= 128")

    def wide_moving(a, b):
        ps = nl.ndarray((16, 512), dtype=nl.float32, buffer=nl.psum)
        nisa.nc_matmul(dst=ps, stationary=load(a), moving=load(b))

    raises(wide_moving, rand(8, 16), rand(8, 600), match="moving free size must be <= 512")

    def sbuf_dst(a):
        out = nl.ndarray((16, 16), dtype=nl.float32)
        nisa.nc_matmul(dst=out, stationary=load(a), moving=load(a))

    raises(sbuf_dst, rand(8, 16), match="dst must be in psum")

    def mixed(a):
        ps = nl.ndarray((16, 16), dtype=nl.float32, buffer=nl.psum)
        nisa.nc_matmul(dst=ps, stationary=load(a), moving=load(a, nl.bfloat16))

    raises(mixed, rand(8, 16), match="float32 the other must be float32")

    def bf16_dst(a):
        ps = nl.ndarray((16, 16), dtype=nl.bfloat16, buffer=nl.psum)
        nisa.nc_matmul(dst=ps, stationary=load(a, nl.bfloat16), moving=load(a, nl.bfloat16))

    raises(bf16_dst, rand(8, 16), match="dst must be a float32 PSUM tile on NeuronCore-v2")

    def bf16_in_fp32_out(a, b):
        ps = nl.ndarray((16, 24), dtype=nl.float32, buffer=nl.psum)
        nisa.nc_matmul(dst=ps, stationary=load(a, nl.bfloat16), moving=load(b, nl.bfloat16))
        out = nl.ndarray((16, 24), dtype=nl.float32)
        nisa.tensor_copy(dst=out, src=ps)
        return store(out)

    a, b = rand(8, 16), rand(8, 24)
    bf = lambda x: x.astype(ml_dtypes.bfloat16).astype(np.float64)  # noqa: E731
    np.testing.assert_allclose(run(bf16_in_fp32_out, a, b), bf(a).T @ bf(b), rtol=1e-5, atol=1e-5)


def test_matmul_output_stays_in_one_psum_bank():
    def straddles(a, b):
        ps = nl.ndarray((16, 1024), dtype=nl.float32, buffer=nl.psum)  # two banks
        nisa.nc_matmul(dst=ps[:, 256:768], stationary=load(a), moving=load(b))

    raises(straddles, rand(8, 16), rand(8, 512), match="dst must lie within one PSUM bank")

    def second_bank(a, b):
        ps = nl.ndarray((16, 1024), dtype=nl.float32, buffer=nl.psum)
        nisa.nc_matmul(dst=ps[:, 512:1024], stationary=load(a), moving=load(b))
        out = nl.ndarray((16, 512), dtype=nl.float32)
        nisa.tensor_copy(dst=out, src=ps[:, 512:1024])
        return store(out)

    a, b = rand(8, 16), rand(8, 512)
    np.testing.assert_allclose(run(second_bank, a, b), a.T @ b, rtol=1e-4, atol=1e-4)


def test_matmul_v2_modes():
    def double_row(a):
        ps = nl.ndarray((16, 16), dtype=nl.float32, buffer=nl.psum)
        nisa.nc_matmul(dst=ps, stationary=load(a, nl.bfloat16), moving=load(a, nl.bfloat16),
                       perf_mode=nisa.matmul_perf_mode.double_row)

    raises(double_row, rand(8, 16), match="performance mode is not supported on NeuronCore-v2")

    def rows32(a):
        ps = nl.ndarray((16, 16), dtype=nl.float32, buffer=nl.psum)
        nisa.nc_matmul(dst=ps, stationary=load(a), moving=load(a), tile_position=(0, 0), tile_size=(32, 128))

    raises(rows32, rand(8, 16), match="row tile size is 64 or 128 on NeuronCore-v2")

    def rows64(a):
        ps = nl.ndarray((16, 16), dtype=nl.float32, buffer=nl.psum)
        nisa.nc_matmul(dst=ps, stationary=load(a), moving=load(a), tile_position=(64, 0), tile_size=(64, 128))
        out = nl.ndarray((16, 16), dtype=nl.float32)
        nisa.tensor_copy(dst=out, src=ps)
        return store(out)

    a = rand(8, 16)
    np.testing.assert_allclose(run(rows64, a), a.T @ a, rtol=1e-5, atol=1e-5)

    def columns(a, position, size):  # [isa] nc_matmul: columns are tiled "in the same fashion" as rows
        ps = nl.ndarray((a.shape[1], 16), dtype=nl.float32, buffer=nl.psum)
        nisa.nc_matmul(dst=ps, stationary=load(a), moving=load(a[:, 0:16]), tile_position=position, tile_size=size)
        out = nl.ndarray((a.shape[1], 16), dtype=nl.float32)
        nisa.tensor_copy(dst=out, src=ps)
        return store(out)

    a = rand(128, 64)
    np.testing.assert_allclose(run(columns, a, (0, 64), (128, 64)), a.T @ a[:, :16], rtol=1e-5, atol=1e-5)
    raises(columns, a, (0, 32), (128, 32), match="column tile size is 64 or 128 on NeuronCore-v2")
    raises(columns, a, (0, 32), (128, 64), match="start_column must be a multiple of the column tile size")
    raises(columns, rand(128, 96), (0, 0), (128, 64), match="stationary free size must fit the column tile")


def test_tensor_engine_transpose_writes_fp32_on_v2():
    def bf16_transpose_to_bf16(a):
        tp = nl.ndarray((64, 128), dtype=nl.bfloat16, buffer=nl.psum)
        nisa.nc_transpose(dst=tp, data=load(a, nl.bfloat16))

    raises(bf16_transpose_to_bf16, rand(128, 64), match="Tensor-engine transpose writes a float32 PSUM tile")

    def bf16_transpose_to_fp32(a):
        tp = nl.ndarray((64, 128), dtype=nl.float32, buffer=nl.psum)
        nisa.nc_transpose(dst=tp, data=load(a, nl.bfloat16))
        out = nl.ndarray((64, 128), dtype=nl.bfloat16)
        nisa.tensor_copy(dst=out, src=tp)
        return store(out)

    a = rand(128, 64)
    expected = a.astype(ml_dtypes.bfloat16).T
    np.testing.assert_array_equal(run(bf16_transpose_to_fp32, a), expected)


def test_vector_engine_transpose_limits_and_dtype():
    def too_big(a):
        tp = nl.ndarray((40, 8), dtype=nl.float32)
        nisa.nc_transpose(dst=tp, data=load(a), engine=nisa.engine.vector)

    raises(too_big, rand(8, 40), match="Vector-engine transpose handles at most 32x32")

    def cast(a):
        tp = nl.ndarray((16, 8), dtype=nl.bfloat16)
        nisa.nc_transpose(dst=tp, data=load(a), engine=nisa.engine.vector)

    raises(cast, rand(8, 16), match="dst must have data's dtype")

    def small(a):
        tp = nl.ndarray((16, 8), dtype=nl.float32)
        nisa.nc_transpose(dst=tp, data=load(a), engine=nisa.engine.vector)
        return store(tp)

    a = rand(8, 16)
    np.testing.assert_array_equal(run(small, a), a.T)


# ----------------------------------------------------------------------------- sizes and buffers
def test_free_size_limits_of_vector_and_scalar_instructions():
    def sbuf_64k(a):
        t = nl.ndarray((1, 70000), dtype=nl.uint8)
        nisa.memset(dst=t, value=1)
        out = nl.ndarray((1, 70000), dtype=nl.uint8)
        nisa.tensor_copy(dst=out, src=t)

    raises(sbuf_64k, rand(1, 1), match="at most 65536 elements per partition of a sbuf operand")

    def psum_4k(a):
        p = nl.ndarray((8, 5000), dtype=nl.bfloat16, buffer=nl.psum)  # 10 KB: five banks
        nisa.memset(dst=p, value=1.0)
        out = nl.ndarray((8, 5000), dtype=nl.bfloat16)
        nisa.activation(dst=out, op=nl.copy, data=p)

    raises(psum_4k, rand(1, 1), match="at most 4096 elements per partition of a psum operand")

    def psum_4096(a):
        p = nl.ndarray((8, 4096), dtype=nl.bfloat16, buffer=nl.psum)
        nisa.memset(dst=p, value=1.5)
        out = nl.ndarray((8, 4096), dtype=nl.float32)
        nisa.activation(dst=out, op=nl.copy, data=p)
        return store(out)

    assert (run(psum_4096, rand(1, 1)) == 1.5).all()


def test_partition_dimension_and_start():
    def tall():
        nl.ndarray((256, 4), dtype=nl.float32)

    msg = raises(tall, match="partition dimension must be <= 128")
    assert "nl.ndarray" in msg and "(256, 4)" in msg

    def index_partition(a, row):  # language guide, Tensor Indexing: an integer picks one partition
        tile = load(a)
        out = nl.ndarray((4,), dtype=nl.float32, buffer=nl.shared_hbm)
        nisa.dma_copy(dst=out, src=tile[row])
        assert tile[row, :].shape == (1, 4)
        return out

    a = rand(8, 4)
    np.testing.assert_array_equal(run(index_partition, a, 3), a[3])
    np.testing.assert_array_equal(run(index_partition, a, -1), a[7])
    raises(index_partition, a, 8, match="partition index out of range")

    def bad_start(a):
        out = nl.ndarray((4, 8), dtype=nl.float32)
        nisa.tensor_copy(dst=out, src=load(a)[5:9, :])

    assert "starts at partition 5" in raises(bad_start, rand(16, 8), match="partition start rule")

    def good_start(a):
        out = nl.ndarray((16, 8), dtype=nl.float32)
        nisa.tensor_copy(dst=out, src=load(a)[32:48, :])
        return store(out)

    a = rand(64, 8)
    np.testing.assert_array_equal(run(good_start, a), a[32:48])


def test_an_operand_walks_at_most_four_free_axes_with_int16_strides():
    """[arch] 'Accessing SBUF/PSUM tensors': up to four free axes per operand, each stride an int16 count of
    elements; axes that continue one another count as one."""

    def corners(a, last):
        """Copy a[:, 0:2, 0:2, 0:2, 0:2, last] of a (P, 3, 3, 3, 3, 3) tile: five strided axes when `last` is
        0:2, four when it is the whole innermost axis (3 elements, contiguous)."""
        t = load(a)
        picked = t[:, 0:2, 0:2, 0:2, 0:2, last]
        out = nl.ndarray(picked.shape, dtype=nl.float32)
        nisa.tensor_copy(dst=out, src=picked)
        return store(out)

    a = rand(2, 3, 3, 3, 3, 3)
    np.testing.assert_array_equal(run(corners, a, slice(None)), a[:, 0:2, 0:2, 0:2, 0:2, :])
    msg = raises(corners, a, slice(0, 2), match="free access pattern has at most 4 axes")
    assert msg.startswith("nisa.tensor_copy:") and "strides [81, 27, 9, 3, 1] elements" in msg

    def every(a, step):
        """Columns 0 and `step` of a bf16 tile: one axis of 2 elements `step` apart."""
        t = load(a, dtype=nl.bfloat16)
        out = nl.ndarray((a.shape[0], 2), dtype=nl.bfloat16)
        nisa.tensor_copy(dst=out, src=t[:, 0:step + 1:step])
        return store(out)

    a = rand(2, 40000)
    np.testing.assert_array_equal(run(every, a, 32767).astype(np.float32),
                                  a[:, [0, 32767]].astype(ml_dtypes.bfloat16).astype(np.float32))
    msg = raises(every, a, 32768, match="a free-axis stride is an int16 count of elements")
    assert "src (2, 2) steps 32768 elements" in msg


def test_usable_sbuf_is_192_kib_less_the_runtime_reservation():
    per_partition = SBUF_USABLE_BYTES_PER_PARTITION  # 180,216 B
    assert per_partition == 192 * 1024 - 16 * 1024 - 8

    def fits():
        keep = nl.ndarray((128, per_partition), dtype=nl.uint8)
        nisa.memset(dst=keep[:, 0:4], value=0)

    run(fits)

    def one_byte_more():
        keep = nl.ndarray((128, per_partition), dtype=nl.uint8)
        more = nl.ndarray((128, 1), dtype=nl.uint8)
        nisa.memset(dst=keep[:, 0:4], value=0)
        nisa.memset(dst=more, value=0)

    # neuronx-cc spills what does not fit (memory-hierarchy-overview.rst line 86): the kernel runs, with a warning
    # naming the tile, and the profile's peak shows the overflow
    with pytest.warns(NKISpillWarning, match=r"usable SBUF is 180216 bytes per partition .*: new tile \(128, 1\)"):
        _, prof = nki.simulate(nki.jit(one_byte_more))
    assert prof.peak_sbuf_bytes == per_partition + 1

    def bigger_than_sbuf():  # no spill makes room for one tile larger than the buffer
        nl.ndarray((128, per_partition + 1), dtype=nl.uint8)

    raises(bigger_than_sbuf, match="usable SBUF is 180216 bytes per partition")


def test_sbuf_size_follows_the_target_generation():
    """Physical SBUF per partition from each arch guide (v2 24 MiB / 128 = 192 KiB, v3 224 KiB, v4 32 MiB / 128
    = 256 KiB), less nki-library's 16,392 B of runtime reservations; the emulator runs v2, whose figure is
    `nl.tile_size.total_available_sbuf_size` and the capacity it enforces, not the 262,144 B (v4's whole
    partition) the SDK's allocator example prints."""
    from nki_kernels.emulator.core import SBUF_BYTES_PER_PARTITION_BY_GEN, usable_sbuf_bytes_per_partition

    assert SBUF_BYTES_PER_PARTITION_BY_GEN == {2: 24 * 2 ** 20 // 128, 3: 28 * 2 ** 20 // 128, 4: 32 * 2 ** 20 // 128}
    assert [usable_sbuf_bytes_per_partition(g) for g in (2, 3, 4)] == [180_216, 212_984, 245_752]
    with pytest.raises(ValueError, match="error: no SBUF size known for NeuronCore-v5"):
        usable_sbuf_bytes_per_partition(5)
    assert nisa.get_nc_version() == nisa.nc_version.gen2
    assert nl.tile_size.total_available_sbuf_size == SBUF_USABLE_BYTES_PER_PARTITION == 180_216


def test_target_comes_from_neuron_platform_target_override(monkeypatch):
    """The `nki.jit` docstring's variable (lines 14-16) picks the target when the kernel runs: unset, empty,
    "trn1" or "gen2" run the emulated NeuronCore-v2; "trn2"/"gen3"/"trn3"/"gen4" are v3/v4 targets, refused
    before the kernel starts (v2's rules would refuse what they accept); any other value is an error."""
    started = []

    @nki.jit
    def copy(a):
        started.append(True)
        t = load(a)
        return store(t)

    a = rand(4, 8)
    for value in (None, "", "trn1", "gen2"):
        if value is None:
            monkeypatch.delenv("NEURON_PLATFORM_TARGET_OVERRIDE", raising=False)
        else:
            monkeypatch.setenv("NEURON_PLATFORM_TARGET_OVERRIDE", value)
        np.testing.assert_array_equal(copy(a), a)
    assert len(started) == 4
    for value, gen in (("trn2", 3), ("gen3", 3), ("trn3", 4), ("gen4", 4)):
        monkeypatch.setenv("NEURON_PLATFORM_TARGET_OVERRIDE", value)
        with pytest.raises(NKIRuleError, match=f"error: NEURON_PLATFORM_TARGET_OVERRIDE='{value}' compiles for "
                                               f"NeuronCore-v{gen}; the emulator models NeuronCore-v2"):
            copy(a)
    for value in ("inf2", "TRN1", "trn1n"):  # the compiler's --target names, not the variable's
        monkeypatch.setenv("NEURON_PLATFORM_TARGET_OVERRIDE", value)
        with pytest.raises(ValueError, match=f"error: NEURON_PLATFORM_TARGET_OVERRIDE='{value}' is not a target"):
            copy(a)
    assert len(started) == 4  # refused before the kernel ran


def test_platform_target_in_the_decorator_is_checked_like_the_variable(monkeypatch):
    """`@nki.jit(platform_target=...)` (the 0.2.0 stub's **kwargs; nki-library passes "trn2"/"trn3") names the
    kernel's target: "trn1" runs, "trn2"/"trn3" are refused before the kernel starts, launched or not, as the
    variable's v3/v4 values are; a value that is not one of nki-library's `Platforms` targets is refused at
    decoration; and a trn1 kernel is still refused when the variable names another generation."""
    started = []

    def copy(a):
        started.append(True)
        return store(load(a))

    monkeypatch.delenv("NEURON_PLATFORM_TARGET_OVERRIDE", raising=False)
    a = rand(4, 8)
    np.testing.assert_array_equal(nki.jit(copy, platform_target="trn1")(a), a)
    np.testing.assert_array_equal(nki.jit(platform_target="trn1")(copy)[1](a), a)
    for value, gen in (("trn2", 3), ("trn3", 4)):
        kernel = nki.jit(mode="trace", platform_target=value)(copy)
        for runnable in (kernel, kernel[1]):
            with pytest.raises(NKIRuleError, match=rf"error: @nki.jit\(platform_target='{value}'\) compiles for "
                                                   f"NeuronCore-v{gen}; the emulator models NeuronCore-v2"):
                runnable(a)
    for value in ("gen3", "inf2", "TRN2", "trn3_a0"):
        with pytest.raises(ValueError, match=f"error: nki.jit: platform_target='{value}' is not a target"):
            nki.jit(copy, platform_target=value)
    monkeypatch.setenv("NEURON_PLATFORM_TARGET_OVERRIDE", "trn2")
    with pytest.raises(NKIRuleError, match="NEURON_PLATFORM_TARGET_OVERRIDE='trn2' compiles for NeuronCore-v3"):
        nki.jit(copy, platform_target="trn1")(a)
    assert len(started) == 2


def test_tensor_names_are_unique_on_the_neuroncore():
    """[nl] ndarray: `name` "has to be unique for tensors on each Physical NeuronCore" (lines 70-72): a second
    declaration with a name already given (SBUF, PSUM, HBM; nl.zeros too) is refused; one line reached again
    (a loop) and same-named shared_hbm tensors (linked across cores, lines 74-77) are accepted."""

    def two_tiles_one_name(a):
        t = nl.ndarray(a.shape, dtype=nl.float32, name="t")
        u = nl.zeros(a.shape, dtype=nl.float32, buffer=nl.psum, name="t")

    msg = raises(two_tiles_one_name, rand(4, 8), match=r"nl.zeros: a tensor name must be unique on the NeuronCore")
    assert re.search(r"name 't' at test_nki_rules.py:\d+, already given at test_nki_rules.py:\d+", msg)

    def two_hbm_tensors_one_name(a):
        x = nl.ndarray(a.shape, dtype=nl.float32, buffer=nl.hbm, name="scratch")
        y = nl.ndarray(a.shape, dtype=nl.float32, buffer=nl.hbm, name="scratch")

    raises(two_hbm_tensors_one_name, rand(4, 8), match="nl.ndarray: a tensor name must be unique")

    def named_in_a_loop_and_shared(a):
        for i in nl.affine_range(2):
            t = nl.ndarray(a.shape, dtype=nl.float32, name="tile")
            nisa.dma_copy(dst=t, src=a)
        out = nl.ndarray(a.shape, dtype=nl.float32, buffer=nl.shared_hbm, name="out")
        alias = nl.ndarray(a.shape, dtype=nl.float32, buffer=nl.shared_hbm, name="out")
        nisa.dma_copy(dst=out, src=t)
        return out

    a = rand(4, 8)
    np.testing.assert_array_equal(run(named_in_a_loop_and_shared, a), a)


def test_psum_has_eight_banks_and_tiles_take_whole_banks():
    def nine_banks():
        tiles = [nl.ndarray((128, 2), dtype=nl.float32, buffer=nl.psum) for _ in range(9)]  # 8 B each, a bank each
        for tile in tiles:
            nisa.memset(dst=tile, value=0.0)

    with pytest.warns(NKISpillWarning, match="PSUM has 8 banks of 2048 B per partition: new tile"):
        _, prof = nki.simulate(nki.jit(nine_banks))  # spilled, as SBUF tiles are
    assert prof.peak_psum_bytes == 9 * 2048

    def too_big():
        nl.ndarray((128, 4097), dtype=nl.float32, buffer=nl.psum)

    raises(too_big, match="PSUM holds 16384 bytes per partition")

    def eight_banks():
        tiles = [nl.ndarray((128, 512), dtype=nl.float32, buffer=nl.psum) for _ in range(7)]
        tiles.append(nl.ndarray((128, 512), dtype=nl.float32, buffer=nl.psum))  # the eighth bank still fits

    run(eight_banks)


def test_psum_accumulation_group():
    """Matmuls into one PSUM region accumulate until another instruction writes it; then they overwrite."""

    def kernel(x, y):
        acc = nl.ndarray((16, 32), dtype=nl.float32, buffer=nl.psum)
        nisa.nc_matmul(dst=acc, stationary=load(x), moving=load(y))
        nisa.nc_matmul(dst=acc, stationary=load(x), moving=load(y))  # accumulates: 2 x^T y
        first = nl.ndarray((16, 32), dtype=nl.float32)
        nisa.tensor_copy(dst=first, src=acc)
        nisa.memset(dst=acc, value=5.0)  # closes the group
        nisa.nc_matmul(dst=acc, stationary=load(x), moving=load(y))  # overwrites
        second = nl.ndarray((16, 32), dtype=nl.float32)
        nisa.tensor_copy(dst=second, src=acc)
        return store(first), store(second)

    x, y = rand(8, 16), rand(8, 32)
    first, second = run(kernel, x, y)
    np.testing.assert_allclose(first, 2 * x.T @ y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(second, x.T @ y, rtol=1e-5, atol=1e-5)


def test_psum_access_patterns_share_the_tiles_accumulation_group():
    """An access pattern over a PSUM tile is the same PSUM region of the same tile as a slice is: a matmul
    through it continues the tile's open group, and another write through it closes the group ([arch]
    "Near-memory accumulation in PSUM": a group is the matmuls accumulating into the same PSUM bank data)."""

    def kernel(x, y):
        acc = nl.ndarray((16, 32), dtype=nl.float32, buffer=nl.psum)
        xs, ys = load(x), load(y)
        nisa.nc_matmul(dst=acc, stationary=xs, moving=ys)
        nisa.nc_matmul(dst=acc.ap([[32, 16], [1, 32]]), stationary=xs, moving=ys)  # accumulates: 2 x^T y
        nisa.nc_matmul(dst=acc.ap([[32, 16], [1, 8]], offset=8), stationary=xs, moving=ys[:, 8:16])  # 3x there
        sums = nl.ndarray((16, 32), dtype=nl.float32)
        nisa.tensor_copy(dst=sums, src=acc)
        nisa.memset(dst=acc.ap([[32, 16], [1, 16]]), value=5.0)  # closes the group on columns 0-15
        nisa.nc_matmul(dst=acc, stationary=xs, moving=ys)  # overwrites there, accumulates on 16-31
        again = nl.ndarray((16, 32), dtype=nl.float32)
        nisa.tensor_copy(dst=again, src=acc)
        return store(sums), store(again)

    x, y = rand(8, 16), rand(8, 32)
    sums, again = run(kernel, x, y)
    product = x.T @ y
    expected = 2 * product
    expected[:, 8:16] += product[:, 8:16]
    np.testing.assert_allclose(sums, expected, rtol=1e-5, atol=1e-5)
    expected = np.concatenate([product[:, :16], 3 * product[:, 16:]], axis=1)
    np.testing.assert_allclose(again, expected, rtol=1e-5, atol=1e-5)


def test_two_psum_inputs_are_not_allowed():
    def both(a):
        p1 = nl.ndarray((8, 8), dtype=nl.float32, buffer=nl.psum)
        p2 = nl.ndarray((8, 8), dtype=nl.float32, buffer=nl.psum)
        nisa.memset(dst=p1, value=0.0)
        nisa.memset(dst=p2, value=0.0)
        out = nl.ndarray((8, 8), dtype=nl.float32)
        nisa.tensor_tensor(dst=out, data1=p1, data2=p2, op=nl.add)

    assert raises(both, rand(8, 8), match="both be in PSUM").startswith("nisa.tensor_tensor")

    def one(a):
        p1 = nl.ndarray((8, 8), dtype=nl.float32, buffer=nl.psum)
        nisa.memset(dst=p1, value=1.0)
        out = nl.ndarray((8, 8), dtype=nl.float32)
        nisa.tensor_tensor(dst=out, data1=p1, data2=load(a), op=nl.add)
        return store(out)

    a = rand(8, 8)
    np.testing.assert_allclose(run(one, a), a + 1, rtol=1e-6)


def test_dma_reaches_hbm_and_sbuf_only_and_adds_only():
    def from_psum():
        p = nl.ndarray((8, 8), dtype=nl.float32, buffer=nl.psum)
        nisa.memset(dst=p, value=0.0)
        out = nl.ndarray((8, 8), dtype=nl.float32, buffer=nl.shared_hbm)
        nisa.dma_copy(dst=out, src=p)

    raises(from_psum, match="DMA reaches HBM and SBUF only")

    def rmw_max(a):
        out = nl.ndarray(a.shape, dtype=nl.float32, buffer=nl.shared_hbm)
        nisa.dma_copy(dst=out, src=load(a), dst_rmw_op=nl.maximum)

    raises(rmw_max, rand(4, 4), match="dst_rmw_op supports only nl.add")

    def sizes(a):
        out = nl.ndarray((4, 5), dtype=nl.float32, buffer=nl.shared_hbm)
        nisa.dma_copy(dst=out, src=load(a))

    raises(sizes, rand(4, 4), match="same number of elements")


def test_scalar_operands_are_fp32_vectors_or_constants():
    def bf16_operand(a):
        out = nl.ndarray(a.shape, dtype=nl.float32)
        nisa.tensor_scalar(dst=out, data=load(a), op0=nl.multiply, operand0=load(a[:, 0:1], nl.bfloat16))

    raises(bf16_operand, rand(8, 8), match="operand0 must be float32")

    def wide_operand(a):
        out = nl.ndarray(a.shape, dtype=nl.float32)
        nisa.tensor_scalar(dst=out, data=load(a), op0=nl.multiply, operand0=load(a[:, 0:2]))

    raises(wide_operand, rand(8, 8), match="operand0 must be a scalar or a .partitions, 1. vector")


def test_gpsimd_pattern_instructions_write_sbuf():
    def iota_psum():
        p = nl.ndarray((8, 4), dtype=nl.float32, buffer=nl.psum)
        nisa.iota(dst=p, pattern=[[1, 4]], offset=0)

    raises(iota_psum, match="dst must be in sbuf")

    def select_tile_false(a):
        out = nl.ndarray(a.shape, dtype=nl.float32)
        nisa.affine_select(dst=out, pattern=[[1, 4]], offset=0, channel_multiplier=1, on_true_tile=load(a),
                           on_false_value=load(a))

    raises(select_tile_false, rand(4, 4), match="on_false_value must be a float32 scalar")


def test_item_assignment_is_rejected():
    def kernel(a):
        t = load(a)
        t[0:1, :] = 0

    raises(kernel, rand(8, 8), match="written by instructions only")


# ----------------------------------------------------------------------------- top-8 search
def test_max8_and_find_index8():
    """[isa] max8 / nc_find_index8: 8..16,384 elements per partition, (P, 8) dst, uint16/uint32 indices."""
    def top8(a):
        data = load(a)
        vals = nl.ndarray((a.shape[0], 8), dtype=nl.float32)
        nisa.max8(dst=vals, src=data)
        idx = nl.ndarray((a.shape[0], 8), dtype=nl.uint32)
        nisa.nc_find_index8(dst=idx, data=data, vals=vals)
        return store(vals), store(idx)

    a = rand(16, 2, 50)
    vals, idx = run(top8, a)
    flat = a.reshape(16, -1)
    np.testing.assert_array_equal(vals, -np.sort(-flat, axis=1)[:, :8])
    np.testing.assert_array_equal(idx, np.argsort(-flat, axis=1, kind="stable")[:, :8])

    def too_few(a):
        nisa.max8(dst=nl.ndarray((a.shape[0], 8), dtype=nl.float32), src=load(a))

    raises(too_few, rand(4, 7), match="max8: src is up to 5-D with 8 to 16,384 elements per partition")

    def float_indices(a):
        data = load(a)
        vals = nl.ndarray((a.shape[0], 8), dtype=nl.float32)
        nisa.max8(dst=vals, src=data)
        nisa.nc_find_index8(dst=nl.ndarray((a.shape[0], 8), dtype=nl.float32), data=data, vals=vals)

    raises(float_indices, rand(4, 32), match="nc_find_index8: dst must be uint16 or uint32")

    def absent_value(a):
        data = load(a)
        vals = nl.ndarray((a.shape[0], 8), dtype=nl.float32)
        nisa.memset(dst=vals, value=1e9)
        nisa.nc_find_index8(dst=nl.ndarray((a.shape[0], 8), dtype=nl.uint32), data=data, vals=vals)

    raises(absent_value, rand(4, 32), match="every value of vals must occur")


def test_scalar_tensor_tensor():
    """[isa] scalar_tensor_tensor: (data op0 operand0) op1 operand1 on Vector; operand0 a constant or a
    (P, 1) tile, operand1 shaped like data, arithmetic operators only, data and operand1 not both in PSUM."""
    def fused(a, col, b):
        out = nl.ndarray(a.shape, dtype=nl.float32)
        nisa.scalar_tensor_tensor(dst=out, data=load(a), op0=nl.subtract, operand0=load(col), op1=nl.multiply,
                                  operand1=load(b))
        return store(out)

    a, col, b = rand(8, 16), rand(8, 1), rand(8, 16)
    np.testing.assert_allclose(run(fused, a, col, b), (a - col) * b, rtol=1e-6)

    def reversed_ops(a, b):
        out = nl.ndarray(a.shape, dtype=nl.float32)
        nisa.scalar_tensor_tensor(dst=out, data=load(a), op0=nl.subtract, operand0=2.0, reverse0=True,
                                  op1=nl.subtract, operand1=load(b), reverse1=True)
        return store(out)

    np.testing.assert_allclose(run(reversed_ops, a, b), b - (2.0 - a), rtol=1e-6)

    def wide_operand0(a, b):
        out = nl.ndarray(a.shape, dtype=nl.float32)
        nisa.scalar_tensor_tensor(dst=out, data=load(a), op0=nl.add, operand0=load(b), op1=nl.multiply,
                                  operand1=load(b))

    raises(wide_operand0, a, b, match="operand0 must be a scalar or a \\(partitions, 1\\) tile")

    def bitvec(a, b):
        out = nl.ndarray(a.shape, dtype=nl.int32)
        nisa.scalar_tensor_tensor(dst=out, data=load(a, nl.int32), op0=nl.bitwise_and, operand0=1,
                                  op1=nl.add, operand1=load(b, nl.int32))

    raises(bitvec, np.round(a * 8), np.round(b * 8), match="op0 and op1 must be arithmetic operators")


# ----------------------------------------------------------------------------- operands, dtypes, placement
def test_tensor_dtypes_are_nki_language_types():
    """nki.api.shared.rst "Supported Data Types": a dtype must be a nki.language data type (no 64-bit)."""
    def float64_tile(a):
        t = nl.ndarray(a.shape, dtype=np.float64)
        nisa.dma_copy(dst=t, src=a)

    raises(float64_tile, rand(4, 4), match=r"nl.ndarray: dtype must be a nki.language data type .*\(dtype float64\)")

    def int64_hbm():
        nl.zeros((4, 4), dtype=np.int64, buffer=nl.shared_hbm)

    raises(int64_hbm, match=r"nl.zeros: dtype must be a nki.language data type .*\(dtype int64\)")

    def int64_view(a):
        t = load(a)
        nisa.tensor_copy(dst=nl.ndarray((4, 2), dtype=nl.float32), src=t.ap([[4, 4], [1, 2]], dtype=np.int64))

    raises(int64_view, rand(4, 4), match=r"tensor.ap: dtype must be a nki.language data type")

    def every_nki_dtype(a):
        outs = []
        for dt in (nl.bool_, nl.int8, nl.int16, nl.int32, nl.uint8, nl.uint16, nl.uint32, nl.float16,
                   nl.float32, nl.bfloat16, nl.tfloat32, nl.float8_e4m3, nl.float8_e5m2, nl.float8_e4m3fn, np.bool_):
            outs.append(store(load(a, dt)))
        return tuple(outs)

    a = np.abs(rand(4, 4)).round() + 1
    for out in run(every_nki_dtype, a):
        np.testing.assert_array_equal(out.astype(np.float32), a.astype(out.dtype).astype(np.float32))


@pytest.mark.parametrize("op", [nl.abs, nl.rsqrt, nl.reciprocal])
def test_elementwise_tensor_ops_need_binary_operators(op):
    """[isa] tensor_tensor "Any supported *binary* operator", tensor_tensor_scan "a binary arithmetic math
    operator", scalar_tensor_tensor op1 as tensor_tensor's op: the one-input ALU operators are refused."""
    def tt(a):
        t = load(a)
        nisa.tensor_tensor(dst=nl.ndarray(a.shape, dtype=nl.float32), data1=t, data2=t, op=op)

    raises(tt, rand(4, 4), match=f"tensor_tensor: op must be a binary operator; nl.{op.name} takes one input")

    def scan(a):
        t = load(a)
        nisa.tensor_tensor_scan(dst=nl.ndarray(a.shape, dtype=nl.float32), data0=t, data1=t, initial=0.0,
                                op0=op, op1=nl.add)

    raises(scan, rand(4, 4), match=f"tensor_tensor_scan: op0 must be a binary operator; nl.{op.name}")

    def stt(a):
        t = load(a)
        nisa.scalar_tensor_tensor(dst=nl.ndarray(a.shape, dtype=nl.float32), data=t, op0=nl.add, operand0=1.0,
                                  op1=op, operand1=t)

    raises(stt, rand(4, 4), match=f"scalar_tensor_tensor: op1 must be a binary operator; nl.{op.name}")

    def unary_in_tensor_scalar(a):  # tensor_scalar takes them (the [ops] rsqrt example passes operand0=0.0)
        out = nl.ndarray(a.shape, dtype=nl.float32)
        nisa.tensor_scalar(dst=out, data=load(a), op0=op, operand0=0.0)
        return store(out)

    a = np.abs(rand(4, 4)) + 0.5
    expected = {"abs": np.abs(a), "rsqrt": 1 / np.sqrt(a), "reciprocal": 1 / a}[op.name]
    np.testing.assert_allclose(run(unary_in_tensor_scalar, a), expected, rtol=1e-6)


def test_binary_operators_in_tensor_tensor_and_scan():
    def tt_and_scan(a, b):
        x, y = load(a), load(b)
        prod = nl.ndarray(a.shape, dtype=nl.float32)
        nisa.tensor_tensor(dst=prod, data1=x, data2=y, op=nl.subtract)
        scan = nl.ndarray(a.shape, dtype=nl.float32)
        nisa.tensor_tensor_scan(dst=scan, data0=x, data1=y, initial=1.0, op0=nl.multiply, op1=nl.add)
        return store(prod), store(scan)

    a, b = rand(4, 6), rand(4, 6)
    prod, scan = run(tt_and_scan, a, b)
    np.testing.assert_allclose(prod, a - b, rtol=1e-6)
    ref, prev = np.empty_like(a), np.ones(4, np.float32)
    for i in range(6):
        prev = a[:, i] * prev + b[:, i]
        ref[:, i] = prev
    np.testing.assert_allclose(scan, ref, rtol=1e-5)


def test_dma_hardware_dge_needs_v3():
    """[isa] dma_copy: "Hardware based DGE is only supported for NeuronCore-v3 or newer"."""
    def hwdge(a):
        nisa.dma_copy(dst=nl.ndarray(a.shape, dtype=nl.float32), src=a, dge_mode=nisa.dge_mode.hwdge)

    raises(hwdge, rand(4, 4), match="dma_copy: dge_mode=hwdge .hardware DGE. needs NeuronCore-v3 or newer")

    def swdge(a):
        t = nl.ndarray(a.shape, dtype=nl.float32)
        nisa.dma_copy(dst=t, src=a, dge_mode=nisa.dge_mode.swdge)
        return store(t)

    a = rand(4, 4)
    np.testing.assert_array_equal(run(swdge, a), a)


def test_psum_address_starts_a_bank():
    """nki-migration-guide.rst: "The allocation for PSUM tensors must start at the beginning of each bank"."""
    def mid_bank():
        nl.ndarray((128, 256), dtype=nl.float32, buffer=nl.psum, address=(0, 1024))

    raises(mid_bank, match=r"nl.ndarray: a PSUM address must start a bank .* \(address=\(0, 1024\)")

    def bank_three(a):
        p = nl.ndarray((4, 4), dtype=nl.float32, buffer=nl.psum, address=(0, 3 * 2048))
        nisa.tensor_copy(dst=p, src=load(a))
        out = nl.ndarray((4, 4), dtype=nl.float32, address=(0, 100))  # SBUF addresses need no bank
        nisa.tensor_copy(dst=out, src=p)
        return store(out)

    a = rand(4, 4)
    np.testing.assert_array_equal(run(bank_three, a), a)


def test_memset_value_is_a_constant():
    """[isa] memset fills dst with "a compile-time constant value"."""
    def tile_value(a):
        t = load(a)
        nisa.memset(dst=nl.ndarray(a.shape, dtype=nl.float32), value=t[:, 0:1])

    raises(tile_value, rand(4, 4), match="memset: value must be a compile-time constant")

    def constant(a):
        t = nl.ndarray(a.shape, dtype=nl.int32)
        nisa.memset(dst=t, value=7)
        return store(t)

    np.testing.assert_array_equal(run(constant, rand(4, 4)), np.full((4, 4), 7, np.int32))


def test_activation_has_no_load_reduce():
    """[isa] activation documents reduce_cmd reset / idle / reduce / reset_reduce; load_reduce has no value
    to load there."""
    def load_reduce(a):
        nisa.activation(dst=nl.ndarray(a.shape, dtype=nl.float32), op=nl.copy, data=load(a), reduce_op=nl.add,
                        reduce_cmd=nisa.reduce_cmd.load_reduce)

    raises(load_reduce, rand(4, 4), match="activation: reduce_cmd=load_reduce is not documented for activation")

    def reduce_without_op(a):  # [isa] activation lines 114-116, 142-145: the reduction is reduce_op's, nl.add
        nisa.activation(dst=nl.ndarray(a.shape, dtype=nl.float32), op=nl.copy, data=load(a),
                        reduce_cmd=nisa.reduce_cmd.reset_reduce)

    raises(reduce_without_op, rand(4, 4), match="activation: a reducing reduce_cmd needs reduce_op=nl.add "
                                                r"\(reduce_cmd=reset_reduce, reduce_op=None\)")

    def two_steps(a, b):
        out = nl.ndarray(a.shape, dtype=nl.float32)
        res = nl.ndarray((a.shape[0], 1), dtype=nl.float32)
        nisa.activation(dst=out, op=nl.copy, data=load(a), reduce_op=nl.add, reduce_cmd=nisa.reduce_cmd.reset_reduce)
        nisa.activation(dst=out, op=nl.copy, data=load(b), reduce_op=nl.add, reduce_cmd=nisa.reduce_cmd.reduce,
                        reduce_res=res)
        return store(res)

    a, b = rand(4, 4), rand(4, 4)
    np.testing.assert_allclose(run(two_steps, a, b)[:, 0], a.sum(1) + b.sum(1), rtol=1e-5, atol=1e-6)


def test_activation_reduce_adds_on_v2():
    """[isa] activation_reduce: "On NeuronCore-v2, the reduce_op must be nl.add" (None is not nl.add)."""
    def no_reduce_op(a):
        res = nl.ndarray((a.shape[0], 1), dtype=nl.float32)
        nisa.activation_reduce(dst=nl.ndarray(a.shape, dtype=nl.float32), op=nl.exp, data=load(a), reduce_op=None,
                               reduce_res=res)

    raises(no_reduce_op, rand(4, 4),
           match=r"activation_reduce: reduce_op must be nl.add on NeuronCore-v2 \(reduce_op=None\)")

    def summed(a):
        res = nl.ndarray((a.shape[0], 1), dtype=nl.float32)
        nisa.activation_reduce(dst=nl.ndarray(a.shape, dtype=nl.float32), op=nl.exp, data=load(a), reduce_op=nl.add,
                               reduce_res=res)
        return store(res)

    a = rand(4, 4)
    np.testing.assert_allclose(run(summed, a)[:, 0], np.exp(a).sum(1), rtol=1e-5)


def test_iota_offsets_are_int32():
    """[isa] iota / affine_select: "an int32 offset value", "an int32 multiplier"."""
    def half_offset():
        nisa.iota(dst=nl.ndarray((4, 4), dtype=nl.int32), pattern=[[1, 4]], offset=0.5)

    raises(half_offset, match=r"iota: offset must be an int32 value \(offset=0.5\)")

    def huge_multiplier(a):
        t = load(a)
        nisa.affine_select(dst=t, pattern=[[1, 4]], offset=0, channel_multiplier=2 ** 31, on_true_tile=t,
                           on_false_value=0.0)

    raises(huge_multiplier, rand(4, 4), match="affine_select: channel_multiplier must be an int32 value")

    def ramp():
        t = nl.ndarray((4, 4), dtype=nl.int32)
        nisa.iota(dst=t, pattern=[[1, 4]], offset=-3, channel_multiplier=10)
        return store(t)

    np.testing.assert_array_equal(run(ramp), np.arange(4)[None, :] - 3 + 10 * np.arange(4)[:, None])


def test_affine_select_compares():
    """[isa] affine_select: "cmp_op: comparison operator to use for predicate evaluation"."""
    def subtract_predicate(a):
        t = load(a)
        nisa.affine_select(dst=t, pattern=[[1, 4]], offset=0, channel_multiplier=-1, on_true_tile=t,
                           on_false_value=0.0, cmp_op=nl.subtract)

    raises(subtract_predicate, rand(4, 4), match=r"affine_select: cmp_op must be a comparison operator .*nl.subtract")

    def strict_upper(a):
        t, out = load(a), nl.ndarray(a.shape, dtype=nl.float32)
        nisa.affine_select(dst=out, pattern=[[1, 4]], offset=0, channel_multiplier=-1, on_true_tile=t,
                           on_false_value=0.0, cmp_op=nl.greater)
        return store(out)

    a = rand(4, 4)
    np.testing.assert_array_equal(run(strict_upper, a), np.triu(a, 1))


def test_affine_select_requires_what_the_stub_lists_without_a_default():
    """The 0.2.0 stub: affine_select(dst, pattern, offset, channel_multiplier, on_true_tile, on_false_value,
    cmp_op=nl.equal, name=None); `offset` alone may be left out (nki-library's cascaded_max.py does)."""
    def select(a, given):
        t, out = load(a), nl.ndarray(a.shape, dtype=nl.float32)
        nisa.affine_select(out, [[1, 4]], on_true_tile=t, **given)
        return store(out)

    a = rand(4, 4)
    upper = {"channel_multiplier": -1, "on_false_value": 0.0, "cmp_op": nl.greater_equal}
    np.testing.assert_array_equal(run(select, a, upper), np.triu(a))
    for given, missing in (({"on_false_value": 0.0}, "channel_multiplier"), ({"channel_multiplier": -1},
                                                                             "on_false_value")):
        with pytest.raises(TypeError, match=rf"affine_select\(\) missing required argument\(s\): {missing}"):
            run(select, a, given)


def test_an_axis_longer_than_a_uint16_count_is_refused():
    """trainium_inferentia2_arch.rst lines 715-718: each free axis of an access pattern has "a size expressed in
    uint16": 65,537 (a prime) elements in a row cannot be walked; 65,536 = 2 x 32,768 can, as two axes."""
    def ramp(n):
        t = nl.ndarray((1, n), dtype=nl.uint8)
        nisa.iota(dst=t, pattern=[[0, 1], [0, n]], offset=0)
        copy = nl.ndarray((1, n), dtype=nl.uint8)
        nisa.tensor_copy(dst=copy, src=t)

    raises(ramp, 2 ** 16 + 1, match=r"nisa.iota: a free axis has at most 65535 elements.*\[65537\]")
    raises(ramp, 2 ** 16, match=r"nisa.iota: each pattern num is 1 to 65535")
    def copy_row(n):
        t = nl.ndarray((1, n), dtype=nl.uint8)
        nisa.memset(dst=t, value=3)
        copy = nl.ndarray((1, n), dtype=nl.uint8)
        nisa.tensor_copy(dst=copy, src=t)
        return store(copy)

    np.testing.assert_array_equal(run(copy_row, 2 ** 16), np.full((1, 2 ** 16), 3, np.uint8))


# ----------------------------------------------------------------------------- kernel launches
@nki.jit
def _halves_plus_one(x):
    """x + 1 for x of shape (2, P, F), each program of the launch grid taking its share of the halves
    (the work split of the LNC-aware example in get-started/about/lnc.rst)."""
    out = nl.ndarray(x.shape, dtype=x.dtype, buffer=nl.shared_hbm)
    per_program = x.shape[0] // nl.num_programs()
    first = nl.program_id(0) * per_program
    for i in nl.affine_range(per_program):
        t = load(x[first + i])
        nisa.tensor_scalar(dst=t, data=t, op0=nl.add, operand0=1.0)
        nisa.dma_copy(dst=out[first + i], src=t)
    return out


@nki.jit
def _launch_queries():
    """program_id(0), num_programs(), num_programs(axes=0), program_ndim() as one int32 row."""
    t = nl.ndarray((1, 4), dtype=nl.int32, buffer=nl.sbuf)
    answers = [nl.program_id(0), nl.num_programs(), nl.num_programs(axes=0), nl.program_ndim()]
    for col, value in enumerate(answers):
        nisa.memset(dst=t[:, col:col + 1], value=value)
    return store(t)


def test_launch_grid_is_one_number():
    """lnc.rst: "The bracket syntax must contain only one number, the number of cores to use"."""
    x = rand(2, 8, 16)
    for grid in ((1, 1), (1,), 1.0, nl.int32):
        with pytest.raises(NKIRuleError, match=r"_halves_plus_one\[...\]: the launch grid is one number"):
            _halves_plus_one[grid]
    with pytest.raises(AttributeError, match="nl.nc is not in the NKI 0.2.0 nki.language stub"):
        nl.nc(2)
    with pytest.raises(AttributeError, match="nl.spmd_dim is not in the NKI 0.2.0 nki.language stub"):
        nl.spmd_dim(1, 2)
    np.testing.assert_array_equal(_halves_plus_one[1](x), x + 1)
    np.testing.assert_array_equal(_halves_plus_one(x), x + 1)  # no brackets: one core (lnc.rst)


def test_trn1_launches_on_one_logical_core():
    """NCC_EARG001: "On trn1, only lnc=1 is supported"; lnc.rst: a count too large for the architecture
    is an error."""
    for count in (2, 8, 0):
        with pytest.raises(NKIRuleError, match=r"only lnc=1 is supported on trn1 .* \(got _halves_plus_one"):
            _halves_plus_one[count]
    x = rand(2, 8, 16)
    np.testing.assert_array_equal(_halves_plus_one[np.int64(1)](x), x + 1)


def test_program_queries_with_and_without_a_grid():
    """lnc.rst: without LNC num_programs() is 1 and program_id(0) is 0; program_ndim() is 0 without
    brackets (nki-library kernel_helpers.get_program_sharding_info) and 1 for kernel[n]."""
    np.testing.assert_array_equal(_launch_queries(), [[0, 1, 1, 0]])
    np.testing.assert_array_equal(_launch_queries[1](), [[0, 1, 1, 1]])


def test_program_id_names_an_axis_of_the_grid():
    """The launch grid has one axis (lnc.rst: one number), so program_id / num_programs take axis 0."""
    def second_axis():
        nl.program_id(1)

    raises(nki.jit(second_axis)[1], match=r"nl.program_id: a launch grid has one axis, 0 .*axis=1, grid \[1\]")
    raises(second_axis, match=r"nl.program_id: a launch grid has one axis, 0 .*axis=1, grid none")

    def programs_on_second_axis():
        nl.num_programs(axes=(0, 1))

    raises(programs_on_second_axis, match=r"nl.num_programs: a launch grid has one axis")
    np.testing.assert_array_equal(_launch_queries[1](), [[0, 1, 1, 1]])


# ----------------------------------------------------------------------------- instructions nki-library needs
def test_dma_transpose_permutes_by_rank_and_keeps_the_dtype():
    """[isa] dma_transpose: (1, 0) for 2-d, (2, 1, 0) for 3-d, (3, 1, 2, 0) for 4-d; hwdge needs v3."""

    def transpose(a, axes=None, dge_mode=nisa.dge_mode.unknown, dst_dtype=None):
        perm = (1, 0) if a.ndim == 2 else (2, 1, 0) if a.ndim == 3 else (3, 1, 2, 0)
        shape = a.shape[::-1] if a.ndim < 4 else (a.shape[3], a.shape[1], a.shape[2], a.shape[0])
        out = nl.ndarray(shape, dtype=dst_dtype or a.dtype, buffer=nl.shared_hbm)
        nisa.dma_transpose(dst=out, src=a, axes=axes, dge_mode=dge_mode)
        return out

    for shape, perm in (((16, 128), (1, 0)), ((4, 8, 16), (2, 1, 0)), ((2, 3, 4, 5), (3, 1, 2, 0))):
        a = rand(*shape)
        np.testing.assert_array_equal(run(transpose, a), a.transpose(perm))
        np.testing.assert_array_equal(run(transpose, a, perm), a.transpose(perm))
    raises(transpose, rand(4, 8, 16), (1, 0, 2), match="axes for a 3-d tile must be \\(2, 1, 0\\)")
    raises(transpose, rand(16, 128), None, nisa.dge_mode.hwdge, match="needs NeuronCore-v3")
    raises(transpose, rand(16, 128), None, nisa.dge_mode.swdge, match="only valid dge_modes are unknown and hwdge")
    raises(transpose, rand(16, 128), None, nisa.dge_mode.unknown, nl.bfloat16, match="same dtype")
    raises(transpose, rand(8), match="2-d, 3-d or 4-d")


def test_tensor_scalar_reduce():
    """[isa] tensor_scalar_reduce: dst = data op0 operand0, reduce_res = reduce_op over the free axes of dst."""

    def scale_and_max(a, op0=nl.multiply, reduce_op=nl.maximum, reverse0=False):
        x = load(a)
        out, red = nl.ndarray(a.shape, dtype=nl.float32), nl.ndarray((a.shape[0], 1), dtype=nl.float32)
        nisa.tensor_scalar_reduce(dst=out, data=x, op0=op0, operand0=-2.0, reduce_op=reduce_op, reduce_res=red,
                                  reverse0=reverse0)
        return store(out), store(red)

    a = rand(16, 64)
    out, red = run(scale_and_max, a)
    np.testing.assert_allclose(out, -2 * a, rtol=1e-6)
    np.testing.assert_allclose(red, (-2 * a).max(axis=1, keepdims=True), rtol=1e-6)
    out, red = run(scale_and_max, a, nl.add, nl.add)
    np.testing.assert_allclose(red, (a - 2).sum(axis=1, keepdims=True), rtol=1e-5)
    raises(scale_and_max, a, nl.bitwise_and, match="op0 must be an arithmetic operator")
    raises(scale_and_max, a, nl.multiply, nl.divide, match="op must be listed in the ALU operator table")
    raises(scale_and_max, a, nl.multiply, nl.maximum, True, match="reverse0 is not supported yet")


def test_placed_tiles_leave_the_live_count_but_must_fit():
    """A tile given address= is placed by the kernel (nki-library's allocator reuses addresses while older tiles
    are referenced): it must fit the buffer there, and does not count against the live tiles."""

    def nine_placed_banks(a):
        tiles = [nl.ndarray((128, 512), dtype=nl.float32, buffer=nl.psum, address=(0, (i % 8) * 2048))
                 for i in range(9)]
        return store(load(a))

    a = rand(4, 4)
    np.testing.assert_array_equal(run(nine_placed_banks, a), a)

    def nine_banks(a):
        tiles = [nl.ndarray((128, 512), dtype=nl.float32, buffer=nl.psum) for _ in range(9)]

    with pytest.warns(NKISpillWarning, match="PSUM has 8 banks"):  # compiler-placed: the ninth bank spills
        run(nine_banks, a)

    def beyond_sbuf(a):
        nl.ndarray((128, 1024), dtype=nl.float32, address=(0, SBUF_USABLE_BYTES_PER_PARTITION - 1024))

    raises(beyond_sbuf, a, match="a placed tile must fit the sbuf")

    def beyond_partitions(a):
        nl.ndarray((64, 16), dtype=nl.float32, address=(96, 0))

    raises(beyond_partitions, a, match="a placed tile must fit the sbuf")


def test_placed_tiles_share_memory():
    """Tiles placed at overlapping addresses are views of the same bytes (nki-language-guide.rst lines 210-218:
    tensors over the same region "use the same underlying memory"; nki-migration-guide.rst "Improved Allocation
    API": address = (partition, byte offset)): a write through one is read through the other, across dtypes,
    partitions, access patterns and PSUM; placed memory nothing wrote reads NaN."""
    a = rand(128, 64)

    def aliases(a, identity):
        wide = nl.ndarray((128, 64), dtype=nl.float32, address=(0, 256))
        right = nl.ndarray((128, 32), dtype=nl.float32, address=(0, 384))  # wide[:, 32:]
        halves = nl.ndarray((128, 128), dtype=nl.bfloat16, address=(0, 256))  # wide's bytes as bf16
        lower = nl.ndarray((32, 64), dtype=nl.float32, address=(32, 256))  # wide[32:64]
        nisa.dma_copy(dst=wide, src=a)
        seen = [store(right), store(halves), store(lower)]
        nisa.memset(dst=right, value=1.0)
        seen.append(store(wide))
        every_other = wide.ap([[64, 128], [2, 16]], offset=1)  # columns 1, 3, .., 31
        seen.append(store(every_other))
        bank = nl.ndarray((128, 512), dtype=nl.float32, buffer=nl.psum, address=(0, 2048))
        head = nl.ndarray((128, 64), dtype=nl.float32, buffer=nl.psum, address=(0, 2048))
        nisa.tensor_copy(dst=head, src=wide)
        back = nl.ndarray((128, 64), dtype=nl.float32)
        nisa.tensor_copy(dst=back, src=bank[:, 0:64])
        seen.append(store(back))
        seen.append(store(nl.ndarray((4, 8), dtype=nl.float32, address=(0, 4096))))
        # a new PSUM tile starts its own accumulation group: its first matmul overwrites the old tile's sums
        eye = load(identity)
        for _ in range(2):
            sums = nl.ndarray((64, 64), dtype=nl.float32, buffer=nl.psum, address=(0, 4096))
            nisa.nc_matmul(dst=sums, stationary=eye, moving=wide)  # wide's first 64 partitions
        nisa.tensor_copy(dst=back[0:64, :], src=bank[0:64, 0:64])
        seen.append(store(back))
        return tuple(seen)

    right, halves, lower, wide, every_other, through_psum, fresh, product = run(aliases, a, np.eye(128, 64, dtype=np.float32))
    np.testing.assert_array_equal(right, a[:, 32:])
    np.testing.assert_array_equal(halves, a.view(ml_dtypes.bfloat16))
    np.testing.assert_array_equal(lower, a[32:64])
    expected = a.copy()
    expected[:, 32:] = 1.0
    np.testing.assert_array_equal(wide, expected)
    np.testing.assert_array_equal(every_other, a[:, 1:32:2])
    np.testing.assert_array_equal(through_psum, expected)
    assert np.isnan(fresh).all()
    np.testing.assert_array_equal(product[:64], expected[:64])

    def off_quadrant(a):  # placed at partition 16: 16 partitions must start at 0, 32, 64 or 96
        tile = nl.ndarray((16, 64), dtype=nl.float32, address=(16, 0))
        nisa.memset(dst=tile, value=0.0)

    raises(off_quadrant, a, match="partition start rule .* starts at partition 16")

    def past_the_row(a):  # on the hardware the bytes after a placed row are more placed memory: not emulated
        tile = nl.ndarray((128, 64), dtype=nl.float32, address=(0, 0))
        tile.ap([[64, 2], [1, 64]], offset=1)  # row 0 from column 1 runs one element past its end

    raises(past_the_row, a, match="not emulated .*a pattern that leaves a placed tile's row")


def test_access_pattern_with_a_scalar_offset():
    """nki-migration-guide.rst, "Scalar Dynamic Access": the start moves by the SBUF value times the elements to
    the right of indirect_dim in the base tensor (its example: A (512, 512), rows 384.. via batch_idx = 384)."""

    def rows_from(a, start, indirect_dim=0, offset_dtype=nl.int32):
        index = nl.ndarray((1, 1), dtype=offset_dtype)
        nisa.memset(dst=index, value=start)
        out = nl.ndarray((128, 256), dtype=a.dtype, buffer=nl.shared_hbm)
        nisa.dma_copy(dst=out, src=a.ap(pattern=[[512, 128], [1, 256]], offset=0, scalar_offset=index,
                                        indirect_dim=indirect_dim))
        return out

    a = rand(512, 512)
    np.testing.assert_array_equal(run(rows_from, a, 384), a[384:, :256])
    np.testing.assert_array_equal(run(rows_from, a, 7, 1), a.reshape(-1)[7:][: 128 * 512].reshape(128, 512)[:, :256])
    raises(rows_from, a, 385, match="access pattern reaches outside the tensor")
    raises(rows_from, a, 3, 0, nl.float32, match="scalar_offset must be one integer element")
    raises(rows_from, a, 3, 2, match="indirect_dim must be an axis of the tensor")


def test_a_dynamic_start_address_needs_dge():
    """[isa] dma_copy (stub lines 515-524): with software or hardware DGE the tensors "can have a dynamic start
    address"; with dge_mode none the runtime writes the descriptors before the kernel runs. So a scalar_offset
    access (or a slice of one), on either side, is refused with dge_mode none; swdge and unknown move it."""

    def rows_from(a, dge_mode, side="src", sliced=False):
        index = nl.ndarray((1, 1), dtype=nl.int32)
        nisa.memset(dst=index, value=2)
        if side == "src":
            out = nl.ndarray((4, 8), dtype=a.dtype, buffer=nl.shared_hbm)
            moved = a.ap(pattern=[[8, 4], [1, 8]], offset=0, scalar_offset=index, indirect_dim=0)
            nisa.dma_copy(dst=out, src=moved[:, 0:8] if sliced else moved, dge_mode=dge_mode)
            return out
        out = nl.ndarray((8, 8), dtype=a.dtype, buffer=nl.shared_hbm)
        nisa.dma_copy(dst=out, src=a, dge_mode=dge_mode)  # a static address: any DGE mode
        nisa.dma_copy(dst=out.ap(pattern=[[8, 4], [1, 8]], offset=0, scalar_offset=index, indirect_dim=0),
                      src=load(a[0:4, :]), dge_mode=dge_mode)
        return out

    a = rand(8, 8)
    for dge in (nisa.dge_mode.swdge, nisa.dge_mode.unknown):
        np.testing.assert_array_equal(run(rows_from, a, dge), a[2:6])
    np.testing.assert_array_equal(run(rows_from, a, nisa.dge_mode.swdge, "dst"), np.concatenate([a[:2], a[:4], a[6:]]))
    for side, sliced in (("src", False), ("src", True), ("dst", False)):
        raises(rows_from, a, nisa.dge_mode.none, side, sliced,
               match=f"dma_copy: a dynamic start address .* needs DGE.*\\({side} with dge_mode=none\\)")


def test_instructions_of_later_neuroncores_are_refused_for_that_reason():
    """[isa] "Available only on NeuronCore-v3 (v4) and newer": refused on the v2 the emulator models."""

    def nonzero(a):
        out = nl.ndarray((128, 9), dtype=nl.int32)
        nisa.nonzero_with_count(dst=out, src=load(a))

    raises(nonzero, rand(128, 8), match="nisa.nonzero_with_count: available only on NeuronCore-v3 and newer")
    for name, version in (("sendrecv", 3), ("range_select", 3), ("exponential", 4), ("quantize_mx", 4)):
        with pytest.raises(NKIRuleError, match=f"available only on NeuronCore-v{version} and newer"):
            getattr(nisa, name)()


def _indices_tile(idx):
    """An SBUF (rows, 1) int32 tile of the HBM indices `idx`."""
    tile = nl.ndarray(idx.shape, dtype=nl.int32)
    nisa.dma_copy(dst=tile, src=idx)
    return tile


def test_access_pattern_with_a_vector_offset_gathers_and_scatters():
    """nki-migration-guide.rst "Vector Dynamic Access" (lines 609-654): element [w, z] is
    flat(A)[offset + idx[w] * prod(A.shape[1:]) + z * z_step]; the leading pair's step is ignored. The DMA
    gathers (src) or scatters (dst) those rows ([isa] dma_copy lines 523-530); oob_mode.error raises on a row
    outside the tensor, oob_mode.skip leaves it; scatter indices must be unique unless dst_rmw_op is given with
    unique_indices=False."""
    a = rand(128, 512)
    idx = np.array([5, 0, 127, 64, 3, 3, 99, 1], np.int32).reshape(8, 1)  # a repeated row is fine in a gather

    def gather(a, idx, lead_step=512, offset=0, oob=nisa.oob_mode.error):
        out = nl.ndarray((8, 256), dtype=nl.float32)
        nisa.memset(dst=out, value=-7.0)
        nisa.dma_copy(dst=out, src=a.ap([[lead_step, 8], [1, 256]], offset, vector_offset=_indices_tile(idx),
                                         indirect_dim=0), oob_mode=oob)
        return store(out)

    rows = idx[:, 0]
    np.testing.assert_array_equal(run(gather, a, idx), a[rows, :256])
    np.testing.assert_array_equal(run(gather, a, idx, 3, 100), a[rows, 100:356])  # step 3: ignored
    outside = idx.copy()
    outside[[2, 6], 0] = [-1, 128]
    raises(gather, a, outside, match="vector_offset index reaches outside the tensor.*rows \\[2, 6\\]")
    raises(gather, a, idx, 512, 257, match="rows \\[2\\]")  # row 127 from column 257 runs past the end
    skipped = run(gather, a, outside, 512, 0, nisa.oob_mode.skip)
    keep = [0, 1, 3, 4, 5, 7]
    np.testing.assert_array_equal(skipped[keep], a[rows[keep], :256])
    assert (skipped[[2, 6]] == -7.0).all()

    def scatter(a, idx, add=None, unique=True, oob=nisa.oob_mode.error):
        out = nl.ndarray(a.shape, dtype=nl.float32, buffer=nl.shared_hbm)
        nisa.dma_copy(dst=out, src=a)
        src = nl.ndarray((8, 512), dtype=nl.bfloat16)
        nisa.memset(dst=src, value=0.5)
        nisa.dma_copy(dst=out.ap([[512, 8], [1, 512]], 0, vector_offset=_indices_tile(idx), indirect_dim=0),
                      src=src, dst_rmw_op=add, unique_indices=unique, oob_mode=oob)
        return out

    unique_rows = np.array([5, 0, 127, 64, 3, 2, 99, 1], np.int32).reshape(8, 1)
    expected = a.copy()
    expected[unique_rows[:, 0]] = 0.5
    np.testing.assert_array_equal(run(scatter, a, unique_rows), expected)
    expected = a.copy()
    np.add.at(expected, rows, np.float32(0.5))
    np.testing.assert_allclose(run(scatter, a, idx, nl.add, False), expected, rtol=1e-6)
    raises(scatter, a, idx, match="scatter indices must be unique")
    raises(scatter, a, idx, nl.add, True, match="scatter indices must be unique")
    expected = a.copy()
    expected[unique_rows[[0, 1, 3, 4, 5, 7], 0]] = 0.5
    outside = unique_rows.copy()
    outside[[2, 6], 0] = [-1, 128]
    np.testing.assert_array_equal(run(scatter, a, outside, None, True, nisa.oob_mode.skip), expected)
    raises(scatter, a, outside, nl.add, True, nisa.oob_mode.skip, match="allows only oob_mode.error")


def test_vector_offset_rules():
    """What the sources refuse about a vector_offset: with a scalar_offset (nki-aps.rst lines 64-65), on another
    indirect_dim ([mig] line 613), an index tile that is not an SBUF (rows, 1) integer tile (nki-aps.rst line 65,
    [mig] lines 622-653), a compute instruction reading it or a DMA without software DGE ([isa] dma_copy lines
    515-526)."""
    a = rand(128, 64)
    idx = np.arange(8, dtype=np.int32).reshape(8, 1)

    def access(a, idx, kw):
        kw = dict(kw)
        index = _indices_tile(idx)
        if kw.pop("float_index", False):
            index = nl.ndarray(idx.shape, dtype=nl.float32)
            nisa.memset(dst=index, value=1.0)
        ap = a.ap([[64, idx.shape[0]], [1, 64]], 0, vector_offset=kw.pop("vector_offset", index),
                  indirect_dim=kw.pop("indirect_dim", 0), scalar_offset=kw.pop("scalar_offset", None))
        out = nl.ndarray((idx.shape[0], 64), dtype=nl.float32)
        if kw.pop("compute", False):
            nisa.tensor_copy(dst=out, src=ap)
        nisa.dma_copy(dst=out, src=ap, **kw)

    raises(access, a, idx, {"indirect_dim": 1}, match="supports only indirect_dim=0")
    raises(access, a, idx, {"float_index": True}, match="one integer per step of the pattern's leading pair")
    raises(access, a, np.arange(16, dtype=np.int32).reshape(8, 2), {}, match="one integer per step")
    raises(access, a, idx, {"vector_offset": a}, match="vector_offset must be an SBUF location")
    raises(access, a, idx, {"scalar_offset": a}, match="at most one of scalar_offset and vector_offset")
    raises(access, a, idx, {"compute": True}, match="tensor_copy: a vector_offset access .* only by nisa.dma_copy")
    raises(access, a, idx, {"dge_mode": nisa.dge_mode.none}, match="needs software DGE")
    run(access, a, idx, {"dge_mode": nisa.dge_mode.swdge})


def test_nc_stream_shuffle():
    """[isa] nc_stream_shuffle (stub lines 1301-1340): dst partition q*32+i copies src partition q*32+mask[i] in
    each quadrant, 255 leaves it unmodified; the starts follow num_active_partitions = max partitions rounded up
    to 32 (64: start 0 or 64), which a 32-partition dst at 32 breaks when src spans 40."""
    a = rand(64, 8)
    mask = [31 - i for i in range(32)]
    mask[5] = 255

    def shuffle(a, mask):
        src = load(a)
        dst = nl.ndarray((64, 8), dtype=nl.float32)
        nisa.memset(dst=dst, value=2.0)
        nisa.nc_stream_shuffle(dst=dst, src=src, shuffle_mask=mask)
        wide = nl.ndarray((32, 8), dtype=nl.float32)
        nisa.nc_stream_shuffle(dst=wide, src=src[0:1, :], shuffle_mask=[0] * 32)  # one row to a quadrant
        return store(dst), store(wide)

    out, wide = run(shuffle, a, mask)
    expected = np.concatenate([a[31::-1], a[63:31:-1]])
    expected[[5, 37]] = 2.0
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(wide, np.repeat(a[:1], 32, 0))

    def misplaced(a):
        src = load(a)
        dst = nl.ndarray((64, 8), dtype=nl.float32)
        nisa.nc_stream_shuffle(dst=dst[32:64, :], src=src[0:40, :], shuffle_mask=list(range(32)))

    raises(misplaced, a, match="with 64 active partitions the start partition must be one of \\(0, 64\\)")
    raises(shuffle, a, [1] * 31, match="shuffle_mask is a 32-element list")
