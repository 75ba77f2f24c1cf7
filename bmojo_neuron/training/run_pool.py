"""Train the independent runs of a suite several at a time, each in its own process (``run.jobs``).

A CPU run of a small model keeps one core busy (the CPU recipes use one thread: their
ops are too small to gain from more), so on a machine with more cores the runs of a
suite or comparison can share the machine instead of queueing. Each run is seeded and
trains alone in its process, so its numbers are those it would have had one after
another (`tests/test_training.py` checks it).

Output: a worker prints plain log lines, each starting with its run's name
(``progress="shared"``), never a live bar, since several bars would overwrite each other. Signals: workers run in their own
process group, so a Ctrl-C reaches only this process, which passes SIGINT or SIGTERM on
to every running worker; each then stops at its next step boundary with a checkpoint,
and runs not yet started are not started. A worker that fails stops the others the
same way, and its error is raised here once they have stopped. A worker is signalled
only once it has said it is ready (its own handlers hold the signal until its trainer
takes it); one still starting gets the signal when it says so, so no run is killed
half-started. A second signal ends every worker at once and then this process, as a
second signal ends a single run (`signals.stop_on_signals`); the checkpoints already
published stay intact, since each is published whole or not at all.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import pickle
import signal
import traceback
from collections.abc import Iterator
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

from .signals import STOP_SIGNALS, hold_stop_signals
from .trainer import TrainResult, train


# A fresh interpreter per worker: a fork would inherit this process's torch thread pools (libgomp's does not
# survive fork() of a process that used it). Tests that only check the pool's bookkeeping may fork workers from
# a preloaded fork server instead (tests/rank_processes.py).
START_METHOD = "spawn"


class RunFailed(RuntimeError):
    """A worker's run raised; the message holds its name and traceback.

    `error` is the worker's exception itself when it survives pickling, so the command can word a
    user's error (bad input, a diverged run, a full disk) in one line, as it does for a single run.
    """

    def __init__(self, message: str, run_name: str | None = None, error: BaseException | None = None) -> None:
        super().__init__(message)
        self.run_name = run_name
        self.error = error


def train_in_processes(runs: list[tuple[Any, Path]], jobs: int, resume: bool = False,
                       signals: list[int] | None = None) -> list[TrainResult]:
    """Train every ``(recipe, run dir)`` with at most `jobs` at once; results in the order of `runs`.

    When a signal or a failure stops the pool, the results of runs that never started
    are missing (runs start in order, so the list is a shorter prefix); the stopped runs'
    results carry ``stop_signal``. `signals`, when given, receives the signals the pool
    passed on: a signal that came as the last running runs finished stopped no run but
    still kept the rest from starting.
    """
    context = multiprocessing.get_context(START_METHOD)
    results: dict[int, TrainResult] = {}
    waiting = list(enumerate(runs))
    active: dict[int, tuple[Any, Connection]] = {}  # index -> (process, its end of the result pipe)
    listening: dict[int, tuple[Any, Connection]] = {}  # the active workers whose signal handlers are set
    failure: RunFailed | None = None
    with _pass_signals_to(listening, active, signals) as stopping:
        while active or (waiting and not stopping and failure is None):
            while waiting and len(active) < jobs and not stopping and failure is None:
                index, (recipe, run_dir) = waiting.pop(0)
                ours, theirs = context.Pipe(duplex=False)
                process = context.Process(target=_worker, args=(recipe, str(run_dir), resume, theirs),
                                          name=f"train {recipe.run.name}", daemon=False)
                process.start()
                theirs.close()
                active[index] = (process, ours)
            ready = wait([conn for _, conn in active.values()] + [p.sentinel for p, _ in active.values()])
            for index, (process, conn) in list(active.items()):
                if conn not in ready and process.sentinel not in ready:
                    continue
                message = _receive(conn)
                if message is not None and message[0] == "ready":
                    listening[index] = active[index]
                    if stopping or failure is not None:  # what it missed while starting
                        _signal_all({index: active[index]}, stopping[-1] if stopping else signal.SIGTERM)
                    continue
                if message is None and process.is_alive():
                    continue  # the pipe closed as the process exits: its sentinel follows
                process.join()
                del active[index]
                listening.pop(index, None)
                name = runs[index][0].run.name
                kind, payload = message or ("error", (name, f"{name}: worker ended with exit code "
                                                     f"{process.exitcode} and no result", None))
                if kind == "result":
                    results[index] = payload
                elif failure is None:
                    failure = RunFailed(payload[1], payload[0], payload[2])
                    _signal_all(listening, signal.SIGTERM)
    if failure is not None:
        raise failure
    return [results[i] for i in sorted(results)]


def _receive(conn: Connection) -> tuple[str, Any] | None:
    """The worker's ``(kind, payload)`` if it sent one, else None (nothing yet, or it died)."""
    try:
        return conn.recv() if conn.poll() else None
    except (EOFError, OSError):
        return None


def _worker(recipe: Any, run_dir: str, resume: bool, conn: Connection) -> None:
    os.setpgrp()  # terminal signals go to the parent, which passes them on
    hold_stop_signals()
    conn.send(("ready", None))
    try:
        result = train(recipe, run_dir, resume=resume, progress="shared")
        conn.send(("result", result))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which raises it
        text = f"{recipe.run.name}: {type(exc).__name__}: {exc}\n{traceback.format_exc()}"
        conn.send(("error", (recipe.run.name, text, _picklable(exc))))
    finally:
        conn.close()


def _picklable(exc: BaseException) -> BaseException | None:
    """`exc` when it crosses the pipe intact (its type and message), else None."""
    try:
        copy = pickle.loads(pickle.dumps(exc))
    except Exception:  # noqa: BLE001 - an exception that does not pickle is reported by its text alone
        return None
    return copy if type(copy) is type(exc) and str(copy) == str(exc) else None


def _signal_all(active: dict[int, tuple[Any, Connection]], signum: int) -> None:
    for process, _ in active.values():
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signum)


@contextlib.contextmanager
def _pass_signals_to(listening: dict[int, tuple[Any, Connection]], active: dict[int, tuple[Any, Connection]],
                     received: list[int] | None = None) -> Iterator[list[int]]:
    """While the pool runs, SIGTERM / SIGINT go on to every listening worker; the yielded list (`received`
    when given) records them.

    The second one ends every active worker with SIGKILL, then this process with that signal's
    default action. Passing the signal on would not do: a worker still starting holds what it
    receives until its trainer takes it, and two signals that reach a process close together
    run its Python handler once, so such a worker would only stop at its next step boundary.
    """
    received = [] if received is None else received
    previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}

    def handle(signum: int, _frame: Any) -> None:
        received.append(signum)
        if len(received) == 1:
            _signal_all(listening, signum)
            return
        _signal_all(active, signal.SIGKILL)
        for process, _ in active.values():
            process.join(timeout=10)
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    for signum in STOP_SIGNALS:
        signal.signal(signum, handle)
    try:
        yield received
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
