"""The ``cpu-c`` ops backend (`ops/cpu_c`): `ssd_scan` in C against the torch reference.

The C library is built once per test session into a temporary cache folder (`c_cache`, in
conftest.py, shared by every `test_cpu_c*` file). Outputs and every gradient are compared with the reference `ssd_scan` in
float64 and float32, on shapes with odd sizes, several B/C groups, lengths that leave a
short last chunk (the C code does not pad) and an initial state, and over the op's options
(no D, no dt_bias, no softplus, B and C as strided views of one projection, bfloat16
inputs, autocast); then the fallbacks: no compiler, a failed build, the off switch,
float64 inputs and inputs that may not take a fast path all run the torch path (warning
once, except for the off switch), and the dispatch routes only `ssd_scan` to the backend.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import warnings
from pathlib import Path

import pytest
import torch

from bmojo_neuron import ops
from bmojo_neuron.ops.cpu_c import build
from bmojo_neuron.ops.cpu_c import ssd as c_ssd
from bmojo_neuron.ops.reference import ssd as ref_ssd
from bmojo_neuron.ops.reference.eager_cpu import fused_kernels_disabled

# Each output and gradient of the float32 C path is within this much of the float64 reference, relative to
# the reference's largest magnitude: float32 round-off of sums over a few hundred terms (on these shapes the
# C path's worst is 4.6e-6, the torch float32 path's 3.3e-6, both on dA, a sum over every token).
F32_TOL = 3e-5


def _inputs(batch, length, heads, head_dim, groups, state, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    return dict(x=r(batch, length, heads, head_dim), dt=r(batch, length, heads), A=-(torch.rand(heads, generator=g,
                dtype=dtype) * 4 + 0.5), B=r(batch, length, groups, state), C=r(batch, length, groups, state),
                D=r(heads), dt_bias=r(heads) * 0.5, initial_state=r(batch, heads, head_dim, state))


def _outputs_and_grads(scan, inputs, chunk, dtype):
    """y, the final state and the gradients of every input of a random linear loss on both."""
    leaves = {k: v.detach().to(dtype, copy=True).requires_grad_() for k, v in inputs.items()}
    y, h = scan(chunk_size=chunk, return_final_state=True, **leaves)
    g = torch.Generator().manual_seed(1)
    loss = (y * torch.randn(y.shape, generator=g, dtype=torch.float64).to(dtype)).sum()
    loss = loss + (h * torch.randn(h.shape, generator=g, dtype=torch.float64).to(dtype)).sum()
    loss.backward()
    return {"y": y, "final_state": h, **{f"d_{k}": v.grad for k, v in leaves.items()}}


@pytest.mark.parametrize("shape, chunk, c_chunk", [
    ((2, 37, 6, 5, 3, 7), 8, 8),      # 3 groups of 2 heads, odd sizes, 5 C chunks, the last of 5 tokens
    ((3, 33, 1, 17, 1, 9), 4, 7),     # one head, an odd C chunk: 5 chunks, the last of 5 tokens
    ((1, 70, 2, 16, 1, 16), 64, 32),  # the default C chunk: whole 16-column tiles, the last chunk of 6
])
def test_c_core_matches_reference(c_cache, monkeypatch, shape, chunk, c_chunk):
    monkeypatch.setattr(c_ssd, "C_CHUNK", c_chunk)
    inputs = _inputs(*shape)
    exact = _outputs_and_grads(ref_ssd.ssd_scan, inputs, chunk, torch.float64)
    torch32 = _outputs_and_grads(ref_ssd.ssd_scan, inputs, chunk, torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # float32 CPU inputs with a built library: no fallback
        c32 = _outputs_and_grads(c_ssd.ssd_scan, inputs, chunk, torch.float32)
    for name, want in exact.items():
        scale = want.abs().max().item()
        err = (c32[name].double() - want).abs().max().item() / scale
        assert err < F32_TOL, f"{name}: C path off the float64 reference by {err:.2e} of its scale"
        err32 = (c32[name] - torch32[name]).abs().max().item() / scale
        assert err32 < F32_TOL, f"{name}: C path off the torch float32 path by {err32:.2e} of its scale"


@pytest.mark.parametrize("drop, softplus, strided_bc", [
    ((), False, True),                                   # dt as given (no softplus), B/C views of one tensor
    (("D", "dt_bias", "initial_state"), True, False),    # the optional inputs left out
])
def test_c_scan_options(c_cache, monkeypatch, drop, softplus, strided_bc):
    """Every option of the op in C against the float64 reference, and bitwise repeatable."""
    monkeypatch.setattr(c_ssd, "C_CHUNK", 8)
    inputs = {k: v for k, v in _inputs(2, 29, 4, 8, 2, 6).items() if k not in drop}
    if not softplus:
        inputs["dt"] = inputs["dt"].abs() * 0.5  # dt used as given must be >= 0 (decays at most 1)
    runs = (("exact", ref_ssd.ssd_scan, torch.float64), ("c", c_ssd.ssd_scan, torch.float32),
            ("again", c_ssd.ssd_scan, torch.float32))
    wrap = _bc_views if strided_bc else _as_given
    results = {name: _outputs_and_grads(functools.partial(wrap, scan, dt_softplus=softplus), inputs, 8, dtype)
               for name, scan, dtype in runs}
    for name, want in results["exact"].items():
        got = results["c"][name]
        assert (got.double() - want).abs().max() < F32_TOL * want.abs().max(), name
        assert torch.equal(got, results["again"][name]), f"{name}: not repeatable"
    assert set(results["c"]) == {"y", "final_state"} | {f"d_{k}" for k in inputs}


def _as_given(scan, **kwargs):
    return scan(**kwargs)


def _bc_views(scan, B, C, **kwargs):
    """`scan` with B and C as the model passes them: views of one (batch, L, G, 2, N) projection."""
    bc = torch.stack([B, C], dim=-2)
    assert not bc[..., 0, :].is_contiguous()
    return scan(B=bc[..., 0, :], C=bc[..., 1, :], **kwargs)


def test_c_scan_bfloat16_and_autocast(c_cache):
    """bfloat16 inputs are cast to float32 and run in C, as the reference casts them; under CPU autocast
    the C path computes in float32 too, so its result is the one without autocast, bit for bit."""
    inputs = {k: v.float() for k, v in _inputs(1, 20, 2, 8, 1, 4).items()}
    half = {k: v.bfloat16() for k, v in inputs.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # runs in C: no fallback warning
        got = c_ssd.ssd_scan(chunk_size=8, **half)
    want = ref_ssd.ssd_scan(chunk_size=8, **half)
    assert got.dtype == torch.bfloat16 and (got.float() - want.float()).abs().max() <= 1e-2 * want.abs().max()
    plain = c_ssd.ssd_scan(chunk_size=8, **inputs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = c_ssd.ssd_scan(chunk_size=8, **inputs)
    assert torch.equal(autocast, plain)


def test_c_core_without_final_state_gradient(c_cache):
    """The model's case: no final state asked, so the backward gets no gradient for it."""
    inputs = _inputs(2, 24, 4, 8, 2, 6)
    del inputs["initial_state"]
    grads = []
    for scan in (ref_ssd.ssd_scan, c_ssd.ssd_scan):
        leaves = {k: v.detach().float().requires_grad_() for k, v in inputs.items()}
        y = scan(chunk_size=8, **leaves)
        y.backward(torch.ones_like(y))
        grads.append([y] + [v.grad for v in leaves.values()])
    for want, got in zip(*grads):
        assert (got - want).abs().max() <= F32_TOL * want.abs().max()


