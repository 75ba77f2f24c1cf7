"""Emulator core: tensors in the NKI buffers, on-chip capacity, and the run state.

The emulator runs the real source of NKI 0.2.0 kernels on CPU with NumPy. Every tensor
lives in a named buffer (``hbm``/``shared_hbm``/``private_hbm``, ``sbuf``, ``psum``)
and every `nisa` instruction checks the rules the hardware imposes before it computes,
in fp32 as the engines do, and issues itself to the cost model (`costmodel.Timeline`).
The rules are enforced here rather than trusted to code review because a kernel that
violates one compiles to nothing (or to wrong answers) on a Trn1 we may not have.

Capacities: SBUF per partition by NeuronCore generation (`SBUF_BYTES_PER_PARTITION_BY_GEN`);
the emulator models NeuronCore-v2 (Trn1, `EMULATED_GEN`): 24 MiB = 128 partitions x 192 KiB,
of which a kernel may use 192 KiB - 16 KiB (dynamic-DMA scratch) - 8 B (an accelerator-reserved
word) per partition: the reservations nki-library makes (`core/mlp/mlp_cte/mlp_cte_constants.py`
line 47, MAX_AVAILABLE_SBUF_SIZE, written for the 224 KiB partitions of NeuronCore-v3). PSUM
2 MiB = 128 partitions x 16 KiB in 8 banks of 2 KiB; PSUM tensors start at a bank
(nki-migration-guide.rst, "Improved Allocation API"), so each takes whole banks.
"""

from __future__ import annotations

import math
import operator
import os
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any

import ml_dtypes
import numpy as np

from . import costmodel
from .costmodel import (ACCESS_OVERHEAD, CLOCK_HZ, ENGINES, HBM_BYTES_PER_S, MIN_II, PSUM_PORT,  # noqa: F401
                        RESOURCES, SBUF_PORT, Timeline)

# --------------------------------------------------------------------- capacities
PMAX = 128  # partitions
EMULATED_GEN = 2  # NeuronCore-v2 (Trn1/Inf2): `nisa.get_nc_version()` is `nc_version.gen2`
# Physical SBUF bytes per partition (capacity / 128 partitions), by NeuronCore generation, from the arch guides
# at 3c46990d: v2 trainium_inferentia2_arch.rst lines 76-78 ("24MiB", "192KiB" per partition, Trn1/Inf2);
# v3 trainium2_arch.rst line 39 ("28MiB", "128 partitions of 224KiB", Trn2); v4 trainium3_arch.rst line 36
# ("32 MiB", Trn3). The 262,144 B that `library/kernel-utils/allocator.rst` lines 195-199 print as
# `total_available_sbuf_size` (an address of it - 512 shown as 261632) is v4's whole partition; it is no
# NeuronCore-v2 figure (docs/kernels.md, "Instruction and hardware rules").
SBUF_BYTES_PER_PARTITION_BY_GEN = {2: 192 * 1024, 3: 224 * 1024, 4: 256 * 1024}
# dynamic-DMA scratch + accelerator-reserved word: nki-library's "Total available SBUF - DynamicDMAScratchLoc -
# EvalAccelReservedLoc" (mlp_cte_constants.py lines 46-47; its further 256 B are that kernel's own identity tile)
SBUF_RESERVED_BYTES_PER_PARTITION = 16 * 1024 + 8


def usable_sbuf_bytes_per_partition(gen: int) -> int:
    """SBUF bytes per partition a kernel may allocate on NeuronCore-v`gen`: the physical partition
    less the runtime's reservations (180,216 B on v2, 212,984 B on v3, 245,752 B on v4)."""
    if gen not in SBUF_BYTES_PER_PARTITION_BY_GEN:
        raise ValueError(f"error: no SBUF size known for NeuronCore-v{gen}; "
                         f"known: {sorted(SBUF_BYTES_PER_PARTITION_BY_GEN)}")
    return SBUF_BYTES_PER_PARTITION_BY_GEN[gen] - SBUF_RESERVED_BYTES_PER_PARTITION


SBUF_BYTES_PER_PARTITION = SBUF_BYTES_PER_PARTITION_BY_GEN[EMULATED_GEN]
SBUF_USABLE_BYTES_PER_PARTITION = usable_sbuf_bytes_per_partition(EMULATED_GEN)  # 180,216 B
PSUM_BANK_BYTES = 2 * 1024  # per partition per bank: 512 fp32
PSUM_BANKS = 8
GEMM_STATIONARY_FMAX = 128
GEMM_MOVING_FMAX = 512
GPSIMD_BASE = 150  # iota / affine_select fixed cost
# free elements per partition a Vector / Scalar instruction may stream (arch guide, Vector and
# Scalar Engine "Layout & Tile Size": "up to 64K elements for SBUF or 4K elements for PSUM")
FREE_MAX = {"sbuf": 64 * 1024, "psum": 4 * 1024}

SBUF, PSUM, HBM, SHARED_HBM, PRIVATE_HBM = "sbuf", "psum", "hbm", "shared_hbm", "private_hbm"
ON_CHIP = (SBUF, PSUM)
HBM_BUFFERS = (HBM, SHARED_HBM, PRIVATE_HBM)

BFLOAT16 = np.dtype(ml_dtypes.bfloat16)


class NKIRuleError(ValueError):
    """A kernel broke a hardware or API rule; the message names instruction, rule and shapes."""


def rule_error(instr: str, rule: str, detail: str) -> NKIRuleError:
    return NKIRuleError(f"{instr}: {rule} ({detail})")


class NKISpillWarning(UserWarning):
    """More live tiles than an on-chip buffer holds. neuronx-cc accepts such a kernel and spills: "If the
    total size of the live data being used by a NKI kernel overflows the capacity of any on-chip memory,
    the Neuron compiler will insert the necessary spills or refills between that memory and the next-tier
    memory in the hierarchy" (nki/get-started/about/memory-hierarchy-overview.rst line 86). The emulator
    runs on; which tiles spill and the traffic they cost are not modelled (no source says)."""


class NKILoopDependencyWarning(UserWarning):
    """A loop-carried dependency between iterations of an ``nl.affine_range`` (emulator/loops.py). neuronx-cc
    accepts such a loop: the stub warns it "is considered unsafe and could lead to numerical errors"
    (nki/api/nki/language/__init__.py lines 251-252) and no 0.2.0 source names a compile error for it. The
    emulator runs the iterations in order and goes on."""


