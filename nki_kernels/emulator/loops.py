"""Loop-carried dependencies inside ``nl.affine_range``, found as the kernel runs and warned about.

The 0.2.0 stub (``nki.language.affine_range``, ``sequential_range``) calls the
iterations of an ``affine_range`` parallel: the compiler may reorder, vectorize or
pipeline them, and using one where the iterations carry a dependency "is considered
unsafe and could lead to numerical errors" (nki/api/nki/language/__init__.py lines
251-252). Associative reductions (matmuls accumulating into one PSUM tile) are named as
not being such a dependency. A buffer allocated outside the loop and reused by every
iteration is one: the migration guide (nki-migration-guide.rst, ``sb_blocks_migrated_incorrect``)
says "the loop carries a dependency on" it, where a buffer allocated inside the loop body
gets one copy per iteration.

No 0.2.0 source says the compiler rejects such a loop. The stub speaks of wrong numbers, not
of a compile error, and the 0.2.0 guides call the range functions hints to the compiler that do
not change what a loop computes: every kind of loop gives the result of the basic range loop
(nki/get-started/nki-language-guide.rst line 344; nki/get-started/about/index.rst lines 135 and
503, "The compiler will always make sure your code works correctly"). So the emulator accepts the
kernel, runs the iterations in order (the basic range loop's result), and warns with
``NKILoopDependencyWarning`` once per ``affine_range`` line and tensor: on the stub's reading a
Trn1 may compute other numbers. The project's pytest settings turn that warning into an error,
so our own kernels keep none.

Three kinds are reported, each between two iterations of one running ``affine_range``:

* a read of what another iteration wrote (true dependency, read after write);
* a write over what another iteration read (anti-dependency, write after read);
* a write over what another iteration wrote (output dependency, write after write).

Exempt, as the stub's associative reductions: accumulating writes over accumulating
writes with the same operator (``nc_matmul`` into PSUM and ``dma_copy`` with
``dst_rmw_op`` add; an instruction that updates one of its inputs in place accumulates
when ``associative_update`` says so), and an accumulating instruction's read of its own
destination. Anything written or read before the loop began, or by an inner loop that has
finished, relates to no running iteration.

How: while an ``affine_range`` runs, each distinct access an instruction makes (a view: its
allocation, first byte, shape, strides, element size) is recorded once per allocation with the
loop iterations (the nest) that made it: for writes the last nest that wrote exactly those bytes
and whether it accumulated (with which operator); for reads a summary of the reader nests. A new
access is compared only with the allocation's records from another iteration of a running loop.
Two accesses meet when their byte ranges overlap and, where both are boxes (one arithmetic
progression of indices per axis of the allocation, plus the bytes within an element; views of
another dtype and reshapes included), every axis's progressions share a value, which is exact
(gcd and a modular inverse per axis); a view that is no box is compared element by element. Which
write last reached each byte is decided by painting the records that meet the access in the order
they were written, done only where more than one meets it and one of them conflicts. The records
are as many as the distinct views, not the elements, so cost-only runs at full size check too.

Python-level effects (lists of tiles built by appending inside the loop) keep program
order in the compiler's tracer, so the emulator does not reorder iterations.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

import warnings

from .core import NKILoopDependencyWarning, kernel_site

if TYPE_CHECKING:
    from .core import NkiTensor

# (loop instance, iteration): one level of the running affine_range nest
Level = tuple[int, int]

# The stub exempts associative reductions (nki/api/nki/language/__init__.py lines 168-172): the
# iterations' contributions may be combined in any order and grouping. An in-place update
# `acc = acc op x_i` is one when `op` is associative and commutative (REDUCTION_OPS, by nl name),
# the accumulator in either operand. The operators are the ALU table's "Legal Reduction op"
# column (nki/api/nki.api.shared.rst lines 61-118: Y for add, subtract, multiply, maximum,
# minimum and the bitwise and logical and/or/xor; `nl` marks them `reducible`), the ISA's own
# list of operators that fold values in any order; which in-place updates neuronx-cc treats as
# reductions in a loop no source says (docs/kernels.md, "What the emulator does not model").
# `acc - x_i` is `acc + (-x_i)`, an add reduction of the negated x_i, so subtract counts with the
# accumulator as its first operand only: `x_i - acc` alternates the sign of acc and each x_i with the
# iteration order. Not reductions: any other
# position or operator (`power`, comparisons, shifts), an activation function (`exp(acc)` is not
# `acc op x_i`), and two steps of different families (`acc * a_i + b_i` is a scan).
REDUCTION_OPS = ("add", "multiply", "maximum", "minimum", "bitwise_and", "bitwise_or", "bitwise_xor",
                 "logical_and", "logical_or", "logical_xor")
_FAMILY_CODES = {name: code for code, name in enumerate(REDUCTION_OPS, start=1)}
# Added to a family code where the accumulation ran over bytes the same iteration had first set with a plain
# write (`if k == 0: memset(acc)`, then `acc += x_k` in every iteration). The stub's associative reduction
# accumulates "into the same output buffer defined outside of this loop level", its example zeroing
# `result_psum` before the loop (nki/api/nki/language/__init__.py lines 170-172, 217-223): an initialisation
# inside one iteration orders it before every other iteration's accumulation, which a reordering compiler does
# not keep, so another iteration's accumulation meeting such bytes is an output dependency on that write.
SET_THEN_ACCUMULATED = 16
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

DEPENDENCY = "a loop-carried dependency in affine_range"  # every warning's text starts with the instruction, then this
RULE = ("neuronx-cc accepts it and the emulator runs the iterations in order, but the stub calls affine_range over a "
        "loop-carried dependency 'unsafe' with possible 'numerical errors' (nki.language.sequential_range); "
        "associative reductions into the same tile are no such dependency")


# A term (stride in bytes, count): one axis of an access, count positions stride bytes apart. An access is
# `lo` plus every sum of one position per term; its last term has stride 1 and counts the bytes of an element.
Term = tuple[int, int]
# One axis of an allocation's box: (first index, step, count) along that axis of the allocation.
Progression = tuple[int, int, int]


class _Access:
    """The bytes one view covers in its allocation, as an affine pattern and, when it is one, as a box.

    `box`: per axis of the allocation (its axes longer than 1, then the bytes of one element) the indices the
    view covers, an arithmetic progression each; the view covers exactly their product. None when the
    pattern is no such product (a view whose axes straddle the allocation's, e.g. some `.ap` patterns):
    then intersections are found element by element.
    """

    __slots__ = ("key", "lo", "hi", "terms", "box", "grain")

    def __init__(self, lo: int, terms: tuple[Term, ...], box: tuple[Progression, ...] | None) -> None:
        self.key = (lo, terms)
        self.lo = lo
        self.hi = lo + sum(t * (n - 1) for t, n in terms) + 1
        self.terms = terms
        self.box = box
        self.grain = math.gcd(lo, *(n if t == 1 else t for t, n in terms))

    def units(self, unit: int) -> np.ndarray:
        """Index (in `unit`-byte steps) of every unit the access covers; `unit` divides `grain`."""
        offsets = np.array([self.lo // unit], np.int64)
        for t, n in self.terms:
            axis = np.arange(n // unit, dtype=np.int64) if t == 1 else np.arange(n, dtype=np.int64) * (t // unit)
            offsets = np.add.outer(offsets, axis).ravel()
        return offsets


class _Track:
    """The accesses one allocation saw since the outermost affine loop began.

    `axes`: (length, byte stride) of the allocation's axes longer than 1, then (element size, 1) for the
    bytes of one element. `writes`: access key -> (stamp, reduction family code (0: not an accumulation;
    `_FAMILY_CODES`), access) of the last write of exactly those bytes, in the order of those writes, so
    painting them in order gives each byte its last writer. `reads`: access key -> (reader summary, access)
    (see `AffineLoops._merge_read`).
    """

    __slots__ = ("layout", "axes", "writes", "reads", "stamps")

    def __init__(self, layout: int, axes: tuple[tuple[int, int], ...]) -> None:
        self.layout = layout  # allocations of one shape and element size share accesses (AffineLoops.patterns)
        self.axes = axes
        self.writes: dict[tuple, tuple[int, int, _Access]] = {}
        self.reads: dict[tuple, tuple[int, _Access]] = {}
        self.stamps: set[int] = set()  # every stamp and reader summary recorded (a superset of those left)

    @staticmethod
    def axes_of(data: np.ndarray) -> tuple[tuple[int, int], ...]:
        axes = [(n, s) for n, s in zip(data.shape, data.strides) if n > 1]
        return (*axes, (data.itemsize, 1)) if data.itemsize > 1 else tuple(axes)

    def access(self, offset: int, shape: tuple[int, ...], strides: tuple[int, ...], item: int) -> _Access:
        """The access of a view `offset` bytes into the allocation."""
        lo, terms = offset, []
        for n, s in zip(shape, strides):
            if n > 1 and s != 0:
                if s < 0:
                    lo, s = lo + s * (n - 1), -s
                terms.append((s, n))
        terms.append((1, item))
        terms.sort(reverse=True)
        merged: list[Term] = []
        for t, n in terms:  # axes that continue one another are one axis (a reshape, a whole row)
            if merged and merged[-1][0] == t * n:
                merged[-1] = (t, merged[-1][1] * n)
            else:
                merged.append((t, n))
        return _Access(lo, tuple(merged), self._box(lo, merged))

    def _box(self, lo: int, terms: list[Term]) -> tuple[Progression, ...] | None:
        """The access as a product of one progression per allocation axis (None: it is not one)."""
        axes = self.axes
        starts = [(lo // stride) % length for length, stride in axes]
        box: list[Progression | None] = [None] * len(axes)
        pending = list(terms)
        while pending:
            t, n = pending.pop()
            axis = next((i for i, (length, stride) in enumerate(axes) if stride <= t < stride * length), None)
            if axis is None or t % axes[axis][1] or box[axis] is not None:
                return None
            length, stride = axes[axis]
            step = t // stride
            if starts[axis] + step * (n - 1) < length:
                box[axis] = (starts[axis], step, n)
                continue
            # the term wraps into the next outer axis: split it there, when every row holds the same columns
            per_row = length // step
            if starts[axis] >= step or length % step or n % per_row:
                return None
            box[axis] = (starts[axis], step, per_row)
            pending.append((stride * length, n // per_row))
        return tuple(b if b is not None else (starts[i], 1, 1) for i, b in enumerate(box))


def _progressions_meet(a: Progression, b: Progression) -> bool:
    """Whether two arithmetic progressions of integers share a value."""
    (x, s, n), (y, t, m) = a, b
    low, high = max(x, y), min(x + s * (n - 1), y + t * (m - 1))
    if low > high:
        return False
    if n == 1 or m == 1:
        value, (first, step) = (x, (y, t)) if n == 1 else (y, (x, s))
        return (value - first) % step == 0
    g = math.gcd(s, t)
    if (y - x) % g:
        return False
    modulus = t // g  # x + s*k = y (mod t): k = (y - x)/g * (s/g)^-1 (mod t/g)
    k = (y - x) // g * pow(s // g, -1, modulus) % modulus if modulus > 1 else 0
    period = s // g * t
    first = x + s * k
    return low + (first - low) % period <= high


def _meet(a: _Access, b: _Access) -> bool:
    """Whether two accesses of one allocation share a byte: by boxes where both are boxes, else by elements."""
    if a.lo >= b.hi or b.lo >= a.hi:
        return False
    if a.box is not None and b.box is not None:
        return all(_progressions_meet(p, q) for p, q in zip(a.box, b.box))
    unit = math.gcd(a.grain, b.grain)
    low, high = max(a.lo, b.lo) // unit, -(-min(a.hi, b.hi) // unit)
    covered = np.zeros(high - low, bool)
    units = a.units(unit)
    units = units[(units >= low) & (units < high)]
    covered[units - low] = True
    units = b.units(unit)
    units = units[(units >= low) & (units < high)]
    return bool(covered[units - low].any())


class AffineLoops:
    """The running ``affine_range`` nest of one kernel run and the stamps of its accesses."""

    def __init__(self) -> None:
        self.stack: list[Level] = []
        self.sites: dict[int, tuple[str, int]] = {}  # loop instance -> kernel line of the affine_range
        self.next_loop = 0
        self.stamps: list[tuple[Level, ...]] = [()]  # stamp id -> the nest it was taken in (0: none)
        self.stamp_ids: dict[tuple[Level, ...], int] = {(): 0}
        self.current = 0  # the stamp of the running nest
        self.tracks: dict[int, _Track] = {}  # allocation id -> its accesses
        self.layouts: dict[tuple, tuple] = {}  # (shape, element size) of an allocation -> (number, axes)
        self.patterns: dict[tuple, _Access | None] = {}  # (layout, offset, shape, strides, item) -> access
        self.conflicts: dict[tuple[int, int], int | None] = {}
        self.merges: dict[tuple[int, int], int] = {}
        self.reported: set[tuple[tuple[str, int], int]] = set()  # (affine_range line, allocation) warned about

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
                self.current = self._stamp_id()
                try:
                    yield i
                finally:
                    self.stack.remove((loop, i))
                    self.current = self._stamp_id()
        finally:
            if not self.stack:  # the outermost affine loop ended: no stamp can conflict any more
                self.tracks.clear()

    def forget(self, alloc_id: int) -> None:
        self.tracks.pop(alloc_id, None)

    def access(self, instr: str, reads: tuple[NkiTensor, ...], writes: tuple[NkiTensor, ...],
               accumulates: str = "") -> None:
        """Check one instruction against the other iterations' accesses, then record its own.

        `accumulates`: the reduction family every write accumulates in ('' when none: see
        `associative_update`). The operand that is the accumulating destination itself is part of the
        reduction, not a read another iteration's write must wait for; an instruction that reads its own
        destination without accumulating reads what the other iterations wrote.
        """
        current = self.current
        if accumulates:
            own = {w.region() for w in writes}
            reads = tuple(t for t in reads if t.region() not in own)
        operands = [(t, seen) for t in reads for seen in (self._access(t),) if seen is not None]
        destinations = [(t, seen) for t in writes for seen in (self._access(t),) if seen is not None]
        # only tracks holding a stamp of another iteration of a running loop can conflict with this one
        for tensor, seen in operands:
            if self._exposed(seen[0].stamps, current):
                self._check_read(instr, tensor, seen, current, writes)
        code = _FAMILY_CODES[accumulates] if accumulates else 0
        for tensor, seen in destinations:
            if self._exposed(seen[0].stamps, current):
                self._check_write(instr, tensor, seen, current, code)
        for _, (track, access) in operands:
            earlier = track.reads.get(access.key)
            if earlier is None:
                track.reads[access.key] = (current, access)
                track.stamps.add(current)
            elif earlier[0] != current:
                summary = self._merge_read(earlier[0], current)
                track.reads[access.key] = (summary, access)
                track.stamps.add(summary)
        for _, (track, access) in destinations:
            earlier = track.writes.pop(access.key, None)  # re-inserted last: the order of the writes
            mark = code
            if code and earlier is not None and earlier[0] == current and not 0 < earlier[1] < SET_THEN_ACCUMULATED:
                mark = code + SET_THEN_ACCUMULATED  # this iteration set these very bytes before accumulating
            track.writes[access.key] = (current, mark, access)
            track.stamps.add(current)

    def _exposed(self, stamps: set[int], current: int) -> bool:
        """Whether a track with these stamps holds one of another iteration of a loop still running."""
        if len(stamps) < 2 and (not stamps or current in stamps):
            return False
        return any(stamp != current and self._conflict(stamp, current) is not None for stamp in stamps)

    # ------------------------------------------------------------------ checks
    def _check_read(self, instr: str, tensor: NkiTensor, seen: tuple[_Track, _Access], current: int,
                    writes: tuple[NkiTensor, ...]) -> None:
        written, _ = self._last_writers(seen, current)
        for stamp, loop in self._conflicting(written, current):
            in_place = tensor.region() in {w.region() for w in writes}
            self._report(instr, "read in place" if in_place else "read", tensor, loop, stamp)
            return

    def _check_write(self, instr: str, tensor: NkiTensor, seen: tuple[_Track, _Access], current: int,
                     code: int) -> None:
        written, accumulated = self._last_writers(seen, current)
        for stamp, loop in self._conflicting(written, current):
            earlier = accumulated[written == stamp]
            if code and bool((earlier == code).all()):
                continue  # accumulations of one family into the same elements: an associative reduction
            if code and bool((earlier > SET_THEN_ACCUMULATED).any()):
                self._report(instr, "initialised", tensor, loop, stamp)
                return
            kind = "mix" if code and bool(earlier.all()) else "overwrite"  # accumulations of two families
            self._report(instr, kind, tensor, loop, stamp)
            return
        track, access = seen
        readers = sorted(summary for summary, other in track.reads.values() if _meet(access, other))
        for stamp, loop in self._conflicting(np.array(readers, np.int64), current):
            self._report(instr, "overwrite-read", tensor, loop, stamp)
            return

    def _last_writers(self, seen: tuple[_Track, _Access], current: int) -> tuple[np.ndarray, np.ndarray]:
        """(stamp, family code) of the last write of each byte of the access that another write reached.

        Enough for the checks: when no write that meets the access conflicts with `current`, just their
        stamps; when one write meets it, its stamp and code; otherwise each byte's last writer, painting the
        writes that meet it in the order they happened.
        """
        track, access = seen
        met = [w for w in track.writes.values() if _meet(access, w[2])]
        if len(met) <= 1 or all(self._conflict(stamp, current) is None for stamp, _, _ in met):
            return np.array([w[0] for w in met], np.int64), np.array([w[1] for w in met], np.int8)
        unit = math.gcd(access.grain, *(w[2].grain for w in met))
        low, high = access.lo // unit, -(-access.hi // unit)
        stamps, codes = np.zeros(high - low, np.int64), np.zeros(high - low, np.int8)
        for stamp, code, other in met:
            units = other.units(unit)
            units = units[(units >= low) & (units < high)] - low
            if stamp and 0 < code < SET_THEN_ACCUMULATED:  # an accumulation over bytes its iteration set plainly
                before = codes[units]
                set_here = (stamps[units] == stamp) & ((before == 0) | (before > SET_THEN_ACCUMULATED))
                code = np.where(set_here, code + SET_THEN_ACCUMULATED, code)
            stamps[units], codes[units] = stamp, code
        mine = access.units(unit) - low
        return stamps[mine], codes[mine]

    def _conflicting(self, marks: np.ndarray, current: int) -> Iterator[tuple[int, int]]:
        """(stamp, loop) for each stamp in `marks` taken in another iteration of a loop still running."""
        if marks.size == 0:
            return
        low, high = int(marks.min()), int(marks.max())
        if high == 0 or (high == current and low in (0, current)):
            return
        for stamp in np.unique(marks):
            loop = self._conflict(int(stamp), current)
            if loop is not None:
                yield int(stamp), loop

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

    # ------------------------------------------------------------------ accesses
    def _access(self, tensor: NkiTensor) -> tuple[_Track, _Access] | None:
        """The track of `tensor`'s allocation and the bytes it covers there (None: untracked)."""
        kept = tensor.dependency_access  # valid while its track is (the outermost loop's end drops them all)
        if kept is not None and kept[0] is self.tracks.get(tensor._alloc.id):
            return kept[1]
        seen = self._find_access(tensor)
        tensor.dependency_access = (seen[0] if seen is not None else None, seen)
        return seen

    def _find_access(self, tensor: NkiTensor) -> tuple[_Track, _Access] | None:
        alloc = tensor._alloc
        track = self.tracks.get(alloc.id)
        if track is None:
            if not alloc.data.flags.c_contiguous:
                return None  # e.g. a broadcast input of a cost-only run
            layout = self.layouts.get((alloc.data.shape, alloc.data.itemsize))
            if layout is None:
                layout = self.layouts[(alloc.data.shape, alloc.data.itemsize)] = (
                    len(self.layouts), _Track.axes_of(alloc.data))
            track = self.tracks[alloc.id] = _Track(*layout)
        view = tensor.covered_view()
        key = (track.layout, tensor.byte_offset(), view.shape, view.strides, view.dtype.itemsize)
        access = self.patterns.get(key, False)
        if access is False:
            access = self.patterns[key] = self._pattern(track, alloc.data.nbytes, *key[1:])
        return None if access is None else (track, access)

    @staticmethod
    def _pattern(track: _Track, nbytes: int, offset: int, shape: tuple[int, ...], strides: tuple[int, ...],
                 item: int) -> _Access | None:
        """The access of a view (None: an empty view, or one reaching outside its allocation, which no
        tracked view does)."""
        if 0 in shape:
            return None
        low = offset + sum(min(0, s * (n - 1)) for s, n in zip(strides, shape))
        high = offset + sum(max(0, s * (n - 1)) for s, n in zip(strides, shape)) + item
        if low < 0 or high > nbytes:
            return None
        return track.access(offset, shape, strides, item)

    # ------------------------------------------------------------------ messages
    def _report(self, instr: str, kind: str, tensor: NkiTensor, loop: int, other: int) -> None:
        """Warn of a dependency, once per affine_range line and allocation (the first one found there)."""
        key = (self.sites[loop], tensor._alloc.id)
        if key in self.reported:
            return
        self.reported.add(key)
        file, line = kernel_site()
        warnings.warn_explicit(NKILoopDependencyWarning(self._message(instr, kind, tensor, loop, other)),
                               NKILoopDependencyWarning, file, line)

    def _message(self, instr: str, kind: str, tensor: NkiTensor, loop: int, other: int) -> str:
        path, line = self.sites[loop]
        theirs = dict(self.stamps[other])[loop]
        ours = dict(self.stack)[loop]
        site = tensor._alloc.site
        name = tensor.name or (f"the tensor allocated at {site[0]}:{site[1]}" if site else "a tensor")
        where = f"iteration {ours} of the affine_range at {path}:{line}"
        head = f"{instr}: {DEPENDENCY}"
        sequential = "use nl.sequential_range for this loop"
        if kind == "read":
            return (f"{head}: an iteration reads what another iteration wrote ({where} reads {name}, written by "
                    f"iteration {theirs}; {sequential}) ({RULE})")
        if kind == "read in place":
            return (f"{head}: an iteration reads what another iteration wrote ({where} updates {name} in place, "
                    f"written by iteration {theirs}, and this update is not an associative reduction: only "
                    f"acc = acc op x with op {ASSOCIATIVE}, one operator family per accumulator, may be reordered; "
                    f"{sequential}) ({RULE})")
        if kind == "mix":
            return (f"{head}: an iteration overwrites what another iteration wrote ({where} accumulates into {name} "
                    f"with another operator than iteration {theirs} did: two reductions of different operators into "
                    f"one tile, such as acc = acc * a + b, are a scan, not an associative reduction; {sequential}) "
                    f"({RULE})")
        if kind == "initialised":
            return (f"{head}: an iteration overwrites what another iteration wrote ({where} accumulates into {name}, "
                    f"which iteration {theirs} set before accumulating into it: the iterations have no order, so "
                    f"that initialisation may run after this accumulation and erase it; set the accumulator before "
                    f"the loop, as the stub's affine_range example zeroes result_psum, or {sequential}) ({RULE})")
        fix = ("allocate it inside the loop body, one copy per iteration (nki-migration-guide.rst: with one buffer "
               f"outside the loop 'the loop carries a dependency on' it), or {sequential}")
        if kind == "overwrite":
            return (f"{head}: an iteration overwrites what another iteration wrote ({where} writes {name}, also "
                    f"written by iteration {theirs}; {fix}) ({RULE})")
        return (f"{head}: an iteration overwrites what another iteration read ({where} writes {name}, read by "
                f"iteration {theirs}; {fix}) ({RULE})")
