"""Choose which entries of a local cache to delete (age, total size, failed) and delete them safely.

Selection: ``--failed`` takes failed entries, ``--older-than DAYS`` entries not
written for that long, then ``--max-size`` takes the oldest of the rest until the
remainder fits. An entry that may be in use (`LocalCache.busy_reason`) is never
taken; it still counts towards the size.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from bmojo_neuron.compile_cache.layout import FAILED, Entry
from bmojo_neuron.compile_cache.local import LocalCache
from bmojo_neuron.compile_cache.units import format_size

Busy = Callable[[Entry], "str | None"]


@dataclass
class PrunePlan:
    remove: list[tuple[Entry, str]] = field(default_factory=list)  # (entry, why it goes)
    kept_busy: list[tuple[Entry, str, str]] = field(default_factory=list)  # (entry, why chosen, why kept)
    size_before: int = 0

    @property
    def freed(self) -> int:
        return sum(e.size for e, _ in self.remove)


def select(entries: list[Entry], busy: Busy, now: float | None = None, older_than_days: float | None = None,
           max_size: int | None = None, failed: bool = False) -> PrunePlan:
    """The entries to remove, and the chosen ones kept because `busy(entry)` gave a reason."""
    if older_than_days is None and max_size is None and not failed:
        raise ValueError("prune needs at least one of --older-than DAYS, --max-size SIZE, --failed")
    if older_than_days is not None and older_than_days < 0:
        raise ValueError(f"--older-than is {older_than_days}; must be >= 0 days")
    if max_size is not None and max_size < 0:
        raise ValueError(f"--max-size is {max_size} bytes; must be >= 0")
    now = time.time() if now is None else now
    plan = PrunePlan(size_before=sum(e.size for e in entries))
    chosen: set[str] = set()

    def take(entry: Entry, why: str) -> bool:
        reason = busy(entry)
        if reason:
            plan.kept_busy.append((entry, why, reason))
            return False
        plan.remove.append((entry, why))
        chosen.add(entry.key)
        return True

    for entry in entries:
        if failed and entry.status == FAILED:
            take(entry, "failed")
        elif older_than_days is not None and now - entry.mtime > older_than_days * 86400:
            take(entry, f"not written for {older_than_days:g} days")
    if max_size is not None:
        rest = sorted((e for e in entries if e.key not in chosen), key=lambda e: (e.mtime, e.key))
        total = sum(e.size for e in rest)
        for entry in rest:  # oldest first
            if total <= max_size:
                break
            if take(entry, f"over --max-size {format_size(max_size)} (oldest first)"):
                total -= entry.size
    return plan


def apply(cache: LocalCache, plan: PrunePlan, log: Callable[[str], None] = print) -> tuple[int, int]:
    """Remove the planned entries, re-checking each under its lock; (entries removed, bytes freed)."""
    removed = freed = 0
    for entry, _ in plan.remove:
        with cache.entry_lock(entry.version, entry.module, blocking=False) as acquired:
            current = cache.entry(entry.version, entry.module) if acquired else None
            why = "another bmojo-neuron process holds its lock" if not acquired else None
            if acquired and current is not None:
                why = cache.busy_reason(current, check_lock=False)
                if not why and current.signature() != entry.signature():
                    why = "changed since it was listed"
            if why:
                log(f"kept {entry.key}: {why}")
                continue
            if current is None:
                continue  # removed by someone else meanwhile
            cache.remove(current)
        removed += 1
        freed += entry.size
    return removed, freed