# --------------------------------------------------------------------- profile / run state
def bound_of(busy: dict[str, float]) -> str:
    """`Profile.bound` from seconds busy per resource (`Profile.busy_s`), also for figures derived from
    several profiles."""
    single = {k: v for k, v in busy.items() if k not in (SBUF_PORT, PSUM_PORT)}
    top = max(single, key=single.get)
    port = max((SBUF_PORT, PSUM_PORT), key=busy.get)
    return port if busy[port] > 1.02 * single[top] else top


@dataclass
class Profile:
    """What one emulated kernel run costs on a Trn1 NeuronCore (modelled, not measured).

    `time_s` is the contention-aware timeline's makespan (costmodel.Timeline);
    `time_overlapped_s` the old perfect-overlap figure (busiest engine alone, no shared
    ports, no dependencies), kept for comparison; `busy_s` per resource (engines, the
    two shared SRAM ports, the DMA engines, HBM) says what bounds the kernel.
    """

    cycles: dict[str, float] = field(default_factory=lambda: {e: 0.0 for e in ENGINES})
    instructions: dict[str, int] = field(default_factory=lambda: {e: 0 for e in ENGINES})
    # cycles the work would take at the engine's peak (all lanes/PEs busy, bf16 rate, no overhead)
    useful: dict[str, float] = field(default_factory=lambda: {e: 0.0 for e in ENGINES})
    hbm_bytes: int = 0
    dma_bytes: int = 0
    dma_count: int = 0
    peak_sbuf_bytes: int = 0  # per partition
    peak_psum_bytes: int = 0  # per partition (banks x 2 KiB)
    timeline: Timeline = field(default_factory=Timeline)

    def engine_seconds(self) -> dict[str, float]:
        return {e: self.cycles[e] / CLOCK_HZ[e] for e in ENGINES}

    @property
    def hbm_seconds(self) -> float:
        return self.hbm_bytes / HBM_BYTES_PER_S

    @property
    def busy_s(self) -> dict[str, float]:
        """Seconds each resource is occupied: engines, SBUF port (Vector+GpSimd), PSUM port, DMA, HBM."""
        return {**self.timeline.busy, "hbm": self.hbm_seconds}

    @property
    def time_s(self) -> float:
        """Contention-aware modelled time: the timeline's makespan."""
        return self.timeline.makespan

    @property
    def time_overlapped_s(self) -> float:
        """Perfect overlap, no contention: the busiest engine (or HBM) alone."""
        return max([*self.engine_seconds().values(), self.hbm_seconds])

    @property
    def time_serial_s(self) -> float:
        """No overlap at all: an upper bound."""
        return sum(self.engine_seconds().values()) + self.timeline.busy["dma"]

    def peak_share(self, engine: str) -> float:
        """Fraction of `engine`'s peak its charged cycles deliver (1.0 = every cycle fully used)."""
        return self.useful[engine] / self.cycles[engine] if self.cycles.get(engine) else 0.0

    @property
    def bound(self) -> str:
        """What bounds the kernel: the busiest engine, 'dma' or 'hbm' - or a shared SRAM port
        ('sbuf_port': Vector + GpSimd, 'psum_port': Vector + Scalar) when sharing it costs more
        than 2 % over the busiest single resource."""
        return bound_of(self.busy_s)

    def to_dict(self) -> dict[str, Any]:
        return {
            "cycles": dict(self.cycles),
            "instructions": dict(self.instructions),
            "engine_seconds": self.engine_seconds(),
            "busy_seconds": self.busy_s,
            "hbm_bytes": self.hbm_bytes,
            "hbm_seconds": self.hbm_seconds,
            "dma_bytes": self.dma_bytes,
            "dma_count": self.dma_count,
            "time_s": self.time_s,
            "time_overlapped_s": self.time_overlapped_s,
            "time_serial_s": self.time_serial_s,
            "bound": self.bound,
            "peak_share": {e: self.peak_share(e) for e in ENGINES},
            "peak_sbuf_bytes_per_partition": self.peak_sbuf_bytes,
            "peak_psum_bytes_per_partition": self.peak_psum_bytes,
        }


