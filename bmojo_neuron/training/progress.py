"""Progress output of a run: a live tqdm bar on a terminal, plain log lines when output is redirected."""

from __future__ import annotations

import math
import os
import sys
import time

from tqdm.auto import tqdm


class Progress:
    """A live tqdm bar (loss, tokens/s, ETA) on a terminal; plain log lines when output is redirected.

    ``enabled="lines"``: plain log lines even on a terminal (``train --no-progress``). ``"shared"``: the
    same for runs sharing one output (`run_pool`), where every line starts with the run's name, so
    interleaved runs can be told apart (the step lines always do).
    """

    def __init__(self, name: str, total: int, initial: int, enabled: bool | str = True) -> None:
        self.name, self.total, self.enabled = name, total, enabled
        self.prefix = run_prefix(name, enabled)
        self.live = shows_live_bar(enabled)
        self.start_step, self.start_time = initial, time.perf_counter()
        width = {"dynamic_ncols": True} if _stderr_columns() > 0 else {"ncols": 100, "nrows": 30}  # sizeless pty
        self.bar = tqdm(total=total, initial=initial, unit="step", desc=name, disable=not self.live, **width)

    def update(self) -> None:
        self.bar.update(1)

    def show(self, step: int, loss: float, tokens_per_s: float) -> None:
        if self.live:
            self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
        elif self.enabled:
            per_step = (time.perf_counter() - self.start_time) / max(1, step - self.start_step)
            eta = format_seconds(per_step * (self.total - step))
            print(f"{self.name} step {step}/{self.total}  loss {loss:.4f}  {tokens_per_s:,.0f} tok/s  "
                  f"eta {eta}", flush=True)

    def write(self, text: str) -> None:
        if self.enabled:
            tqdm.write(text) if self.live else print(self.prefix + text, flush=True)

    def close(self) -> None:
        self.bar.close()


def shows_live_bar(progress: bool | str) -> bool:
    """Whether a run with this `progress` setting (`Progress`'s ``enabled``) draws a live bar: asked for, and
    stderr a terminal. Without one the data libraries' bars are off too (`library_progress_bars`): in a log file
    or a pipe each of their redraws would be another line."""
    return progress is True and sys.stderr.isatty()


def run_prefix(name: str, progress: bool | str) -> str:
    """What starts each line a run prints: its name when several runs share the output (``"shared"``)."""
    return f"{name}: " if progress == "shared" else ""


def _stderr_columns() -> int:
    try:
        return os.get_terminal_size(sys.stderr.fileno()).columns
    except (OSError, ValueError):
        return 0


def format_seconds(seconds: float) -> str:
    minutes, secs = divmod(int(math.ceil(seconds)), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"
