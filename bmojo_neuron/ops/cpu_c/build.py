"""Build the plain-C kernels of this package once per user and load them with `ctypes`.

Every ``*.c`` file of this folder goes into one library, compiled on first use
(``cc -O3 -march=native -fopenmp -shared``, about a second: the C files include no torch
headers) into a per-user cache folder, named by a hash of the sources, the compiler, its
flags and the machine, so an edited source or another CPU gets its own build. The compiler writes to a temporary file in
that folder which is then renamed into place (`os.replace`, atomic on one file
system): a build killed half way leaves no library that would load broken, and
processes that build at once (test workers, torchrun ranks starting together) each
write their own temporary file, the last rename winning with an identical library.
A temporary file a killed process left behind is removed by a later build once it is
older than any build can take.

OpenMP: nothing here looks for torch's runtime. ``-fopenmp`` makes the library need the
compiler's own runtime by its soname (GCC's ``libgomp.so.1``, LLVM's ``libomp.so``); torch's
CPU wheels ship a ``libgomp.so.1``, which the dynamic loader reuses when torch is already
loaded (it is: the kernels' modules import torch first), so with GCC the kernels and torch
share one thread pool. Under another name the loader maps the compiler's runtime as a
second one: `openmp_runtimes` lists the runtimes a process has mapped, and the load
reason names one the library added (docs/ops.md, "One OpenMP runtime").

Where the compiler rejects a flag the build falls back (`ATTEMPTS`): without OpenMP
(Apple's clang has no ``-fopenmp``; ``-fopenmp-simd`` keeps the ``omp simd`` loops
vectorised, and GCC and clang ignore the other OpenMP pragmas under it), then with
portable flags only. A library built without OpenMP runs every kernel on one thread, with
the same results (no kernel's result depends on its thread count); `Loaded.openmp` and the
load reason say so.

Nothing here raises on a missing compiler or a failed build: `load` returns the reason
instead, and the caller runs the torch path. Each kernel's Python module declares its C
functions' argument types and calls them through `function`.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ATTEMPTS", "CACHE_ENV", "FLOAT_P", "INT", "LONG", "OFF_ENV", "FLOAT", "Loaded", "cache_dir",
           "compile_command", "function", "function_of", "load", "openmp_runtimes", "reset", "sources"]

OFF_ENV = "BMOJO_CPU_C"  # "0" turns the C kernels off: the torch path runs
CACHE_ENV = "BMOJO_CPU_C_CACHE"  # where the built library goes (default: the user cache folder)
LIBRARY_STEM = "bmojo-kernels"
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")
# The flags tried in order: FLAGS; without OpenMP (one thread); portable ones. The next set is tried only
# where the compiler exited naming what it drops (a rejected flag, or an OpenMP runtime the linker lacks):
# another failure (an error in a source, a killed or timed-out compiler) would fail the same way again.
# The portable set names no OpenMP flag, so the compiler skips the sources' `omp` pragmas, as intended
# there: `-Wno-unknown-pragmas` keeps that set as warning-clean under `-Wall` as the other two (GCC and
# clang both take the flag; tests/test_cpu_c.py builds every set with `-Wall -Wextra -Werror`).
ATTEMPTS = (FLAGS, ("-O3", "-march=native", "-fopenmp-simd", "-shared", "-fPIC"),
            ("-O3", "-Wno-unknown-pragmas", "-shared", "-fPIC"))
_OPENMP_LIBRARIES = ("gomp", "-lomp", "libomp", "iomp")
BUILD_TIMEOUT_S = 120  # per attempt

# The C types the kernels' parameters use (every kernel function returns an int status, 0 for success).
FLOAT_P, LONG, INT, FLOAT = ctypes.c_void_p, ctypes.c_long, ctypes.c_int, ctypes.c_float


@dataclass(frozen=True)
class Loaded:
    """The loaded library (and whether it was built with OpenMP), or None and why not."""

    library: ctypes.CDLL | None
    reason: str
    openmp: bool = False


_loaded: Loaded | None = None
_lock = threading.Lock()  # one build per process, also when threads (NxD's pipeline stages) call at once


def cache_dir() -> Path:
    """`BMOJO_CPU_C_CACHE`, else ``$XDG_CACHE_HOME/bmojo-neuron/cpu-c`` (``~/.cache`` by default)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "bmojo-neuron" / "cpu-c"


def turned_off() -> bool:
    return os.environ.get(OFF_ENV, "1").strip().lower() in ("0", "off", "false", "no")


def load() -> Loaded:
    """The kernels' library, built if needed; once per process (`reset` forgets it)."""
    global _loaded
    if turned_off():
        return Loaded(None, f"turned off by {OFF_ENV}={os.environ[OFF_ENV]}")
    if _loaded is None:  # the lock only until the first load: the default backend asks on every op call
        with _lock:
            if _loaded is None:
                _loaded = _build_and_load()
    return _loaded


def function(name: str, argtypes: list) -> ctypes._CFuncPtr:
    """The loaded library's C function `name` with its argument types set; call only after `load` succeeded."""
    return function_of(load().library, name, argtypes)


