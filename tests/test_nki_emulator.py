"""The NKI 0.2.0 emulator: each instruction against an independent NumPy expression of its
documented semantics, and each hardware rule broken once by a small bad kernel."""

from __future__ import annotations

import numpy as np
import pytest

from emulator_helpers import load, raises, rand, run, store

from nki_kernels import compat
from nki_kernels.emulator import nisa, nki, nl


def test_compat_returns_the_emulator_without_neuron():
    if compat.NKI_AVAILABLE:
        pytest.skip("the real NKI is installed")
    assert compat.NKI_IMPLEMENTATION == "emulator"
    assert compat.nisa is nisa and compat.nl is nl
    assert compat.NKI_UNAVAILABLE_REASON


def test_dma_copy_roundtrip_cast_and_rmw():
    a, b = rand(64, 40), rand(64, 40)

    def kernel(a, b):
        t = load(a, nl.bfloat16)  # the DMA casts fp32 -> bf16
        out = nl.ndarray(a.shape, dtype=nl.float32, buffer=nl.shared_hbm)
        nisa.dma_copy(dst=out, src=t)
        nisa.dma_copy(dst=out, src=load(b), dst_rmw_op=nl.add)
        return out

    import ml_dtypes

    expected = a.astype(ml_dtypes.bfloat16).astype(np.float32) + b
    np.testing.assert_allclose(run(kernel, a, b), expected, rtol=1e-6)


def test_dma_copy_converts_integers_through_float32():
    """[isa] dma_copy "Data types" (and nki-dma-overview.rst): between dtypes the DMA casts src.dtype ->
    float32 -> dst.dtype, a read-modify-write adds in float32; between equal dtypes it moves the bits.
    2^24 + 1 and 2^24 + 3 are ties in float32 and round to the even neighbours 2^24 and 2^24 + 4."""
    a = np.array([[2 ** 24 + 1, 2 ** 24 + 3, 2, -7]], np.int32)

    def kernel(a):
        t = load(a, nl.int32)  # int32 -> int32: the bits
        same = nl.ndarray(a.shape, dtype=nl.int32, buffer=nl.shared_hbm)
        nisa.dma_copy(dst=same, src=t)
        widened = nl.ndarray((1, 2), dtype=nl.uint32, buffer=nl.shared_hbm)
        nisa.dma_copy(dst=widened, src=t[:, 0:2])  # int32 -> uint32, through float32
        summed = nl.ndarray((1, 1), dtype=nl.int32, buffer=nl.shared_hbm)
        nisa.dma_copy(dst=summed, src=t[:, 0:1])
        nisa.dma_copy(dst=summed, src=t[:, 2:3], dst_rmw_op=nl.add)  # (2^24 + 1) + 2, added in float32
        return same, widened, summed

    same, widened, summed = run(kernel, a)
    np.testing.assert_array_equal(same, a)
    assert widened.dtype == np.uint32
    np.testing.assert_array_equal(widened, [[2 ** 24, 2 ** 24 + 4]])
    np.testing.assert_array_equal(summed, [[2 ** 24 + 2]])  # float32(2^24 + 1) = 2^24, + 2


def test_dma_copy_converts_floats_to_integers_only_where_no_rounding_mode_matters():
    """dma_copy allows float -> integer ("any supported NKI data types"), but 3c46990d documents neither the
    rounding of a fraction nor the saturation of a value beyond the type: whole values in range convert,
    others are refused as not emulated rather than guessed."""
    def to_int8(a):
        out = nl.ndarray(a.shape, dtype=nl.int8, buffer=nl.shared_hbm)
        nisa.dma_copy(dst=out, src=load(a))
        return out

    np.testing.assert_array_equal(run(to_int8, np.array([[-128.0, 3.0, 127.0]], np.float32)), [[-128, 3, 127]])
    for bad in (2.5, 128.0, np.nan):
        raises(to_int8, np.array([[1.0, bad]], np.float32),
               match=r"nisa.dma_copy: the DMA's float32-to-int8 step is not documented .*not emulated")


