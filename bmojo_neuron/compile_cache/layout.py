"""The Neuron persistent compile cache as a tree of entries, and what state an entry is in.

libneuronxla (the compiler wrapper behind torch-neuronx) keeps one folder per
compiled graph::

    <cache>/neuronxcc-<compiler version>/MODULE_<graph hash>+<flags hash>/
        model.hlo_module.pb   the extracted HLO graph (model.hlo.pb on old compilers)
        compile_flags.json    the compiler flags (compile_flags.txt on old compilers)
        model.neff            the compiled graph
        model.done            empty marker written after a successful compile
        model.log             the compiler log, kept when a compile failed
        *.lock                held while a compile runs; left behind by a killed one

docs/compile-cache.md lists the sources and which parts are assumptions. This
module only interprets file names; `local` and `s3` list the files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

VERSION_PREFIX = "neuronxcc-"
MODULE_PREFIX = "MODULE_"
NEFF = "model.neff"
DONE = "model.done"
LOG = "model.log"
HLO_NAMES = ("model.hlo_module.pb", "model.hlo_module.pb.gz", "model.hlo.pb")
LOCK_SUFFIX = ".lock"
# Our own completion marker for entries published to S3 (see sync.py); never written locally.
MARKER = ".bmojo-complete"

OK = "ok"
FAILED = "failed"
INCOMPLETE = "incomplete"
STATUSES = (OK, FAILED, INCOMPLETE)


@dataclass(frozen=True)
class CacheFile:
    """One file of an entry: its path relative to the entry, size in bytes, mtime (seconds since the epoch)."""

    name: str
    size: int
    mtime: float


@dataclass
class Entry:
    """One compiled (or extracted, or failed) graph: ``<version>/<module>`` and its files."""

    version: str  # the folder name, e.g. "neuronxcc-2.23.6484.0+abcdef12"
    module: str  # "MODULE_<graph hash>+<flags hash>"
    location: str  # a local path or an s3:// URL of the entry folder
    files: dict[str, CacheFile] = field(default_factory=dict)
    folder_mtime: float = 0.0  # the entry folder's own mtime where known (local caches)

    @property
    def key(self) -> str:
        return f"{self.version}/{self.module}"

    @property
    def compiler_version(self) -> str:
        return self.version[len(VERSION_PREFIX):]

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files.values())

    @property
    def mtime(self) -> float:
        """When the entry was last written: the newest mtime of its files (of its folder when it has none)."""
        return max((f.mtime for f in self.files.values()), default=self.folder_mtime)

    @property
    def locks(self) -> list[CacheFile]:
        return [f for f in self.files.values() if f.name.endswith(LOCK_SUFFIX)]

    @property
    def published(self) -> bool:
        """True when our S3 completion marker is among the files (remote entries only)."""
        return MARKER in self.files

    @property
    def status(self) -> str:
        return classify(self.files)[0]

    @property
    def detail(self) -> str:
        return classify(self.files)[1]

    def signature(self) -> frozenset[tuple[str, int, float]]:
        """Changes whenever a file is added, removed, resized or rewritten."""
        return frozenset((f.name, f.size, f.mtime) for f in self.files.values())


def classify(names: Iterable[str]) -> tuple[str, str]:
    """(status, why) of an entry holding the files `names`.

    ok: a NEFF and ``model.done`` (the compiler wrapper writes ``model.done`` last).
    failed: ``model.log`` without ``model.done`` (libneuronxla keeps the log of a failed
    compile and then serves the failure from the cache until it is retried or removed).
    incomplete: anything else — a lock (compile running, or killed), a NEFF without
    ``model.done`` (interrupted write), or an HLO that was extracted but never compiled.
    """
    names = set(names)
    if NEFF in names and DONE in names:
        return OK, ""
    if LOG in names:
        return FAILED, f"compile error, see {LOG}"
    if any(n.endswith(LOCK_SUFFIX) for n in names):
        return INCOMPLETE, "lock file: a compile is running, or was killed"
    if NEFF in names:
        return INCOMPLETE, f"{NEFF} without {DONE}: interrupted write"
    if names & set(HLO_NAMES):
        return INCOMPLETE, "HLO extracted, not compiled"
    return INCOMPLETE, "no graph files"


def is_version_name(name: str) -> bool:
    return name.startswith(VERSION_PREFIX) and len(name) > len(VERSION_PREFIX)


def is_module_name(name: str) -> bool:
    return name.startswith(MODULE_PREFIX) and len(name) > len(MODULE_PREFIX)


def split_entry_path(relpath: str) -> tuple[str, str, str] | None:
    """``"neuronxcc-V/MODULE_M/name"`` -> (version, module, name); None for anything else."""
    parts = relpath.split("/", 2)
    if len(parts) < 2 or not is_version_name(parts[0]) or not is_module_name(parts[1]):
        return None
    return parts[0], parts[1], parts[2] if len(parts) == 3 else ""


def group_entries(files: Iterable[tuple[str, int, float]], location_of) -> list[Entry]:
    """Entries from a flat listing of ``(path relative to the cache root, size, mtime)``.

    Paths outside the ``neuronxcc-*/MODULE_*/`` layout (our staging area, other tools'
    folders) are ignored. A path ending in ``/`` with no name stands for an empty entry
    folder; its mtime is the folder's. `location_of(version, module)` gives each entry's location.
    """
    entries: dict[tuple[str, str], Entry] = {}
    for relpath, size, mtime in files:
        split = split_entry_path(relpath)
        if split is None:
            continue
        version, module, name = split
        entry = entries.get((version, module))
        if entry is None:
            entry = entries[(version, module)] = Entry(version, module, location_of(version, module))
        if name:
            entry.files[name] = CacheFile(name, int(size), float(mtime))
        else:
            entry.folder_mtime = max(entry.folder_mtime, float(mtime))
    return sorted(entries.values(), key=lambda e: (e.version, e.module))


def totals(entries: Iterable[Entry]) -> dict[str, int]:
    """Entry counts per status, the entry count and the total size in bytes."""
    out = {status: 0 for status in STATUSES}
    out["entries"] = out["bytes"] = 0
    for entry in entries:
        out[entry.status] += 1
        out["entries"] += 1
        out["bytes"] += entry.size
    return out
