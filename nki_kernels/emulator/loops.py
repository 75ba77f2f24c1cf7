"""Loop-carried dependencies inside ``nl.affine_range``, found as the kernel runs.

The 0.2.0 stub (``nki.language.affine_range``, ``sequential_range``) calls the
iterations of an ``affine_range`` parallel: the compiler may reorder or pipeline them,
and using one where an iteration depends on another "is considered unsafe and could lead
to numerical errors". Associative reductions (matmuls accumulating into one PSUM tile)
are named as not being such a dependency. neuronx-cc does not reject the kernel; on a
Trn1 it may compute wrong numbers. The emulator runs the iterations in order, so the
kernel would give the right numbers here and pass its tests: this module turns the
dependency into a rule error instead.

How: every element a kernel writes while an ``affine_range`` iteration runs is stamped
with the loop iterations that enclose the write. A read that finds a stamp from another
iteration of a loop that is still running is a loop-carried dependency. Reads of the
instruction's own destination (an accumulation such as ``nc_matmul`` into PSUM) are
exempt; so is anything written before the loop began.

Python-level effects (lists of tiles built by appending inside the loop) keep program
order in the compiler's tracer, so the emulator does not reorder iterations.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

from .core import NKIRuleError, kernel_site

if TYPE_CHECKING:
    from .core import NkiTensor

# (loop instance, iteration): one level of the running affine_range nest
Level = tuple[int, int]


class AffineLoops:
    """The running ``affine_range`` nest of one kernel run and the stamps of its writes."""

    def __init__(self) -> None:
        self.stack: list[Level] = []
        self.sites: dict[int, tuple[str, int]] = {}  # loop instance -> kernel line of the affine_range
        self.next_loop = 0
        self.stamps: list[tuple[Level, ...]] = [()]  # stamp id -> the nest it was taken in (0: none)
        self.stamp_ids: dict[tuple[Level, ...], int] = {(): 0}
        self.marks: dict[int, np.ndarray] = {}  # allocation id -> one stamp id per element
        self.conflicts: dict[tuple[int, int], int | None] = {}

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
                self.marks.clear()

    def forget(self, alloc_id: int) -> None:
        self.marks.pop(alloc_id, None)

    def access(self, instr: str, reads: tuple["NkiTensor", ...], writes: tuple["NkiTensor", ...]) -> None:
        """Check `instr`'s reads against other iterations' writes, then stamp its writes."""
        current = self._stamp_id()
        own = {w.region() for w in writes}
        for tensor in reads:
            if tensor.region() not in own:
                self._check_read(instr, tensor, current)
        for tensor in writes:
            view = self._marks_view(tensor)
            if view is not None:
                view[...] = current

    # ------------------------------------------------------------------ internals
    def _stamp_id(self) -> int:
        nest = tuple(self.stack)
        stamp = self.stamp_ids.get(nest)
        if stamp is None:
            stamp = self.stamp_ids[nest] = len(self.stamps)
            self.stamps.append(nest)
        return stamp

    def _check_read(self, instr: str, tensor: "NkiTensor", current: int) -> None:
        view = self._marks_view(tensor, create=False)
        if view is None or view.size == 0:
            return
        low, high = int(view.min()), int(view.max())
        if high == 0 or (high == current and low in (0, current)):
            return
        for stamp in np.unique(view):
            loop = self._conflict(int(stamp), current)
            if loop is not None:
                raise self._error(instr, tensor, loop, int(stamp))

    def _conflict(self, written: int, current: int) -> int | None:
        """The loop whose iterations differ between two nests, if it runs in both (else None)."""
        key = (written, current)
        if key not in self.conflicts:
            found = None
            for a, b in zip(self.stamps[written], self.stamps[current]):
                if a != b:
                    found = a[0] if a[0] == b[0] else None
                    break
            self.conflicts[key] = found
        return self.conflicts[key]

    def _error(self, instr: str, tensor: "NkiTensor", loop: int, written: int) -> NKIRuleError:
        path, line = self.sites[loop]
        wrote = dict(self.stamps[written])[loop]
        reads = dict(self.stack)[loop]
        site = tensor._alloc.site
        name = tensor.name or (f"the tensor allocated at {site[0]}:{site[1]}" if site else "a tensor")
        return NKIRuleError(
            f"{instr}: an affine_range iteration must not read what another iteration wrote (nki.language."
            f"affine_range / sequential_range: a loop-carried dependency in affine_range 'is considered unsafe "
            f"and could lead to numerical errors'; associative reductions into the same tile excepted) "
            f"(iteration {reads} of the affine_range at {path}:{line} reads {name}, written by iteration "
            f"{wrote}; use nl.sequential_range for this loop)")

    def _marks_view(self, tensor: "NkiTensor", create: bool = True) -> np.ndarray | None:
        """The stamps of the elements `tensor` covers, laid out like it (None: not trackable)."""
        alloc, view = tensor._alloc, tensor._view
        item = alloc.data.dtype.itemsize
        if view.dtype.itemsize != item:
            return None  # a reinterpreting view: not tracked
        offset = view.__array_interface__["data"][0] - alloc.base_address
        if offset % item or any(s % item for s in view.strides):
            return None
        low = offset + sum(min(0, s * (n - 1)) for s, n in zip(view.strides, view.shape))
        high = offset + sum(max(0, s * (n - 1)) for s, n in zip(view.strides, view.shape)) + item
        if low < 0 or high > alloc.data.size * item or not alloc.data.flags.c_contiguous:
            return None
        marks = self.marks.get(alloc.id)
        if marks is None:
            if not create:
                return None
            marks = self.marks[alloc.id] = np.zeros(alloc.data.size, np.int32)
        strides = [s // item * marks.itemsize for s in view.strides]
        return np.lib.stride_tricks.as_strided(marks[offset // item:], shape=view.shape, strides=strides)
