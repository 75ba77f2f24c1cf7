"""Timing and memory measurement shared by the benchmark suites.

Method (also in ``docs/benchmarks.md``):

* **Probe (time cap).** Before a candidate is timed at a size, one unit of its work
  (a training step, a layer forward+backward, a prefill plus one decoded token)
  runs in a separate process with a deadline of ``cap_seconds``; a probe that
  misses it is killed and the candidate is reported ``"status": "capped"`` at that
  size and every larger one, instead of hanging the suite. Probe processes are
  forked from a multiprocessing *fork server* that imported torch but never
  computed (libgomp's thread pool does not survive ``fork()`` of a process that
  used it), so they run with the same thread count as the timing process.
* **Peak memory.** The probe runs the unit a second time (when the first run took
  at most half the cap) and reports the peak *additional* memory of that warm run
  over what was resident just before it (weights, data, optimizer state; lazy
  imports and first-call set-up excluded). CPU: glibc's ``M_MMAP_THRESHOLD`` is
  pinned to 64 KiB in the probe (every large block is a fresh ``mmap``, returned
  on ``free``), ``/proc/self/clear_refs`` = 5 resets the kernel's peak-RSS counter,
  and the number is ``VmHWM - VmRSS(before)``. CUDA:
  ``torch.cuda.max_memory_allocated() - memory_allocated()``.
* **Timing.** In the main process all candidates of a cell run *alternating*
  (round-robin: A B C A B C ...), first ``warmup`` rounds untimed, then ``repeats``
  timed rounds; the reported time is the median. Alternating spreads machine noise
  evenly over the candidates, so ratios measured in one run are much steadier
  than absolute times.
"""

from __future__ import annotations

import datetime as _dt
import importlib
import json
import math
import multiprocessing as mp
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from bmojo_neuron.bench.library_notes import keeping_library_warnings
from bmojo_neuron.host_allocator import return_freed_memory

SCHEMA = "bmojo-neuron-bench/1"
OK, CAPPED, ERROR, SKIPPED = "ok", "capped", "error", "skipped"

MEMORY_METHOD_CPU = (
    "peak additional RSS of one warm unit of work in a probe process: glibc M_MMAP_THRESHOLD pinned to 64 KiB, "
    "/proc/self/clear_refs=5 resets VmHWM, peak = VmHWM - VmRSS(before the unit)"
)
MEMORY_METHOD_CUDA = "torch.cuda.max_memory_allocated() - memory_allocated() around one warm unit, in a probe process"