class RunState:
    """Per-run bookkeeping: live on-chip bytes, the profile and its timeline. One run at a time."""

    def __init__(self, compute: bool = True, record_timeline: bool = False, grid: tuple[int, ...] = ()) -> None:
        self.compute = compute
        self.grid = grid  # the launch grid (`kernel[n]`; empty without brackets): one program on Trn1 (`launch`)
        self.profile = Profile(timeline=Timeline(record=record_timeline))
        self.live = {SBUF: 0, PSUM: 0}
        self.next_alloc = 0
        self.reduce_regs = np.zeros((PMAX, 1), np.float32)  # Scalar-engine accumulation registers
        # shared_hbm tensors allocated without a name, with the kernel line that made them: one that
        # is not a kernel output needs a name (checked when the kernel returns, frontend.check_outputs)
        self.unnamed_shared_hbm: list[tuple["_Allocation", str, int]] = []
        # the running affine_range nest and the accesses made in it (loops.AffineLoops), made by the
        # run's first affine_range
        self.affine_loops: Any = None
        # per on-chip buffer, the memory tiles placed with `address=` live in (placed_memory)
        self.placed: dict[str, "_Allocation"] = {}
        self.spilled: set[str] = set()  # the on-chip buffers whose live tiles overflowed (NKISpillWarning)
        self.tensor_names: dict[str, tuple[str, int]] = {}  # a tensor name -> the kernel line that first gave it

    def placed_memory(self, buffer: str) -> "_Allocation":
        """The kernel's `buffer` as bytes (partitions x usable bytes). Placed tiles are views of it, so
        tiles placed at overlapping addresses share their bytes as on the hardware (nki-language-guide.rst
        lines 210-218: tensors made over the same region "use the same underlying memory"). It starts as
        0xFF bytes: NaN in every float type, so reads of placed memory nothing wrote show (as
        `nl.ndarray`'s NaN fill does); -1 in integer types."""
        if buffer not in self.placed:
            per_partition = SBUF_USABLE_BYTES_PER_PARTITION if buffer == SBUF else PSUM_BANKS * PSUM_BANK_BYTES
            data = np.full((PMAX, per_partition), 0xFF, np.uint8) if self.compute else np.empty(
                (PMAX, per_partition), np.uint8)
            self.placed[buffer] = _Allocation(data, buffer, f"placed {buffer}", 0)
        return self.placed[buffer]

    def issue(self, engine: str, instr: str, cycles: float, reads: tuple["NkiTensor", ...],
              writes: tuple["NkiTensor", ...], useful: float = 0.0, overhead: float = ACCESS_OVERHEAD,
              accumulates: str = "") -> None:
        """Charge one compute instruction of `cycles` (+ the SBUF/PSUM access overhead) and place it on the
        timeline. `accumulates`: the associative operator its writes accumulate into the destination with
        ("add" for nc_matmul into PSUM; "" when they do not; loops.associative_update)."""
        if self.affine_loops is not None and self.affine_loops.active:
            self.affine_loops.access(instr, reads, writes, accumulates)
        if engine in costmodel.STREAMING_ENGINES and any(
                t.buffer in ON_CHIP and t.minor_stride_bytes() > costmodel.STRIDE_PENALTY_BYTES
                for t in (*reads, *writes)):
            cycles *= costmodel.STRIDE_PENALTY
        cycles = cycles + overhead
        self.profile.cycles[engine] += cycles
        self.profile.instructions[engine] += 1
        self.profile.useful[engine] += useful
        buffers = {t.buffer for t in (*reads, *writes)}
        ports: tuple[str, ...] = ()
        if engine == "gpsimd" or (engine == "vector" and SBUF in buffers):
            ports += (SBUF_PORT,)
        if engine in ("vector", "scalar") and PSUM in buffers:
            ports += (PSUM_PORT,)
        self.profile.timeline.issue(engine, instr, cycles, [t.region() for t in reads],
                                    [t.region() for t in writes], ports)

    def dma(self, instr: str, dst: "NkiTensor", src: "NkiTensor", hbm_bytes: int, accumulates: str = "",
            indices: tuple["NkiTensor", ...] = ()) -> None:
        """Charge one DMA transfer (bytes moved = the larger side) and place it on the DMA engines.
        `accumulates`: "add" when it adds into `dst` (`dst_rmw_op`), an associative reduction;
        `indices`: the `vector_offset` tiles a gather / scatter reads."""
        if self.affine_loops is not None and self.affine_loops.active:
            self.affine_loops.access(instr, (src, *indices), (dst,), accumulates)
        nbytes = max(src.nbytes, dst.nbytes)
        on_chip = [t.partitions for t in (dst, src) if t.buffer in ON_CHIP]
        partitions = max(on_chip) if on_chip else None
        self.profile.hbm_bytes += int(hbm_bytes)
        self.profile.dma_bytes += int(nbytes)
        self.profile.dma_count += 1
        reads = [src.region(), *(t.region() for t in indices)] + ([dst.region()] if hbm_bytes > nbytes else [])
        self.profile.timeline.dma(instr, nbytes, partitions, hbm_bytes, reads, [dst.region()])

    def allocate(self, buffer: str, nbytes: int) -> int:
        self.live[buffer] += nbytes
        if buffer == SBUF:
            self.profile.peak_sbuf_bytes = max(self.profile.peak_sbuf_bytes, self.live[SBUF])
        else:
            self.profile.peak_psum_bytes = max(self.profile.peak_psum_bytes, self.live[PSUM])
        self.next_alloc += 1
        return self.next_alloc

    def release(self, buffer: str, nbytes: int, alloc_id: int) -> None:
        self.live[buffer] -= nbytes
        self.profile.timeline.forget(alloc_id)


_STATE: list[RunState] = [RunState()]


def state() -> RunState:
    return _STATE[-1]


def push_state(run: RunState) -> None:
    _STATE.append(run)


def pop_state() -> RunState:
    return _STATE.pop()


def kernel_running() -> bool:
    """Whether a kernel is being simulated (a run state above the idle one)."""
    return len(_STATE) > 1


# --------------------------------------------------------------------- names of 0.2.0 the emulator cannot run
NOT_EMULATED = "is in NKI 0.2.0 but not emulated"


def not_emulated(qualname: str):
    """A stand-in for an NKI 0.2.0 function the emulator does not implement.

    Code that names it imports and parses as under neuronx-cc (nki-library keeps such
    calls on paths a NeuronCore-v2, single-core run never takes); calling it is an error.
    """
    def unsupported(*args: Any, **kwargs: Any) -> None:
        raise rule_error(qualname, NOT_EMULATED, "the emulator cannot run it")

    unsupported.__name__ = unsupported.__qualname__ = qualname.rsplit(".", 1)[-1]
    return unsupported