def test_tensor_copy_memset_and_new_tiles_are_nan():
    a = rand(32, 16)

    def kernel(a):
        t = nl.ndarray((32, 16), dtype=nl.float32)
        nisa.tensor_copy(dst=t, src=load(a))
        m = nl.ndarray((32, 16), dtype=nl.float32)
        nisa.memset(dst=m, value=2.5)
        fresh = nl.ndarray((32, 16), dtype=nl.float32)
        return store(t), store(m), store(fresh)

    t, m, fresh = run(kernel, a)
    np.testing.assert_array_equal(t, a)
    assert (m == 2.5).all() and np.isnan(fresh).all()


@pytest.mark.parametrize("op,ref", [(nl.add, np.add), (nl.multiply, np.multiply), (nl.subtract, np.subtract),
                                    (nl.maximum, np.maximum)])
def test_tensor_tensor(op, ref):
    a, b = rand(128, 64), rand(128, 64)

    def kernel(a, b):
        out = nl.ndarray(a.shape, dtype=nl.float32)
        nisa.tensor_tensor(dst=out, data1=load(a), data2=load(b), op=op)
        return store(out)

    np.testing.assert_allclose(run(kernel, a, b), ref(a, b), rtol=1e-6)


def test_tensor_scalar_vector_and_scalar_operands_with_reverse():
    a, v = rand(16, 32), rand(16, 1)

    def kernel(a, v):
        out = nl.ndarray(a.shape, dtype=nl.float32)
        nisa.tensor_scalar(dst=out, data=load(a), op0=nl.subtract, operand0=load(v), reverse0=True,
                           op1=nl.multiply, operand1=3.0)
        return store(out)

    np.testing.assert_allclose(run(kernel, a, v), (v - a) * 3.0, rtol=1e-6)


def test_tensor_reduce_numbers_axes_from_the_most_minor_with_negate():
    """NKI numbering: axis=1 is the most minor free axis (here the last, size 5), (1, 2) both free axes."""
    a = rand(8, 4, 5)

    def kernel(a):
        out = nl.ndarray((8, 4), dtype=nl.float32)
        nisa.tensor_reduce(dst=out, op=nl.add, data=load(a), axis=1)
        out2 = nl.ndarray((8, 1), dtype=nl.float32)
        nisa.tensor_reduce(dst=out2, op=nl.maximum, data=load(a), axis=(1, 2), negate=True)
        return store(out), store(out2)

    s, m = run(kernel, a)
    np.testing.assert_allclose(s, a.sum(axis=2), rtol=1e-5)
    np.testing.assert_allclose(m[:, 0], -a.reshape(8, -1).max(axis=1), rtol=1e-6)


def test_activation_scale_bias_and_reduce():
    a, s, bias = rand(32, 24), rand(32, 1), rand(32, 1)

    def kernel(a, s, bias):
        out = nl.ndarray(a.shape, dtype=nl.float32)
        red = nl.ndarray((32, 1), dtype=nl.float32)
        nisa.activation(dst=out, op=nl.exp, data=load(a), scale=load(s), bias=load(bias),
                        reduce_op=nl.add, reduce_res=red, reduce_cmd=nisa.reduce_cmd.reset_reduce)
        sp = nl.ndarray(a.shape, dtype=nl.float32)
        nisa.activation(dst=sp, op=nl.softplus, data=load(a), scale=2.0)
        return store(out), store(red), store(sp)

    out, red, sp = run(kernel, a, s, bias)
    expected = np.exp(a * s + bias)
    np.testing.assert_allclose(out, expected, rtol=1e-5)
    np.testing.assert_allclose(red[:, 0], expected.sum(axis=1), rtol=1e-5)
    np.testing.assert_allclose(sp, np.log1p(np.exp(2 * a)), rtol=1e-5)


def _scan_ref(a, b, init):
    out, prev = np.empty_like(a), np.broadcast_to(init, (a.shape[0],)).astype(np.float32)
    for i in range(a.shape[1]):
        prev = a[:, i] * prev + b[:, i]
        out[:, i] = prev
    return out


@pytest.mark.parametrize("tile_initial", [False, True])
def test_tensor_tensor_scan_initial_scalar_and_tile(tile_initial):
    a, b, init = rand(64, 100), rand(64, 100), rand(64, 1)

    def kernel(a, b, init):
        out = nl.ndarray(a.shape, dtype=nl.float32)
        initial = load(init) if tile_initial else 0.5
        nisa.tensor_tensor_scan(dst=out, data0=load(a), data1=load(b), initial=initial, op0=nl.multiply, op1=nl.add)
        return store(out)

    expected = _scan_ref(a, b, init[:, 0] if tile_initial else np.float32(0.5))
    np.testing.assert_allclose(run(kernel, a, b, init), expected, rtol=1e-5, atol=1e-6)


