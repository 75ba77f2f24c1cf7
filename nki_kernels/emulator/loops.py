"""Loop-carried dependencies inside ``nl.affine_range``, found as the kernel runs.

The 0.2.0 stub (``nki.language.affine_range``, ``sequential_range``) calls the
iterations of an ``affine_range`` parallel: the compiler may reorder, vectorize or
pipeline them, and using one where the iterations carry a dependency "is considered
unsafe and could lead to numerical errors". Associative reductions (matmuls accumulating
into one PSUM tile) are named as not being such a dependency. A buffer allocated outside
the loop and reused by every iteration is one: the migration guide
(nki-migration-guide.rst, ``sb_blocks_migrated_incorrect``) says "the loop carries a
dependency on" it, where a buffer allocated inside the loop body gets one copy per
iteration. neuronx-cc does not reject such a kernel; on a Trn1 it may compute wrong
numbers. The emulator runs the iterations in order, so the kernel would give the right
numbers here and pass its tests: this module turns the dependency into a rule error.

Three kinds are refused, each between two iterations of one running ``affine_range``:

* a read of what another iteration wrote (true dependency, read after write);
* a write over what another iteration read (anti-dependency, write after read);
* a write over what another iteration wrote (output dependency, write after write).

Exempt, as the stub's associative reductions: accumulating writes over accumulating
writes with the same operator (``nc_matmul`` into PSUM and ``dma_copy`` with
``dst_rmw_op`` add; an instruction that updates one of its inputs in place accumulates
when ``associative_update`` says so), and an accumulating instruction's read of its own
destination. Anything written or read before the loop began, or by an inner loop that has
finished, relates to no running iteration.

How: every byte range a kernel touches while an ``affine_range`` runs is stamped with the
loop iterations (the nest) that enclose the access: the last writer, the operator that
write accumulated with (if it did), and a summary of the readers. Stamps follow views of
any dtype (``.ap(dtype=)`` reinterprets a tile): the tracking unit shrinks to the largest
byte count that divides every view's element size, offset and strides.

Python-level effects (lists of tiles built by appending inside the loop) keep program
order in the compiler's tracer, so the emulator does not reorder iterations.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

from .core import NKIRuleError, kernel_site

if TYPE_CHECKING:
    from .core import NkiTensor

# (loop instance, iteration): one level of the running affine_range nest
Level = tuple[int, int]

# The stub exempts associative reductions (nki/api/nki/language/__init__.py lines 168-172): the
# iterations' contributions may be combined in any order and grouping. An in-place update
# `acc = acc op x_i` is one when `op` is associative and commutative (REDUCTION_OPS, by nl name),
# the accumulator in either operand. `acc - x_i` is `acc + (-x_i)`, an add reduction of the
# negated x_i, so subtract counts with the accumulator as its first operand only: `x_i - acc`
# alternates the sign of acc and each x_i with the iteration order. Not reductions: any other
# position or operator (`power`, comparisons, shifts), an activation function (`exp(acc)` is not
# `acc op x_i`), and two steps of different families (`acc * a_i + b_i` is a scan).
REDUCTION_OPS = ("add", "multiply", "maximum", "minimum", "bitwise_and", "bitwise_or", "bitwise_xor",
                 "logical_and", "logical_or", "logical_xor")
_FAMILY_CODES = {name: code for code, name in enumerate(REDUCTION_OPS, start=1)}
ASSOCIATIVE = "add, subtract (accumulator first), multiply, maximum, minimum and the bitwise and logical and/or/xor"


def associative_update(steps: list[tuple[str, bool]]) -> str:
    """The reduction family of an in-place update made of `steps`, '' when it is not an associative reduction.

    Each step is (operator name, whether the value holding the accumulator is its first operand), in the
    order the instruction applies them; every step must accumulate, all in one family.
    """
    families = set()
    for name, accumulator_first in steps:
        if name == "subtract" and accumulator_first:
            families.add("add")
        elif name in REDUCTION_OPS:
            families.add(name)
        else:
            return ""
    return families.pop() if len(families) == 1 else ""

RULE = ("nki.language.affine_range / sequential_range: a loop-carried dependency in affine_range 'is considered "
        "unsafe and could lead to numerical errors'; associative reductions into the same tile excepted")


class _Track:
    """What one allocation's bytes saw since the outermost affine loop began, `unit` bytes per entry.

    `written`: stamp of the last write (0: none); `accumulated`: the reduction family code of that write
    (0: not an accumulation; `_FAMILY_CODES`);
    `read`: the reader summary (0: none; see `AffineLoops._merge_read`). Each is made when first needed.
    """

    __slots__ = ("unit", "entries", "written", "accumulated", "read")

    def __init__(self, unit: int, nbytes: int) -> None:
        self.unit = unit
        self.entries = nbytes // unit
        self.written: np.ndarray | None = None
        self.accumulated: np.ndarray | None = None
        self.read: np.ndarray | None = None

    def refine(self, unit: int) -> None:
        """Split every entry into entries of `unit` bytes (a view with a smaller element or offset)."""
        factor = self.unit // unit
        for name in ("written", "accumulated", "read"):
            marks = getattr(self, name)
            if marks is not None:
                setattr(self, name, np.repeat(marks, factor))
        self.unit, self.entries = unit, self.entries * factor

    def array(self, name: str) -> np.ndarray:
        marks = getattr(self, name)
        if marks is None:
            marks = np.zeros(self.entries, np.int8 if name == "accumulated" else np.int32)
            setattr(self, name, marks)
        return marks


# (track, first entry, shape, strides in entries, unit): where a tensor's bytes lie in its allocation's stamps
Span = tuple[_Track, int, tuple[int, ...], tuple[int, ...], int]


class AffineLoops:
    """The running ``affine_range`` nest of one kernel run and the stamps of its accesses."""

    def __init__(self) -> None:
        self.stack: list[Level] = []
        self.sites: dict[int, tuple[str, int]] = {}  # loop instance -> kernel line of the affine_range
        self.next_loop = 0
        self.stamps: list[tuple[Level, ...]] = [()]  # stamp id -> the nest it was taken in (0: none)
        self.stamp_ids: dict[tuple[Level, ...], int] = {(): 0}
        self.tracks: dict[int, _Track] = {}  # allocation id -> its stamps
        self.conflicts: dict[tuple[int, int], int | None] = {}
        self.merges: dict[tuple[int, int], int] = {}

    @property
    def active(self) -> bool:
        return bool(self.stack)

    def iterate(self, values: range) -> Iterator[int]:
        """Yield `values` in order, each with its iteration on the nest while the body runs."""
        loop = self.next_loop = self.next_loop + 1
        self.sites[loop] = kernel_site()
        try:
            for i in values:
                self.stack.append((loop, i))
                try:
                    yield i
                finally:
                    self.stack.remove((loop, i))
        finally:
            if not self.stack:  # the outermost affine loop ended: no stamp can conflict any more
                self.tracks.clear()

    def forget(self, alloc_id: int) -> None:
        self.tracks.pop(alloc_id, None)

    def access(self, instr: str, reads: tuple[NkiTensor, ...], writes: tuple[NkiTensor, ...],
               accumulates: str = "") -> None:
        """Check one instruction against the other iterations' accesses, then stamp its own.

        `accumulates`: the reduction family every write accumulates in ('' when none: see
        `associative_update`). The operand that is the accumulating destination itself is part of the
        reduction, not a read another iteration's write must wait for; an instruction that reads its own
        destination without accumulating reads what the other iterations wrote.
        """
        current = self._stamp_id()
        own = {w.region() for w in writes}
        operands = [t for t in reads if not (accumulates and t.region() in own)]
        spans = self._spans((*operands, *writes))
        in_place = {r.region() for r in reads} & own
        for tensor in operands:
            self._check_read(instr, tensor, spans[id(tensor)], current, tensor.region() in in_place)
        code = _FAMILY_CODES[accumulates] if accumulates else 0
        for tensor in writes:
            self._check_write(instr, tensor, spans[id(tensor)], current, code)
        for tensor in operands:
            self._record_read(spans[id(tensor)], current)
        for tensor in writes:
            span = spans[id(tensor)]
            if span is not None:
                self._view(span, "written")[...] = current
                self._view(span, "accumulated")[...] = code

    # ------------------------------------------------------------------ checks
    def _check_read(self, instr: str, tensor: NkiTensor, span: Span | None, current: int, in_place: bool) -> None:
        written = self._existing(span, "written")
        for stamp, loop in self._conflicting(written, current):
            raise self._error(instr, "read in place" if in_place else "read", tensor, loop, stamp)

    def _check_write(self, instr: str, tensor: NkiTensor, span: Span | None, current: int, code: int) -> None:
        written = self._existing(span, "written")
        for stamp, loop in self._conflicting(written, current):
            earlier = self._existing(span, "accumulated")[written == stamp]
            if code and bool((earlier == code).all()):
                continue  # accumulations of one family into the same elements: an associative reduction
            kind = "mix" if code and bool(earlier.all()) else "overwrite"  # accumulations of two families
            raise self._error(instr, kind, tensor, loop, stamp)
        read = self._existing(span, "read")
        for stamp, loop in self._conflicting(read, current):
            raise self._error(instr, "overwrite-read", tensor, loop, stamp)

    def _conflicting(self, marks: np.ndarray | None, current: int) -> Iterator[tuple[int, int]]:
        """(stamp, loop) for each stamp in `marks` taken in another iteration of a loop still running."""
        if marks is None:
            return
        low, high = int(marks.min()), int(marks.max())
        if high == 0 or (high == current and low in (0, current)):
            return
        for stamp in np.unique(marks):
            loop = self._conflict(int(stamp), current)
            if loop is not None:
                yield int(stamp), loop

    def _record_read(self, span: Span | None, current: int) -> None:
        if span is None:
            return
        read = self._view(span, "read")
        low, high = int(read.min()), int(read.max())
        if high == 0 or (high == current and low in (0, current)):
            read[...] = current
            return
        for stamp in np.unique(read):
            merged = self._merge_read(int(stamp), current)
            if merged != stamp:
                read[read == stamp] = merged

    # ------------------------------------------------------------------ stamps
    def _stamp_id(self, nest: tuple[Level, ...] | None = None) -> int:
        nest = tuple(self.stack) if nest is None else nest
        stamp = self.stamp_ids.get(nest)
        if stamp is None:
            stamp = self.stamp_ids[nest] = len(self.stamps)
            self.stamps.append(nest)
        return stamp

    def _divergence(self, first: int, second: int) -> int | None:
        """The level at which two nests run different iterations of one loop (None: no such level)."""
        for depth, (a, b) in enumerate(zip(self.stamps[first], self.stamps[second])):
            if a != b:
                return depth if a[0] == b[0] else None
        return None

    def _conflict(self, earlier: int, current: int) -> int | None:
        """The loop whose iterations differ between two nests, if it runs in both (else None)."""
        key = (earlier, current)
        if key not in self.conflicts:
            depth = self._divergence(earlier, current)
            self.conflicts[key] = None if depth is None else self.stamps[earlier][depth][0]
        return self.conflicts[key]

    def _merge_read(self, summary: int, current: int) -> int:
        """The reader summary after a read in `current`, given the summary of the earlier readers.

        Reads happen in program order, so every earlier reader precedes `current`. If the two
        run different iterations of one loop, the element has been read by two of its iterations
        and any later write inside that loop overwrites what one of them read: the summary becomes
        the earlier nest cut after that loop (a write in any other of its iterations conflicts, and
        no later access runs the earlier iteration again). Otherwise the later reader alone
        conflicts with every later write that an earlier one would.
        """
        key = (summary, current)
        if key not in self.merges:
            depth = self._divergence(summary, current) if summary else None
            self.merges[key] = current if depth is None else self._stamp_id(self.stamps[summary][:depth + 1])
        return self.merges[key]

    # ------------------------------------------------------------------ views of the stamps
    def _spans(self, tensors: tuple[NkiTensor, ...]) -> dict[int, Span | None]:
        """The span of each tensor (by id), in the units its track has once all of them are seen."""
        spans = {id(t): self._span(t) for t in tensors}
        if any(s is not None and s[0].unit != s[4] for s in spans.values()):
            spans = {id(t): self._span(t) for t in tensors}  # a later view refined an earlier one's track
        return spans

    def _span(self, tensor: NkiTensor) -> Span | None:
        """(track, first entry, shape, strides in entries, unit) of the bytes `tensor` covers (None: untracked)."""
        alloc, view = tensor._alloc, tensor._view
        if view.size == 0 or not alloc.data.flags.c_contiguous:
            return None  # e.g. a broadcast input of a cost-only run
        item = view.dtype.itemsize
        offset = view.__array_interface__["data"][0] - alloc.base_address
        low = offset + sum(min(0, s * (n - 1)) for s, n in zip(view.strides, view.shape))
        high = offset + sum(max(0, s * (n - 1)) for s, n in zip(view.strides, view.shape)) + item
        if low < 0 or high > alloc.data.nbytes:
            return None
        track = self.tracks.get(alloc.id)
        if track is None:
            track = self.tracks[alloc.id] = _Track(alloc.data.dtype.itemsize, alloc.data.nbytes)
        unit = math.gcd(track.unit, item, offset, *(abs(s) for s in view.strides))
        if unit < track.unit:
            track.refine(unit)
        shape = (*view.shape, item // unit)
        strides = (*(s // unit for s in view.strides), 1)
        return track, offset // unit, shape, strides, unit

    def _view(self, span: Span, name: str) -> np.ndarray:
        """`name`'s stamps of the span, laid out like the tensor plus a last axis of its bytes' entries."""
        track, first, shape, strides, _ = span
        marks = track.array(name)
        return np.lib.stride_tricks.as_strided(marks[first:], shape=shape,
                                               strides=[s * marks.itemsize for s in strides])

    def _existing(self, span: Span | None, name: str) -> np.ndarray | None:
        """`name`'s stamps of the span, or None when nothing of that kind was stamped there yet."""
        if span is None or getattr(span[0], name) is None:
            return None
        return self._view(span, name)

    # ------------------------------------------------------------------ messages
    def _error(self, instr: str, kind: str, tensor: NkiTensor, loop: int, other: int) -> NKIRuleError:
        path, line = self.sites[loop]
        theirs = dict(self.stamps[other])[loop]
        ours = dict(self.stack)[loop]
        site = tensor._alloc.site
        name = tensor.name or (f"the tensor allocated at {site[0]}:{site[1]}" if site else "a tensor")
        where = f"iteration {ours} of the affine_range at {path}:{line}"
        if kind == "read":
            return NKIRuleError(
                f"{instr}: an affine_range iteration must not read what another iteration wrote ({RULE}) "
                f"({where} reads {name}, written by iteration {theirs}; use nl.sequential_range for this loop)")
        if kind == "read in place":
            return NKIRuleError(
                f"{instr}: an affine_range iteration must not read what another iteration wrote ({RULE}) "
                f"({where} updates {name} in place, written by iteration {theirs}, and this update is not an "
                f"associative reduction: only acc = acc op x with op {ASSOCIATIVE}, one operator family per "
                f"accumulator, may be reordered; use nl.sequential_range for this loop)")
        if kind == "mix":
            return NKIRuleError(
                f"{instr}: an affine_range iteration must not overwrite what another iteration wrote ({RULE}) "
                f"({where} accumulates into {name} with another operator than iteration {theirs} did: two "
                f"reductions of different operators into one tile, such as acc = acc * a + b, are a scan, not an "
                f"associative reduction; use nl.sequential_range for this loop)")
        fix = ("allocate it inside the loop body, one copy per iteration (nki-migration-guide.rst: with one buffer "
               "outside the loop 'the loop carries a dependency on' it), or use nl.sequential_range for this loop")
        if kind == "overwrite":
            return NKIRuleError(
                f"{instr}: an affine_range iteration must not overwrite what another iteration wrote ({RULE}) "
                f"({where} writes {name}, also written by "
                f"iteration {theirs}; {fix})")
        return NKIRuleError(
            f"{instr}: an affine_range iteration must not overwrite what another iteration read ({RULE}) "
            f"({where} writes {name}, read by iteration {theirs}; {fix})")
