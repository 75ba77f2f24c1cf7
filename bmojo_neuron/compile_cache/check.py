"""Did a compile run leave a complete cache? Entries it touched, entries its log names, their states.

`bmojo-neuron precompile` snapshots the cache before `neuron_parallel_compile`
runs and compares afterwards: an entry is *touched* when it is new or any of its
files changed. A warm cache is touched by nothing, so the entries named in the
tool's log ("Using a cached neff at .../MODULE_x/model.neff", "Extracting graphs
(.../MODULE_x/model.hlo_module.pb)") count as well.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable

from bmojo_neuron.compile_cache.layout import OK, Entry

ENTRY_IN_TEXT = re.compile(r"(neuronxcc-[^/\s'\"]+)/(MODULE_[^/\s'\"]+)")


def snapshot(entries: Iterable[Entry]) -> dict[str, frozenset]:
    return {e.key: e.signature() for e in entries}


def keys_in_text(text: str) -> list[str]:
    """``version/module`` keys of the cache entries a log line mentions."""
    return [f"{v}/{m}" for v, m in ENTRY_IN_TEXT.findall(text)]


@dataclass
class RunCheck:
    new: list[Entry] = field(default_factory=list)
    changed: list[Entry] = field(default_factory=list)
    mentioned: list[Entry] = field(default_factory=list)  # named in the log, untouched (cache hits)
    missing: list[str] = field(default_factory=list)  # named in the log, not in this cache

    @property
    def checked(self) -> list[Entry]:
        return self.new + self.changed + self.mentioned

    @property
    def bad(self) -> list[Entry]:
        return [e for e in self.checked if e.status != OK]

    @property
    def ok(self) -> bool:
        return bool(self.checked) and not self.bad


def check_run(before: dict[str, frozenset], after: Iterable[Entry], mentioned: Iterable[str]) -> RunCheck:
    """Classify the entries after a run against the snapshot taken before it."""
    result = RunCheck()
    by_key = {e.key: e for e in after}
    for key, entry in by_key.items():
        if key not in before:
            result.new.append(entry)
        elif before[key] != entry.signature():
            result.changed.append(entry)
    touched = {e.key for e in result.new + result.changed}
    for key in dict.fromkeys(mentioned):  # unique, in order
        if key in touched:
            continue
        if key in by_key:
            result.mentioned.append(by_key[key])
        else:
            result.missing.append(key)
    return result
