"""SIGTERM and SIGINT end a training run at a step boundary with a checkpoint, instead of losing it.

Schedulers stop jobs with SIGTERM and then, after a grace period, SIGKILL: Slurm's
``scancel`` and preemption, Kubernetes deleting a pod, torchrun passing on its own
SIGTERM to every worker. Ctrl-C sends SIGINT. While `stop_on_signals` is active the
first of either asks the trainer to stop (`Trainer.request_stop`): the current step
finishes, a checkpoint is written and the run returns early, and the command exits
with the signal's conventional status (128 + signal number: 143, 130). A second
signal exits at once, with the default action of that signal; the last published
checkpoint is intact either way (checkpoints are published atomically).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Any, Iterator

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

_held: list[int] = []  # signals received while held, before `stop_on_signals` took over


def hold_stop_signals() -> None:
    """Until `stop_on_signals` takes over, remember SIGTERM / SIGINT instead of dying of them.

    A process that is still starting (importing torch, building data) when it is asked to
    stop then stops like one already training: at its first step boundary, with a
    checkpoint, so a run's directory never depends on how far start-up had got.
    """
    for signum in STOP_SIGNALS:
        signal.signal(signum, _hold)


def _hold(signum: int, _frame: Any) -> None:
    """Remember the first signal; a second one exits at once, as it does while training."""
    if _held:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    _held.append(signum)


@contextlib.contextmanager
def holding_stop_signals() -> Iterator[list[int]]:
    """`hold_stop_signals` for the block (the handlers found are restored after it), from the main thread.

    The train command holds them around its runs, so a signal between two runs or after the last
    one is not the default action's sudden death: it yields the list of held signals, which the
    next run's trainer takes (`stop_on_signals`), or which the command reads with `pending_signal`.
    """
    if threading.current_thread() is not threading.main_thread():
        yield _held
        return
    previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    hold_stop_signals()
    try:
        yield _held
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _held.clear()


def pending_signal() -> int | None:
    """The signal held and not yet taken by a trainer, if any."""
    return _held[0] if _held else None


@contextlib.contextmanager
def stop_on_signals(trainer: Any, announce: bool = True, prefix: str = "") -> Iterator[None]:
    """Route SIGTERM / SIGINT to ``trainer.request_stop()`` for the duration of the block.

    With `announce`, the first signal is acknowledged in a line that starts with `prefix` (the run's
    name where several runs share the output).

    Signal handlers can only be set from the main thread; elsewhere (a trainer driven
    from a worker thread) the block runs with the handlers it found.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}

    def handle(signum: int, _frame: Any) -> None:
        if trainer.stop_signal is not None:  # the second one: leave now
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        trainer.stop_signal = signum
        trainer.request_stop()
        if announce:
            what = getattr(trainer, "stop_notice", None) or "finishing this step, then writing a checkpoint"
            print(f"\n{prefix}received {signal.Signals(signum).name}: {what} (send it again to exit at once)",
                  file=sys.stderr, flush=True)

    for signum in STOP_SIGNALS:
        signal.signal(signum, handle)
    while _held:  # what arrived while held counts as if it arrived now, in order
        handle(_held.pop(0), None)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def signal_name(signum: int | None) -> str:
    """``SIGTERM`` / ``SIGINT`` (``a signal`` when none is known)."""
    return signal.Signals(signum).name if signum is not None else "a signal"


def exit_status(signum: int) -> int:
    """The shell's status for a process ended by `signum` (SIGTERM 143, SIGINT 130)."""
    return 128 + signum
