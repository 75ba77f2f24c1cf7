"""Emulated `nki.isa` (NKI 0.2.0) on NeuronCore-v2 (Trn1): instructions with the stub's signatures.

Each instruction (1) checks the documented rules and raises `NKIRuleError` naming the
instruction, the rule and the shapes; (2) issues itself to the cost model with its
engine, cycle count and the regions it reads and writes; (3) unless the run is
cost-only, computes in fp32 and casts to `dst.dtype`.

Sources, at aws-neuron-sdk 3c46990d unless noted (cited per rule below):
[isa] nki/api/nki/isa/__init__.py (each instruction's docstring);
[ops] nki/api/nki.api.shared.rst (ALU operator table, activation table, engine notes);
[arch] nki/guides/architecture/trainium_inferentia2_arch.rst;
[mig] nki/deep-dives/nki-migration-guide.rst;
[lib] aws-neuron/nki-library 0759719 (where the docs are silent and the library's
v2 code paths show the rule).
"""

from __future__ import annotations

import functools
import math
from enum import Enum
from typing import Any

import numpy as np

from . import core, costmodel, loops
from . import language as nl
from .core import MIN_II, PSUM, SBUF, IndirectTensor, NkiTensor, is_float, rule_error, state


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


@functools.total_ordering
class nc_version(Enum):  # noqa: N801
    """Ordered by generation, as nki-library 0759719 compares them (`get_nc_version() >= nc_version.gen3`,
    `core/qkv/qkv_cte_utils.py` line 663); the stub gives the values 2, 3, 4 (line 51)."""

    gen2 = 2
    gen3 = 3
    gen4 = 4

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, nc_version):
            return NotImplemented
        return self.value < other.value


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
_ENGINE_ENUM = engine
_REDUCE_CMD = reduce_cmd
_DGE_MODE = dge_mode
_OOB_MODE = oob_mode


def get_nc_version():
    """The emulator models Trn1 (NeuronCore-v2): its SBUF size and rules (core.EMULATED_GEN)."""
    return nc_version(core.EMULATED_GEN)


# [isa] nc_matmul "Data types": float8_e4m3/float8_e5m2/bfloat16/float16/tfloat32/float32
_MATMUL_DTYPES = (np.dtype(np.float32), core.BFLOAT16, np.dtype(np.float16), nl.float8_e4m3, nl.float8_e5m2)


# ------------------------------------------------------------------ rule helpers
def _op(instr: str, op: Any, kind: str) -> nl._Op:
    """`op` must be listed in the table `kind` names: "alu" (ALU operator table) or "act" (activations)."""
    if not isinstance(op, nl._Op):
        raise rule_error(instr, "op must be a nki.language operator identifier (nki.api.shared.rst tables)",
                         f"got {op!r}")
    ok = op.kinds & {"arith", "bitvec"} if kind == "alu" else op.is_("act")
    if not ok:
        table = ("the ALU operator table ('Supported Math Operators for NKI ISA')" if kind == "alu"
                 else "the activation-function table ('Supported Activation Functions for NKI ISA')")
        raise rule_error(instr, f"op must be listed in {table}", f"{op!r} is not")
    return op


def _partition_start_ok(n: int, start: int) -> bool:
    if n > 64:
        return start == 0
    if n > 32:
        return start in (0, 64)
    return start in (0, 32, 64, 96)


def _tile(instr: str, name: str, t: Any, buffers: tuple[str, ...] = (SBUF, PSUM)) -> NkiTensor:
    """Check an on-chip operand: its buffer, partition count and partition start ([arch] "Accessing
    SBUF/PSUM tensors using compute engines": start_partition rule)."""
    if not isinstance(t, NkiTensor):
        raise rule_error(instr, f"{name} must be a tile", f"got {type(t).__name__}")
    if isinstance(t, IndirectTensor):  # isa stub dma_copy lines 523-526: gather / scatter is a DMA operation
        raise rule_error(instr, "a vector_offset access (gather / scatter) is read and written only by "
                         "nisa.dma_copy (isa stub lines 523-526)", f"{name} {t!r}")
    if t.buffer not in buffers:
        raise rule_error(instr, f"{name} must be in {'/'.join(buffers)}", f"{name} {t.shape} is in {t.buffer}")
    if t.partitions > core.PMAX:
        raise rule_error(instr, f"partition dimension must be <= {core.PMAX}", f"{name} {t.shape}")
    if not _partition_start_ok(t.partitions, t.pstart):
        raise rule_error(instr, "partition start rule (>64 partitions start at 0; 33-64 at 0 or 64; "
                         "<=32 at 0, 32, 64 or 96)", f"{name} {t.shape} starts at partition {t.pstart}")
    _free_pattern(instr, name, t)
    return t


# [arch] "Accessing SBUF/PSUM tensors using compute engines" (trainium_inferentia2_arch.rst lines 715-718):
# within a partition an engine instruction's operand is an access pattern of up to four free axes, each with
# "a size expressed in uint16 and a stride expressed in int16, measured in data elements"; nki-aps.rst
# "Hardware Capability" (lines 24-28): "up to four-dimensional arrays" in the free dimension.
MAX_FREE_AXES = 4
STRIDE_RANGE = (-2 ** 15, 2 ** 15 - 1)
AXIS_SIZE_MAX = 2 ** 16 - 1  # a uint16 count (the same arch lines); nki-library's cross_entropy.py: 65535


