"""Emulated `nki.isa` (NKI 0.2.0): the instructions our kernels use, with the stub's signatures.

Each instruction (1) checks the hardware rules and raises `NKIRuleError` naming the
instruction, the rule and the shapes; (2) charges its documented cycle cost to its
engine; (3) unless the run is cost-only, computes in fp32 and casts to `dst.dtype`.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

import numpy as np

from . import core
from . import language as nl
from .core import ACCESS_OVERHEAD, MIN_II, PSUM, SBUF, NkiTensor, is_float, rule_error, state


class dge_mode(Enum):  # noqa: N801
    unknown = 0
    swdge = 1
    hwdge = 2
    none = 3


class engine(Enum):  # noqa: N801
    tensor = 1
    vector = 5
    scalar = 2
    gpsimd = 3
    dma = 4
    sync = 6
    unknown = 0


class nc_version(Enum):  # noqa: N801
    gen2 = 2
    gen3 = 3
    gen4 = 4


class oob_mode(Enum):  # noqa: N801
    error = 0
    skip = 1


class reduce_cmd(Enum):  # noqa: N801
    idle = 0
    reset = 1
    reduce = 2
    reset_reduce = 3
    load_reduce = 4


class matmul_perf_mode(Enum):  # noqa: N801
    none = "none"
    double_row = "double_row"


tensor_engine, vector_engine, scalar_engine = engine.tensor, engine.vector, engine.scalar
gpsimd_engine, dma_engine, unknown_engine = engine.gpsimd, engine.dma, engine.unknown


def get_nc_version():
    """The emulator models Trn1 (NeuronCore-v2)."""
    return nc_version.gen2


_REDUCE_REGS: dict[str, np.ndarray] = {}
_MATMUL_DTYPES = (np.dtype(np.float32), core.BFLOAT16, np.dtype(np.float16))
_UFUNC_OPS = {np.add: nl.add, np.subtract: nl.subtract, np.multiply: nl.multiply, np.maximum: nl.maximum,
              np.minimum: nl.minimum, np.divide: nl.divide, np.power: nl.power}


# ------------------------------------------------------------------ rule helpers
def _op(instr: str, op: Any, kind: str = "alu") -> Any:
    op = _UFUNC_OPS.get(op, op)
    if not isinstance(op, nl._Op) or op.kind != kind:
        want = "an ALU operator such as nl.multiply" if kind == "alu" else "an activation function such as nl.exp"
        raise rule_error(instr, f"op must be {want}", f"got {op!r}")
    return op


def _partition_start_ok(n: int, start: int) -> bool:
    if n > 64:
        return start == 0
    if n > 32:
        return start in (0, 64)
    return start in (0, 32, 64, 96)


def _tile(instr: str, name: str, t: Any, buffers: tuple[str, ...] = (SBUF, PSUM)) -> NkiTensor:
    """Check an on-chip operand: its buffer, partition count and partition start."""
    if not isinstance(t, NkiTensor):
        raise rule_error(instr, f"{name} must be a tile", f"got {type(t).__name__}")
    if t.buffer not in buffers:
        raise rule_error(instr, f"{name} must be in {'/'.join(buffers)}", f"{name} {t.shape} is in {t.buffer}")
    if t.partitions > core.PMAX:
        raise rule_error(instr, f"partition dimension must be <= {core.PMAX}", f"{name} {t.shape}")
    if not _partition_start_ok(t.partitions, t.pstart):
        raise rule_error(instr, "partition start rule (>64 partitions start at 0; 33-64 at 0 or 64; "
                         "<=32 at 0, 32, 64 or 96)", f"{name} {t.shape} starts at partition {t.pstart}")
    return t


def _same_layout(instr: str, names: tuple[str, ...], tiles: tuple[NkiTensor, ...]) -> None:
    p0, f0 = tiles[0].partitions, tiles[0].free_size
    for name, t in zip(names[1:], tiles[1:]):
        if t.partitions != p0 or t.free_size != f0:
            raise rule_error(instr, "operands need the same partition size and elements per partition",
                             f"{names[0]} {tiles[0].shape} vs {name} {t.shape}")


def _not_both_psum(instr: str, a: NkiTensor, b: NkiTensor, names: tuple[str, str]) -> None:
    if a.buffer == PSUM and b.buffer == PSUM:
        raise rule_error(instr, "two input operands of one instruction may not both be in PSUM",
                         f"{names[0]} {a.shape} and {names[1]} {b.shape} are both in psum")


def _scalar_operand(instr: str, name: str, value: Any, partitions: int) -> np.ndarray | float:
    """A compile-time float or a (P, 1) fp32 tile -> broadcastable fp32 values."""
    if isinstance(value, NkiTensor):
        _tile(instr, name, value)
        if value.partitions != partitions or value.free_size != 1:
            raise rule_error(instr, f"{name} must be a scalar or a (partitions, 1) vector",
                             f"{name} {value.shape} for data with {partitions} partitions")
        if value.dtype != np.float32:
            raise rule_error(instr, f"{name} must be float32", f"{name} dtype {value.dtype}")
        return value.read() if state().compute else 0.0
    if isinstance(value, (int, float, np.floating, np.integer)):
        return np.float32(value)
    raise rule_error(instr, f"{name} must be a compile-time scalar or a (P, 1) tile", f"got {type(value).__name__}")


def _engine(instr: str, eng: Any, default: str, allowed: tuple[str, ...], tiles: tuple[NkiTensor, ...]) -> str:
    name = default if eng in (None, engine.unknown) else eng.name
    if name not in allowed:
        raise rule_error(instr, f"runs on {'/'.join(allowed)} only (NeuronCore-v2)", f"engine={name}")
    if name == "gpsimd" and any(t.buffer == PSUM for t in tiles):
        raise rule_error(instr, "GpSimd engine cannot access PSUM", ", ".join(f"{t.shape} in {t.buffer}" for t in tiles))
    return name


def _charge(engine_name: str, cycles: float, useful: float = 0.0) -> None:
    state().charge(engine_name, cycles, useful)


def _lanes(t: NkiTensor) -> float:
    """Elements per lane weighted by the share of the 128 lanes in use."""
    return t.free_size * t.partitions / core.PMAX


def _elementwise_cost(n: int) -> int:
    return max(MIN_II, n) + ACCESS_OVERHEAD


# ------------------------------------------------------------------ data movement
def dma_copy(dst, src, dst_rmw_op=None, oob_mode=oob_mode.error, dge_mode=dge_mode.unknown, unique_indices=True,
             name=None):
    """dst = src (or dst += src), any of HBM/SBUF; element counts must match; PSUM is not reachable."""
    instr = "nisa.dma_copy"
    for nm, t in (("dst", dst), ("src", src)):
        if not isinstance(t, NkiTensor):
            raise rule_error(instr, f"{nm} must be a tensor", f"got {type(t).__name__}")
        if t.buffer == PSUM:
            raise rule_error(instr, "DMA cannot access PSUM (copy through SBUF)", f"{nm} {t.shape} in psum")
        if t.buffer == SBUF and t.partitions > core.PMAX:
            raise rule_error(instr, "partition dimension must be <= 128", f"{nm} {t.shape}")
    if dst.numpy().size != src.numpy().size:
        raise rule_error(instr, "src and dst must hold the same number of elements", f"dst {dst.shape}, src {src.shape}")
    if dst_rmw_op is not None and _UFUNC_OPS.get(dst_rmw_op, dst_rmw_op) is not nl.add:
        raise rule_error(instr, "dst_rmw_op supports only nl.add", f"got {dst_rmw_op!r}")
    run = state()
    src_bytes = src.numpy().size * src.dtype.itemsize
    dst_bytes = dst.numpy().size * dst.dtype.itemsize
    hbm = src_bytes if src.buffer in core.HBM_BUFFERS else 0
    if dst.buffer in core.HBM_BUFFERS:
        hbm += dst_bytes * (2 if dst_rmw_op is not None else 1)
    run.profile.hbm_bytes += int(hbm)
    run.profile.dma_count += 1
    if not run.compute:
        return
    same = dst.dtype == src.dtype and dst_rmw_op is None
    values = src.numpy().reshape(dst.shape) if same else src.read().reshape(dst.shape)
    if dst_rmw_op is not None:
        values = dst.read().reshape(dst.shape) + values
    if same:
        dst.numpy()[...] = values
        if dst._acc is not None:
            dst._acc[...] = False
    else:
        dst.write(values)


def tensor_copy(dst, src, engine=engine.unknown, name=None):
    """Copy within SBUF/PSUM on Vector or GpSimd (NeuronCore-v2 has no Scalar-engine copy)."""
    instr = "nisa.tensor_copy"
    _tile(instr, "dst", dst)
    _tile(instr, "src", src)
    _same_layout(instr, ("dst", "src"), (dst, src))
    eng = _engine(instr, engine, "vector", ("vector", "gpsimd"), (dst, src))
    _charge(eng, _elementwise_cost(src.free_size), _lanes(src))
    if state().compute:
        if dst.dtype == src.dtype:
            dst.write(src.numpy().reshape(dst.shape)) if not is_float(dst.dtype) else dst.write(src.read())
        else:
            dst.write(src.read())


def memset(dst, value, engine=engine.unknown, name=None):
    """Fill `dst` with a constant on Vector or GpSimd."""
    instr = "nisa.memset"
    _tile(instr, "dst", dst)
    eng = _engine(instr, engine, "vector" if dst.buffer == PSUM else "gpsimd", ("vector", "gpsimd"), (dst,))
    _charge(eng, _elementwise_cost(dst.free_size), _lanes(dst))
    if state().compute:
        dst.write(np.full((dst.partitions, dst.free_size), value, dtype=np.float64))


# ------------------------------------------------------------------ Tensor engine
def nc_matmul(dst, stationary, moving, is_stationary_onezero=False, is_moving_onezero=False, is_transpose=False,
              tile_position=(), tile_size=(), perf_mode=matmul_perf_mode.none, name=None):
    """dst (PSUM, fp32) = stationary.T @ moving, contracting over partitions; accumulates into an open group.

    Matmuls into the same PSUM region accumulate until another instruction writes it; the
    first matmul into a fresh (or otherwise-written) region overwrites.
    """
    instr = "nisa.nc_matmul"
    _tile(instr, "stationary", stationary, (SBUF,))
    _tile(instr, "moving", moving, (SBUF,))
    _tile(instr, "dst", dst, (PSUM,))
    k, m, n = stationary.partitions, stationary.free_size, moving.free_size
    if moving.partitions != k:
        raise rule_error(instr, "stationary and moving must have the same partition (contraction) size",
                         f"stationary {stationary.shape}, moving {moving.shape}")
    if m > core.GEMM_STATIONARY_FMAX:
        raise rule_error(instr, f"stationary free size must be <= {core.GEMM_STATIONARY_FMAX}",
                         f"stationary {stationary.shape}")
    if n > core.GEMM_MOVING_FMAX:
        raise rule_error(instr, f"moving free size must be <= {core.GEMM_MOVING_FMAX}", f"moving {moving.shape}")
    if dst.partitions != m or dst.free_size != n:
        raise rule_error(instr, "dst must be (stationary free, moving free)",
                         f"dst {dst.shape}, stationary {stationary.shape}, moving {moving.shape}")
    if dst.dtype != np.float32:
        raise rule_error(instr, "dst must be a float32 PSUM tile on NeuronCore-v2", f"dst dtype {dst.dtype}")
    for nm, t in (("stationary", stationary), ("moving", moving)):
        if t.dtype not in _MATMUL_DTYPES:
            raise rule_error(instr, "inputs must be float8/bfloat16/float16/tfloat32/float32", f"{nm} dtype {t.dtype}")
    fp32 = [t.dtype == np.float32 for t in (stationary, moving)]
    if any(fp32) and not all(fp32):
        raise rule_error(instr, "if one input is float32 the other must be float32 too",
                         f"stationary {stationary.dtype}, moving {moving.dtype}")
    passes = 1
    if all(fp32):
        passes = 2 if (is_stationary_onezero or is_moving_onezero) else 4
    _charge("tensor", max(min(64, m), n) * passes, n * (k / core.PMAX) * (m / core.PMAX))
    if not state().compute:
        return
    result = stationary.read().T.astype(np.float64) @ moving.read().astype(np.float64)
    open_group = dst.accumulating()
    result = np.where(open_group, dst.read() + result, result)
    dst.write(result.astype(np.float32), accumulate_group=True)


def nc_transpose(dst, data, engine=engine.unknown, name=None):
    """2-D transpose: Tensor engine (<=128x128, SBUF -> PSUM) or Vector engine (<=32x32)."""
    instr = "nisa.nc_transpose"
    _tile(instr, "data", data)
    _tile(instr, "dst", dst)
    p, f = data.partitions, data.free_size
    if dst.partitions != f or dst.free_size != p:
        raise rule_error(instr, "dst must be data's transpose", f"data {data.shape}, dst {dst.shape}")
    if dst.dtype != data.dtype:
        raise rule_error(instr, "dst must have data's dtype", f"data {data.dtype}, dst {dst.dtype}")
    eng = "tensor" if engine in (None, globals()["engine"].unknown) and (p > 32 or f > 32) else (
        "vector" if engine in (None, globals()["engine"].unknown) else engine.name)
    if eng == "tensor":
        if data.buffer != SBUF or dst.buffer != PSUM:
            raise rule_error(instr, "Tensor-engine transpose reads SBUF and writes PSUM",
                             f"data in {data.buffer}, dst in {dst.buffer}")
        if p > 128 or f > 128:
            raise rule_error(instr, "Tensor-engine transpose handles at most 128x128", f"data {data.shape}")
        _charge("tensor", max(min(64, f), p) * (4 if data.dtype == np.float32 else 1), p * f / core.PMAX)
    elif eng == "vector":
        if p > 32 or f > 32:
            raise rule_error(instr, "Vector-engine transpose handles at most 32x32", f"data {data.shape}")
        _charge("vector", _elementwise_cost(f), _lanes(data))
    else:
        raise rule_error(instr, "runs on the Tensor or Vector engine", f"engine={eng}")
    if state().compute:
        dst.write(data.read().T)


# ------------------------------------------------------------------ Vector / Scalar / GpSimd compute
def tensor_tensor(dst, data1, data2, op, engine=engine.unknown, name=None):
    """dst = op(data1, data2) element-wise in fp32 (Vector; GpSimd for nl.power)."""
    instr = "nisa.tensor_tensor"
    op = _op(instr, op)
    for nm, t in (("dst", dst), ("data1", data1), ("data2", data2)):
        _tile(instr, nm, t)
    _same_layout(instr, ("dst", "data1", "data2"), (dst, data1, data2))
    _not_both_psum(instr, data1, data2, ("data1", "data2"))
    eng = _engine(instr, engine, "gpsimd" if op is nl.power else "vector", ("vector", "gpsimd"), (dst, data1, data2))
    n = data1.free_size
    fast = PSUM in (data1.buffer, data2.buffer) or (
        data1.dtype == core.BFLOAT16 and data2.dtype == core.BFLOAT16 and op in (nl.add, nl.multiply))
    _charge(eng, max(MIN_II, n if fast else 2 * n) + ACCESS_OVERHEAD, _lanes(data1))
    if state().compute:
        with np.errstate(all="ignore"):
            dst.write(op.fn(data1.read(), data2.read()))


def tensor_scalar(dst, data, op0, operand0, reverse0=False, op1=None, operand1=None, reverse1=False,
                  engine=engine.unknown, name=None):
    """dst = (data op0 operand0) op1 operand1 with scalar or per-partition (P, 1) operands."""
    instr = "nisa.tensor_scalar"
    _tile(instr, "dst", dst)
    _tile(instr, "data", data)
    _same_layout(instr, ("dst", "data"), (dst, data))
    op0 = _op(instr, op0)
    v0 = _scalar_operand(instr, "operand0", operand0, data.partitions)
    if (op1 is None) != (operand1 is None):
        raise rule_error(instr, "op1 and operand1 go together (both None when unused)", f"op1={op1!r}")
    eng = _engine(instr, engine, "vector", ("vector", "scalar", "gpsimd"), (dst, data))
    _charge(eng, _elementwise_cost(data.free_size), _lanes(data))
    v1 = None
    if op1 is not None:
        op1 = _op(instr, op1)
        v1 = _scalar_operand(instr, "operand1", operand1, data.partitions)
    if not state().compute:
        return
    with np.errstate(all="ignore"):
        x = data.read()
        x = op0.fn(v0, x) if reverse0 else op0.fn(x, v0)
        if op1 is not None:
            x = op1.fn(v1, x) if reverse1 else op1.fn(x, v1)
    dst.write(x)


def activation(dst, op, data, bias=None, scale=1.0, reduce_op=None, reduce_res=None, reduce_cmd=reduce_cmd.idle,
               name=None):
    """dst = op(data * scale + bias) on the Scalar engine, with the optional free-axis add-reduction."""
    instr = "nisa.activation"
    op = _op(instr, op, "act")
    _tile(instr, "dst", dst)
    _tile(instr, "data", data)
    _same_layout(instr, ("dst", "data"), (dst, data))
    s = _scalar_operand(instr, "scale", scale, data.partitions)
    b: Any = 0.0
    if bias is not None:
        if not isinstance(bias, NkiTensor):
            raise rule_error(instr, "on NeuronCore-v2 bias must be a (partitions, 1) vector, not a scalar",
                             f"bias={bias!r}")
        _tile(instr, "bias", bias)
        if bias.partitions != data.partitions or bias.free_size != 1:
            raise rule_error(instr, "bias must be a (partitions, 1) vector", f"bias {bias.shape}, data {data.shape}")
        if bias.dtype not in (np.dtype(np.float32), core.BFLOAT16, np.dtype(np.float16)):
            raise rule_error(instr, "bias must be float32/float16/bfloat16", f"bias dtype {bias.dtype}")
        b = bias.read() if state().compute else 0.0
    if reduce_op is not None and _UFUNC_OPS.get(reduce_op, reduce_op) is not nl.add:
        raise rule_error(instr, "reduce_op must be nl.add on NeuronCore-v2", f"reduce_op={reduce_op!r}")
    _charge("scalar", _elementwise_cost(data.free_size), _lanes(data))
    if reduce_res is not None:
        _tile(instr, "reduce_res", reduce_res)
        _charge("scalar", MIN_II)
    if not state().compute:
        return
    with np.errstate(all="ignore"):
        out = op.fn(data.read() * s + b).astype(np.float32)
    dst.write(out)
    regs = _REDUCE_REGS.setdefault("scalar", np.zeros((core.PMAX, 1), np.float32))
    p = data.partitions
    if reduce_cmd in (globals()["reduce_cmd"].reset, globals()["reduce_cmd"].reset_reduce):
        regs[:p] = 0.0
    if reduce_cmd in (globals()["reduce_cmd"].reduce, globals()["reduce_cmd"].reset_reduce):
        regs[:p] += out.reshape(p, -1).sum(axis=1, keepdims=True)
    if reduce_res is not None:
        reduce_res.write(regs[:p])


def tensor_reduce(dst, op, data, axis, negate=False, keepdims=False, name=None):
    """Reduce the trailing free axes of `data` with an ALU op (Vector engine, fp32)."""
    instr = "nisa.tensor_reduce"
    op = _op(instr, op)
    _tile(instr, "dst", dst)
    _tile(instr, "data", data)
    axes = sorted([axis] if isinstance(axis, int) else list(axis))
    last = data.ndim - 1
    if 0 in axes or not axes or axes[-1] != last or axes != list(range(axes[0], last + 1)):
        raise rule_error(instr, "axis must be consecutive free axes ending at the last one (never 0)",
                         f"axis={axis}, data {data.shape}")
    kept = int(np.prod(data.shape[1:axes[0]], dtype=np.int64))
    if dst.partitions != data.partitions or dst.free_size != kept:
        raise rule_error(instr, "dst must hold the reduced shape", f"dst {dst.shape}, data {data.shape}, axis {axis}")
    if op.fn not in (np.add, np.multiply, np.maximum, np.minimum, np.subtract):
        raise rule_error(instr, "op must be a legal reduction operator", f"op {op!r}")
    _charge("vector", _elementwise_cost(data.free_size), _lanes(data))
    if not state().compute:
        return
    x = data.read().reshape(data.shape).astype(np.float32)
    out = op.fn.reduce(x, axis=tuple(axes)) if op.fn is not np.subtract else np.subtract.reduce(
        x.reshape(data.partitions, kept, -1), axis=2)
    dst.write(-out if negate else out)


def tensor_tensor_scan(dst, data0, data1, initial, op0, op1, reverse0=False, reverse1=False, name=None):
    """r[:, i] = op1(op0(data0[:, i], r[:, i-1]), data1[:, i]), r[:, -1] = initial; fp32 (Vector engine)."""
    instr = "nisa.tensor_tensor_scan"
    op0, op1 = _op(instr, op0), _op(instr, op1)
    for nm, t in (("dst", dst), ("data0", data0), ("data1", data1)):
        _tile(instr, nm, t)
    _same_layout(instr, ("dst", "data0", "data1"), (dst, data0, data1))
    _not_both_psum(instr, data0, data1, ("data0", "data1"))
    init = _scalar_operand(instr, "initial", initial, data0.partitions)
    n = data0.free_size
    _charge("vector", max(MIN_II, 2 * n) + ACCESS_OVERHEAD, _lanes(data0))
    if not state().compute:
        return
    a, b = data0.read(), data1.read()
    out = np.empty_like(a)
    prev = np.broadcast_to(np.asarray(init, np.float32).reshape(-1), (a.shape[0],)).astype(np.float32)
    with np.errstate(all="ignore"):
        for i in range(n):
            x = op0.fn(prev, a[:, i]) if reverse0 else op0.fn(a[:, i], prev)
            prev = (op1.fn(b[:, i], x) if reverse1 else op1.fn(x, b[:, i])).astype(np.float32)
            out[:, i] = prev
    dst.write(out)


def _affine_values(instr: str, dst: NkiTensor, pattern: Any, offset: int, channel_multiplier: int) -> np.ndarray:
    dims = [list(map(int, d)) for d in pattern]
    if not 1 <= len(dims) <= 4:
        raise rule_error(instr, "pattern has 1 to 4 [step, num] pairs", f"pattern={pattern}")
    count = int(np.prod([num for _, num in dims]))
    if count != dst.free_size:
        raise rule_error(instr, "pattern must cover exactly the elements per partition of dst",
                         f"pattern {pattern} gives {count}, dst {dst.shape} has {dst.free_size}")
    value = np.zeros([num for _, num in dims], dtype=np.int64) + int(offset)
    for axis, (step, num) in enumerate(dims):
        shape = [1] * len(dims)
        shape[axis] = num
        value = value + step * np.arange(num).reshape(shape)
    channel = np.arange(dst.partitions).reshape(-1, 1) * int(channel_multiplier)
    return value.reshape(1, -1) + channel


def iota(dst, pattern, offset, channel_multiplier=0, name=None):
    """dst[p, ...] = offset + p * channel_multiplier + sum(step * index) (GpSimd, int32 math)."""
    instr = "nisa.iota"
    _tile(instr, "dst", dst, (SBUF,))
    _charge("gpsimd", core.GPSIMD_BASE + dst.free_size, _lanes(dst))
    values = _affine_values(instr, dst, pattern, offset, channel_multiplier)
    if state().compute:
        dst.write(values.astype(np.int32).astype(np.float64))


def affine_select(dst, pattern, offset, channel_multiplier, on_true_tile, on_false_value, cmp_op=nl.equal, name=None):
    """dst = on_true_tile where cmp_op(affine value, 0) else on_false_value (GpSimd)."""
    instr = "nisa.affine_select"
    _tile(instr, "dst", dst, (SBUF,))
    _tile(instr, "on_true_tile", on_true_tile, (SBUF,))
    _same_layout(instr, ("dst", "on_true_tile"), (dst, on_true_tile))
    cmp = _op(instr, cmp_op)
    if not isinstance(on_false_value, (int, float, np.floating)):
        raise rule_error(instr, "on_false_value must be a float32 scalar", f"got {on_false_value!r}")
    _charge("gpsimd", core.GPSIMD_BASE + dst.free_size, _lanes(dst))
    values = _affine_values(instr, dst, pattern, offset, channel_multiplier)
    if state().compute:
        keep = cmp.fn(values.astype(np.float64), 0.0).astype(bool)
        dst.write(np.where(keep, on_true_tile.read(), np.float32(on_false_value)))


__all__ = [
    "activation", "affine_select", "dge_mode", "dma_copy", "engine", "get_nc_version", "iota", "matmul_perf_mode",
    "memset", "nc_matmul", "nc_transpose", "nc_version", "oob_mode", "reduce_cmd", "tensor_copy", "tensor_reduce",
    "tensor_scalar", "tensor_tensor", "tensor_tensor_scan",
]
