"""Plain progress lines while a text cache is built, for output that no live bar can redraw (a log, a pipe).

Building the cache of a large corpus takes minutes (tokenize, pack, save). On a terminal the `datasets`
library's bars show it; in a log file each redraw of a bar would be another line of carriage returns, so the
bars are off there (`text.library_progress_bars`) and this prints plain lines instead: one as each stage
starts, and within the batched stages at most one every `BuildProgress.every` seconds, as `train` prints one
plain line per ``train.log_every`` steps in a log.
"""

from __future__ import annotations

import sys
import time
from typing import Callable

EVERY_SECONDS = 10.0  # at most one count line per stage this often: a log a person reads, not a trace


class BuildProgress:
    """Says each stage of a cache build as it starts and, within a stage of counted units, how far it is at most
    every `every` seconds; `say` gets each line (the command adds its prefix and picks the stream)."""

    def __init__(self, say: Callable[[str], None], every: float = EVERY_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.say = say
        self.every = every
        self.clock = clock
        self.started = self.last = clock()
        self.total, self.done, self.unit = 0, 0, ""

    def stage(self, line: str, total: int = 0, unit: str = "") -> None:
        """A stage starts: `line` now; `advance` then counts its `total` `unit` (0: nothing to count)."""
        self.total, self.done, self.unit = total, 0, unit
        self.last = self.clock()
        self.say(line)

    def advance(self, count: int) -> None:
        """`count` more units of the stage are done: a line when `every` seconds passed since the stage's last."""
        self.done = min(self.total, self.done + count)
        now = self.clock()
        if self.total and self.done < self.total and now - self.last >= self.every:
            self.last = now
            self.say(f"  {self.done:,} of {self.total:,} {self.unit} ({100 * self.done / self.total:.0f}%), "
                     f"{now - self.started:.0f}s in")

    def finish(self, line: str) -> None:
        """The build is done: `line` and the seconds it took."""
        self.say(f"{line} in {self.clock() - self.started:.1f}s")


def stderr_lines(prefix: str) -> Callable[[str], None]:
    """A `say` for `BuildProgress` that prints each line on stderr after `prefix`, at once (a log shows it as it
    happens)."""
    return lambda line: print(f"{prefix}{line}", file=sys.stderr, flush=True)