# ----------------------------------------------------------------------------- machine
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def machine_info(device: str) -> dict[str, Any]:
    """Where the numbers came from: CPU, cores, threads, versions, load."""
    from importlib.metadata import PackageNotFoundError, version

    def ver(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    info: dict[str, Any] = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": ver("transformers"),
        "bmojo_neuron": ver("bmojo-neuron"),
        "device": device,
        "load_average_start": load_average(),
    }
    try:
        info["affinity_cores"] = len(os.sched_getaffinity(0))
    except AttributeError:
        info["affinity_cores"] = None
    try:
        with open("/proc/meminfo") as f:
            info["memory_total_bytes"] = int(f.readline().split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        info["memory_total_bytes"] = None
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# ----------------------------------------------------------------------------- memory
def _proc_status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def cpu_memory_supported() -> bool:
    return os.path.exists("/proc/self/clear_refs") and os.path.exists("/proc/self/status")


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------- probe
# Modules the fork server imports once, so each probe process starts in milliseconds.
PRELOAD = [
    "torch", "transformers", "bmojo_neuron", "bmojo_neuron.bench.suites",
    "transformers.models.mamba.modeling_mamba", "transformers.models.mamba2.modeling_mamba2",
    "transformers.models.mistral.modeling_mistral",
]
_context: Any = None


def probe_context():
    """The multiprocessing ``forkserver`` context (None where there is none, e.g. Windows)."""
    global _context
    if _context is None:
        if "forkserver" not in mp.get_all_start_methods():
            return None
        _context = mp.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
    return _context


@dataclass
class Probe:
    """Outcome of running one unit of work under a deadline, in a fresh process."""

    status: str  # ok | capped | error
    seconds: float | None = None
    peak_memory_bytes: int | None = None
    memory_warm: bool | None = None  # peak from a second (warm) run, not the cold first one
    error: str | None = None
    info: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # the libraries' warnings in the probe (`library_notes`)


def _load(builder: str) -> Callable:
    module, name = builder.split(":")
    return getattr(importlib.import_module(module), name)


def _measure(unit, device: str) -> tuple[float, int | None]:
    """Seconds and peak additional memory of one `unit.run()`."""
    return measure_call(unit.run, device)


def measure_call(fn: Callable[[], Any], device: str) -> tuple[float, int | None]:
    """Seconds and peak additional memory of one call of `fn` (see the module docstring for the method).

    A unit whose set-up is itself worth measuring (decode's prefill) calls this while it is built.
    """
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return time.perf_counter() - t0, int(torch.cuda.max_memory_allocated() - base)
    # The baseline is read after the reset: the peak counter then covers every RSS from that reading on, so the
    # difference is never negative (memory freed in between would otherwise lower the peak below the baseline).
    reset = _reset_peak_rss()
    rss0 = _proc_status_kb("VmRSS")
    t0 = time.perf_counter()
    fn()
    seconds = time.perf_counter() - t0
    hwm = _proc_status_kb("VmHWM")
    peak = (hwm - rss0) * 1024 if (reset and hwm is not None and rss0 is not None) else None
    return seconds, peak


def _probe_child(builder: str, spec: dict[str, Any], threads: int, cap_seconds: float, conn) -> None:
    """Probe process: build the unit, run it once (the parent enforces the cap), run it again for memory; the
    libraries' warnings go to the parent with the result, not to the terminal the suite prints its table on."""
    with keeping_library_warnings() as notes:
        _probe_unit(builder, spec, threads, cap_seconds, conn, notes)


def _probe_unit(builder: str, spec: dict[str, Any], threads: int, cap_seconds: float, conn, notes: list[str]) -> None:
    try:
        torch.set_num_threads(threads)
        device = spec.get("device", "cpu")
        if not device.startswith("cuda"):
            return_freed_memory()  # honest RSS peaks (`host_allocator`)
        unit = _load(builder)(spec)
        conn.send({"event": "built"})
        seconds, peak = _measure(unit, device)
        conn.send({"event": "first", "seconds": seconds})
        warm = False
        if seconds <= cap_seconds / 2:  # steady-state memory: lazy imports and first-call set-up excluded
            _, peak = _measure(unit, device)
            warm = True
        info = unit.info() if hasattr(unit, "info") else {}
        conn.send({"event": "done", "seconds": seconds, "peak": peak, "warm": warm, "info": info, "notes": notes})
    except BaseException as exc:  # noqa: BLE001 - report everything to the parent
        conn.send({"event": "error", "error": f"{type(exc).__name__}: {exc}",
                   "trace": traceback.format_exc(limit=6), "notes": notes})
    finally:
        conn.close()


def probe(builder: str, spec: dict[str, Any], cap_seconds: float, build_seconds: float = 120.0,
          isolate: bool = True) -> Probe:
    """Run the unit `builder(spec)` once under a deadline; measure its time and peak memory.

    `builder` is ``"module:function"``; the function takes the spec and returns an
    object with ``run()`` (one unit of work) and optionally ``info()`` (a dict of
    JSON numbers). Building it (set-up that is not the unit of work, e.g. decode's
    prefill) may take `build_seconds` (plus the cap); the cap applies to the unit. With ``isolate`` the unit runs in a process forked from a
    clean fork server (same thread count as here), killed if its first run takes
    longer than `cap_seconds`. Without it (or without a fork server) it runs here:
    it cannot be abandoned, is reported capped afterwards if over the cap, and
    CPU memory is not measured.
    """
    ctx = probe_context() if isolate else None
    if ctx is None:
        return _probe_inline(builder, spec, cap_seconds)
    parent_conn, child_conn = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_probe_child, args=(builder, spec, torch.get_num_threads(), cap_seconds, child_conn),
                          daemon=True)
    process.start()
    child_conn.close()
    result = Probe(ERROR, error="the probe process ended without a result")
    first: float | None = None
    built = False
    deadline = time.monotonic() + build_seconds + cap_seconds
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not parent_conn.poll(left):
                if not built:
                    result = Probe(CAPPED, error="setting up the unit did not finish within "
                                                 f"{build_seconds + cap_seconds:g} s")
                elif first is None:
                    result = Probe(CAPPED, error=f"one unit did not finish within the cap of {cap_seconds:g} s")
                else:  # the memory run overran: keep the first run's numbers
                    result = Probe(OK, first, None, None, error="memory run abandoned")
                break
            try:
                message = parent_conn.recv()
            except EOFError:
                break
            event = message.get("event")
            if event == "built":
                built = True
                deadline = time.monotonic() + cap_seconds
            elif event == "first":
                first = float(message["seconds"])
                deadline = time.monotonic() + 2 * first + 30
            elif event == "done":
                seconds = float(message["seconds"])
                result = Probe(CAPPED if seconds > cap_seconds else OK, seconds, message.get("peak"),
                               message.get("warm"), info=message.get("info") or {}, notes=message.get("notes") or [])
                break
            elif event == "error":
                result = Probe(ERROR, error=message.get("error"), info={"trace": message.get("trace")},
                               notes=message.get("notes") or [])
                break
    finally:
        if process.is_alive():
            process.kill()
        process.join(10)
        parent_conn.close()
    return result