def test_fallbacks_run_the_torch_path(fresh_build, monkeypatch):
    inputs = {k: v.float() for k, v in _inputs(2, 20, 2, 4, 1, 3).items()}
    want = ref_ssd.ssd_scan(chunk_size=8, **inputs)

    monkeypatch.setenv("CC", "/nonexistent/cc")
    with pytest.warns(RuntimeWarning, match="runs the torch path: no C compiler: '/nonexistent/cc'"):
        assert torch.equal(c_ssd.ssd_scan(chunk_size=8, **inputs), want)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per reason
        c_ssd.ssd_scan(chunk_size=8, **inputs)

    build.reset()
    monkeypatch.setenv("CC", "false")  # a "compiler" that fails: no library, no temporary file left behind
    with pytest.warns(RuntimeWarning, match=r"compiling .*ssd_chunks.c.* with .*false failed \(exit 1\)"):
        assert torch.equal(c_ssd.ssd_scan(chunk_size=8, **inputs), want)
    assert list(fresh_build.iterdir()) == []

    monkeypatch.delenv("CC")
    monkeypatch.setenv(build.OFF_ENV, "0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # turned off on purpose: no warning
        assert torch.equal(c_ssd.ssd_scan(chunk_size=8, **inputs), want)

    monkeypatch.delenv(build.OFF_ENV)
    wide = {k: v.double() for k, v in inputs.items()}
    with pytest.warns(RuntimeWarning, match="float64 inputs"):
        assert torch.equal(c_ssd.ssd_scan(chunk_size=8, **wide), ref_ssd.ssd_scan(chunk_size=8, **wide))

    with fused_kernels_disabled():  # as a traced (Neuron) graph: the reference's plain expressions
        with pytest.warns(RuntimeWarning, match="not eager CPU tensors"):
            got = c_ssd.ssd_scan(chunk_size=8, **inputs)
        assert torch.equal(got, ref_ssd.ssd_scan(chunk_size=8, **inputs))
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):  # bad arguments: the reference's errors
        c_ssd.ssd_scan(chunk_size=0, **inputs)


