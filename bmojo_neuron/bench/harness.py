"""Timing and memory measurement shared by the benchmark suites.

Method (also in ``docs/benchmarks.md``):

* **Probe.** Before a candidate is timed at a size, one unit of its work (a training
  step, a layer forward+backward, a prefill plus one decoded token) runs in a
  *forked child process* with a deadline of ``cap_seconds``. A child that misses it
  is killed and the candidate is reported ``"status": "capped"`` at that size (and
  at every larger size) instead of hanging the suite. The child runs torch with one
  thread: libgomp's thread pool does not survive ``fork()``, and a child that uses
  it after the parent did deadlocks. The probe is therefore a conservative
  (slower) estimate; the cap is a budget, not a measurement.
* **Peak memory (CPU).** The probe child also measures memory. It pins glibc's
  ``M_MMAP_THRESHOLD`` (so every block above 64 KiB is a fresh ``mmap`` returned
  on ``free``, not reused from the parent's heap), resets the kernel's peak-RSS
  counter (``/proc/self/clear_refs`` = 5) and reports ``VmHWM - VmRSS`` around the
  unit: the peak *additional* resident memory of one unit of work above what was
  resident before it (weights and, for a first training step, not yet the
  gradients or optimizer state, which it allocates). On CUDA the same number comes
  from ``torch.cuda.max_memory_allocated`` around the unit (no probe process;
  CUDA cannot be forked). Elsewhere (no ``fork`` or no ``/proc``) memory is None.
* **Timing.** In the parent process, all candidates of a cell run *alternating*
  (round-robin: A B C A B C ...), first ``warmup`` rounds untimed, then ``repeats``
  timed rounds; the reported time is the median. Alternating spreads machine noise
  (other processes, thermal state) evenly over the candidates, so ratios measured
  in one run are much steadier than absolute times.
"""

from __future__ import annotations

import ctypes
import datetime as _dt
import json
import math
import os
import platform
import select
import signal
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

SCHEMA = "bmojo-neuron-bench/1"
OK, CAPPED, ERROR, SKIPPED = "ok", "capped", "error", "skipped"

MEMORY_METHOD_CPU = (
    "peak additional RSS of one unit of work, measured in a forked probe process: glibc M_MMAP_THRESHOLD "
    "pinned to 64 KiB, /proc/self/clear_refs=5 resets VmHWM, then VmHWM - VmRSS(before)"
)
MEMORY_METHOD_CUDA = "torch.cuda.max_memory_allocated() - memory_allocated() around one unit of work"


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


