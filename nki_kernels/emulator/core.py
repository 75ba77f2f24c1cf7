"""Emulator core: tensors in the NKI buffers, hardware rules, and the cost model.

The emulator runs the real source of our NKI 0.2.0 kernels on CPU with NumPy. Every
tensor lives in a named buffer (``hbm``/``shared_hbm``/``private_hbm``, ``sbuf``,
``psum``) and every `nisa` instruction checks the rules the hardware imposes before it
computes, in fp32 as the engines do, and charges its cycle cost to its engine. The
rules are enforced here rather than trusted to code review because a kernel that
violates one compiles to nothing (or to wrong answers) on a Trn1 we may not have.

Costs (Trn1, NeuronCore-v2; docs/kernels.md explains them): per instruction the
documented cycle formula on its engine plus a fixed `ACCESS_OVERHEAD`, DMA bytes that
touch HBM at `HBM_BYTES_PER_S`. A run returns a `Profile`.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

import ml_dtypes
import numpy as np

# --------------------------------------------------------------------- hardware figures
PMAX = 128  # partitions
SBUF_BYTES_PER_PARTITION = 192 * 1024  # trn1: 24 MiB / 128
PSUM_BANK_BYTES = 2 * 1024  # per partition per bank: 512 fp32
PSUM_BANKS = 8
GEMM_STATIONARY_FMAX = 128
GEMM_MOVING_FMAX = 512
MIN_II = 64  # minimum initiation interval of a vector/scalar/gpsimd instruction, cycles
ACCESS_OVERHEAD = 60  # fixed SBUF/PSUM access cycles charged per compute instruction
GPSIMD_BASE = 150  # iota / affine_select fixed cost
CLOCK_HZ = {"tensor": 2.8e9, "vector": 1.12e9, "scalar": 1.4e9, "gpsimd": 1.4e9}
HBM_BYTES_PER_S = 820e9
ENGINES = tuple(CLOCK_HZ)

SBUF, PSUM, HBM, SHARED_HBM, PRIVATE_HBM = "sbuf", "psum", "hbm", "shared_hbm", "private_hbm"
ON_CHIP = (SBUF, PSUM)
HBM_BUFFERS = (HBM, SHARED_HBM, PRIVATE_HBM)

BFLOAT16 = np.dtype(ml_dtypes.bfloat16)


class NKIRuleError(ValueError):
    """A kernel broke a hardware or API rule; the message names instruction, rule and shapes."""


def rule_error(instr: str, rule: str, detail: str) -> NKIRuleError:
    return NKIRuleError(f"{instr}: {rule} ({detail})")


# --------------------------------------------------------------------- profile / run state
@dataclass
class Profile:
    """What one emulated kernel run costs on a Trn1 NeuronCore (modelled, not measured)."""

    cycles: dict[str, float] = field(default_factory=lambda: {e: 0.0 for e in ENGINES})
    instructions: dict[str, int] = field(default_factory=lambda: {e: 0 for e in ENGINES})
    # cycles the work would take at the engine's peak (all lanes/PEs busy, bf16 rate, no overhead)
    useful: dict[str, float] = field(default_factory=lambda: {e: 0.0 for e in ENGINES})
    hbm_bytes: int = 0
    dma_count: int = 0
    peak_sbuf_bytes: int = 0  # per partition
    peak_psum_bytes: int = 0  # per partition (banks x 2 KiB)

    def engine_seconds(self) -> dict[str, float]:
        return {e: self.cycles[e] / CLOCK_HZ[e] for e in ENGINES}

    @property
    def hbm_seconds(self) -> float:
        return self.hbm_bytes / HBM_BYTES_PER_S

    @property
    def time_overlapped_s(self) -> float:
        """Perfect overlap: the busiest engine (or HBM) sets the time."""
        return max([*self.engine_seconds().values(), self.hbm_seconds])

    @property
    def time_serial_s(self) -> float:
        """No overlap at all: an upper bound."""
        return sum(self.engine_seconds().values()) + self.hbm_seconds

    def peak_share(self, engine: str) -> float:
        """Fraction of `engine`'s peak its charged cycles deliver (1.0 = every cycle fully used)."""
        return self.useful[engine] / self.cycles[engine] if self.cycles[engine] else 0.0

    @property
    def bound(self) -> str:
        times = {**self.engine_seconds(), "hbm": self.hbm_seconds}
        return max(times, key=times.get)

    def to_dict(self) -> dict[str, Any]:
        return {
            "cycles": dict(self.cycles),
            "instructions": dict(self.instructions),
            "engine_seconds": self.engine_seconds(),
            "hbm_bytes": self.hbm_bytes,
            "hbm_seconds": self.hbm_seconds,
            "dma_count": self.dma_count,
            "time_overlapped_s": self.time_overlapped_s,
            "time_serial_s": self.time_serial_s,
            "bound": self.bound,
            "peak_share": {e: self.peak_share(e) for e in ENGINES},
            "peak_sbuf_bytes_per_partition": self.peak_sbuf_bytes,
            "peak_psum_bytes_per_partition": self.peak_psum_bytes,
        }