def _probe_inline(builder: str, spec: dict[str, Any], cap_seconds: float) -> Probe:
    device = spec.get("device", "cpu")
    try:
        unit = _load(builder)(spec)
        if device.startswith("cuda"):
            seconds, peak = _measure(unit, device)
        else:
            t0 = time.perf_counter()
            unit.run()
            seconds, peak = time.perf_counter() - t0, None
        info = unit.info() if hasattr(unit, "info") else {}
    except Exception as exc:  # a candidate that fails must not stop the others
        return Probe(ERROR, error=f"{type(exc).__name__}: {exc}")
    return Probe(CAPPED if seconds > cap_seconds else OK, seconds, peak, False, info=info)


# ----------------------------------------------------------------------------- background load
# Spins until its parent is gone, so a killed benchmark leaves no load behind. Polling alone misses a parent
# killed while the loop is stopped (SIGSTOP, a quiet run): a stopped loop polls nothing and stays stopped until
# something continues it. On Linux the kernel therefore kills it with its parent (PR_SET_PDEATHSIG = 1, SIGKILL,
# which also ends a stopped process; the parent's main thread starts it); the poll still covers a parent that
# died before the request.
BUSY_LOOP = """
import ctypes, os, signal, sys
parent = os.getppid()
if sys.platform.startswith("linux"):
    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)
print("ready", flush=True)
while os.getppid() == parent:
    for _ in range(1_000_000):
        pass
"""


class BusyLoad:
    """A fixed background load: one single-threaded busy loop pinned to one core (`bench --busy`).

    It stands in for a neighbour on a shared machine (a CI runner, a colleague's job).
    It is a separate interpreter, not a fork of this process (libgomp), pinned to the
    last core this process may use, and it lives only inside the ``with`` block.
    `paused()` stops it (SIGSTOP) around one unit of work, so quiet and busy times can
    be measured alternating in one run.
    """

    def __init__(self) -> None:
        self.process: subprocess.Popen | None = None
        self.core: int | None = None

    def __enter__(self) -> BusyLoad:
        self.process = subprocess.Popen([sys.executable, "-c", BUSY_LOOP], stdin=subprocess.DEVNULL,
                                        stdout=subprocess.PIPE, text=True)
        self.process.stdout.readline()  # the loop has started (and asked to die with this process): time from here
        self.process.stdout.close()
        try:
            self.core = max(os.sched_getaffinity(0))
            os.sched_setaffinity(self.process.pid, {self.core})
        except (AttributeError, OSError):  # no affinity control here: the loop still takes one core's worth
            self.core = None
        return self

    def __exit__(self, *exc) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGCONT)
            self.process.kill()
            self.process.wait(10)
            self.process = None

    def describe(self) -> dict[str, Any]:
        return {"kind": "one single-threaded Python busy loop", "pinned_core": self.core,
                "pid": self.process.pid if self.process else None}

    def paused(self, work: Callable[[], Any]) -> Callable[[], Any]:
        """`work` wrapped so that the load is stopped while it runs."""

        def run() -> Any:
            self.process.send_signal(signal.SIGSTOP)
            try:
                return work()
            finally:
                self.process.send_signal(signal.SIGCONT)

        return run