class NotEmulatedDtype:
    """A 0.2.0 dtype the emulator cannot store (the packed x4 types): comparable by name, not allocatable."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __str__(self) -> str:
        return self.name

    __repr__ = __str__


# --------------------------------------------------------------------- dtypes
def as_dtype(dtype: Any) -> np.dtype:
    """Any NKI / NumPy / torch-like dtype name -> NumPy dtype (bfloat16, float8 via ml_dtypes)."""
    if isinstance(dtype, NotEmulatedDtype):
        raise rule_error(f"nl.{dtype.name}", NOT_EMULATED, "the emulator cannot store it")
    if isinstance(dtype, str):
        named = {"bfloat16": BFLOAT16, "tfloat32": np.dtype(np.float32), "bool": np.dtype(np.uint8),
                 "float8_e4m3": np.dtype(ml_dtypes.float8_e4m3), "float8_e5m2": np.dtype(ml_dtypes.float8_e5m2),
                 "float8_e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn)}
        return named.get(dtype) or np.dtype(dtype)
    dt = np.dtype(dtype)
    return np.dtype(np.uint8) if dt == np.bool_ else dt  # nl.bool_ is "boolean stored as uint8"


# nki.api.shared.rst "Supported Data Types": a tensor's `dtype` "must be a nki.language data
# type" (the integer types up to 32 bits, float8_e4m3/e5m2, float16, bfloat16, tfloat32 (stored
# as float32 here), float32, bool (stored as uint8, NumPy's bool too)); the 0.2.0 language stub
# adds float8_e4m3fn. No 64-bit or complex type is among them.
NKI_DTYPES = frozenset(np.dtype(d) for d in (
    np.uint8, np.int8, np.uint16, np.int16, np.uint32, np.int32, np.float16, np.float32,
    ml_dtypes.bfloat16, ml_dtypes.float8_e4m3, ml_dtypes.float8_e5m2, ml_dtypes.float8_e4m3fn))


def nki_dtype(instr: str, dtype: Any) -> np.dtype:
    """`as_dtype`, refusing what is not a nki.language data type (float64, int64, ...)."""
    dt = as_dtype(dtype)
    if dt not in NKI_DTYPES:
        raise rule_error(instr, "dtype must be a nki.language data type (nki.api.shared.rst 'Supported Data "
                         "Types': int8/16/32, uint8/16/32, float8_e4m3/e5m2, float16, bfloat16, tfloat32, "
                         "float32, bool)", f"dtype {dt}")
    return dt


def is_float(dtype: np.dtype) -> bool:
    return dtype == BFLOAT16 or np.issubdtype(dtype, np.floating) or dtype.name.startswith("float8")


# --------------------------------------------------------------------- tensors
class _Allocation:
    """One allocated buffer region; frees its on-chip bytes when the last view dies."""

    __slots__ = ("data", "buffer", "name", "bytes_per_partition", "base_address", "row_bytes", "id", "site", "_run")

    def __init__(self, data: np.ndarray, buffer: str, name: str, bytes_per_partition: int) -> None:
        self.data = data
        self.buffer = buffer
        self.name = name
        self.bytes_per_partition = bytes_per_partition
        self.base_address = data.__array_interface__["data"][0]
        self.row_bytes = data.strides[0] if (buffer in ON_CHIP and data.ndim > 1) else max(data.nbytes, 1)
        self.site: tuple[str, int] | None = None  # the kernel line that allocated it (rule messages)
        self._run = run = state()
        if buffer in ON_CHIP:
            self.id = run.allocate(buffer, bytes_per_partition)
        else:
            run.next_alloc += 1
            self.id = run.next_alloc

    def __del__(self) -> None:
        run = self._run
        if run.affine_loops is not None:
            run.affine_loops.forget(self.id)
        if self.buffer in ON_CHIP:
            run.release(self.buffer, self.bytes_per_partition, self.id)
        else:
            run.profile.timeline.forget(self.id)


class _PlacedAllocation(_Allocation):
    """A tile placed with `address=`: its own name and site, but the identity, memory and addresses of its
    buffer's placed memory (`RunState.placed_memory`), so the timeline and the loop check see the bytes it
    shares with other placed tiles. Dropping it frees nothing: the placed memory lives as long as the run."""

    __slots__ = ()

    def __init__(self, memory: _Allocation, name: str) -> None:  # memory's fields, not a new allocation
        for slot in ("data", "buffer", "bytes_per_partition", "base_address", "row_bytes", "id", "_run"):
            setattr(self, slot, getattr(memory, slot))
        self.name = name
        self.site = None

    def __del__(self) -> None:
        pass


def _one_partition(first: Any, partitions: int, key: tuple) -> slice:
    """The partition-axis part of an on-chip index as a slice.

    An integer selects one partition (language guide, "Tensor Indexing": `t[0,0,10]`, `t[0,...]`
    on an SBUF tensor; nki-library 0759719 writes `sink_sb[0, 0]`, `mx_dequant_sb[0, :]`:
    `core/attention/attention_cte.py` line 624, `core/qkv/qkv_cte.py` line 1903). The view keeps
    that partition as an axis of size 1, so the partition axis stays first; the guide's `.shape`
    drops it (docs/kernels.md, "What the emulator does not model").
    """
    if isinstance(first, slice):
        return first
    index = operator.index(first)
    if not -partitions <= index < partitions:
        raise rule_error("indexing", "partition index out of range", f"index {index} of {partitions}, key {key!r}")
    index %= partitions
    return slice(index, index + 1)


def _is_whole(key: tuple) -> bool:
    return all(k is Ellipsis or (isinstance(k, slice) and k == slice(None)) for k in key)


class NkiTensor:
    """A tensor (or a view of one) in a NKI buffer; axis 0 is the partition axis on chip.

    `indexed` marks views made by indexing or `.ap`: NKI 0.2 has no nested slicing
    (nki-migration-guide.rst, "What features ... are not available": "Nested slicing is
    not available"; nki-aps.rst, "Restriction on Nested Indexing"), so a view cannot be
    indexed, reshaped or given an access pattern again.
    """

    def __init__(self, alloc: _Allocation, view: np.ndarray, pstart: int = 0,
                 acc: np.ndarray | None = None, indexed: bool = False) -> None:
        self._alloc = alloc
        self._view = view
        self.pstart = pstart  # first partition of this view (on-chip buffers)
        self.indexed = indexed
        self._region: tuple | None = None
        self._offset: int | None = None
        self.dependency_access: Any = None  # what loops.AffineLoops found this view covers, kept for its next use
        # a view whose start an `.ap(scalar_offset=...)` moves at run time (slices of it too): a DMA needs DGE for it
        self.dynamic_start = False
        # PSUM only: True where the last write was an nc_matmul (its accumulation group is open)
        self._acc = acc if acc is not None else (
            np.zeros(view.shape, dtype=bool) if alloc.buffer == PSUM else None)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self._view.shape)

    @property
    def dtype(self) -> np.dtype:
        return self._view.dtype

    @property
    def buffer(self) -> str:
        return self._alloc.buffer

    @property
    def name(self) -> str:
        return self._alloc.name

    @property
    def ndim(self) -> int:
        return self._view.ndim

    @property
    def nbytes(self) -> int:
        return int(self._view.size) * self._view.dtype.itemsize

    def __repr__(self) -> str:
        return f"NkiTensor({self.buffer}, shape={self.shape}, dtype={self.dtype}, pstart={self.pstart})"

    def _no_nesting(self, what: str) -> None:
        """[aps] "Restriction on Nested Indexing": no access pattern (nor, conservatively, a reshape) on a
        tile made by indexing or `.ap`. Slicing such a tile again is allowed: nki-library's 0.2
        attention_bwd.py slices a slice (`dy_o_sum[h][:, a:b]`, then `[:, i]` in a callee)."""
        if self.indexed:
            raise rule_error(what, "nested indexing is not available in NKI 0.2: an access pattern or reshape "
                             "applies to the tensor itself, not to a view made by indexing or .ap "
                             "(nki-aps.rst 'Restriction on Nested Indexing'; nki-migration-guide.rst)",
                             f"{self!r} is already a view")

    def __getitem__(self, key: Any) -> "NkiTensor":
        key = key if isinstance(key, tuple) else (key,)
        key = tuple(slice(k.start, k.start + k.size) if isinstance(k, DynSlice) else k for k in key)
        if _is_whole(key):
            return self
        pstart = self.pstart
        if self.buffer in ON_CHIP and key and key[0] is not Ellipsis:
            key = (_one_partition(key[0], self.shape[0], key), *key[1:])
            start, _, step = key[0].indices(self.shape[0])
            if step != 1:
                raise rule_error("indexing", "partition slices must be contiguous (step 1)",
                                 f"tensor {self.shape}, key {key!r}")
            pstart += start
        view = self._view[key]
        acc = self._acc[key] if self._acc is not None else None
        sliced = NkiTensor(self._alloc, view, pstart, acc, indexed=True)
        sliced.dynamic_start = self.dynamic_start
        return sliced

    def __setitem__(self, key: Any, value: Any) -> None:
        raise rule_error("assignment", "NKI 0.2 tiles are written by instructions only",
                         "use nisa.tensor_copy / nisa.dma_copy with dst=... instead of item assignment")

    def reshape(self, shape: tuple[int, ...] | list[int]) -> "NkiTensor":
        """Another view of the tensor's memory (language guide, "Creating Tensors"); the partition axis stays."""
        self._no_nesting("reshape")
        shape = tuple(int(s) for s in shape)
        if self.buffer in ON_CHIP and shape[0] != self.shape[0]:
            raise rule_error("reshape", "the partition axis of an on-chip tile cannot change",
                             f"{self.shape} -> {shape}")
        acc = self._acc.reshape(shape) if self._acc is not None else None
        return NkiTensor(self._alloc, self._view.reshape(shape), self.pstart, acc)

    def ap(self, pattern, offset: int = 0, scalar_offset=None, vector_offset=None, indirect_dim: int = 0,
           dtype=None) -> "NkiTensor":
        """A hardware access pattern over the tensor flattened row-major (nki-aps.rst).

        `pattern` is [[step, num], ...] in elements, outermost first; on SBUF/PSUM the
        first pair walks the partitions and its step must be the tensor's free size.
        `scalar_offset` (an SBUF element holding an index on `indirect_dim` of this tensor)
        moves the start by that index times the elements to the right of `indirect_dim`
        (nki-migration-guide.rst, "Scalar Dynamic Access": `offset + scalar_offset *
        prod(A.shape[indirect_dim+1:])`). `vector_offset` (an SBUF (rows, 1) integer tile) picks
        the row of each step of the leading pair at run time: an `IndirectTensor`, which only
        `nisa.dma_copy` reads or writes (a gather or a scatter).
        """
        instr = "tensor.ap"
        self._no_nesting(instr)
        if scalar_offset is not None and vector_offset is not None:  # nki-aps.rst lines 64-65
            raise rule_error(instr, "at most one of scalar_offset and vector_offset can be specified "
                             "(nki-aps.rst lines 64-65)", "both given")
        if scalar_offset is not None:
            offset = int(offset) + self._dynamic_start(instr, scalar_offset, indirect_dim)
        dims = [(int(step), int(num)) for step, num in pattern]
        if not dims:
            raise rule_error(instr, "pattern needs at least one [step, num] pair", f"pattern={pattern}")
        base = self._view if dtype is None else self._view.view(nki_dtype(instr, dtype))
        if vector_offset is not None:
            return IndirectTensor(self._alloc, base, dims, int(offset), vector_offset, indirect_dim)
        flat_size = base.size
        free = int(np.prod(base.shape[1:], dtype=np.int64)) if base.ndim > 1 else 1
        if self.buffer in ON_CHIP and dims[0][0] != free and dims[0][1] > 1:
            raise rule_error(instr, "on SBUF/PSUM the first pair walks the partitions: its step must be the "
                             "tensor's free size (nki-aps.rst, 'Restriction on SBUF/PSUM Tensors')",
                             f"pattern {pattern} on {self.shape}")
        lo = offset + sum(min(0, s * (n - 1)) for s, n in dims)
        hi = offset + sum(max(0, s * (n - 1)) for s, n in dims)
        if lo < 0 or hi >= flat_size:
            raise rule_error(instr, "access pattern reaches outside the tensor",
                             f"pattern {pattern} offset {offset} on {self.shape} ({flat_size} elements)")
        itemsize = base.dtype.itemsize
        if self.buffer in ON_CHIP and base.ndim > 1 and not base.flags.c_contiguous:
            view = _placed_pattern(instr, base, dims, offset, free)
        elif base.flags.c_contiguous:
            flat = base.reshape(-1)
            view = np.lib.stride_tricks.as_strided(flat[offset:], shape=[n for _, n in dims],
                                                   strides=[s * itemsize for s, _ in dims])
        else:  # a broadcast (cost-only) input: contents are never read
            view = np.broadcast_to(np.zeros((), base.dtype), [n for _, n in dims])
        pstart = self.pstart + (offset // free if self.buffer in ON_CHIP else 0)
        pattern = NkiTensor(self._alloc, view, pstart, self._pattern_group(base, dims, offset), indexed=True)
        pattern.dynamic_start = scalar_offset is not None
        return pattern

    def _pattern_group(self, base: np.ndarray, dims: list[tuple[int, int]], offset: int) -> np.ndarray | None:
        """The accumulation-group mask of a PSUM access pattern: the same pattern over this tile's mask, so
        the pattern and the tile are one PSUM region of one tile ("Near-memory accumulation in PSUM", [arch]:
        a group is the matmuls "accumulating into the same PSUM bank data"), as slices and reshapes are. A
        pattern that reads the tile as another element size has no element-wise mask there: its own."""
        if self.buffer != PSUM:
            return None
        if base.dtype.itemsize != self.dtype.itemsize or not self._acc.flags.c_contiguous:
            return np.zeros([n for _, n in dims], dtype=bool)
        flat = self._acc.reshape(-1)
        return np.lib.stride_tricks.as_strided(flat[offset:], shape=[n for _, n in dims],
                                               strides=[s * flat.itemsize for s, _ in dims])

    def _dynamic_start(self, instr: str, scalar_offset: Any, indirect_dim: int) -> int:
        """Elements a `scalar_offset` moves the access: its value (read now, in program order) times the
        size of one step of `indirect_dim` in this (base) tensor. A cost-only run has no values: 0."""
        if not isinstance(scalar_offset, NkiTensor) or scalar_offset.buffer != SBUF:
            raise rule_error(instr, "scalar_offset must be an SBUF location", f"got {scalar_offset!r}")
        if scalar_offset.numpy().size != 1 or is_float(scalar_offset.dtype):
            raise rule_error(instr, "scalar_offset must be one integer element",
                             f"{scalar_offset.shape} {scalar_offset.dtype}")
        if not 0 <= indirect_dim < len(self.shape):
            raise rule_error(instr, "indirect_dim must be an axis of the tensor", f"indirect_dim={indirect_dim}")
        if not state().compute:
            return 0
        step = int(np.prod(self.shape[indirect_dim + 1:], dtype=np.int64))
        return int(scalar_offset.numpy().reshape(-1)[0]) * step

    # helpers for instructions -------------------------------------------------------
    @property
    def partitions(self) -> int:
        shape = self._view.shape
        return shape[0] if shape else 1

    @property
    def free_size(self) -> int:
        return math.prod(self._view.shape[1:])

    def minor_stride_bytes(self) -> int:
        """Bytes between neighbours along the innermost free axis of more than one element (0 for none): the
        step an engine's access pattern takes at its fastest axis ([arch] lines 757-762)."""
        for count, stride in zip(reversed(self._view.shape[1:]), reversed(self._view.strides[1:])):
            if count > 1:
                return abs(stride)
        return 0

    def region(self) -> tuple:
        """(allocation id, p0, p1, f0, f1): the partitions and per-partition bytes this view covers."""
        if self._region is None:
            self._region = self._compute_region()
        return self._region

    def byte_offset(self) -> int:
        """Bytes from the allocation's start to this view's first element (reading the view's address
        costs tens of microseconds: the region and the loop check share it)."""
        if self._offset is None:
            self._offset = self._view.__array_interface__["data"][0] - self._alloc.base_address
        return self._offset

    def _compute_region(self) -> tuple:
        view = self._view
        off = self.byte_offset()
        if view.ndim == 0 or view.size == 0:
            return (self._alloc.id, 0, 0, 0, 0)
        strides = view.strides
        item = view.dtype.itemsize
        if self.buffer in ON_CHIP:
            row = self._alloc.row_bytes
            lo = sum(min(0, s * (n - 1)) for s, n in zip(strides[1:], view.shape[1:]))
            hi = sum(max(0, s * (n - 1)) for s, n in zip(strides[1:], view.shape[1:])) + item
            p0, f0 = divmod(off, row) if row else (0, off)
            return (self._alloc.id, p0, p0 + view.shape[0], f0 + lo, f0 + hi)
        lo = sum(min(0, s * (n - 1)) for s, n in zip(strides, view.shape))
        hi = sum(max(0, s * (n - 1)) for s, n in zip(strides, view.shape)) + item
        return (self._alloc.id, 0, 1, off + lo, off + hi)

    def read(self) -> np.ndarray:
        """Values as fp32 (P, F) (integer tiles as int64), the engines' compute precision."""
        data = self._view
        out = data.astype(np.float32) if is_float(data.dtype) else data.astype(np.int64)
        return out.reshape(self.partitions, self.free_size)

    def write(self, values: np.ndarray, accumulate_group: bool = False) -> None:
        """Cast to this tensor's dtype (round to nearest) and store.

        In PSUM, `accumulate_group=True` (nc_matmul) marks the region as an open
        accumulation group; any other write closes it.
        """
        if self._acc is not None:
            self._acc[...] = accumulate_group
        values = np.asarray(values).reshape(self.shape)
        if is_float(self.dtype):
            self._view[...] = values.astype(np.float32).astype(self.dtype)
        else:
            self._view[...] = values.astype(self.dtype)

    def accumulating(self) -> np.ndarray:
        """(P, F) mask of PSUM elements whose last write was an nc_matmul."""
        return self._acc.reshape(self.partitions, self.free_size)

    def numpy(self) -> np.ndarray:
        return self._view

    def covered_view(self) -> np.ndarray:
        """The memory this tensor may touch, as a view of its allocation (the loop-dependency check)."""
        return self._view


def _placed_pattern(instr: str, base: np.ndarray, dims: list[tuple[int, int]], offset: int, free: int) -> np.ndarray:
    """An access pattern over a placed tile, whose partitions' rows are contiguous but a whole partition of
    placed memory apart: the leading pair steps by that distance, the others within a row."""
    row, column = divmod(offset, free)
    if (column + sum(min(0, s * (n - 1)) for s, n in dims[1:]) < 0
            or column + sum(max(0, s * (n - 1)) for s, n in dims[1:]) >= free):
        raise rule_error(instr, NOT_EMULATED, f"a pattern that leaves a placed tile's row: pattern "
                         f"{[list(d) for d in dims]} offset {offset} on {base.shape}")
    start = base.reshape(base.shape[0], free)[row:, column:]
    strides = [base.strides[0]] + [s * base.dtype.itemsize for s, _ in dims[1:]]
    return np.lib.stride_tricks.as_strided(start, shape=[n for _, n in dims], strides=strides)


class IndirectTensor(NkiTensor):
    """`t.ap(pattern, offset, vector_offset=idx, indirect_dim=0)`: a gather / scatter access.

    nki-migration-guide.rst "Vector Dynamic Access" (lines 609-654 at 3c46990d): element
    [w, z, ...] is `flat(t)[offset + idx[w] * prod(t.shape[1:]) + z * z_step + ...]`; only
    `indirect_dim=0` is supported; the step of the leading pair is ignored (the base tensor's
    row size is used). nki-aps.rst line 65: `vector_offset` is an SBUF memory location. The
    values are read when the DMA runs (program order), and a row whose elements fall outside the
    tensor is out of bounds: `dma_copy`'s `oob_mode` raises or skips it (isa stub lines 523-530).
    Only `nisa.dma_copy` moves data through it ("can also perform a gather or scatter
    operation", isa stub line 525); compute instructions refuse it.
    """

    def __init__(self, alloc: _Allocation, base: np.ndarray, dims: list[tuple[int, int]], offset: int,
                 index: Any, indirect_dim: int) -> None:
        instr = "tensor.ap"
        if indirect_dim != 0:
            raise rule_error(instr, "a vector_offset supports only indirect_dim=0 (nki-migration-guide.rst "
                             "'Vector Dynamic Access', line 613)", f"indirect_dim={indirect_dim}")
        if not isinstance(index, NkiTensor) or index.buffer != SBUF or isinstance(index, IndirectTensor):
            raise rule_error(instr, "vector_offset must be an SBUF location (nki-aps.rst line 65)",
                             f"got {index!r}")
        rows = dims[0][1]
        if is_float(index.dtype) or index.partitions != rows or index.free_size != 1:
            raise rule_error(instr, "vector_offset must hold one integer per step of the pattern's leading pair: "
                             "an SBUF (rows, 1) integer tile (nki-migration-guide.rst lines 622-653: "
                             "dynamic_idx_legal[w] for w in range(64))",
                             f"vector_offset {index.shape} {index.dtype} for pattern {[list(d) for d in dims]}")
        self.index = index
        self.row_elements = int(np.prod(base.shape[1:], dtype=np.int64)) if base.ndim > 1 else 1
        self.flat = base.reshape(-1) if base.flags.c_contiguous else None  # None: a cost-only broadcast input
        if self.flat is None and alloc.buffer in ON_CHIP:
            raise rule_error(instr, NOT_EMULATED, "a vector_offset access of a placed tile")
        self.flat_size = int(base.size)
        self.offset = offset
        inner = np.zeros((), np.int64)
        for step, num in dims[1:]:
            inner = inner[..., None] + step * np.arange(num, dtype=np.int64)
        self.inner = inner  # element offsets within one row, the pattern's other pairs
        placeholder = np.broadcast_to(np.zeros((), base.dtype), [n for _, n in dims])
        super().__init__(alloc, placeholder, 0, None, indexed=True)
        self._acc = None

    def addresses(self) -> np.ndarray:
        """Flat element indices of the access, the pattern's shape (reads the index tile now)."""
        rows = self.index.numpy().reshape(-1).astype(np.int64)
        return self.offset + rows.reshape(-1, *([1] * self.inner.ndim)) * self.row_elements + self.inner

    def rows_in_bounds(self, addresses: np.ndarray) -> np.ndarray:
        """(rows,) True where every element of the row lies inside the tensor."""
        inside = (addresses >= 0) & (addresses < self.flat_size)
        return inside.reshape(len(inside), -1).all(axis=1)

    def _refuse(self) -> NKIRuleError:
        return rule_error("tensor.ap", "a vector_offset access (gather / scatter) is read and written only by "
                          "nisa.dma_copy (isa stub dma_copy, lines 523-526)", f"{self!r}")

    def read(self) -> np.ndarray:
        raise self._refuse()

    def write(self, values: np.ndarray, accumulate_group: bool = False) -> None:
        raise self._refuse()

    def numpy(self) -> np.ndarray:
        raise self._refuse()

    def covered_view(self) -> np.ndarray:
        """Any row of the tensor: which ones is known only when the DMA runs."""
        return self._alloc.data

    def byte_offset(self) -> int:
        return 0

    def _compute_region(self) -> tuple:
        data = self._alloc.data
        if self.buffer in ON_CHIP:
            return (self._alloc.id, 0, data.shape[0], 0, self._alloc.row_bytes)
        return (self._alloc.id, 0, 1, 0, max(data.nbytes, 1))

    def __repr__(self) -> str:
        return (f"IndirectTensor({self.buffer}, shape={self.shape}, dtype={self.dtype}, "
                f"vector_offset {self.index.shape})")


class DynSlice:
    """`nl.ds(start, size)`."""

    def __init__(self, start: int, size: int) -> None:
        self.start, self.size = int(start), int(size)


def _fill_value(dtype: np.dtype) -> Any:
    return np.nan if is_float(dtype) else np.iinfo(dtype).min


def allocate(shape: tuple[int, ...] | list[int], dtype: Any, buffer: str | None, name: str,
             fill: Any = "nan", instr: str = "nl.ndarray", address: Any = None) -> NkiTensor:
    """A new tensor in `buffer` (default sbuf), checked against partition and capacity rules.

    A tile the kernel places itself (`address=(partition, byte offset)`) must fit the buffer at
    that address and is not counted among the live tiles the compiler would place: kernels
    that manage memory (nki-library's `core/utils/allocator.py` line 306) reuse addresses
    while older tiles are still referenced. Placed tiles are views of one memory per buffer
    (`_placed`), so overlapping ones share bytes; overlaps are not checked (no source states
    a rule: "What the emulator does not model").
    """
    buffer = buffer or SBUF
    if buffer not in ON_CHIP + HBM_BUFFERS:
        raise rule_error(instr, "unknown buffer", f"buffer={buffer!r}")
    shape = tuple(int(s) for s in (shape if isinstance(shape, (tuple, list)) else (shape,)))
    dt = nki_dtype(instr, dtype)
    per_partition = int(np.prod(shape[1:], dtype=np.int64)) * dt.itemsize if len(shape) > 1 else dt.itemsize
    charge = per_partition
    if buffer in ON_CHIP:
        _check_on_chip_alloc(instr, shape, dt, buffer, per_partition, placed=address is not None)
        if buffer == PSUM:  # whole banks
            charge = -(-per_partition // PSUM_BANK_BYTES) * PSUM_BANK_BYTES
        if address is not None:
            _check_placement(instr, shape, buffer, per_partition, address)
            charge = 0
    run = state()
    _check_unique_name(run, instr, name, buffer)
    if address is not None and buffer in ON_CHIP:
        return _placed(run, shape, dt, buffer, name, address, per_partition)
    data = np.empty(shape, dtype=dt)
    if run.compute:
        data.fill(_fill_value(dt) if isinstance(fill, str) else fill)
    alloc = _Allocation(data, buffer, name, charge)
    alloc.site = kernel_site()
    if buffer == SHARED_HBM and not name:
        run.unnamed_shared_hbm.append((alloc, *alloc.site))
    return NkiTensor(alloc, data)


def _check_unique_name(run: RunState, instr: str, name: str, buffer: str) -> None:
    """[nl] `ndarray`: a tensor's `name` "has to be unique for tensors on each Physical NeuronCore" (lines
    70-72); nki-library's allocator says "Must be unique in the kernel" (`core/utils/allocator.py` lines 239,
    273, 338). So two declarations (call sites) giving one name in a run are refused. Not checked: one call
    site reached again (a loop the compiler may trace once, a helper called twice: the sources do not say
    whether the compiler sees one declaration or several), and `shared_hbm`, whose names link tensors
    across NeuronCores (lines 74-77), a sharing one program cannot show."""
    if not name or buffer == SHARED_HBM:
        return
    site = kernel_site()
    first = run.tensor_names.setdefault(name, site)
    if first != site:
        raise rule_error(instr, "a tensor name must be unique on the NeuronCore (nki.language.ndarray)",
                         f"name {name!r} at {os.path.basename(site[0])}:{site[1]}, already given at "
                         f"{os.path.basename(first[0])}:{first[1]}")


def _placed(run: RunState, shape: tuple[int, ...], dt: np.dtype, buffer: str, name: str, address: Any,
            per_partition: int) -> NkiTensor:
    """A tile at `address` = (partition, byte offset) of the kernel's placed memory: a view of those bytes,
    not new storage. Its first partition is the address's. In PSUM it starts with no open accumulation group
    of its own, as every new tile does: the first `nc_matmul` into it overwrites what an earlier tile at
    that address left (the compiler's accumulation groups belong to the tile, not to the bytes)."""
    memory = run.placed_memory(buffer)
    partition, offset = (int(a) for a in address)
    rows = slice(partition, partition + shape[0])
    data = memory.data[rows, offset:offset + per_partition].view(dt).reshape(shape)
    alloc = _PlacedAllocation(memory, name)
    alloc.site = kernel_site()
    return NkiTensor(alloc, data, partition)


_EMULATOR_DIR = os.path.dirname(os.path.abspath(__file__))


def kernel_site() -> tuple[str, int]:
    """(file, line) of the innermost caller outside the emulator: the kernel line being run."""
    frame = sys._getframe(1)
    while frame is not None and os.path.dirname(os.path.abspath(frame.f_code.co_filename)) == _EMULATOR_DIR:
        frame = frame.f_back
    return (frame.f_code.co_filename, frame.f_lineno) if frame is not None else ("<kernel>", 0)


def _check_placement(instr: str, shape: tuple[int, ...], buffer: str, per_partition: int, address: Any) -> None:
    partition, offset = (int(a) for a in address)
    capacity = SBUF_USABLE_BYTES_PER_PARTITION if buffer == SBUF else PSUM_BANKS * PSUM_BANK_BYTES
    if partition < 0 or partition + shape[0] > PMAX or offset < 0 or offset + per_partition > capacity:
        raise rule_error(instr, f"a placed tile must fit the {buffer} ({PMAX} partitions, {capacity} B each)",
                         f"shape {shape} ({per_partition} B/partition) at address {tuple(address)}")


def _check_on_chip_alloc(instr: str, shape: tuple[int, ...], dt: np.dtype, buffer: str, per_partition: int,
                         placed: bool = False) -> None:
    if len(shape) < 2:
        raise rule_error(instr, "on-chip tiles need a partition axis first and at least one free axis",
                         f"shape {shape} in {buffer}")
    if shape[0] > PMAX:
        raise rule_error(instr, f"partition dimension must be <= {PMAX} and first", f"shape {shape} in {buffer}")
    run = state()
    if placed:
        return
    usable = f"usable SBUF is {SBUF_USABLE_BYTES_PER_PARTITION} bytes per partition ({SBUF_BYTES_PER_PARTITION} " \
        f"on NeuronCore-v{EMULATED_GEN} less the {SBUF_RESERVED_BYTES_PER_PARTITION} the runtime reserves)"
    if buffer == SBUF:
        if per_partition > SBUF_USABLE_BYTES_PER_PARTITION:  # no spill makes room for it
            raise rule_error(instr, usable, f"tile {shape} {dt} needs {per_partition} B/partition")
        if run.live[SBUF] + per_partition > SBUF_USABLE_BYTES_PER_PARTITION:
            _spill(run, SBUF, f"{instr}: {usable}: new tile {shape} {dt} needs {per_partition} B/partition, "
                   f"{run.live[SBUF]} B already live")
        return
    banks = -(-per_partition // PSUM_BANK_BYTES)
    if banks > PSUM_BANKS:
        raise rule_error(instr, f"PSUM holds {PSUM_BANKS * PSUM_BANK_BYTES} bytes per partition",
                         f"tile {shape} {dt} needs {per_partition} B/partition")
    if run.live[PSUM] + banks * PSUM_BANK_BYTES > PSUM_BANKS * PSUM_BANK_BYTES:
        _spill(run, PSUM, f"{instr}: PSUM has {PSUM_BANKS} banks of {PSUM_BANK_BYTES} B per partition: new tile "
               f"{shape} {dt} needs {banks}, {run.live[PSUM] // PSUM_BANK_BYTES} banks live")


def _spill(run: RunState, buffer: str, what: str) -> None:
    """Live tiles overflow `buffer`: the compiler spills (NKISpillWarning); warned once per run and buffer."""
    if buffer not in run.spilled:
        run.spilled.add(buffer)
        file, line = kernel_site()
        warnings.warn_explicit(NKISpillWarning(f"{what}; neuronx-cc spills live tiles to the next memory "
                                               "(memory-hierarchy-overview.rst line 86): spill traffic is not "
                                               "modelled"), NKISpillWarning, file, line)


def wrap_hbm(array: np.ndarray, name: str = "") -> NkiTensor:
    """A kernel argument: a NumPy array seen as an HBM tensor (no copy)."""
    return NkiTensor(_Allocation(array, HBM, name, 0), array)


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


__all__ = [
    "BFLOAT16", "DynSlice", "IndirectTensor", "NKILoopDependencyWarning", "NKIRuleError", "NKISpillWarning",
    "NkiTensor", "Profile", "RunState",
    "allocate", "as_dtype", "ceil_div", "is_float", "kernel_site", "nki_dtype", "rule_error", "state", "wrap_hbm",
]