class RunState:
    """Per-run bookkeeping: live on-chip bytes and the profile. One run at a time."""

    def __init__(self, compute: bool = True) -> None:
        self.compute = compute
        self.profile = Profile()
        self.live = {SBUF: 0, PSUM: 0}

    def charge(self, engine: str, cycles: float, useful: float = 0.0) -> None:
        self.profile.cycles[engine] += cycles
        self.profile.instructions[engine] += 1
        self.profile.useful[engine] += useful

    def allocate(self, buffer: str, nbytes: int) -> None:
        self.live[buffer] += nbytes
        if buffer == SBUF:
            self.profile.peak_sbuf_bytes = max(self.profile.peak_sbuf_bytes, self.live[SBUF])
        else:
            self.profile.peak_psum_bytes = max(self.profile.peak_psum_bytes, self.live[PSUM])

    def release(self, buffer: str, nbytes: int) -> None:
        self.live[buffer] -= nbytes


_STATE: list[RunState] = [RunState()]


def state() -> RunState:
    return _STATE[-1]


def push_state(run: RunState) -> None:
    _STATE.append(run)


def pop_state() -> RunState:
    return _STATE.pop()


# --------------------------------------------------------------------- dtypes
def as_dtype(dtype: Any) -> np.dtype:
    """Any NKI / NumPy / torch-like dtype name -> NumPy dtype (bfloat16 via ml_dtypes)."""
    if isinstance(dtype, str):
        if dtype in ("bfloat16",):
            return BFLOAT16
        if dtype in ("tfloat32",):
            return np.dtype(np.float32)
        if dtype == "bool":
            return np.dtype(np.uint8)
        return np.dtype(dtype)
    return np.dtype(dtype)


def is_float(dtype: np.dtype) -> bool:
    return dtype == BFLOAT16 or np.issubdtype(dtype, np.floating)


# --------------------------------------------------------------------- tensors
class _Allocation:
    """One allocated buffer region; frees its on-chip bytes when the last view dies."""

    def __init__(self, data: np.ndarray, buffer: str, name: str, bytes_per_partition: int) -> None:
        self.data = data
        self.buffer = buffer
        self.name = name
        self.bytes_per_partition = bytes_per_partition
        if buffer in ON_CHIP:
            run = state()
            run.allocate(buffer, bytes_per_partition)
            weakref.finalize(self, run.release, buffer, bytes_per_partition)


class NkiTensor:
    """A tensor (or a view of one) in a NKI buffer; axis 0 is the partition axis on chip."""

    def __init__(self, alloc: _Allocation, view: np.ndarray, pstart: int = 0,
                 acc: np.ndarray | None = None) -> None:
        self._alloc = alloc
        self._view = view
        self.pstart = pstart  # first partition of this view (on-chip buffers)
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

    def __repr__(self) -> str:
        return f"NkiTensor({self.buffer}, shape={self.shape}, dtype={self.dtype}, pstart={self.pstart})"

    def __getitem__(self, key: Any) -> "NkiTensor":
        key = key if isinstance(key, tuple) else (key,)
        key = tuple(slice(k.start, k.start + k.size) if isinstance(k, DynSlice) else k for k in key)
        pstart = self.pstart
        if self.buffer in ON_CHIP and key and key[0] is not Ellipsis:
            first = key[0]
            if not isinstance(first, slice):
                raise rule_error("indexing", "the partition axis must stay first (slice it, never index it)",
                                 f"tensor {self.shape} in {self.buffer}, key {key!r}")
            start, _, step = first.indices(self.shape[0])
            if step != 1:
                raise rule_error("indexing", "partition slices must be contiguous (step 1)",
                                 f"tensor {self.shape}, key {key!r}")
            pstart += start
        view = self._view[key]
        acc = self._acc[key] if self._acc is not None else None
        return NkiTensor(self._alloc, view, pstart, acc)

    def __setitem__(self, key: Any, value: Any) -> None:
        raise rule_error("assignment", "NKI 0.2 tiles are written by instructions only",
                         "use nisa.tensor_copy / nisa.dma_copy with dst=... instead of item assignment")

    def reshape(self, shape: tuple[int, ...]) -> "NkiTensor":
        """Reshape an HBM tensor (any shape) or an on-chip tile's free axes (partition kept)."""
        shape = tuple(shape)
        if self.buffer in ON_CHIP and shape[0] != self.shape[0]:
            raise rule_error("reshape", "the partition axis of an on-chip tile cannot change",
                             f"{self.shape} -> {shape}")
        acc = self._acc.reshape(shape) if self._acc is not None else None
        return NkiTensor(self._alloc, self._view.reshape(shape), self.pstart, acc)

    # helpers for instructions -------------------------------------------------------
    @property
    def partitions(self) -> int:
        return self.shape[0] if self.ndim else 1

    @property
    def free_size(self) -> int:
        return int(np.prod(self.shape[1:], dtype=np.int64)) if self.ndim > 1 else 1

    def read(self) -> np.ndarray:
        """Values as fp32 (P, F) (int32 tiles as int64), the engines' compute precision."""
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