def _axes_for(count: int) -> int:
    """How many uint16-sized axes a run of `count` evenly spaced elements takes (MAX_FREE_AXES + 1: none fit)."""
    if count <= AXIS_SIZE_MAX:
        return 1
    smallest = -(-count // AXIS_SIZE_MAX)  # the fewest elements the outer axis of two can have
    if any(count % d == 0 and count // d <= AXIS_SIZE_MAX for d in range(smallest, AXIS_SIZE_MAX + 1)):
        return 2
    return MAX_FREE_AXES + 1


def _free_pattern(instr: str, name: str, t: NkiTensor) -> None:
    """The free axes of an on-chip operand as the hardware walks them: axes of one element dropped, and an
    axis merged into the next outer one where that continues it (a reshape, whole rows). More than four, or
    a stride outside int16 elements, cannot be encoded."""
    view = t._view
    item = view.dtype.itemsize
    axes: list[tuple[int, int]] = []  # (stride in elements, count), outermost first
    for count, stride in zip(view.shape[1:], view.strides[1:]):
        if count > 1:
            axes.append((stride // item, count))
    merged: list[tuple[int, int]] = []
    for stride, count in reversed(axes):  # innermost first
        if merged and stride == merged[-1][0] * merged[-1][1]:
            merged[-1] = (merged[-1][0], merged[-1][1] * count)
        else:
            merged.append((stride, count))
    if len(merged) > MAX_FREE_AXES:
        raise rule_error(instr, f"an operand's free access pattern has at most {MAX_FREE_AXES} axes (trainium_"
                         "inferentia2_arch.rst 'Accessing SBUF/PSUM tensors'; nki-aps.rst 'Hardware Capability')",
                         f"{name} {t.shape} walks {len(merged)} (strides {[a for a, _ in reversed(merged)]} elements)")
    # an axis longer than a uint16 count can be walked as two when its length factors into two such counts
    if sum(_axes_for(count) for _, count in merged) > MAX_FREE_AXES:
        raise rule_error(instr, f"a free axis has at most {AXIS_SIZE_MAX} elements, a uint16 count, and an operand "
                         f"at most {MAX_FREE_AXES} such axes (trainium_inferentia2_arch.rst lines 715-718)",
                         f"{name} {t.shape} walks axes of {[c for _, c in reversed(merged)]} elements")
    for stride, _ in merged:
        if not STRIDE_RANGE[0] <= stride <= STRIDE_RANGE[1]:
            raise rule_error(instr, "a free-axis stride is an int16 count of elements (trainium_inferentia2_arch.rst "
                             "'Accessing SBUF/PSUM tensors')", f"{name} {t.shape} steps {stride} elements")


def _free_limit(instr: str, tiles: dict[str, NkiTensor]) -> None:
    """[arch] Vector/Scalar "Layout & Tile Size": free size up to 64K elements in SBUF, 4K in PSUM."""
    for name, t in tiles.items():
        limit = core.FREE_MAX[t.buffer]
        if t.free_size > limit:
            raise rule_error(instr, f"at most {limit} elements per partition of a {t.buffer} operand",
                             f"{name} {t.shape} has {t.free_size}")


def _same_layout(instr: str, names: tuple[str, ...], tiles: tuple[NkiTensor, ...]) -> None:
    p0, f0 = tiles[0].partitions, tiles[0].free_size
    for name, t in zip(names[1:], tiles[1:]):
        if t.partitions != p0 or t.free_size != f0:
            raise rule_error(instr, "operands need the same partition size and elements per partition",
                             f"{names[0]} {tiles[0].shape} vs {name} {t.shape}")


def _not_both_psum(instr: str, a: NkiTensor, b: NkiTensor, names: tuple[str, str]) -> None:
    """[isa] tensor_tensor / tensor_tensor_scan: the two inputs cannot both reside in PSUM."""
    if a.buffer == PSUM and b.buffer == PSUM:
        raise rule_error(instr, "two input operands of one instruction may not both be in PSUM",
                         f"{names[0]} {a.shape} and {names[1]} {b.shape} are both in psum")


def _binary(instr: str, name: str, op: nl._Op) -> None:
    """[isa] tensor_tensor "Any supported *binary* operator", tensor_tensor_scan "a binary arithmetic math
    operator", scalar_tensor_tensor's op1 "= tensor_tensor(temp_result, op1, operand1)": the ALU table's
    one-input operators (invert, rsqrt, reciprocal, abs) are not binary."""
    if op.unary:
        raise rule_error(instr, f"{name} must be a binary operator; {op!r} takes one input", f"{name}={op!r}")


def _integer_tiles(instr: str, op: nl._Op, tiles: dict[str, NkiTensor]) -> None:
    """[ops] bitvec operators expect integer data types (bit patterns, no casting)."""
    if op.is_("bitvec"):
        for name, t in tiles.items():
            if is_float(t.dtype):
                raise rule_error(instr, f"bitvec operator {op!r} needs integer tiles", f"{name} is {t.dtype}")


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
    if isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, bool):
        return np.float32(value)
    raise rule_error(instr, f"{name} must be a compile-time scalar or a (P, 1) tile", f"got {type(value).__name__}")


def _engine(instr: str, eng: Any, default: str, allowed: tuple[str, ...], tiles: tuple[NkiTensor, ...]) -> str:
    """Resolve `engine=` and check it; GpSimd cannot reach PSUM ([arch] connectivity; [isa] tensor_copy)."""
    if eng is not None and not isinstance(eng, engine):
        raise rule_error(instr, "engine must be a nki.isa.engine member", f"engine={eng!r}")
    name = default if eng in (None, engine.unknown) else eng.name
    if name not in allowed:
        raise rule_error(instr, f"runs on {'/'.join(allowed)} only (NeuronCore-v2)", f"engine={name}")
    if name == "gpsimd" and any(t.buffer == PSUM for t in tiles):
        raise rule_error(instr, "GpSimd engine cannot access PSUM", ", ".join(f"{t.shape} in {t.buffer}" for t in tiles))
    return name


def _lanes(t: NkiTensor) -> float:
    """Elements per lane weighted by the share of the 128 lanes in use."""
    return t.free_size * t.partitions / core.PMAX


def _accumulates(dst: NkiTensor, data: Any, op0: nl._Op, operand0: Any, reverse0: bool = False,
                 op1: nl._Op | None = None, operand1: Any = None, reverse1: bool = False) -> str:
    """The reduction family when `dst = (data op0 operand0) op1 operand1` (an operand first where its
    `reverse` is set, as tensor_scalar / scalar_tensor_tensor compute) overwrites exactly one of its
    inputs as an associative reduction into it ('' otherwise): loops.associative_update."""
    held = [isinstance(t, NkiTensor) and t.region() == dst.region() for t in (data, operand0, operand1)]
    if sum(held) != 1:
        return ""
    if held[2]:
        return loops.associative_update([(op1.name, reverse1)]) if op1 is not None else ""
    steps = [(op0.name, reverse0 if held[1] else not reverse0)]
    if op1 is not None:
        steps.append((op1.name, not reverse1))
    return loops.associative_update(steps)


def _issue(engine_name: str, instr: str, cycles: float, reads: tuple, writes: tuple, useful: float = 0.0,
           overhead: float = core.ACCESS_OVERHEAD, accumulates: str = "") -> None:
    state().issue(engine_name, instr, cycles, tuple(t for t in reads if isinstance(t, NkiTensor)),
                  tuple(writes), useful, overhead, accumulates)


# ------------------------------------------------------------------ data movement
def dma_copy(dst, src, dst_rmw_op=None, oob_mode=oob_mode.error, dge_mode=dge_mode.unknown, unique_indices=True,
             name=None):
    """dst = src (or dst += src) between HBM and SBUF; element counts must match ([isa] dma_copy).

    Either side may be a `vector_offset` access (`core.IndirectTensor`): a gather from, or a
    scatter into, rows picked at run time (`_gather_scatter`).
    """
    instr = "nisa.dma_copy"
    for nm, t in (("dst", dst), ("src", src)):
        if not isinstance(t, NkiTensor):
            raise rule_error(instr, f"{nm} must be a tensor", f"got {type(t).__name__}")
        if t.buffer == PSUM:  # [isa] "Both src and dst tiles can be in HBM or SBUF"
            raise rule_error(instr, "DMA reaches HBM and SBUF only, not PSUM (copy through SBUF)",
                             f"{nm} {t.shape} in psum")
        if t.buffer == SBUF and t.partitions > core.PMAX:
            raise rule_error(instr, "partition dimension must be <= 128", f"{nm} {t.shape}")
    if int(np.prod(dst.shape)) != int(np.prod(src.shape)):
        raise rule_error(instr, "src and dst must hold the same number of elements", f"dst {dst.shape}, src {src.shape}")
    if dge_mode == _DGE_MODE.hwdge:  # [isa] dma_copy: "Hardware based DGE is only supported for NeuronCore-v3 or newer"
        raise rule_error(instr, "dge_mode=hwdge (hardware DGE) needs NeuronCore-v3 or newer", "dge_mode=hwdge")
    if dst_rmw_op is not None and dst_rmw_op is not nl.add:  # [isa] "only nl.add is supported"
        raise rule_error(instr, "dst_rmw_op supports only nl.add", f"got {dst_rmw_op!r}")
    dynamic = [nm for nm, t in (("dst", dst), ("src", src)) if t.dynamic_start]
    if dynamic and dge_mode == _DGE_MODE.none:  # [isa] dma_copy lines 523-524: dynamic addresses need sw/hw DGE
        raise rule_error(instr, "a dynamic start address (.ap(scalar_offset=...)) needs DGE: dge_mode swdge or "
                         "unknown (isa stub dma_copy lines 515-524: with dge_mode none the descriptors are made "
                         "before the kernel runs)", f"{' and '.join(dynamic)} with dge_mode=none")
    indirect = tuple(t for t in (dst, src) if isinstance(t, IndirectTensor))
    if indirect:
        _check_gather_scatter(instr, dst, src, dst_rmw_op, oob_mode, dge_mode)
    run = state()
    hbm = src.nbytes if src.buffer in core.HBM_BUFFERS else 0
    if dst.buffer in core.HBM_BUFFERS:
        hbm += dst.nbytes * (2 if dst_rmw_op is not None else 1)
    run.dma(instr, dst, src, hbm, accumulates="add" if dst_rmw_op is not None else "",
            indices=tuple(t.index for t in indirect))
    if not run.compute:
        return
    if indirect:
        _gather_scatter(instr, dst, src, dst_rmw_op is not None, oob_mode == _OOB_MODE.skip, unique_indices)
        return
    if dst.dtype == src.dtype and dst_rmw_op is None:  # nothing to convert: the bits move
        dst.numpy()[...] = src.numpy().reshape(dst.shape)
        if dst._acc is not None:
            dst._acc[...] = False
        return
    dst.write(_dma_convert(src, dst, dst_rmw_op is not None))


def _check_gather_scatter(instr: str, dst: NkiTensor, src: NkiTensor, dst_rmw_op: Any, oob: Any, dge: Any) -> None:
    """[isa] dma_copy (stub lines 523-530): indices from SBUF drive a gather or scatter only with software
    DGE (`swdge`, or `unknown`, the compiler's choice; `none` means descriptors written before the kernel
    runs, which cannot depend on its values); a read-modify-write allows only `oob_mode.error`."""
    if dge == _DGE_MODE.none:
        raise rule_error(instr, "a gather / scatter (vector_offset) needs software DGE: dge_mode swdge or unknown "
                         "(isa stub dma_copy lines 515-525)", "dge_mode=none")
    if isinstance(dst, IndirectTensor) and isinstance(src, IndirectTensor):
        raise rule_error(instr, core.NOT_EMULATED, "a vector_offset on both src and dst (no source describes it)")
    if dst_rmw_op is not None and oob == _OOB_MODE.skip:
        raise rule_error(instr, "with dst_rmw_op a dynamic DMA allows only oob_mode.error (isa stub line 530)",
                         "oob_mode=skip")


def _gather_scatter(instr: str, dst: NkiTensor, src: NkiTensor, add: bool, skip: bool, unique: bool) -> None:
    """Move the data of a DMA with one `IndirectTensor` side; rows out of bounds raise or are skipped."""
    side = dst if isinstance(dst, IndirectTensor) else src
    addresses = side.addresses()
    inside = side.rows_in_bounds(addresses)
    if not inside.all() and not skip:  # [isa] oob_mode.error: "Raises an error when encountering out-of-bounds indices"
        bad = np.flatnonzero(~inside)[:4]
        raise rule_error(instr, "a vector_offset index reaches outside the tensor; oob_mode.error raises at run time "
                         "(isa stub dma_copy lines 526-527, 571-576)",
                         f"rows {bad.tolist()} hold {side.index.numpy().reshape(-1)[bad].tolist()} on {side.shape} "
                         f"of a {side.flat_size}-element tensor")
    keep = np.broadcast_to(inside.reshape(-1, *([1] * (addresses.ndim - 1))), addresses.shape).reshape(-1)
    if side is src:
        values = src.flat[addresses.reshape(-1)[keep]]
        target = np.array(dst.numpy()).reshape(-1)  # the rows skipped keep dst's values
        target[keep] = _dma_values(values, dst.dtype, target[keep] if add else None)
        dst.numpy()[...] = target.reshape(dst.shape)
        return
    kept = np.flatnonzero(inside)
    rows = side.index.numpy().reshape(-1)[kept]
    if len(np.unique(rows)) != len(rows) and (not add or unique):
        raise rule_error(instr, "scatter indices must be unique (isa stub dma_copy line 525: 'a list of unique "
                         "dynamic indices'; with dst_rmw_op, unique_indices=False declares repeats)",
                         f"vector_offset holds {rows.tolist()}")
    targets = addresses.reshape(-1)[keep]
    values = src.numpy().reshape(-1)[keep]
    if add and not unique:  # repeated rows: every addition lands (in float32, as the DMA computes)
        total = dst.flat.astype(np.float32)
        np.add.at(total, targets, values.astype(np.float32))
        dst.flat[targets] = _dma_values(total[targets], dst.dtype, None)
        return
    dst.flat[targets] = _dma_values(values, dst.dtype, dst.flat[targets] if add else None)


def _dma_values(values: np.ndarray, dtype: np.dtype, current: np.ndarray | None) -> np.ndarray:
    """What a DMA stores: the bits when nothing converts, else through float32 (`_dma_convert`)."""
    if current is None and values.dtype == dtype:
        return values
    out = values.astype(np.float32)
    if current is not None:
        out = current.astype(np.float32) + out
    return _to_dtype(out, dtype).astype(dtype)


# [isa] dma_transpose (stub lines 581-623): the permutation for each rank; `axes` may only restate it.
_DMA_TRANSPOSE_AXES = {2: (1, 0), 3: (2, 1, 0), 4: (3, 1, 2, 0)}


def dma_transpose(dst, src, axes=None, dge_mode=dge_mode.unknown, oob_mode=oob_mode.error, name=None):
    """dst = src permuted by the DMA engine: (1, 0), (2, 1, 0) or (3, 1, 2, 0) by rank ([isa] dma_transpose).

    src is in HBM or SBUF; "the only valid dge_modes are unknown and hwdge", and hardware DGE
    needs NeuronCore-v3 (as for `dma_copy`). The stub describes no conversion, so the dtypes
    must match; the indirect (software DGE) form has no index argument in this signature.
    """
    instr = "nisa.dma_transpose"
    for nm, t in (("dst", dst), ("src", src)):
        if not isinstance(t, NkiTensor):
            raise rule_error(instr, f"{nm} must be a tensor", f"got {type(t).__name__}")
        if isinstance(t, IndirectTensor):  # the stub's indirect transpose names an `indices` this signature lacks
            raise rule_error(instr, core.NOT_EMULATED, f"an indirect (vector_offset) transpose, {nm} {t!r}")
        if t.buffer == PSUM:
            raise rule_error(instr, f"{nm} must be in HBM or SBUF", f"{nm} {t.shape} in psum")
    perm = _DMA_TRANSPOSE_AXES.get(len(src.shape))
    if perm is None:
        raise rule_error(instr, "src must be a 2-d, 3-d or 4-d tile", f"src {src.shape}")
    if axes is not None and tuple(axes) != perm:
        raise rule_error(instr, f"axes for a {len(src.shape)}-d tile must be {perm}", f"axes={tuple(axes)}")
    if dge_mode == _DGE_MODE.hwdge:
        raise rule_error(instr, "dge_mode=hwdge (hardware DGE) needs NeuronCore-v3 or newer", "dge_mode=hwdge")
    if dge_mode != _DGE_MODE.unknown:
        raise rule_error(instr, "the only valid dge_modes are unknown and hwdge", f"dge_mode={dge_mode}")
    expected = tuple(src.shape[i] for i in perm)
    if tuple(dst.shape) != expected:
        raise rule_error(instr, "dst must have the transposed shape of src", f"dst {dst.shape}, src {src.shape} -> "
                         f"{expected}")
    if dst.dtype != src.dtype:
        raise rule_error(instr, "src and dst must have the same dtype", f"dst {dst.dtype}, src {src.dtype}")
    if dst.buffer == SBUF and dst.partitions > core.PMAX:
        raise rule_error(instr, "partition dimension must be <= 128", f"dst {dst.shape}")
    run = state()
    hbm = sum(t.nbytes for t in (src, dst) if t.buffer in core.HBM_BUFFERS)
    run.dma(instr, dst, src, hbm)
    if run.compute:  # same dtype: the bits move
        dst.numpy()[...] = src.numpy().transpose(perm)


def _dma_convert(src: NkiTensor, dst: NkiTensor, add: bool) -> np.ndarray:
    """What a converting or read-modify-write DMA writes, before the cast to `dst.dtype`.

    [isa] dma_copy, "Data types": a conversion casts `src.dtype` to float32, then float32 to
    `dst.dtype`, and a read-modify-write casts its inputs to float32 and adds there; the DMA
    overview (get-started/about/nki-dma-overview.rst) says the same "if working with integer
    types". So integers beyond float32's 24-bit mantissa round (to nearest even) on the way,
    integer to integer included. Float to integer is allowed ("any supported NKI data types"),
    but how the float32-to-integer step rounds a fraction and treats a value outside the
    integer type is not documented at 3c46990d: the emulator converts what every rounding
    mode agrees on (whole numbers the type holds) and refuses the rest rather than guess.
    """
    values = src.read().astype(np.float32).reshape(dst.shape)
    if add:
        values = dst.read().astype(np.float32).reshape(dst.shape) + values
    return _to_dtype(values, dst.dtype)


def _to_dtype(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """The float32-to-`dtype` step of a DMA: refuses what `_dma_convert` says is undocumented."""
    if is_float(dtype):
        return values
    info = np.iinfo(dtype)
    whole = np.isfinite(values) & (values == np.trunc(values))
    fits = whole & (values >= info.min) & (values <= info.max)
    if not fits.all():
        bad = values[~fits].flat[0]
        raise rule_error("nisa.dma_copy", f"the DMA's float32-to-{dtype} step is not documented for a value "
                         f"that is not a whole number within {dtype} (rounding, saturation): not emulated",
                         f"{int((~fits).sum())} such values, e.g. {bad!r}")
    return values.astype(np.int64)


def tensor_copy(dst, src, engine=engine.unknown, name=None, dtype=None):
    """Copy within SBUF/PSUM on Vector or GpSimd ([isa] tensor_copy: NeuronCore v2 has no Scalar-engine copy).

    `dtype=` is not in the 0.2.0 stub but AWS's own 0.2 code passes it (the matrix
    multiplication examples at 3c46990d, nki-library's moe and topk kernels), sometimes
    different from `dst.dtype`; the emulator accepts and ignores it: the docstring
    defines the result by `dst`'s dtype (an intermediate fp32 cast when they differ).
    """
    instr = "nisa.tensor_copy"
    _tile(instr, "dst", dst)
    _tile(instr, "src", src)
    _same_layout(instr, ("dst", "src"), (dst, src))
    eng = _engine(instr, engine, "vector", ("vector", "gpsimd"), (dst, src))
    _free_limit(instr, {"dst": dst, "src": src})
    _issue(eng, instr, max(MIN_II, src.free_size), (src,), (dst,), _lanes(src))
    if state().compute:
        if dst.dtype == src.dtype and not is_float(dst.dtype):
            dst.write(src.numpy().reshape(dst.shape))
        else:
            dst.write(src.read())


def nc_stream_shuffle(dst, src, shuffle_mask, name=None):
    """Cross-partition move within each quadrant of 32 partitions on the Vector engine ([isa]
    nc_stream_shuffle, stub lines 1301-1340): dst partition q*32+i copies src partition
    q*32+shuffle_mask[i]; 255 leaves it unmodified; the same dtype and elements per partition;
    both starts follow the rule for `num_active_partitions` (max partitions rounded up to 32)."""
    instr = "nisa.nc_stream_shuffle"
    _tile(instr, "dst", dst)
    _tile(instr, "src", src)
    mask = [int(m) for m in shuffle_mask]
    if len(mask) != 32 or any(not (0 <= m < 32 or m == 255) for m in mask):
        raise rule_error(instr, "shuffle_mask is a 32-element list of partitions 0-31 (or 255: unmodified)",
                         f"shuffle_mask={shuffle_mask!r}")
    if dst.dtype != src.dtype or dst.free_size != src.free_size:
        raise rule_error(instr, "dst must have src's dtype and number of elements per partition",
                         f"dst {dst.shape} {dst.dtype}, src {src.shape} {src.dtype}")
    active = -(-max(dst.partitions, src.partitions) // 32) * 32
    starts = {96: (0,), 128: (0,), 64: (0, 64), 32: (0, 32, 64, 96)}[active]
    for nm, t in (("dst", dst), ("src", src)):
        if t.pstart not in starts:
            raise rule_error(instr, f"with {active} active partitions the start partition must be one of {starts}",
                             f"{nm} {t.shape} starts at partition {t.pstart}")
    _free_limit(instr, {"dst": dst, "src": src})
    _issue("vector", instr, max(MIN_II, src.free_size), (src,), (dst,), _lanes(src))
    if not state().compute:
        return
    values, out = src.numpy().reshape(src.partitions, -1).copy(), dst.read()
    for row in range(dst.partitions):
        pick = mask[row % 32]
        if pick == 255:
            continue
        source = row - row % 32 + pick
        if source >= src.partitions:
            raise rule_error(instr, "shuffle_mask picks a partition src does not access",
                             f"dst partition {row} <- src partition {source} of {src.partitions}")
        out[row] = values[source]
    dst.write(out if is_float(dst.dtype) else out.astype(np.int64))


def memset(dst, value, engine=engine.unknown, name=None):
    """Fill `dst` with a compile-time constant on Vector or GpSimd ([isa] memset).

    The stub says only that memset "supports all valid NKI dtypes" (lines 888-889); no source at
    3c46990d says what a value `dst.dtype` cannot hold becomes. A float `dst` gets the value rounded
    as every engine output is (to float32, then to nearest even in the dtype; beyond its range,
    infinity, or NaN in float8_e4m3fn, which has none). An integer `dst` takes whole values within
    its range; a fraction, a value outside the range, NaN or infinity is refused as undocumented
    (truncate, round, wrap or saturate), as the DMA's float-to-integer step is (`_to_dtype`)."""
    instr = "nisa.memset"
    _tile(instr, "dst", dst)
    if not isinstance(value, (int, float, np.floating, np.integer)):  # [isa] "a compile-time constant value"
        raise rule_error(instr, "value must be a compile-time constant", f"got {type(value).__name__}")
    if not is_float(dst.dtype):
        info = np.iinfo(dst.dtype)
        if not (math.isfinite(value) and value == math.trunc(value) and info.min <= value <= info.max):
            raise rule_error(instr, f"what a {dst.dtype} tile holds after a memset of a value it cannot hold "
                             "(rounding, wrapping, saturation) is not documented: not emulated",
                             f"value={value!r}, {dst.dtype} holds whole numbers {info.min}..{info.max}")
    eng = _engine(instr, engine, "vector" if dst.buffer == PSUM else "gpsimd", ("vector", "gpsimd"), (dst,))
    _issue(eng, instr, max(MIN_II, dst.free_size), (), (dst,), _lanes(dst))
    if state().compute:
        dst.write(np.full((dst.partitions, dst.free_size), value, dtype=np.float64))


# ------------------------------------------------------------------ Tensor engine
def _matmul_tiling(instr: str, stationary: NkiTensor, tile_position: Any, tile_size: Any) -> None:
    """[isa] nc_matmul "Tiling mode" on NeuronCore-v2 (stub lines 1023-1041): rows in 2x64 tiles
    ("NeuronCore-v2 or newer"; 4x32 needs v3), columns "in the same fashion", so 64 or 128 each;
    a start a multiple of its tile size within 128; the stationary tile fits the chosen tile."""
    if not tile_position and not tile_size:
        return
    if not tile_position or not tile_size:
        raise rule_error(instr, "tile_position and tile_size must both be set to enable tiling mode",
                         f"tile_position={tile_position}, tile_size={tile_size}")
    (row0, col0), (rows, cols) = tile_position, tile_size
    for axis, size, start in (("row", rows, row0), ("column", cols, col0)):
        if size not in (64, 128):
            raise rule_error(instr, f"{axis} tile size is 64 or 128 on NeuronCore-v2 (32 needs NeuronCore-v3)",
                             f"tile_size={tile_size}")
        if start % size or start + size > 128:
            raise rule_error(instr, f"start_{axis} must be a multiple of the {axis} tile size within 128",
                             f"tile_position={tile_position}, tile_size={tile_size}")
    if stationary.partitions > rows:
        raise rule_error(instr, "stationary partitions must fit the row tile", f"{stationary.shape}, rows {rows}")
    if stationary.free_size > cols:
        raise rule_error(instr, "stationary free size must fit the column tile", f"{stationary.shape}, columns {cols}")


def nc_matmul(dst, stationary, moving, is_stationary_onezero=False, is_moving_onezero=False, is_transpose=False,
              tile_position=(), tile_size=(), perf_mode=matmul_perf_mode.none, name=None):
    """dst (PSUM, fp32) = stationary.T @ moving, contracting over partitions ([isa] nc_matmul, [arch] Tensor Engine).

    Matmuls into the same PSUM region accumulate until another instruction writes it; the
    first matmul into a fresh (or otherwise-written) region overwrites ([arch] "Near-memory
    accumulation in PSUM": a matmul accumulation group).
    """
    instr = "nisa.nc_matmul"
    _tile(instr, "stationary", stationary, (SBUF,))
    _tile(instr, "moving", moving, (SBUF,))
    _tile(instr, "dst", dst, (PSUM,))
    if perf_mode not in (None, matmul_perf_mode.none):
        raise rule_error(instr, "performance mode is not supported on NeuronCore-v2", f"perf_mode={perf_mode}")
    _matmul_tiling(instr, stationary, tile_position, tile_size)
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
    _one_bank(instr, dst)
    for nm, t in (("stationary", stationary), ("moving", moving)):
        if t.dtype not in _MATMUL_DTYPES:
            raise rule_error(instr, "inputs must be float8/bfloat16/float16/tfloat32/float32", f"{nm} dtype {t.dtype}")
    fp32 = [t.dtype == np.float32 for t in (stationary, moving)]
    if any(fp32) and not all(fp32):
        raise rule_error(instr, "if one input is float32 the other must be float32 too",
                         f"stationary {stationary.dtype}, moving {moving.dtype}")
    passes = 1
    if all(fp32):  # [arch] "For FP32 input data type, the instruction cost is roughly 4x"; one/zero hint halves it
        passes = 2 if (is_stationary_onezero or is_moving_onezero) else 4
    # [arch] Tensor Engine cost model: initiation interval max(N, 64) per MultiplyMoving; the access
    # overhead of the Vector/Scalar model does not apply to the pipelined PE array. Accumulating into PSUM
    # is [nl]'s associative reduction, no loop-carried dependency in an affine_range (loops.AffineLoops)
    _issue("tensor", instr, max(min(64, m), n) * passes, (stationary, moving), (dst,),
           n * (k / core.PMAX) * (m / core.PMAX), overhead=0, accumulates="add")
    if not state().compute:
        return
    result = stationary.read().T.astype(np.float64) @ moving.read().astype(np.float64)
    open_group = dst.accumulating()
    result = np.where(open_group, dst.read() + result, result)
    dst.write(result.astype(np.float32), accumulate_group=True)


def _one_bank(instr: str, dst: NkiTensor) -> None:
    """[arch] "The output tile of a TensorE matrix multiplication instruction must fit into one PSUM bank"."""
    _, _, _, f0, f1 = dst.region()
    if f1 > f0 and f0 // core.PSUM_BANK_BYTES != (f1 - 1) // core.PSUM_BANK_BYTES:
        raise rule_error(instr, f"dst must lie within one PSUM bank ({core.PSUM_BANK_BYTES} B per partition)",
                         f"dst {dst.shape} {dst.dtype} spans bytes {f0}..{f1} of its partitions")


def nc_transpose(dst, data, engine=engine.unknown, name=None):
    """2-D transpose on the Tensor engine (<= 128x128, SBUF -> PSUM) or the Vector engine (<= 32x32).

    [isa] nc_transpose: dst must have data's dtype. On NeuronCore-v2 the Tensor engine
    writes fp32 only ([arch] Tensor Engine "Data Types": "the output data of a TensorE
    calculation is always in FP32"; bf16 transposes on the PE array start with
    NeuronCore-v3: [lib] core/qkv/qkv_cte_utils.py "Instances after >=Trn2 support BF16
    transpose mode on PE Array" picks an fp32 PSUM transpose dtype on gen2,
    core/moe/moe_cte/moe_cte_utils.py `compatible_dtype` likewise), so a Tensor-engine
    transpose of a bf16 tile writes an fp32 PSUM tile there.
    """
    instr = "nisa.nc_transpose"
    _tile(instr, "data", data)
    _tile(instr, "dst", dst)
    p, f = data.partitions, data.free_size
    if dst.partitions != f or dst.free_size != p:
        raise rule_error(instr, "dst must be data's transpose", f"data {data.shape}, dst {dst.shape}")
    if engine in (None, _ENGINE_ENUM.unknown):
        eng = "vector" if p <= 32 and f <= 32 and dst.dtype == data.dtype else "tensor"
    elif isinstance(engine, _ENGINE_ENUM):
        eng = engine.name
    else:
        raise rule_error(instr, "engine must be a nki.isa.engine member", f"engine={engine!r}")
    if eng == "tensor":
        if data.buffer != SBUF or dst.buffer != PSUM:
            raise rule_error(instr, "Tensor-engine transpose reads SBUF and writes PSUM",
                             f"data in {data.buffer}, dst in {dst.buffer}")
        if p > 128 or f > 128:
            raise rule_error(instr, "Tensor-engine transpose handles at most 128x128", f"data {data.shape}")
        if dst.dtype != np.float32:
            raise rule_error(instr, "a Tensor-engine transpose writes a float32 PSUM tile on NeuronCore-v2",
                             f"data {data.dtype}, dst {dst.dtype}")
        if data.dtype not in _MATMUL_DTYPES:
            raise rule_error(instr, "Tensor-engine inputs must be float8/bfloat16/float16/float32",
                             f"data {data.dtype}")
        _one_bank(instr, dst)
        _issue("tensor", instr, max(min(64, f), p) * (4 if data.dtype == np.float32 else 1), (data,), (dst,),
               p * f / core.PMAX, overhead=0)
    elif eng == "vector":
        if p > 32 or f > 32:
            raise rule_error(instr, "Vector-engine transpose handles at most 32x32", f"data {data.shape}")
        if dst.dtype != data.dtype:
            raise rule_error(instr, "dst must have data's dtype", f"data {data.dtype}, dst {dst.dtype}")
        _issue("vector", instr, max(MIN_II, f), (data,), (dst,), _lanes(data))
    else:
        raise rule_error(instr, "runs on the Tensor or Vector engine", f"engine={eng}")
    if state().compute:
        dst.write(data.read().T)


# ------------------------------------------------------------------ Vector / Scalar / GpSimd compute
def tensor_tensor(dst, data1, data2, op, engine=engine.unknown, name=None):
    """dst = op(data1, data2) element-wise in fp32 on Vector or GpSimd ([isa] tensor_tensor)."""
    instr = "nisa.tensor_tensor"
    op = _op(instr, op, "alu")
    _binary(instr, "op", op)
    for nm, t in (("dst", dst), ("data1", data1), ("data2", data2)):
        _tile(instr, nm, t)
    _same_layout(instr, ("dst", "data1", "data2"), (dst, data1, data2))
    _not_both_psum(instr, data1, data2, ("data1", "data2"))
    _integer_tiles(instr, op, {"dst": dst, "data1": data1, "data2": data2})
    # [isa] "nl.power (Which runs on the GpSimd engine)"; GpSimd cannot access PSUM
    eng = _engine(instr, engine, "gpsimd" if op is nl.power else "vector", ("vector", "gpsimd"), (dst, data1, data2))
    if op is nl.power and eng != "gpsimd":
        raise rule_error(instr, "nl.power runs on the GpSimd engine", f"engine={eng}")
    _free_limit(instr, {"dst": dst, "data1": data1, "data2": data2})
    n = data1.free_size
    # [arch] Vector cost model: "two input tiles ... roughly 2N cycles"; an input streamed from
    # PSUM, or bf16 add/multiply, runs at N (the older isa docstrings; docs/kernels.md)
    fast = PSUM in (data1.buffer, data2.buffer) or (
        data1.dtype == core.BFLOAT16 and data2.dtype == core.BFLOAT16 and op in (nl.add, nl.multiply))
    _issue(eng, instr, max(MIN_II, n if fast else costmodel.TWO_INPUT_CYCLES_PER_ELEMENT * n), (data1, data2), (dst,),
           _lanes(data1), accumulates=_accumulates(dst, data1, op, data2))
    if state().compute:
        dst.write(op.fn(data1.read(), data2.read()))


def tensor_scalar(dst, data, op0, operand0, reverse0=False, op1=None, operand1=None, reverse1=False,
                  engine=engine.unknown, name=None):
    """dst = (data op0 operand0) op1 operand1 with scalar or per-partition (P, 1) operands ([isa] tensor_scalar)."""
    instr = "nisa.tensor_scalar"
    _tile(instr, "dst", dst)
    _tile(instr, "data", data)
    _same_layout(instr, ("dst", "data"), (dst, data))
    op0 = _op(instr, op0, "alu")
    if (op1 is None) != (operand1 is None):
        raise rule_error(instr, "op1 and operand1 go together (both None when unused)", f"op1={op1!r}")
    if op1 is not None:
        op1 = _op(instr, op1, "alu")
        if op0.is_("bitvec") != op1.is_("bitvec"):  # [isa] "must be of the same type"
            raise rule_error(instr, "op0 and op1 must both be bitvec or both arithmetic operators", f"{op0!r}, {op1!r}")
    bitvec = op0.is_("bitvec")
    eng = _engine(instr, engine, "vector", ("vector", "scalar", "gpsimd"), (dst, data))
    if bitvec and eng != "vector":  # [isa] "If bitvec operators are used, ... must run on Vector Engine"
        raise rule_error(instr, "bitvec operators run on the Vector engine only", f"engine={eng}")
    if eng == "gpsimd" and not (op0 is nl.rsqrt and op1 is None):
        # [isa] engine parameter: "nki.isa.gpsimd_engine (only allowed for rsqrt)"; [ops] engine selection
        raise rule_error(instr, "on the GpSimd engine tensor_scalar is allowed only for op0=nl.rsqrt",
                         f"op0={op0!r}, op1={op1!r}")
    if eng == "scalar" and (op0, op1) not in ((nl.multiply, nl.add), (nl.multiply, None), (nl.add, None)):
        # [isa] "The Scalar Engine ... only supports some operator combinations" (stated for trn2; NeuronCore-v2's
        # Scalar engine is documented with no more, so the emulator applies the same list)
        raise rule_error(instr, "on the Scalar engine tensor_scalar supports only (multiply, add), (multiply, None) "
                         "and (add, None)", f"op0={op0!r}, op1={op1!r}")
    _integer_tiles(instr, op0, {"dst": dst, "data": data})
    v0 = _scalar_operand(instr, "operand0", operand0, data.partitions)
    v1 = _scalar_operand(instr, "operand1", operand1, data.partitions) if op1 is not None else None
    _free_limit(instr, {"dst": dst, "data": data})
    # [ops] engine selection: rsqrt on GpSimd is 4x slower than on the Scalar engine
    per_elem = 4 if eng == "gpsimd" else 1
    _issue(eng, instr, max(MIN_II, per_elem * data.free_size), (data, operand0, operand1), (dst,), _lanes(data),
           accumulates=_accumulates(dst, data, op0, operand0, reverse0, op1, operand1, reverse1))
    if not state().compute:
        return
    x = data.read()
    if bitvec:
        v0, v1 = np.int64(v0) if np.ndim(v0) == 0 else v0.astype(np.int64), v1
    x = op0.fn(v0, x) if reverse0 else op0.fn(x, v0)
    if op1 is not None:
        x = op1.fn(v1, x) if reverse1 else op1.fn(x, v1)
    dst.write(x)


def tensor_scalar_reduce(dst, data, op0, operand0, reduce_op, reduce_res, reverse0=False, name=None):
    """dst = data op0 operand0 on the Vector engine, and reduce_res = reduce_op over all free axes of
    that result, one value per partition ([isa] tensor_scalar_reduce, stub lines 2459-2495).

    op0 is an arithmetic ALU operator (no bitvec); reverse0 is "not supported yet"; reduce_op a
    legal reduction operator of the ALU table (the stub's "nl.max or nl.min" are `nl.maximum` /
    `nl.minimum`, which nki-library passes); reduce_res a (P, 1) tile.
    """
    instr = "nisa.tensor_scalar_reduce"
    _tile(instr, "dst", dst)
    _tile(instr, "data", data)
    _tile(instr, "reduce_res", reduce_res)
    _same_layout(instr, ("dst", "data"), (dst, data))
    op0, reduce_op = _op(instr, op0, "alu"), _op(instr, reduce_op, "alu")
    if not op0.is_("arith"):
        raise rule_error(instr, "op0 must be an arithmetic operator (bitvec operators are not supported)", f"{op0!r}")
    if not reduce_op.reducible:
        raise rule_error(instr, "reduce_op is not a legal reduction operator (ALU table, 'Legal Reduction op')",
                         f"reduce_op {reduce_op!r}")
    if reverse0:
        raise rule_error(instr, "reverse0 is not supported yet", "reverse0=True")
    if reduce_res.partitions != data.partitions or reduce_res.free_size != 1:
        raise rule_error(instr, "reduce_res must be a (partitions, 1) tile",
                         f"reduce_res {reduce_res.shape}, data {data.shape}")
    v0 = _scalar_operand(instr, "operand0", operand0, data.partitions)
    _free_limit(instr, {"dst": dst, "data": data})
    _issue("vector", instr, max(MIN_II, data.free_size), (data, operand0), (dst, reduce_res), _lanes(data))
    if not state().compute:
        return
    dst.write(op0.fn(data.read(), v0))
    reduce_res.write(reduce_op.reducer(dst.read()).reshape(-1, 1))  # the stub: reduce_op(dst, axis=<FreeAxis>)


def scalar_tensor_tensor(dst, data, op0, operand0, op1, operand1, reverse0=False, reverse1=False, name=None):
    """dst = (data op0 operand0) op1 operand1 on the Vector engine, fp32 math ([isa] scalar_tensor_tensor):
    operand0 a constant or a (P, 1) tile, operand1 a tile shaped like data; data and operand1 not both in
    PSUM; about the cost of one tensor_tensor."""
    instr = "nisa.scalar_tensor_tensor"
    op0, op1 = _op(instr, op0, "alu"), _op(instr, op1, "alu")
    for op in (op0, op1):
        if not op.is_("arith"):
            raise rule_error(instr, "op0 and op1 must be arithmetic operators (no bitvec)", f"{op!r}")
    _binary(instr, "op1", op1)
    for nm, t in (("dst", dst), ("data", data), ("operand1", operand1)):
        _tile(instr, nm, t)
    _same_layout(instr, ("dst", "data", "operand1"), (dst, data, operand1))
    _not_both_psum(instr, data, operand1, ("data", "operand1"))
    if isinstance(operand0, NkiTensor):
        _tile(instr, "operand0", operand0)
        if operand0.partitions != data.partitions or operand0.free_size != 1:
            raise rule_error(instr, "operand0 must be a scalar or a (partitions, 1) tile",
                             f"operand0 {operand0.shape} for data {data.shape}")
        v0 = operand0.read().astype(np.float32) if state().compute else 0.0
    elif isinstance(operand0, (int, float, np.floating, np.integer)) and not isinstance(operand0, bool):
        v0 = np.float32(operand0)
    else:
        raise rule_error(instr, "operand0 must be a compile-time scalar or a (P, 1) tile", f"got {type(operand0).__name__}")
    _free_limit(instr, {"dst": dst, "data": data, "operand1": operand1})
    n = data.free_size
    fast = PSUM in (data.buffer, operand1.buffer)
    _issue("vector", instr, max(MIN_II, n if fast else costmodel.TWO_INPUT_CYCLES_PER_ELEMENT * n),
           (data, operand0, operand1), (dst,), _lanes(data),
           accumulates=_accumulates(dst, data, op0, operand0, reverse0, op1, operand1, reverse1))
    if not state().compute:
        return
    x = data.read().astype(np.float32)
    x = op0.fn(v0, x) if reverse0 else op0.fn(x, v0)
    y = operand1.read().astype(np.float32)
    dst.write(op1.fn(y, x) if reverse1 else op1.fn(x, y))


def _check_range(instr: str, op: nl._Op, x: np.ndarray) -> None:
    """[ops] activation table: inputs outside the Valid Input Range give invalid results on the Scalar engine."""
    if op.valid is None:
        return
    lo, hi = op.valid
    mag = np.abs(x) if op.symmetric else x
    bad = ~np.isnan(mag) & ((mag < lo) | (mag > hi))
    if bad.any():
        worst = x[bad].reshape(-1)[0]
        rng = f"±[{lo:g}, {hi:g}]" if op.symmetric else f"[{lo:g}, {hi:g}]"
        raise rule_error(instr, f"input of {op!r} outside its valid range {rng} (the Scalar engine returns invalid "
                         "results there)", f"{int(bad.sum())} elements, e.g. {worst:g}")


def activation(dst, op, data, bias=None, scale=1.0, reduce_op=None, reduce_res=None, reduce_cmd=reduce_cmd.idle,
               name=None):
    """dst = op(data * scale + bias) on the Scalar engine, with the optional free-axis add-reduction ([isa] activation)."""
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
        if op is nl.reciprocal:  # [ops] "nki.isa.activation(op=nl.reciprocal) doesn't support setting bias on v2"
            raise rule_error(instr, "activation(op=nl.reciprocal) takes no bias on NeuronCore-v2", "bias given")
        _tile(instr, "bias", bias)
        if bias.partitions != data.partitions or bias.free_size != 1:
            raise rule_error(instr, "bias must be a (partitions, 1) vector", f"bias {bias.shape}, data {data.shape}")
        if bias.dtype not in (np.dtype(np.float32), core.BFLOAT16, np.dtype(np.float16)):
            raise rule_error(instr, "bias must be float32/float16/bfloat16", f"bias dtype {bias.dtype}")
        b = bias.read() if state().compute else 0.0
    if reduce_op is not None and reduce_op is not nl.add:
        raise rule_error(instr, "reduce_op must be nl.add on NeuronCore-v2", f"reduce_op={reduce_op!r}")
    if reduce_op is None and reduce_cmd in (_REDUCE_CMD.reduce, _REDUCE_CMD.reset_reduce):
        # [isa] activation (stub lines 114-116, 142-145): the registers take reduce_op(output) under these two
        # commands, and "reduce_op must be nl.add"; with no reduce_op there is no reduction to store
        raise rule_error(instr, "a reducing reduce_cmd needs reduce_op=nl.add",
                         f"reduce_cmd={reduce_cmd.name}, reduce_op=None")
    if reduce_cmd == _REDUCE_CMD.load_reduce:  # [isa] activation documents reset, idle, reduce, reset_reduce only
        raise rule_error(instr, "reduce_cmd=load_reduce is not documented for activation (it takes no value to "
                         "load) and is not emulated", "reduce_cmd=load_reduce")
    if reduce_res is not None:
        _tile(instr, "reduce_res", reduce_res)
        if reduce_res.partitions != data.partitions or reduce_res.free_size != 1:
            raise rule_error(instr, "reduce_res must be a (partitions, 1) tile",
                             f"reduce_res {reduce_res.shape}, data {data.shape}")
    _free_limit(instr, {"dst": dst, "data": data})
    _issue("scalar", instr, max(MIN_II, data.free_size), (data, bias, scale), (dst,), _lanes(data),
           accumulates=_activation_accumulates(dst, op, data, bias, scale))
    if reduce_res is not None:  # [arch] "ActReadAccumulator ... roughly 64 ScalarE cycles"
        _issue("scalar", instr + " (read accumulators)", MIN_II, (), (reduce_res,), overhead=0)
    if not state().compute:
        return
    x = data.read() * s + b
    _check_range(instr, op, x)
    out = op.act_fn(x)
    dst.write(out)
    run, p = state(), data.partitions
    regs = run.reduce_regs
    if reduce_cmd in (_REDUCE_CMD.reset, _REDUCE_CMD.reset_reduce):
        regs[:p] = 0.0
    if reduce_cmd in (_REDUCE_CMD.reduce, _REDUCE_CMD.reset_reduce):
        regs[:p] += out.reshape(p, -1).sum(axis=1, keepdims=True)
    if reduce_res is not None:
        reduce_res.write(regs[:p])


def _activation_accumulates(dst: NkiTensor, op: nl._Op, data: NkiTensor, bias: Any, scale: Any) -> str:
    """`activation(op=nl.copy)` computes data * scale + bias: over `data` in place that is `acc * scale`
    (qkv_cte.py and output_projection_tkg.py of nki-library dequantize so) or, at scale 1, `acc + bias`.
    Any other function of acc (exp, ...) is no reduction, nor is the accumulator in `bias` or `scale`."""
    if op is not nl.copy or dst.region() != data.region():
        return ""
    if any(isinstance(t, NkiTensor) and t.region() == dst.region() for t in (bias, scale)):
        return ""
    unit_scale = not isinstance(scale, NkiTensor) and float(scale) == 1.0
    steps = ([] if unit_scale else [("multiply", True)]) + ([("add", True)] if bias is not None else [])
    return loops.associative_update(steps) if steps else ""


def activation_reduce(dst, op, data, reduce_op, reduce_res, bias=None, scale=1.0, name=None):
    """`activation` with reduce_cmd=reset_reduce and reduce_res ([isa] activation_reduce)."""
    if reduce_op is not nl.add:  # [isa] activation_reduce: "On NeuronCore-v2, the reduce_op must be nl.add"
        raise rule_error("nisa.activation_reduce", "reduce_op must be nl.add on NeuronCore-v2",
                         f"reduce_op={reduce_op!r}")
    activation(dst=dst, op=op, data=data, bias=bias, scale=scale, reduce_op=reduce_op, reduce_res=reduce_res,
               reduce_cmd=_REDUCE_CMD.reset_reduce)


def _reduce_axes(instr: str, axis: Any, data: NkiTensor) -> int:
    """[isa] tensor_reduce: axes are numbered from the most-minor free axis (1) outwards, must contain 1
    and be consecutive ([1], [1,2], [1,2,3], [1,2,3,4]). Returns how many trailing axes reduce."""
    axes = sorted([axis] if isinstance(axis, int) else [int(a) for a in axis])
    free_axes = data.ndim - 1
    if not axes or axes != list(range(1, len(axes) + 1)) or len(axes) > min(4, free_axes):
        raise rule_error(instr, "axis counts free axes from the most minor one (= 1) and must be [1], [1, 2], "
                         "[1, 2, 3] or [1, 2, 3, 4] within the tile's free axes (never 0, the partition axis)",
                         f"axis={axis}, data {data.shape}")
    return len(axes)


def tensor_reduce(dst, op, data, axis, negate=False, keepdims=False, name=None):
    """Reduce the innermost free axes of `data` with an ALU op on the Vector engine ([isa] tensor_reduce)."""
    instr = "nisa.tensor_reduce"
    op = _op(instr, op, "alu")
    if not op.reducible:  # [ops] ALU table, column "Legal Reduction op"
        raise rule_error(instr, "op is not a legal reduction operator (ALU table, 'Legal Reduction op')", f"op {op!r}")
    _tile(instr, "dst", dst)
    _tile(instr, "data", data)
    _integer_tiles(instr, op, {"dst": dst, "data": data})
    if negate and op.is_("bitvec"):
        raise rule_error(instr, "negate applies to arithmetic operators only", f"op {op!r}")
    n_axes = _reduce_axes(instr, axis, data)
    kept_shape = data.shape[1:data.ndim - n_axes]
    kept = int(np.prod(kept_shape, dtype=np.int64))
    if dst.partitions != data.partitions or dst.free_size != kept:
        raise rule_error(instr, "dst must hold the reduced shape", f"dst {dst.shape}, data {data.shape}, axis {axis}")
    _free_limit(instr, {"dst": dst, "data": data})
    _issue("vector", instr, max(MIN_II, data.free_size), (data,), (dst,), _lanes(data))
    if not state().compute:
        return
    out = op.reducer(data.read().reshape(data.partitions, kept, -1))
    dst.write(-out if negate else out)


def tensor_tensor_scan(dst, data0, data1, initial, op0, op1, reverse0=False, reverse1=False, name=None):
    """r[:, i] = op1(op0(data0[:, i], r[:, i-1]), data1[:, i]), r[:, -1] = initial; fp32 on Vector ([isa])."""
    instr = "nisa.tensor_tensor_scan"
    op0, op1 = _op(instr, op0, "alu"), _op(instr, op1, "alu")
    for op in (op0, op1):
        if not op.is_("arith"):
            raise rule_error(instr, "op0 and op1 must be arithmetic operators", f"{op!r}")
    _binary(instr, "op0", op0)
    _binary(instr, "op1", op1)
    for nm, t in (("dst", dst), ("data0", data0), ("data1", data1)):
        _tile(instr, nm, t)
    _same_layout(instr, ("dst", "data0", "data1"), (dst, data0, data1))
    _not_both_psum(instr, data0, data1, ("data0", "data1"))
    init = _scalar_operand(instr, "initial", initial, data0.partitions)
    _free_limit(instr, {"dst": dst, "data0": data0, "data1": data1})
    n = data0.free_size
    _issue("vector", instr, max(MIN_II, costmodel.TWO_INPUT_CYCLES_PER_ELEMENT * n), (data0, data1, initial), (dst,),
           _lanes(data0))
    if not state().compute:
        return
    a, b = data0.read(), data1.read()
    out = np.empty_like(a)
    prev = np.broadcast_to(np.asarray(init, np.float32).reshape(-1), (a.shape[0],)).astype(np.float32)
    for i in range(n):
        x = op0.fn(prev, a[:, i]) if reverse0 else op0.fn(a[:, i], prev)
        prev = (op1.fn(b[:, i], x) if reverse1 else op1.fn(x, b[:, i])).astype(np.float32)
        out[:, i] = prev
    dst.write(out)


def reciprocal(dst, data, name=None):
    """dst = 1 / data on the Vector engine, max(MIN_II, 8N) cycles ([isa] reciprocal; [ops] engine selection)."""
    instr = "nisa.reciprocal"
    _tile(instr, "dst", dst)
    _tile(instr, "data", data)
    _same_layout(instr, ("dst", "data"), (dst, data))
    _free_limit(instr, {"dst": dst, "data": data})
    _issue("vector", instr, max(MIN_II, 8 * data.free_size), (data,), (dst,), _lanes(data))
    if state().compute:
        with np.errstate(divide="ignore"):
            dst.write(1.0 / data.read())


# the comparison rows of the [ops] ALU operator table
_COMPARISONS = (nl.equal, nl.not_equal, nl.greater_equal, nl.greater, nl.less_equal, nl.less)


def _int32(instr: str, name: str, value: Any) -> int:
    """[isa] iota / affine_select: offset and channel_multiplier are int32 values."""
    integral = isinstance(value, (int, np.integer)) or (
        isinstance(value, (float, np.floating)) and float(value).is_integer())
    if isinstance(value, bool) or not integral or not -2 ** 31 <= int(value) < 2 ** 31:
        raise rule_error(instr, f"{name} must be an int32 value", f"{name}={value!r}")
    return int(value)


def _affine_values(instr: str, dst: NkiTensor, pattern: Any, offset: int, channel_multiplier: int) -> np.ndarray:
    offset = _int32(instr, "offset", offset)
    channel_multiplier = _int32(instr, "channel_multiplier", channel_multiplier)
    dims = [list(map(int, d)) for d in pattern]
    if not 1 <= len(dims) <= 4:
        raise rule_error(instr, "pattern has 1 to 4 [step, num] pairs", f"pattern={pattern}")
    if any(not 1 <= num <= AXIS_SIZE_MAX for _, num in dims):  # the sizes of an access pattern are uint16 counts
        raise rule_error(instr, f"each pattern num is 1 to {AXIS_SIZE_MAX} (a uint16 count, trainium_inferentia2_"
                         "arch.rst lines 715-718)", f"pattern={pattern}")
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


def iota(dst, pattern, offset=0, channel_multiplier=0, name=None):
    """dst[p, ...] = offset + p * channel_multiplier + sum(step * index) (GpSimd, int32 math; [isa] iota).

    `offset` defaults to 0 here although the stub lists it without a default: nki-library's
    v2-capable kernels call `nisa.iota(pattern=..., dst=...)` (core/max/cascaded_max.py).
    """
    instr = "nisa.iota"
    _tile(instr, "dst", dst, (SBUF,))
    values = _affine_values(instr, dst, pattern, offset, channel_multiplier)
    _issue("gpsimd", instr, core.GPSIMD_BASE + dst.free_size, (), (dst,), _lanes(dst), overhead=0)
    if state().compute:
        dst.write(values.astype(np.int32).astype(np.float64))


_REQUIRED: Any = object()  # a parameter the stub lists without a default, after one given a default here


def affine_select(dst, pattern, offset=0, channel_multiplier=_REQUIRED, on_true_tile=_REQUIRED,
                  on_false_value=_REQUIRED, cmp_op=nl.equal, name=None):
    """dst = on_true_tile where cmp_op(affine value, 0) else on_false_value (GpSimd; [isa] affine_select).

    The stub's signature (nki/api/nki/isa/__init__.py line 255 at 3c46990d) gives only `cmp_op`
    and `name` defaults. `offset` defaults to 0 here because nki-library's cascaded_max.py (line
    266 at 0759719) omits it, as the later stub's signature allows; the other three are required.
    """
    instr = "nisa.affine_select"
    missing = [nm for nm, v in (("channel_multiplier", channel_multiplier), ("on_true_tile", on_true_tile),
                                ("on_false_value", on_false_value)) if v is _REQUIRED]
    if missing:
        raise TypeError(f"affine_select() missing required argument(s): {', '.join(missing)}")
    _tile(instr, "dst", dst, (SBUF,))
    _tile(instr, "on_true_tile", on_true_tile, (SBUF,))
    _same_layout(instr, ("dst", "on_true_tile"), (dst, on_true_tile))
    cmp = _op(instr, cmp_op, "alu")
    if cmp not in _COMPARISONS:  # [isa] affine_select "cmp_op: comparison operator to use for predicate evaluation"
        raise rule_error(instr, "cmp_op must be a comparison operator (equal, not_equal, greater_equal, greater, "
                         "less_equal, less)", f"cmp_op={cmp!r}")
    if not isinstance(on_false_value, (int, float, np.floating)) or isinstance(on_false_value, bool):
        raise rule_error(instr, "on_false_value must be a float32 scalar", f"got {on_false_value!r}")
    values = _affine_values(instr, dst, pattern, offset, channel_multiplier)
    _issue("gpsimd", instr, core.GPSIMD_BASE + dst.free_size, (on_true_tile,), (dst,), _lanes(dst), overhead=0)
    if state().compute:
        keep = cmp.fn(values.astype(np.float64), 0.0).astype(bool)
        dst.write(np.where(keep, on_true_tile.read(), np.float32(on_false_value)))


# ------------------------------------------------------------------ top-8 search (Vector)
def _top8_operand(instr: str, name: str, t: Any) -> NkiTensor:
    """[isa] max8 / nc_find_index8: the searched tile is up to 5-D with 8 to 16,384 elements per partition."""
    _tile(instr, name, t)
    if t.ndim > 5 or not 8 <= t.free_size <= 16384:
        raise rule_error(instr, f"{name} is up to 5-D with 8 to 16,384 elements per partition", f"{name} {t.shape}")
    return t


def _top8_dst(instr: str, dst: Any, partitions: int, dtypes: tuple | None = None) -> NkiTensor:
    _tile(instr, "dst", dst)
    if dst.ndim != 2 or dst.shape != (partitions, 8):
        raise rule_error(instr, "dst is a 2-D (partitions, 8) tile", f"dst {dst.shape} for {partitions} partitions")
    if dtypes is not None and dst.dtype not in dtypes:
        raise rule_error(instr, "dst must be uint16 or uint32", f"dst dtype {dst.dtype}")
    return dst


def max8(dst, src, name=None):
    """The 8 largest values of each partition, descending, read as fp32 ([isa] max8). Vector engine,
    as its siblings: [isa] nc_match_replace8 names the Vector engine for this family."""
    instr = "nisa.max8"
    _top8_operand(instr, "src", src)
    _top8_dst(instr, dst, src.partitions)
    _issue("vector", instr, max(MIN_II, src.free_size), (src,), (dst,), _lanes(src))
    if state().compute:
        data = src.read().reshape(src.partitions, -1).astype(np.float32)
        dst.write(-np.sort(-data, axis=1)[:, :8])


def nc_find_index8(dst, data, vals, name=None):
    """Index (from 0, over the flattened free axes) of the first occurrence of each of the 8 `vals` in
    each partition of `data` ([isa] nc_find_index8); dst (partitions, 8) uint16/uint32. A value not in
    the partition is undefined behaviour on hardware: an error here."""
    instr = "nisa.nc_find_index8"
    _top8_operand(instr, "data", data)
    _tile(instr, "vals", vals)
    if vals.ndim > 3 or vals.free_size != 8 or vals.partitions != data.partitions:
        raise rule_error(instr, "vals is up to 3-D with exactly 8 elements per partition, as many partitions as data",
                         f"vals {vals.shape}, data {data.shape}")
    _top8_dst(instr, dst, data.partitions, (np.dtype(np.uint16), np.dtype(np.uint32)))
    _issue("vector", instr, max(MIN_II, data.free_size), (data, vals), (dst,), _lanes(data))
    if not state().compute:
        return
    hay = data.read().reshape(data.partitions, -1).astype(np.float32)
    needles = vals.read().reshape(vals.partitions, 8).astype(np.float32)
    hits = hay[:, None, :] == needles[:, :, None]
    if not hits.any(axis=2).all():
        raise rule_error(instr, "every value of vals must occur in its partition of data (undefined otherwise)",
                         f"data {data.shape}")
    dst.write(hits.argmax(axis=2))


# In the 0.2.0 stub but not emulated: callable names that raise when a kernel reaches them.
NOT_EMULATED = (
    "bn_aggr", "bn_stats", "dma_compute",
    "dropout", "local_gather", "nc_match_replace8", "nc_n_gather",
    "rand_get_state", "rand_set_state",
    "register_alloc", "register_load", "register_move", "register_store", "rng",
    "select_reduce", "sequence_bounds", "set_rng_seed", "tensor_copy_predicated",
    "tensor_partition_reduce", "tensor_scalar_cumulative",
)
for _name in NOT_EMULATED:
    globals()[_name] = core.not_emulated(f"nisa.{_name}")

# [isa] "Available only on NeuronCore-vN and newer" (the stub line of each note): a Trn1 is NeuronCore-v2,
# so these are refused for that reason, as neuronx-cc would, whatever their arguments.
LATER_NEURONCORE = {
    "core_barrier": (3, 402), "exponential": (4, 630), "nc_matmul_mx": (4, 1147), "nonzero_with_count": (3, 1392),
    "quantize_mx": (4, 1496), "rand2": (4, 1568), "range_select": (3, 1686), "sendrecv": (3, 2078),
}


def _later_neuroncore(name: str, version: int, line: int):
    def unsupported(*args: Any, **kwargs: Any) -> None:
        raise rule_error(f"nisa.{name}", f"available only on NeuronCore-v{version} and newer (stub line {line}); "
                         "a Trn1 is NeuronCore-v2", "the emulator models v2")

    unsupported.__name__ = unsupported.__qualname__ = name
    return unsupported


for _name, (_version, _line) in LATER_NEURONCORE.items():
    globals()[_name] = _later_neuroncore(_name, _version, _line)


__all__ = [
    "activation", "activation_reduce", "affine_select", "dge_mode", "dma_copy", "dma_transpose", "engine",
    "get_nc_version", "iota",
    "matmul_perf_mode", "max8", "memset", "nc_find_index8", "nc_matmul", "nc_stream_shuffle", "nc_transpose", "nc_version", "oob_mode", "reciprocal", "reduce_cmd",
    "tensor_copy", "tensor_reduce", "tensor_scalar", "tensor_scalar_reduce", "tensor_tensor", "tensor_tensor_scan",
]