def test_build_is_cached_and_renamed_into_place(c_cache):
    (library,) = c_cache.iterdir()  # the library only: the temporary file it was written to was renamed
    assert library.name.startswith(build.LIBRARY_STEM + "-") and library.suffix == ".so"
    built_at = library.stat().st_mtime_ns
    build.reset()
    assert build.load().library is not None and library.stat().st_mtime_ns == built_at  # loaded, not rebuilt


def test_dispatch_routes_only_ssd_scan(c_cache, monkeypatch):
    from bmojo_neuron.ops import dispatch

    monkeypatch.setattr(dispatch, "_active", {})
    monkeypatch.setenv(dispatch.ENV_VAR, "cpu-c")
    assert ops.get_backend("ssd_scan") == "cpu-c"
    assert ops.get_backend("eidetic_attention") == "torch"  # not implemented there
    assert dispatch.resolve("ssd_scan") is c_ssd.ssd_scan
    with pytest.raises(ValueError, match="has no implementation of 'eidetic_attention'"):
        ops.set_backend("cpu-c", ["eidetic_attention"])


def test_model_runs_the_c_core_through_the_dispatch(c_cache):
    """A tiny B'MOJO model's loss and gradients with `ssd_scan` on ``cpu-c`` against the torch backend; the
    C core is what ran (its backward node is in the graph)."""
    from naive import tiny_config

    from bmojo_neuron import BMojoForCausalLM

    torch.manual_seed(0)
    model = BMojoForCausalLM(tiny_config()).train()
    ids = torch.randint(0, 64, (2, 23), generator=torch.Generator().manual_seed(0))
    results = {}
    for backend in ("torch", "cpu-c"):
        model.zero_grad(set_to_none=True)
        with ops.use_backend(backend, ["ssd_scan"]):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        results[backend] = (loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None],
                            _backward_names(loss.grad_fn))
    (want, want_grads, torch_nodes), (got, got_grads, c_nodes) = results["torch"], results["cpu-c"]
    assert "CSSDScanBackward" in c_nodes and "CSSDScanBackward" not in torch_nodes
    assert abs(got - want) <= F32_TOL * abs(want)
    for w, g in zip(want_grads, got_grads, strict=True):
        assert (g - w).abs().max() <= F32_TOL * max(w.abs().max(), 1e-3)


def _backward_names(node) -> set[str]:
    names, stack, seen = set(), [node], set()
    while stack:
        n = stack.pop()
        if n is None or id(n) in seen:
            continue
        seen.add(id(n))
        names.add(type(n).__name__)
        stack.extend(f for f, _ in n.next_functions)
    return names


def test_a_compiler_without_openmp_builds_a_one_thread_library(fresh_build, monkeypatch, tmp_path):
    """A compiler that rejects ``-fopenmp`` (Apple's clang) gets the build without OpenMP, not the torch path:
    the kernels run, on one thread, with the results of the OpenMP build. Two sources, compiled at ``-O0`` (the
    fake appends it: what is tested is the fallback, not the code's speed), keep the build short."""
    from bmojo_neuron.ops import auto
    from bmojo_neuron.ops.cpu_c import swiglu as c_swiglu

    fake = tmp_path / "cc-without-openmp"
    fake.write_text('#!/bin/sh\nfor a in "$@"; do\n  if [ "$a" = -fopenmp ]; then\n'
                    '    echo "clang: error: unsupported option \'-fopenmp\'" >&2; exit 1\n  fi\ndone\nexec cc "$@" -O0\n')
    fake.chmod(0o755)
    here = build.sources()[0].parent
    monkeypatch.setattr(build, "sources", lambda: [here / "build_info.c", here / "swiglu.c"])
    gate, up = torch.randn(3, 70, generator=torch.Generator().manual_seed(0)).unbind(0)[:2]
    monkeypatch.setenv("CC", str(fake))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning: the library builds
        loaded = build.load()
        assert loaded.library is not None and not loaded.openmp, loaded.reason
        assert "without OpenMP" in loaded.reason and "one thread" in auto.describe("cpu")
        runs = []
        for threads in (1, 2):
            with _threads(threads):
                runs.append(c_swiglu.swiglu_product(gate, up))
    assert torch.equal(runs[0], runs[1])
    want = torch.nn.functional.silu(gate.double()) * up.double()
    torch.testing.assert_close(runs[0].double(), want, rtol=0, atol=1e-6)

    build.reset()  # a compiler that rejects every flag set fails with the first (the usual build's) message
    monkeypatch.setenv("CC", "false")
    assert build.load().library is None and "failed (exit 1)" in build.load().reason