def test_nc_matmul_accumulates_in_psum_and_transpose():
    x1, y1, x2, y2 = rand(128, 96), rand(128, 200), rand(64, 96), rand(64, 200)

    def kernel(x1, y1, x2, y2):
        acc = nl.ndarray((96, 200), dtype=nl.float32, buffer=nl.psum)
        nisa.nc_matmul(dst=acc, stationary=load(x1), moving=load(y1))
        nisa.nc_matmul(dst=acc, stationary=load(x2), moving=load(y2))  # accumulates
        res = nl.ndarray((96, 200), dtype=nl.float32)
        nisa.tensor_copy(dst=res, src=acc)
        tr = nl.ndarray((96, 64), dtype=nl.float32, buffer=nl.psum)
        nisa.nc_transpose(dst=tr, data=load(x2))
        tr_sb = nl.ndarray((96, 64), dtype=nl.float32)
        nisa.tensor_copy(dst=tr_sb, src=tr)
        return store(res), store(tr_sb)

    res, tr = run(kernel, x1, y1, x2, y2)
    np.testing.assert_allclose(res, x1.T @ y1 + x2.T @ y2, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(tr, x2.T)


def test_iota_and_affine_select():
    a = rand(8, 12)

    def kernel(a):
        io = nl.ndarray((8, 12), dtype=nl.int32)
        nisa.iota(dst=io, pattern=[[3, 4], [1, 3]], offset=5, channel_multiplier=100)
        sel = nl.ndarray((8, 12), dtype=nl.float32)
        nisa.affine_select(dst=sel, pattern=[[1, 12]], offset=0, channel_multiplier=-1, on_true_tile=load(a),
                           on_false_value=-7.0, cmp_op=nl.greater_equal)
        return store(io), store(sel)

    io, sel = run(kernel, a)
    p, w, x = np.arange(8)[:, None, None], np.arange(4)[None, :, None], np.arange(3)[None, None, :]
    np.testing.assert_array_equal(io, (5 + 100 * p + 3 * w + x).reshape(8, 12))
    i, j = np.arange(8)[:, None], np.arange(12)[None, :]
    np.testing.assert_array_equal(sel, np.where(j - i >= 0, a, -7.0))


def test_cost_model_charges_documented_cycles():
    a = rand(128, 512)

    def kernel(a):
        t = load(a)
        out = nl.ndarray(a.shape, dtype=nl.float32)
        nisa.tensor_tensor(dst=out, data1=t, data2=t, op=nl.add)  # k N, two SBUF inputs
        nisa.tensor_tensor_scan(dst=out, data0=t, data1=t, initial=0.0, op0=nl.multiply, op1=nl.add)  # k N
        nisa.activation(dst=out, op=nl.exp, data=t)  # N on Scalar
        ps = nl.ndarray((128, 512), dtype=nl.float32, buffer=nl.psum)
        nisa.nc_matmul(dst=ps, stationary=t[:, 0:128], moving=t)  # 512 x 4 (fp32)
        return store(out)

    _, prof = nki.simulate(kernel, a)
    from nki_kernels.emulator.costmodel import ACCESS_OVERHEAD, TWO_INPUT_CYCLES_PER_ELEMENT

    assert prof.cycles["vector"] == pytest.approx(2 * (TWO_INPUT_CYCLES_PER_ELEMENT * 512 + ACCESS_OVERHEAD))
    assert prof.cycles["scalar"] == 512 + ACCESS_OVERHEAD
    assert prof.cycles["tensor"] == 512 * 4
    assert prof.hbm_bytes == 2 * a.nbytes
    assert prof.peak_psum_bytes == 2048 and prof.peak_sbuf_bytes >= 2 * 2048
    assert prof.bound == "vector" and prof.time_serial_s > prof.time_overlapped_s


def test_dma_engines_serve_eight_partitions_each():
    """nki-dma-overview.rst line 34: each of the 16 DMA engines moves the data of eight SBUF partitions, and
    arch guide lines 615-616: an engine processes one transfer at a time at 27 GiB/s. The overview's examples:
    32 KiB over 4 partitions keep one engine busy (lines 57, 120); 32 KiB over 128 partitions put 2 KiB on each
    of the 16 (lines 131, 192). The cost model alone, no kernel."""
    from nki_kernels.emulator.costmodel import DMA_ENGINE_BYTES_PER_S as BW
    from nki_kernels.emulator.costmodel import Timeline

    def region(i, p0, p1):
        return (i, p0, p1, 0, 1 << 20)

    t = Timeline()
    assert t.dma("4 rows", 32768, 4, 0, [], [region(1, 0, 4)]) == pytest.approx(32768 / BW)
    assert t.dma("128 rows", 32768, 128, 0, [], [region(2, 0, 128)]) == pytest.approx(2048 / BW)
    assert t.dma("12 rows", 12 * 1024, 12, 0, [], [region(3, 0, 12)]) == pytest.approx(8 * 1024 / BW)  # 8 + 4
    assert t.dma("hbm to hbm", 16 * 1024, None, 0, [], [region(4, 0, 1)]) == pytest.approx(1024 / BW)

    t = Timeline(record=True)  # 16 independent 8-partition transfers run side by side; the 17th waits for one
    for i in range(17):
        t.dma(f"d{i}", 8192, 8, 0, [], [region(10 + i, 0, 8)])
    starts = [start for _, _, start, _ in t.events]
    assert starts[:16] == [0.0] * 16 and starts[16] == pytest.approx(8192 / BW)
    assert t.busy["dma"] == pytest.approx(17 * 8192 / BW / 16)


def test_an_operand_striding_over_16_bytes_halves_an_engines_bandwidth():
    """[arch] lines 757-762: SBUF/PSUM supply peak bandwidth while the most-minor free axis steps less than
    16 bytes and half beyond: "roughly 50% performance hit on the instructions". A Vector copy, a Scalar
    activation and a GpSimd memset over every 8th float32 (32-byte steps) cost twice the contiguous
    instruction's cycles (the 60-cycle access overhead once); 16-byte steps (every 4th float32, every 8th
    bfloat16) and the Tensor engine's reads cost the same as contiguous ones."""
    from nki_kernels.emulator.costmodel import ACCESS_OVERHEAD

    def cycles(step, dtype=nl.float32, engine="vector"):
        """Cycles of one instruction reading or writing every `step`-th element of a row, less the overhead."""
        def kernel(a, charge):
            t = nl.ndarray((128, 512 * step), dtype=dtype)
            nisa.memset(dst=t, value=1.0)
            out = nl.ndarray((128, 512), dtype=dtype)
            if charge and engine == "scalar":
                nisa.activation(dst=out, op=nl.copy, data=t[:, ::step])
            elif charge and engine == "gpsimd":
                nisa.memset(dst=t[:, ::step], value=2.0, engine=nisa.engine.gpsimd)
            elif charge and engine == "tensor":
                ps = nl.ndarray((128, 512), dtype=nl.float32, buffer=nl.psum)
                nisa.nc_matmul(dst=ps, stationary=t[:, 0:128], moving=t[:, ::step])
            elif charge:
                nisa.tensor_copy(dst=out, src=t[:, ::step])

        with_it, without = (nki.simulate(kernel, np.zeros((1, 1), np.float32), charge)[1].cycles[engine]
                            for charge in (True, False))
        return with_it - without - (ACCESS_OVERHEAD if engine != "tensor" else 0)

    contiguous = cycles(1)
    assert contiguous == 512
    assert cycles(8) == 2 * contiguous  # 32 bytes
    assert cycles(4) == contiguous  # 16 bytes: not beyond
    assert cycles(8, nl.bfloat16) == contiguous and cycles(9, nl.bfloat16) == 2 * contiguous  # 16 and 18 bytes
    assert cycles(1, engine="scalar") == 512 and cycles(8, engine="scalar") == 2 * 512
    assert cycles(1, engine="gpsimd") == 512 and cycles(8, engine="gpsimd") == 2 * 512
    assert cycles(1, engine="tensor") == cycles(8, engine="tensor") == 512 * 4  # fp32 matmul, as above