def _pin_malloc() -> None:
    """Make glibc return large blocks to the OS on free (so RSS peaks are honest)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD (also disables the dynamic threshold)
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def cpu_probe_supported() -> bool:
    return hasattr(os, "fork") and sys.platform.startswith("linux") and os.path.exists("/proc/self/clear_refs")


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------- probe
@dataclass
class Probe:
    """Outcome of running one unit of work once under a deadline."""

    status: str  # ok | capped | error
    seconds: float | None = None
    peak_memory_bytes: int | None = None
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def probe(unit: Callable[[], dict[str, Any] | None], cap_seconds: float, device: str = "cpu",
          fork: bool = True) -> Probe:
    """Run `unit()` once with a deadline; measure its time and peak memory.

    On CPU with ``fork`` (Linux) the unit runs in a forked child, killed at the
    deadline. Otherwise it runs here: it cannot be abandoned, but is reported
    capped afterwards if it took longer than the cap. `unit` may return a dict of
    extra JSON-serialisable numbers, passed back in `Probe.extra`.
    """
    if device.startswith("cuda"):
        return _probe_cuda(unit, cap_seconds)
    if fork and cpu_probe_supported():
        return _probe_fork(unit, cap_seconds)
    return _probe_inline(unit, cap_seconds, device)


def _probe_inline(unit, cap_seconds: float, device: str) -> Probe:
    try:
        t0 = time.perf_counter()
        extra = unit() or {}
        sync(device)
        seconds = time.perf_counter() - t0
    except Exception as exc:  # a candidate that fails must not stop the others
        return Probe(ERROR, error=f"{type(exc).__name__}: {exc}")
    return Probe(CAPPED if seconds > cap_seconds else OK, seconds, None, extra=extra)


def _probe_cuda(unit, cap_seconds: float) -> Probe:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    result = _probe_inline(unit, cap_seconds, "cuda")
    result.peak_memory_bytes = int(torch.cuda.max_memory_allocated() - base)
    return result


def _probe_fork(unit, cap_seconds: float) -> Probe:
    read_fd, write_fd = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # child: never return into the caller's code
        code = 0
        try:
            os.close(read_fd)
            torch.set_num_threads(1)
            _pin_malloc()
            rss0 = _proc_status_kb("VmRSS")
            reset = _reset_peak_rss()
            t0 = time.perf_counter()
            extra = unit() or {}
            seconds = time.perf_counter() - t0
            hwm = _proc_status_kb("VmHWM")
            peak = (hwm - rss0) * 1024 if (reset and hwm is not None and rss0 is not None) else None
            message = {"status": OK, "seconds": seconds, "peak": peak, "extra": extra}
        except BaseException as exc:  # noqa: BLE001 - report everything to the parent
            message = {"status": ERROR, "error": f"{type(exc).__name__}: {exc}",
                       "trace": traceback.format_exc(limit=4)}
            code = 1
        try:
            with os.fdopen(write_fd, "w") as out:
                out.write(json.dumps(message))
        finally:
            os._exit(code)
    os.close(write_fd)
    deadline = time.monotonic() + cap_seconds
    chunks: list[bytes] = []
    capped = False
    with os.fdopen(read_fd, "rb") as pipe:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                capped = True
                break
            ready, _, _ = select.select([pipe], [], [], left)
            if ready:
                data = os.read(pipe.fileno(), 1 << 16)
                if not data:
                    break
                chunks.append(data)
    if capped:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    _, status = os.waitpid(pid, 0)
    if capped:
        return Probe(CAPPED, seconds=None, error=f"one unit did not finish within the cap of {cap_seconds:g} s")
    try:
        message = json.loads(b"".join(chunks).decode() or "{}")
    except json.JSONDecodeError:
        message = {}
    if message.get("status") == OK:
        seconds = float(message["seconds"])
        return Probe(CAPPED if seconds > cap_seconds else OK, seconds, message.get("peak"),
                     extra=message.get("extra") or {})
    error = message.get("error") or f"probe process exited with status {status}"
    return Probe(ERROR, error=error, extra={"trace": message.get("trace")} if message.get("trace") else {})


# ----------------------------------------------------------------------------- timing
@dataclass
class Timing:
    times: list[float] = field(default_factory=list)
    status: str = OK
    error: str | None = None

    @property
    def median(self) -> float | None:
        return statistics.median(self.times) if self.times else None


def round_robin(units: dict[str, Callable[[], Any]], warmup: int, repeats: int, device: str = "cpu",
                cap_seconds: float | None = None, budget_seconds: float | None = None) -> dict[str, Timing]:
    """Time every unit alternating (A B C A B C ...): `warmup` untimed rounds, then `repeats` timed.

    A unit that raises is dropped (status error). With `cap_seconds`, a unit whose
    single run exceeds the cap is dropped after that run (status capped). With
    `budget_seconds`, a unit stops repeating once its timed runs add up to the
    budget (at least one timed run is kept).
    """
    out = {name: Timing() for name in units}
    active = list(units)
    spent = {name: 0.0 for name in units}
    for round_idx in range(warmup + repeats):
        for name in list(active):
            if round_idx >= warmup and budget_seconds is not None and out[name].times \
                    and spent[name] >= budget_seconds:
                continue
            try:
                sync(device)
                t0 = time.perf_counter()
                units[name]()
                sync(device)
                seconds = time.perf_counter() - t0
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
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")


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
