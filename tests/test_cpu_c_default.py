"""The default ops backend (``auto``): the ``cpu-c`` kernels on eager CPU float32, the torch reference elsewhere.

Which implementation ran is read from `dispatch.recording` and checked against the
outputs: where the reference runs they equal `ops.reference`'s bit for bit, where C runs
they equal the ``cpu-c`` backend's. Then the build under load: two processes building
into one empty cache at once, a compiler killed part way and a builder process killed
part way (nothing that loads is left), one OpenMP runtime and thread pool shared with
torch, and a data-loader worker forked after the kernels ran.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from test_cpu_c import _inputs

from bmojo_neuron import ops
from bmojo_neuron.ops import auto, dispatch
from bmojo_neuron.ops.cpu_c import build
from bmojo_neuron.ops.cpu_c import ssd as c_ssd
from bmojo_neuron.ops.reference import ssd as ref_ssd
from bmojo_neuron.ops.reference.eager_cpu import fused_kernels_disabled

BUILD_PY = Path(build.__file__)


@pytest.fixture
def default_selection(monkeypatch):
    """No ``BMOJO_OPS_BACKEND`` and no earlier choice: what a new user's process gets, with the switch on (the
    tests hold whichever way `DEFAULT_BACKEND` ships)."""
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    monkeypatch.setattr(dispatch, "_active", {})
    monkeypatch.setattr(dispatch, "DEFAULT_BACKEND", dispatch.AUTO)
    monkeypatch.setattr(auto, "MIN_C_ELEMENTS", 0)  # these tests' small inputs stand for large ones (one test below)


def _float_inputs(dtype=torch.float32) -> dict:
    return {k: v.to(dtype) for k, v in _inputs(2, 20, 2, 4, 1, 3).items()}


def _scan(dtype=torch.float32):
    inputs = _float_inputs(dtype)
    with dispatch.recording() as ran:
        y = ops.ssd_scan(chunk_size=8, **inputs)
    return y, ran.get("ssd_scan"), inputs


def test_default_runs_c_only_on_eager_cpu_float32(c_cache, default_selection, monkeypatch):
    assert ops.get_backend("ssd_scan") == "auto" and ops.get_backend("eidetic_attention") == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the default never warns
        y, ran, inputs = _scan()
        assert ran == {"cpu-c"} and torch.equal(y, c_ssd.ssd_scan(chunk_size=8, **inputs))
        for dtype in (torch.float64, torch.bfloat16):
            y, ran, inputs = _scan(dtype)
            assert ran == {"torch"} and torch.equal(y, ref_ssd.ssd_scan(chunk_size=8, **inputs)), dtype
        with fused_kernels_disabled():  # the Neuron backend's CPU stand-in: the traced form, as before
            y, ran, inputs = _scan()
            assert ran == {"torch"} and torch.equal(y, ref_ssd.ssd_scan(chunk_size=8, **inputs))
        with torch.autocast("cpu", dtype=torch.bfloat16):  # products in bf16, as the reference runs them
            y, ran, inputs = _scan()
            assert ran == {"torch"} and torch.equal(y, ref_ssd.ssd_scan(chunk_size=8, **inputs))
    assert "cpu-c for ssd_scan" in auto.describe("cpu") and auto.describe("cuda").startswith("torch")

    monkeypatch.setattr(auto, "MIN_C_ELEMENTS", 1 << 14)  # as shipped: a decoding step's few rows stay on torch
    y, ran, inputs = _scan()
    assert ran == {"torch"} and torch.equal(y, ref_ssd.ssd_scan(chunk_size=8, **inputs))
    big = {k: v.repeat(1, 64, 1, 1) if v.dim() == 4 else (v.repeat(1, 64, 1) if v.dim() == 3 else v)
           for k, v in _float_inputs().items()}  # 2 x 1280 tokens: above the threshold
    with dispatch.recording() as ran:
        ops.ssd_scan(chunk_size=8, **big)
    assert ran["ssd_scan"] == {"cpu-c"}

    monkeypatch.setattr(dispatch, "_active", {})
    monkeypatch.setenv(dispatch.ENV_VAR, "torch")  # the documented way to the pure reference
    assert ops.get_backend("ssd_scan") == "torch" and _scan()[1] == {"torch"}


def test_default_falls_back_silently_where_c_cannot_build(c_cache, fresh_build, default_selection, monkeypatch,
                                                          tmp_path):
    want = ref_ssd.ssd_scan(chunk_size=8, **_float_inputs())
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    cases = [("CC", "/nonexistent/cc", "no C compiler"), ("CC", "false", "failed (exit 1)"),
             (build.CACHE_ENV, str(blocker / "cache"), "cannot write the kernel cache folder"),
             (build.OFF_ENV, "0", "turned off")]
    for variable, value, reason in cases:
        build.reset()
        with monkeypatch.context() as env, warnings.catch_warnings():
            env.setenv(variable, value)
            warnings.simplefilter("error")
            y, ran, _ = _scan()
            assert ran == {"torch"} and torch.equal(y, want), value
            assert reason in auto.describe("cpu") and auto.describe("cpu").startswith("torch"), auto.describe("cpu")
    assert list(fresh_build.iterdir()) == []  # the failed build left no file
    build.reset()
    monkeypatch.setenv(build.CACHE_ENV, str(c_cache))  # a built library: used
    assert _scan()[1] == {"cpu-c"}


def test_a_kernel_turning_to_torch_is_silent_under_the_default_only(c_cache, default_selection, monkeypatch):
    """Inputs the default hands to C that a kernel still declines (SwiGLU operands that broadcast) run its torch
    path without a warning under the default, with one under an explicit ``cpu-c``."""
    from bmojo_neuron.ops.cpu_c import common
    from bmojo_neuron.ops.reference import elementwise

    gate, up = torch.randn(4, 8), torch.randn(1, 8)
    want = elementwise.swiglu_product(gate, up)
    monkeypatch.setattr(common, "warned", set())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with dispatch.recording() as ran:
            got = ops.swiglu_product(gate, up)
    assert ran.get("swiglu_product") == {"cpu-c"} and torch.equal(got, want)
    with ops.use_backend("cpu-c"), pytest.warns(RuntimeWarning, match="swiglu_product runs the torch path"):
        assert torch.equal(ops.swiglu_product(gate, up), want)


def _builder(cache: Path, env: dict | None = None) -> subprocess.Popen:
    """A process that loads `build.py` alone (no torch: it starts in milliseconds) and builds into `cache`."""
    code = ("import importlib.util, sys; s = importlib.util.spec_from_file_location('b', sys.argv[1]); "
            "b = sys.modules['b'] = importlib.util.module_from_spec(s); s.loader.exec_module(b); r = b.load(); "
            "print('ok' if r.library else r.reason)")
    return subprocess.Popen([sys.executable, "-c", code, str(BUILD_PY)], text=True, stdout=subprocess.PIPE,
                            env={**os.environ, build.CACHE_ENV: str(cache), **(env or {})})


def _slow_compiler(folder: Path, seconds: float, library: Path | None) -> Path:
    """A `CC` that writes half a file to its output, sleeps, then writes the whole `library` there (a real build
    takes a second or more on a loaded machine; this one takes `seconds`), or with no `library` sleeps on as
    the same process, to be killed (its pid is in ``cc.pid``)."""
    (folder / "cc.pid").unlink(missing_ok=True)
    script = folder / f"slow-cc-{seconds}"
    finish = f"sleep {seconds}\ncat {library} > \"$out\"\n" if library else f"exec sleep {seconds}\n"
    script.write_text(f"#!/bin/sh\necho $$ > {folder}/cc.pid\nfor a; do [ \"$prev\" = -o ] && out=$a; prev=$a; done\n"
                      f"printf 'half an ELF' > \"$out\"\n{finish}")
    script.chmod(0o755)
    return script


def test_concurrent_first_builds_and_killed_builds(c_cache, tmp_path):
    (library,) = c_cache.iterdir()
    cache = tmp_path / "cache"
    slow = _slow_compiler(tmp_path, 0.5, library)  # both processes are mid-build at once
    first, second = _builder(cache, {"CC": str(slow)}), _builder(cache, {"CC": str(slow)})
    assert [p.communicate(timeout=60)[0].strip() for p in (first, second)] == ["ok", "ok"]
    assert [p.suffix for p in cache.iterdir()] == [".so"]  # one library, no temporary file

    killed = tmp_path / "killed"
    builder = _builder(killed, {"CC": str(_slow_compiler(tmp_path, 30, None))})  # the compiler killed part way
    os.kill(_wait_for_pid(tmp_path / "cc.pid"), signal.SIGKILL)
    assert "failed (exit -9)" in builder.communicate(timeout=30)[0]
    assert list(killed.iterdir()) == []

    builder = _builder(killed, {"CC": str(_slow_compiler(tmp_path, 30, None))})  # the builder process killed
    _wait_for_pid(tmp_path / "cc.pid")
    builder.kill()
    builder.wait(10)
    (left,) = killed.iterdir()  # its temporary file (half an ELF), which no load ever opens
    assert left.suffix == ".tmp" and left.read_bytes() == b"half an ELF"
    os.utime(left, (0, 0))  # as if left long ago: the next build removes it
    rebuilt = _builder(killed, {"CC": str(_slow_compiler(tmp_path, 0, library))})
    assert rebuilt.communicate(timeout=60)[0].strip() == "ok"
    assert [p.suffix for p in killed.iterdir()] == [".so"]


def _wait_for_pid(path: Path) -> int:
    deadline = time.monotonic() + 30
    while not (path.exists() and path.read_text().strip()):
        assert time.monotonic() < deadline, "the compiler did not start"
        time.sleep(0.02)
    return int(path.read_text())


class _Scans(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> torch.Tensor:
        return _scan()[0]


def test_one_openmp_pool_and_forked_workers(c_cache, default_selection):
    """The kernels use torch's OpenMP runtime (one pool: two threads add one worker thread at most, whoever
    runs), and a data-loader worker forked after they ran (one thread, as torch sets it) does not hang."""
    threads = torch.get_num_threads()
    before = len(os.listdir("/proc/self/task"))
    try:
        torch.set_num_threads(2)
        for _ in range(2):
            assert _scan()[1] == {"cpu-c"}
            torch.randn(256, 256) @ torch.randn(256, 256)
        assert len(os.listdir("/proc/self/task")) <= before + 1
    finally:
        torch.set_num_threads(threads)
    assert len(build.openmp_runtimes()) == 1, build.openmp_runtimes()
    loader = torch.utils.data.DataLoader(_Scans(), num_workers=1, timeout=30,
                                         multiprocessing_context="fork")
    assert [torch.equal(y[0], _scan()[0]) for y in loader] == [True, True]