# The compilers the warning check builds with: `cc`, and clang where installed (one entry per real compiler).
WARNING_COMPILERS = list({os.path.realpath(p): p for p in map(shutil.which, ("cc", "clang", "clang-14")) if p}.values())
WARNINGS = ("-Wall", "-Wextra", "-Werror")


@pytest.fixture(scope="module")
def warning_builds(tmp_path_factory):
    """The library built as `build.py` builds it (`build.compile_command`: compile, optimise, link) with
    `WARNINGS` added, for each compiler of `WARNING_COMPILERS` and each flag set of `build.ATTEMPTS`: started side
    by side, once for every case of `test_every_flag_set_builds_warning_clean`. Warnings such as
    ``-Wmaybe-uninitialized``, ``-Warray-bounds`` or GCC's ABI notes come from the optimiser and the code
    generator, which a front-end check (``-fsyntax-only``) never runs. {(compiler, set index): (exit, stderr)}."""
    folder = tmp_path_factory.mktemp("cpu-c-warnings")
    runs = {}
    for compiler in WARNING_COMPILERS:
        for index, flags in enumerate(build.ATTEMPTS):
            command = build.compile_command(compiler, flags, folder / f"{Path(compiler).name}-{index}.so")
            runs[compiler, index] = subprocess.Popen([command[0], *WARNINGS, *command[1:]], stderr=subprocess.PIPE,
                                                     text=True)
    results = {}
    for key, run in runs.items():
        _, stderr = run.communicate()
        results[key] = (run.returncode, stderr)
    return results


@pytest.mark.parametrize("index", range(len(build.ATTEMPTS)), ids=lambda i: " ".join(build.ATTEMPTS[i]))
@pytest.mark.parametrize("compiler", WARNING_COMPILERS, ids=lambda path: Path(path).name)
def test_every_flag_set_builds_warning_clean(warning_builds, tmp_path, compiler, index):
    """The library builds under ``-Wall -Wextra -Werror`` with each flag set (with OpenMP, without it, portable),
    saying nothing at all (no note either), with `cc` and with clang where installed. A set the compiler itself
    refuses here (clang's ``-fopenmp`` without libomp) is one the build never uses with it: skipped."""
    returncode, stderr = warning_builds[compiler, index]
    if returncode != 0:
        plain = subprocess.run(build.compile_command(compiler, build.ATTEMPTS[index], tmp_path / "plain.so"),
                               capture_output=True, text=True)
        if plain.returncode != 0 and build._rejected_what_the_next_drops(build.ATTEMPTS[index], plain.returncode,
                                                                         plain.stderr):
            pytest.skip(f"{compiler} refuses this set, so the build falls back: {plain.stderr.strip()[:200]}")
    assert returncode == 0 and stderr == "", f"{compiler} {' '.join(build.ATTEMPTS[index])}:\n{stderr}"


def _threads(n):
    import contextlib

    @contextlib.contextmanager
    def scope():
        before = torch.get_num_threads()
        torch.set_num_threads(n)
        try:
            yield
        finally:
            torch.set_num_threads(before)
    return scope()


def test_c_scan_same_bits_for_any_thread_count(c_cache):
    """Each (batch row, group) task writes its own outputs and per-row partial sums: 1 and 3 threads over
    2 x 3 tasks give the same bits, outputs and every gradient; on odd sizes, and on sizes whose
    transposes run in whole 8 x 8 blocks (P 16, N 24)."""
    for shape in ((2, 37, 6, 5, 3, 7), (2, 40, 6, 16, 3, 24)):
        inputs = {k: v.float() for k, v in _inputs(*shape).items()}
        runs = []
        for threads in (1, 3):
            with _threads(threads):
                runs.append(_outputs_and_grads(c_ssd.ssd_scan, inputs, 8, torch.float32))
        for name, value in runs[0].items():
            assert torch.equal(value, runs[1][name]), (shape, name)