def function_of(library: ctypes.CDLL, name: str, argtypes: list) -> ctypes._CFuncPtr:
    """`library`'s C function `name` with its argument types set (int result)."""
    fn = getattr(library, name)  # ctypes caches the attribute, so the types are set once
    if fn.argtypes is None:
        fn.argtypes, fn.restype = argtypes, ctypes.c_int
    return fn


def sources() -> list[Path]:
    """The C files built into the library: every ``*.c`` beside this module, in name order."""
    return sorted(Path(__file__).parent.glob("*.c"))


def compile_command(compiler: str, flags: tuple[str, ...], output: str | Path) -> list[str]:
    """The command that builds the library from `sources` into `output` with `flags` (one of `ATTEMPTS`)."""
    return [compiler, *flags, "-o", str(output), *map(str, sources())]


def reset() -> None:
    """Forget the loaded library (tests change the compiler or the cache folder)."""
    global _loaded
    _loaded = None


def _key(compiler: str) -> str:
    files = sources() + sorted(Path(__file__).parent.glob("*.h"))  # the headers they include count too
    parts = [b for source in files for b in (source.name.encode(), source.read_bytes())]
    flag_sets = " | ".join(" ".join(flags) for flags in ATTEMPTS)
    parts += [compiler.encode(), flag_sets.encode(), platform.machine().encode(), _cpu_model().encode()]
    return hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]


def _cpu_model() -> str:
    """The CPU's model line (``-march=native`` builds for it), or "" where /proc/cpuinfo is absent."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line
    except OSError:
        pass
    return platform.processor()


def _build_and_load() -> Loaded:
    compiler = os.environ.get("CC") or "cc"
    path = shutil.which(compiler)
    if path is None:
        return Loaded(None, f"no C compiler: {compiler!r} is not on PATH (set CC)")
    folder = cache_dir()
    library = folder / f"{LIBRARY_STEM}-{_key(path)}.so"
    if not library.exists():
        reason = _build(path, folder, library)
        if reason:
            return Loaded(None, reason)
    runtimes = openmp_runtimes()
    try:
        lib = ctypes.CDLL(str(library))
    except OSError as exc:
        return Loaded(None, f"the built library {library} does not load: {exc}")
    added = sorted(set(openmp_runtimes()) - set(runtimes))
    second = f"; a second OpenMP runtime ({', '.join(added)}) beside torch's" if runtimes and added else ""
    openmp = bool(function_of(lib, "bmojo_kernels_openmp", [])())
    threads = "with OpenMP" if openmp else "without OpenMP (none with this compiler: every kernel runs on one thread)"
    return Loaded(lib, f"built with {path} {threads} in {library}{second}", openmp)


def openmp_runtimes() -> list[str]:
    """The OpenMP runtime files this process has mapped (libgomp, libiomp, libomp), from /proc/self/maps."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    paths = {line.split(maxsplit=5)[-1] for line in lines if len(line.split(maxsplit=5)) == 6}
    return sorted(p for p in paths if Path(p).name.startswith(("libgomp", "libiomp", "libomp")))


def _build(compiler: str, folder: Path, library: Path) -> str:
    """Compile into a temporary file next to `library` with the first of `ATTEMPTS` that compiles, then rename
    it there; "" or why it failed (the first attempt's message: the usual build's)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _remove_abandoned(folder)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=library.stem + ".", suffix=".tmp")
        os.close(fd)
    except OSError as exc:
        return f"cannot write the kernel cache folder {folder}: {exc.strerror or exc}"
    try:
        files = sources()
        failures = []
        for flags in ATTEMPTS:
            done = subprocess.run(compile_command(compiler, flags, tmp), capture_output=True, text=True,
                                  timeout=BUILD_TIMEOUT_S)
            if done.returncode == 0:
                os.replace(tmp, library)
                return ""
            first = (done.stderr.strip().splitlines() or ["no message"])[0]
            failures.append(f"compiling {_names(files)} with {compiler} failed (exit {done.returncode}): {first}")
            if not _rejected_what_the_next_drops(flags, done.returncode, done.stderr):
                break
        return failures[0]
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"compiling {_names(sources())} with {compiler} failed: {exc}"
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _rejected_what_the_next_drops(flags: tuple[str, ...], returncode: int, stderr: str) -> bool:
    """Whether a failed compile with `flags` exited (not killed) naming a flag the next attempt drops or,
    with ``-fopenmp``, an OpenMP runtime library."""
    later = ATTEMPTS[ATTEMPTS.index(flags) + 1:] if flags in ATTEMPTS else ()
    if returncode <= 0 or not later:
        return False
    dropped = [f for f in flags if f not in later[0]]
    if "-fopenmp" in dropped:
        dropped += _OPENMP_LIBRARIES
    return any(name in stderr for name in dropped)


def _remove_abandoned(folder: Path) -> None:
    """Delete temporary files older than any live build (every attempt's timeout, twice): a killed process's."""
    for tmp in folder.glob(f"{LIBRARY_STEM}-*.tmp"):
        try:
            if time.time() - tmp.stat().st_mtime > 2 * BUILD_TIMEOUT_S * len(ATTEMPTS):
                tmp.unlink()
        except OSError:  # another process removed it first
            pass


def _names(files: list[Path]) -> str:
    return ", ".join(f.name for f in files)
