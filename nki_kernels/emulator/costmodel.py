"""Trn1 (NeuronCore-v2) cost model: engine queues, shared SRAM ports, DMA engines, dependencies.

Every instruction the emulator runs is *issued* here with its engine, its cycle count
(the per-instruction formulas live in `isa.py`) and the tensor regions it reads and
writes. The timeline then places it, in program order per engine (each engine has its
own in-order instruction stream; trainium_inferentia2_arch.rst, "NeuronCore-v2 Compute
Engines"), at the earliest time when

* its engine is free,
* the data it reads has been written, the data it overwrites has been read and written
  by earlier instructions (true data dependencies on overlapping regions; the compiler
  inserts the semaphores, the engines otherwise run asynchronously),
* the shared SRAM ports it needs are free. On NeuronCore-v2 "Vector Engine and GpSimd
  Engine cannot access SBUF in parallel" and "Vector Engine and Scalar Engine cannot
  access PSUM in parallel" (arch guide, "Concurrent SBUF/PSUM accesses by engines" and
  "Data Movement"): a Vector instruction touching SBUF and any GpSimd instruction hold
  the SBUF port; a Vector or Scalar instruction touching PSUM holds the PSUM port.
  Tensor and Scalar use SBUF without interference.

An instruction that depends on the previous instruction of its own engine pays the
documented static overhead of 100 cycles (arch guide, Vector Engine cost model:
"every instruction depending on the output tile of the previous instruction").

DMA: 16 DMA engines per NeuronCore, each moving one transfer at a time at 27 GiB/s
(trainium_inferentia2_arch.rst lines 615-616: "Each DMA engine can process one DMA transfer at a
time driving a peak bandwidth of 27 GiB/s, but all DMA engines can process different DMA transfers
in parallel"). Each engine serves eight SBUF partitions (get-started/about/nki-dma-overview.rst
line 34: "each DMA engine is typically responsible for moving data for eight SBUF partitions (128
partitions / 16 DMA engines)"; its example of 4 partitions keeps one engine busy, lines 57 and
120, and 128 partitions all 16, lines 131 and 192; the arch guide splits a 128-partition load
into 16 transfers of 8 partitions each, lines 661-662). So a transfer over P partitions is cut into
ceil(P / 8) pieces of at most 8 partitions, each on its own engine (the ones free earliest: the
compiler assigns the engines, arch guide lines 660-661, and no source gives a fixed map), and lasts as
long as its largest piece: bytes x min(8, P) / P at 27 GiB/s. A transfer with no on-chip side
(HBM to HBM) uses all 16. An engine's 16 queues (nki-dma-overview.rst line 29) share that one
engine: transfers on it run one after another in issue order, the same throughput as the round
robin between queues the source describes, though a transfer's own finish can come earlier than
it would interleaved. HBM traffic is also capped at the device's 820 GB/s.

An engine instruction whose SBUF/PSUM operand steps more than 16 bytes along its innermost axis streams at
half bandwidth (arch guide, "Access pattern"): its cycles double (`STRIDE_PENALTY`).

What the model leaves out (docs/kernels.md): DMA descriptor overheads and latency,
semaphore latency between engines, instruction-fetch stalls, SBUF bank conflicts, the
compiler's reordering across engines beyond program order per engine, and allocation
(tiles never wait for memory).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable

# --------------------------------------------------------------------- hardware figures (arch guide)
CLOCK_HZ = {"tensor": 2.8e9, "vector": 1.12e9, "scalar": 1.4e9, "gpsimd": 1.4e9}
ENGINES = tuple(CLOCK_HZ)
MIN_II = 64  # minimum initiation interval of a vector/scalar/gpsimd instruction, cycles
ACCESS_OVERHEAD = 60  # static SBUF/PSUM access cost per compute instruction, cycles
DEPENDENT_STALL = 100  # extra cycles when an instruction waits on its engine's previous instruction
# Vector cycles per element of an instruction streaming two SBUF inputs (tensor_tensor, tensor_tensor_scan,
# scalar_tensor_tensor). The arch guide says "roughly 2N"; fitted to the fused-Mamba tutorial's measurement
# instead (docs/kernels.md, "Calibration").
TWO_INPUT_CYCLES_PER_ELEMENT = 1.12
# "When the most-minor F dimension stride is less than 16 bytes, SBUF/PSUM on NeuronCore-v2 can supply a peak
# bandwidth of 128 elements/cycle ... If the most-minor F dimension stride exceeds 16 bytes, the achievable
# bandwidth of each tensor read/write interface will be half of the peak bandwidth, which translates to roughly
# 50% performance hit on the instructions" (trainium_inferentia2_arch.rst lines 757-762): an instruction of the
# engines that stream their operands element by element (Vector, Scalar, GpSimd) with an SBUF/PSUM operand whose
# innermost walked axis steps more than 16 bytes takes twice its cycles (the access overhead aside).
STRIDE_PENALTY_BYTES = 16
STRIDE_PENALTY = 2.0
STREAMING_ENGINES = ("vector", "scalar", "gpsimd")
DMA_ENGINES = 16
PARTITIONS_PER_DMA_ENGINE = 8  # nki-dma-overview.rst line 34
DMA_ENGINE_BYTES_PER_S = 27 * 2 ** 30
HBM_BYTES_PER_S = 820e9  # per device (two NeuronCores); one kernel alone on the chip
SBUF_PORT, PSUM_PORT = "sbuf_port", "psum_port"  # the two shared SRAM interfaces
RESOURCES = (*ENGINES, "dma", SBUF_PORT, PSUM_PORT)

Region = tuple  # (allocation id, p0, p1, f0, f1): partitions [p0, p1) x bytes [f0, f1) of each partition


def _overlap(a: Region, b: Region) -> bool:
    return a[1] < b[2] and b[1] < a[2] and a[3] < b[4] and b[3] < a[4]


class _Accesses:
    """Finish times of earlier reads and writes of one allocation, by region."""

    __slots__ = ("writes", "reads")
    LIMIT = 48  # records kept per list; the older half then merges into one covering record

    def __init__(self) -> None:
        self.writes: list[tuple[Region, float, int]] = []  # (region, finish time, instruction id)
        self.reads: list[tuple[Region, float, int]] = []


def _covers(outer: Region, inner: Region) -> bool:
    return outer[1] <= inner[1] and inner[2] <= outer[2] and outer[3] <= inner[3] and inner[4] <= outer[4]


def _bounded(records: list[tuple[Region, float, int]]) -> list[tuple[Region, float, int]]:
    """Keep a record list short: merge its older half into one region with the latest finish (conservative)."""
    if len(records) <= _Accesses.LIMIT:
        return records
    old, keep = records[: len(records) // 2], records[len(records) // 2:]
    regions = [r[0] for r in old]
    merged = (regions[0][0], min(r[1] for r in regions), max(r[2] for r in regions),
              min(r[3] for r in regions), max(r[4] for r in regions))
    latest = max(old, key=lambda r: r[1])
    return [(merged, latest[1], latest[2]), *keep]


@dataclass
class Timeline:
    """List scheduler over the engines, the two shared ports and the DMA engines."""

    record: bool = False
    free: dict[str, float] = field(default_factory=lambda: {e: 0.0 for e in ENGINES})
    port_free: dict[str, float] = field(default_factory=lambda: {SBUF_PORT: 0.0, PSUM_PORT: 0.0})
    dma_free: list[float] = field(default_factory=lambda: [0.0] * DMA_ENGINES)  # per DMA engine
    busy: dict[str, float] = field(default_factory=lambda: {r: 0.0 for r in RESOURCES})
    last_instr: dict[str, int] = field(default_factory=dict)  # engine -> id of its last instruction
    makespan: float = 0.0
    hbm_time: float = 0.0
    events: list[tuple[str, str, float, float]] = field(default_factory=list)  # (resource, name, start, end)
    _accesses: dict[int, _Accesses] = field(default_factory=dict)
    _next_id: int = 0

    # ---------------------------------------------------------------- dependencies
    def _ready(self, reads: Iterable[Region], writes: Iterable[Region]) -> tuple[float, set[int]]:
        """Earliest start allowed by data dependencies, and the ids of the instructions whose output it reads."""
        t, producers = 0.0, set()
        for reg in reads:  # read after write
            acc = self._accesses.get(reg[0])
            if acc is not None:
                for w, end, iid in acc.writes:
                    if _overlap(reg, w):
                        t = max(t, end)
                        producers.add(iid)
        for reg in writes:  # write after write, write after read
            acc = self._accesses.get(reg[0])
            if acc is not None:
                for w, end, _ in acc.writes:
                    if _overlap(reg, w):
                        t = max(t, end)
                for r, end, _ in acc.reads:
                    if _overlap(reg, r):
                        t = max(t, end)
        return t, producers

    def _record(self, iid: int, reads: Iterable[Region], writes: Iterable[Region], end: float) -> None:
        for reg in reads:
            acc = self._accesses.setdefault(reg[0], _Accesses())
            acc.reads = _bounded([*acc.reads, (reg, end, iid)])
        for reg in writes:  # a write that covers an older access supersedes it (it already waited for it)
            acc = self._accesses.setdefault(reg[0], _Accesses())
            acc.writes = _bounded([*(w for w in acc.writes if not _covers(reg, w[0])), (reg, end, iid)])
            acc.reads = [r for r in acc.reads if not _covers(reg, r[0])]

    def forget(self, alloc_id: int) -> None:
        """An allocation died: its records can go (a new allocation never reuses the id while alive)."""
        self._accesses.pop(alloc_id, None)

    # ---------------------------------------------------------------- compute instructions
    def issue(self, engine: str, name: str, cycles: float, reads: list[Region], writes: list[Region],
              ports: tuple[str, ...]) -> float:
        """Place one compute instruction; returns its duration in seconds."""
        iid = self._next_id
        self._next_id += 1
        ready, producers = self._ready(reads, writes)
        if self.last_instr.get(engine) in producers:
            cycles += DEPENDENT_STALL
        duration = cycles / CLOCK_HZ[engine]
        start = max(self.free[engine], ready, *(self.port_free[p] for p in ports))
        end = start + duration
        self.free[engine] = end
        for p in ports:
            self.port_free[p] = end
            self.busy[p] += duration
        self.busy[engine] += duration
        self.last_instr[engine] = iid
        self._record(iid, reads, writes, end)
        self.makespan = max(self.makespan, end)
        if self.record:
            self.events.append((engine, name, start, end))
        return duration

    # ---------------------------------------------------------------- DMA
    def dma(self, name: str, nbytes: int, partitions: int | None, hbm_bytes: int, reads: list[Region],
            writes: list[Region]) -> float:
        """Place one DMA transfer over `partitions` SBUF/PSUM partitions (None: no on-chip side) on
        the DMA engines that serve them; returns its duration in seconds."""
        iid = self._next_id
        self._next_id += 1
        ready, _ = self._ready(reads, writes)
        engines, piece_bytes = dma_pieces(nbytes, partitions)
        order = sorted(range(DMA_ENGINES), key=self.dma_free.__getitem__)[:engines]
        duration = piece_bytes / DMA_ENGINE_BYTES_PER_S
        self.hbm_time += hbm_bytes / HBM_BYTES_PER_S
        start = max(ready, *(self.dma_free[q] for q in order))
        end = start + duration
        for q in order:
            self.dma_free[q] = end
        self.busy["dma"] += duration * engines / DMA_ENGINES  # share of the aggregate DMA throughput
        self._record(iid, reads, writes, end)
        self.makespan = max(self.makespan, end, self.hbm_time)
        if self.record:
            self.events.append(("dma", name, start, end))
        return duration


def dma_pieces(nbytes: int, partitions: int | None) -> tuple[int, float]:
    """(DMA engines a transfer occupies, bytes its largest piece moves): one engine per eight
    partitions, all 16 for a transfer with no on-chip side (module docstring)."""
    if partitions is None:
        return DMA_ENGINES, nbytes / DMA_ENGINES
    partitions = max(1, partitions)
    engines = min(DMA_ENGINES, math.ceil(partitions / PARTITIONS_PER_DMA_ENGINE))
    largest_piece = max(min(PARTITIONS_PER_DMA_ENGINE, partitions), math.ceil(partitions / DMA_ENGINES))
    return engines, nbytes * largest_piece / partitions


__all__ = ["ACCESS_OVERHEAD", "CLOCK_HZ", "DEPENDENT_STALL", "DMA_ENGINES", "DMA_ENGINE_BYTES_PER_S", "ENGINES",
           "HBM_BYTES_PER_S", "MIN_II", "PARTITIONS_PER_DMA_ENGINE", "PSUM_PORT", "RESOURCES", "SBUF_PORT",
           "Timeline", "dma_pieces"]
