"""A reader that closes our stdout early (``cmd | head -1``) ends a command quietly.

Python turns the closed pipe into a BrokenPipeError at the next write or at the exit
flush, with a traceback. A command line tool should instead stop at once and exit as
a shell reports a tool that SIGPIPE ended (141), without printing anything more: the
`bmojo-neuron` CLI and every ``python -m bmojo_neuron...`` entry point that prints
go through `exit_status_on_closed_stdout`.
"""

from __future__ import annotations

import io
import os
import stat
import sys
from collections.abc import Callable

__all__ = ["SIGPIPE_STATUS", "exit_status_on_closed_stdout"]

SIGPIPE_STATUS = 128 + 13  # what a shell reports for a process that SIGPIPE ended


def exit_status_on_closed_stdout(run: Callable[[], int | None]) -> int:
    """`run()`'s exit status (None counts as 0), or `SIGPIPE_STATUS` when its reader closed stdout.

    A BrokenPipeError from another pipe (a subprocess, a socket) is a real error and is raised.
    """
    try:
        try:
            return run() or 0
        finally:  # a SystemExit included: a closed pipe shows here, not in the interpreter's exit flush
            sys.stdout.flush()
    except BrokenPipeError:
        if not _stdout_is_pipe():
            raise
        _discard_stdout()
        return SIGPIPE_STATUS


def _stdout_is_pipe() -> bool:
    try:
        mode = os.fstat(sys.stdout.fileno()).st_mode
    except (OSError, ValueError, io.UnsupportedOperation):
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


def _discard_stdout() -> None:
    """Point stdout at /dev/null, so that nothing flushed later (at exit) meets the closed pipe again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, io.UnsupportedOperation):  # a stdout without a file descriptor: nothing flushes
        pass