# ----------------------------------------------------------------------------- timing
# What a timed run is measured with. `wall` is what a user waits. `cpu` is the CPU time
# of this process: with one torch thread it is the work of the step alone, so on a
# machine other jobs share it does not count the time spent waiting for a core (cache
# and memory-bandwidth contention still show).
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


@dataclass
class Timing:
    times: list[float] = field(default_factory=list)
    status: str = OK
    error: str | None = None

    @property
    def median(self) -> float | None:
        return statistics.median(self.times) if self.times else None


def round_robin(units: dict[str, Callable[[], Any]], warmup: int, repeats: int, device: str = "cpu",
                cap_seconds: float | None = None, budget_seconds: float | None = None,
                deadline: float | None = None, clock: Callable[[], float] = time.perf_counter) -> dict[str, Timing]:
    """Time every unit alternating (A B C A B C ...): `warmup` untimed rounds, then `repeats` timed.

    A unit that raises is dropped (status error). With `cap_seconds`, a unit whose
    single run exceeds the cap is dropped after that run (status capped). With
    `budget_seconds`, a unit stops repeating once its timed runs add up to the
    budget (at least one timed run is kept); likewise for all units once
    `time.monotonic()` passes `deadline`. `clock` is one of `CLOCKS`.
    """
    out = {name: Timing() for name in units}
    active = list(units)
    spent = {name: 0.0 for name in units}
    for round_idx in range(warmup + repeats):
        for name in list(active):
            if round_idx >= warmup and out[name].times and (
                    (budget_seconds is not None and spent[name] >= budget_seconds)
                    or (deadline is not None and time.monotonic() > deadline)):
                continue
            try:
                sync(device)
                t0 = clock()
                units[name]()
                sync(device)
                seconds = clock() - t0
            except Exception as exc:
                out[name].status, out[name].error = ERROR, f"{type(exc).__name__}: {exc}"
                active.remove(name)
                continue
            if round_idx >= warmup:
                out[name].times.append(seconds)
                spent[name] += seconds
            if cap_seconds is not None and seconds > cap_seconds:
                out[name].status = CAPPED
                out[name].error = f"one run took {seconds:.1f} s, over the cap of {cap_seconds:g} s"
                active.remove(name)
    return out


# ----------------------------------------------------------------------------- analysis
def fit_exponent(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of log(y) against log(x) (1.0 = linear, 2.0 = quadratic)."""
    pairs = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x and y and x > 0 and y > 0]
    if len(pairs) < 2:
        return None
    mx = sum(p[0] for p in pairs) / len(pairs)
    my = sum(p[1] for p in pairs) / len(pairs)
    var = sum((p[0] - mx) ** 2 for p in pairs)
    if var == 0:
        return None
    return round(sum((p[0] - mx) * (p[1] - my) for p in pairs) / var, 4)


def rounded(x: float | None, digits: int = 6) -> float | None:
    return None if x is None else round(float(x), digits)


def write_json(path: str, data: dict[str, Any]) -> None:
    """Write `data` as strict JSON: a NaN or infinity (which `json` would write as invalid ``NaN`` / ``Infinity``)
    is a ValueError before the file is touched; a number that was not measured is ``null``."""
    text = json.dumps(data, indent=2, allow_nan=False)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with open(path, "w") as f:
        f.write(text + "\n")


def tensor_bytes(obj: Any) -> int:
    """Bytes of all distinct tensor storages reachable from `obj` (a cache object)."""
    seen_storage: set[int] = set()
    seen_obj: set[int] = set()
    total = 0

    def visit(x: Any, depth: int) -> None:
        nonlocal total
        if depth > 8 or id(x) in seen_obj:
            return
        seen_obj.add(id(x))
        if isinstance(x, torch.Tensor):
            storage = x.untyped_storage()
            key = storage.data_ptr()
            if key not in seen_storage:
                seen_storage.add(key)
                total += storage.nbytes()
            return
        if isinstance(x, dict):
            for v in x.values():
                visit(v, depth + 1)
        elif isinstance(x, (list, tuple, set)):
            for v in x:
                visit(v, depth + 1)
        elif hasattr(x, "__dict__") and not isinstance(x, (type, torch.nn.Module)):
            for v in vars(x).values():
                visit(v, depth + 1)
        elif hasattr(x, "__slots__"):
            for slot in x.__slots__:
                visit(getattr(x, slot, None), depth + 1)

    visit(obj, 0)
    return total