class DynSlice:
    """`nl.ds(start, size)`."""

    def __init__(self, start: int, size: int) -> None:
        self.start, self.size = int(start), int(size)


def _fill_value(dtype: np.dtype) -> Any:
    return np.nan if is_float(dtype) else np.iinfo(dtype).min


def allocate(shape: tuple[int, ...] | list[int], dtype: Any, buffer: str | None, name: str,
             fill: Any = "nan", instr: str = "nl.ndarray") -> NkiTensor:
    """A new tensor in `buffer` (default sbuf), checked against partition and capacity rules."""
    buffer = buffer or SBUF
    if buffer not in ON_CHIP + HBM_BUFFERS:
        raise rule_error(instr, "unknown buffer", f"buffer={buffer!r}")
    shape = tuple(int(s) for s in (shape if isinstance(shape, (tuple, list)) else (shape,)))
    dt = as_dtype(dtype)
    per_partition = int(np.prod(shape[1:], dtype=np.int64)) * dt.itemsize if len(shape) > 1 else dt.itemsize
    if buffer in ON_CHIP:
        _check_on_chip_alloc(instr, shape, dt, buffer, per_partition)
    run = state()
    if run.compute or buffer in ON_CHIP:
        data = np.empty(shape, dtype=dt)
        if run.compute:
            data.fill(_fill_value(dt) if isinstance(fill, str) else fill)
    else:
        data = np.empty(shape, dtype=dt)  # cost-only run: contents never read
    charge = PSUM_BANK_BYTES if buffer == PSUM else per_partition  # a PSUM tile holds a whole bank
    return NkiTensor(_Allocation(data, buffer, name, charge), data)


def _check_on_chip_alloc(instr: str, shape: tuple[int, ...], dt: np.dtype, buffer: str, per_partition: int) -> None:
    if len(shape) < 2:
        raise rule_error(instr, "on-chip tiles need a partition axis first and at least one free axis",
                         f"shape {shape} in {buffer}")
    if shape[0] > PMAX:
        raise rule_error(instr, f"partition dimension must be <= {PMAX} and first", f"shape {shape} in {buffer}")
    run = state()
    if buffer == SBUF:
        if run.live[SBUF] + per_partition > SBUF_BYTES_PER_PARTITION:
            raise rule_error(instr, f"SBUF capacity {SBUF_BYTES_PER_PARTITION} bytes per partition exceeded",
                             f"new tile {shape} {dt} needs {per_partition} B/partition, "
                             f"{run.live[SBUF]} B already live")
        return
    if per_partition > PSUM_BANK_BYTES:
        raise rule_error(instr, f"a PSUM tile must fit one bank ({PSUM_BANK_BYTES} bytes per partition, 512 fp32)",
                         f"tile {shape} {dt} needs {per_partition} B/partition")
    if run.live[PSUM] + PSUM_BANK_BYTES > PSUM_BANKS * PSUM_BANK_BYTES:
        raise rule_error(instr, f"PSUM has {PSUM_BANKS} banks; all are in use",
                         f"new tile {shape} {dt}; {run.live[PSUM] // PSUM_BANK_BYTES} banks live")


def wrap_hbm(array: np.ndarray, name: str = "") -> NkiTensor:
    """A kernel argument: a NumPy array seen as an HBM tensor (no copy)."""
    return NkiTensor(_Allocation(array, HBM, name, 0), array)


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


__all__ = [
    "BFLOAT16", "DynSlice", "NKIRuleError", "NkiTensor", "Profile", "RunState", "allocate", "as_dtype",
    "ceil_div", "is_float", "rule_error", "state", "wrap_hbm",
]
