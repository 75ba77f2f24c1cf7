"""The ``cpu-c`` backend's `causal_conv1d_rows` (`ops/cpu_c/causal_conv.c`) against the torch reference.

Outputs, the returned conv state and every gradient (x, weight, bias, the prefix) of the
float32 C path are compared with the reference in float64 and in float32, on odd sizes,
lengths shorter than the history and spanning several of the kernel's 64-row blocks, kernel
sizes with and without the unrolled fast path, with and without bias, prefix and SiLU; then
the SiLU at large magnitudes, a finite-difference check of the gradients, the gradients'
independence of the thread count, the fallbacks (each warning once, the off switch silent),
shape errors, the dispatch's routing and a Mamba-2 mixer running it from a conv state.
The library is built once per session (`test_cpu_c.c_cache`).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from test_cpu_c import _backward_names
from naive import tiny_config

from bmojo_neuron import ops
from bmojo_neuron.layers.mamba2 import Mamba2Mixer
from bmojo_neuron.ops import dispatch
from bmojo_neuron.ops.cpu_c import build
from bmojo_neuron.ops.cpu_c import causal_conv as c_conv
from bmojo_neuron.ops.reference import causal_conv as ref_conv
from bmojo_neuron.ops.reference.eager_cpu import fused_kernels_disabled

# Each output and gradient of the float32 paths is within this much of the float64 reference, relative to the
# reference's largest magnitude: float32 round-off of sums of K products (outputs, dx) and of sums over every
# token of the batch (dw, dbias: up to 400 terms here). Observed: 2.3e-7 for the C path, 1.6e-7 for torch's.
F32_TOL = 2e-6


def _inputs(batch, length, channels, kernel, bias, prefix, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return dict(x=r(batch, length, channels), weight=r(channels, 1, kernel) * 0.7,
                bias=r(channels) if bias else None, prefix=r(batch, channels, kernel - 1) if prefix else None)


def _outputs_and_grads(conv, inputs, silu, dtype):
    """out, the returned state and the gradients of every input of a random linear loss on both."""
    leaves = {k: None if v is None else v.detach().to(dtype, copy=True).requires_grad_() for k, v in inputs.items()}
    out, tail = conv(leaves["x"], leaves["weight"], leaves["bias"], leaves["prefix"], silu=silu)
    g = torch.Generator().manual_seed(1)
    loss = (out * torch.randn(out.shape, generator=g, dtype=torch.float64).to(dtype)).sum()
    loss = loss + (tail * torch.randn(tail.shape, generator=g, dtype=torch.float64).to(dtype)).sum()
    loss.backward()
    return {"out": out, "tail": tail, **{f"d_{k}": v.grad for k, v in leaves.items() if v is not None}}


@pytest.mark.parametrize("shape", [
    # batch, L, channels, K, bias, prefix, silu
    (2, 13, 5, 4, True, True, True),       # odd sizes, one short block
    (3, 130, 33, 4, False, False, True),   # three blocks of 64 rows, the last of 2; no bias, zero history
    (2, 2, 7, 4, True, True, False),       # L < K - 1: the state keeps older prefix entries; no SiLU
    (1, 70, 9, 3, True, True, True),       # K 3 (the generic path), a block boundary within the taps' reach
    (2, 9, 6, 5, True, True, True),        # K 5
    (2, 7, 4, 1, True, False, True),       # K 1: no history at all
])
def test_c_conv_matches_reference(c_cache, shape):
    *sizes, silu = shape
    inputs = _inputs(*sizes)
    exact = _outputs_and_grads(ref_conv.causal_conv1d_rows, inputs, silu, torch.float64)
    torch32 = _outputs_and_grads(ref_conv.causal_conv1d_rows, inputs, silu, torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # float32 CPU inputs with a built library: no fallback
        c32 = _outputs_and_grads(c_conv.causal_conv1d_rows, inputs, silu, torch.float32)
    assert set(c32) == set(exact)
    for name, want in exact.items():
        assert c32[name].shape == want.shape and c32[name].dtype == torch.float32, name
        if want.numel() == 0:
            continue
        scale = want.abs().max().item()
        err = (c32[name].double() - want).abs().max().item() / scale
        assert err < F32_TOL, f"{name}: C path off the float64 reference by {err:.2e} of its scale"
        err32 = (c32[name] - torch32[name]).abs().max().item() / scale
        assert err32 < F32_TOL, f"{name}: C path off the torch float32 path by {err32:.2e} of its scale"
    # the same state layout as the reference returns (strides of dimensions of size 1 do not matter)
    tails = c32["tail"], torch32["tail"]
    assert [[s for s, n in zip(t.stride(), t.shape) if n > 1] for t in tails] == [
        [s for s, n in zip(tails[1].stride(), tails[1].shape) if n > 1]] * 2


def test_silu_at_large_magnitudes_and_finite_differences(c_cache):
    """Pre-activations up to ±200 (the exponential's clamp, sigmoid 0 or 1): the SiLU and its gradient as
    torch's float32, nothing NaN. Then a central difference of a loss along a random direction of every
    input against the gradients' inner product with that direction (float32 C, float64 differences)."""
    inputs = _inputs(2, 40, 16, 4, True, True, seed=3)
    inputs["x"] = inputs["x"] * 40
    want = _outputs_and_grads(ref_conv.causal_conv1d_rows, inputs, True, torch.float32)
    got = _outputs_and_grads(c_conv.causal_conv1d_rows, inputs, True, torch.float32)
    for name in want:
        assert torch.isfinite(got[name]).all(), name
        assert (got[name] - want[name]).abs().max() <= F32_TOL * want[name].abs().max(), name

    inputs = _inputs(2, 20, 8, 4, True, True, seed=4)
    grads = _outputs_and_grads(c_conv.causal_conv1d_rows, inputs, True, torch.float32)
    g = torch.Generator().manual_seed(5)
    direction = {k: torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in inputs.items()}

    def loss(step: float) -> float:
        moved = {k: (v + step * direction[k]).float() for k, v in inputs.items()}
        with torch.no_grad():
            out, tail = c_conv.causal_conv1d_rows(moved["x"], moved["weight"], moved["bias"], moved["prefix"], True)
        gen = torch.Generator().manual_seed(1)
        return ((out.double() * torch.randn(out.shape, generator=gen, dtype=torch.float64)).sum()
                + (tail.double() * torch.randn(tail.shape, generator=gen, dtype=torch.float64)).sum()).item()

    h = 1e-2
    numeric = (loss(h) - loss(-h)) / (2 * h)
    analytic = sum((grads[f"d_{k}"].double() * d).sum().item() for k, d in direction.items())
    # float32 losses of magnitude ~30 differ by round-off ~4e-6, /2h ~2e-4; the h^2 term of a smooth SiLU ~1e-4
    assert abs(numeric - analytic) <= 2e-3 * max(1.0, abs(analytic)), (numeric, analytic)


def test_gradients_do_not_depend_on_the_thread_count(c_cache):
    """dw and dbias are per-block partial sums added in block order: bit-identical on 1 and 2 threads."""
    inputs = _inputs(3, 200, 24, 4, True, False, seed=6)
    previous = torch.get_num_threads()
    runs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            runs.append(_outputs_and_grads(c_conv.causal_conv1d_rows, inputs, True, torch.float32))
    finally:
        torch.set_num_threads(previous)
    for name in runs[0]:
        assert torch.equal(runs[0][name], runs[1][name]), name


def test_fallbacks_run_the_torch_path(c_cache, fresh_build, monkeypatch):
    inputs = {k: None if v is None else v.float() for k, v in _inputs(2, 11, 6, 4, True, True).items()}
    args = (inputs["x"], inputs["weight"], inputs["bias"], inputs["prefix"])
    want = ref_conv.causal_conv1d_rows(*args, silu=True)

    def same(got, expected=want) -> bool:
        return all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))

    monkeypatch.setenv("CC", "/nonexistent/cc")
    with pytest.warns(RuntimeWarning, match="causal_conv1d_rows runs the torch path: no C compiler"):
        assert same(c_conv.causal_conv1d_rows(*args, silu=True))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per reason
        c_conv.causal_conv1d_rows(*args, silu=True)

    monkeypatch.delenv("CC")
    monkeypatch.setenv(build.CACHE_ENV, str(c_cache))  # the session's library from here on: no second build
    build.reset()
    monkeypatch.setenv(build.OFF_ENV, "0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # turned off on purpose: no warning
        assert same(c_conv.causal_conv1d_rows(*args, silu=True))

    monkeypatch.delenv(build.OFF_ENV)
    wide = [a.double() for a in args]
    with pytest.warns(RuntimeWarning, match="causal_conv1d_rows runs the torch path: float64 x"):
        assert same(c_conv.causal_conv1d_rows(*wide, silu=True), ref_conv.causal_conv1d_rows(*wide, silu=True))
    half = [a.bfloat16() for a in args]
    with pytest.warns(RuntimeWarning, match="bfloat16 x"):
        assert same(c_conv.causal_conv1d_rows(*half, silu=True), ref_conv.causal_conv1d_rows(*half, silu=True))
    with fused_kernels_disabled():  # what a traced graph runs: the reference's conv1d between transposes
        with pytest.warns(RuntimeWarning, match="not eager CPU tensors"):
            out, _ = c_conv.causal_conv1d_rows(args[0].requires_grad_(), *args[1:], silu=True)
        assert type(out.grad_fn).__name__ == "SiluBackward0"
    out, _ = c_conv.causal_conv1d_rows(*args, silu=True)  # and the C path once more, with the library built
    assert type(out.grad_fn).__name__ == "CCausalConvBackward"
    assert (out - want[0]).abs().max() <= F32_TOL * want[0].abs().max()


def test_a_compiled_graph_takes_the_traced_form_whole(c_cache):
    """Under torch.compile (``fullgraph``, as `train.compile` asks) the op runs the reference's traced form and
    warns nothing: a `warnings.warn` inside would make Dynamo fail the whole graph."""
    x, w, b = torch.randn(2, 5, 3, requires_grad=True), torch.randn(3, 1, 4), torch.randn(3)
    compiled = torch.compile(lambda x: c_conv.causal_conv1d_rows(x, w, b, silu=True)[0], fullgraph=True,
                             backend="eager")
    want = ref_conv.causal_conv1d_rows(x, w, b, silu=True)[0]
    assert (compiled(x) - want).abs().max() <= F32_TOL * want.abs().max()


def test_sizes_that_do_not_fit_are_refused(c_cache):
    x, w = torch.randn(2, 5, 6), torch.randn(6, 1, 4)
    with pytest.raises(ValueError, match=r"weight must be \(6, 1, K\)"):
        c_conv.causal_conv1d_rows(x, torch.randn(7, 1, 4), None)
    with pytest.raises(ValueError, match=r"bias must be \(6,\)"):
        c_conv.causal_conv1d_rows(x, w, torch.randn(5))
    with pytest.raises(ValueError, match=r"prefix \(the conv state\) must be \(2, 6, 3\)"):
        c_conv.causal_conv1d_rows(x, w, None, torch.randn(2, 6, 2))
    with pytest.raises(ValueError, match=r"x must be \(batch, L, channels\)"):
        c_conv.causal_conv1d_rows(x[0], w, None)


def test_dispatch_routes_the_conv(c_cache, monkeypatch):
    """cpu-c implements the op; a backend that lacks it (as the NKI backends do) leaves it on torch when named
    in the environment, and refuses it when named for it. The stand-in backend has the NKI ones' ops but
    not their imports (the emulator's take seconds)."""
    lacking = {name: ops.ssd_scan for name in ("selective_scan", "ssd_scan", "eidetic_attention")}
    monkeypatch.setitem(dispatch._BACKENDS, "lacking", dispatch.Backend("lacking", lambda: (True, "test"),
                                                                        lambda: lacking))
    monkeypatch.setattr(dispatch, "_active", {})
    monkeypatch.setenv(dispatch.ENV_VAR, "cpu-c")
    assert dispatch.resolve("causal_conv1d_rows") is c_conv.causal_conv1d_rows
    monkeypatch.setattr(dispatch, "_active", {})
    monkeypatch.setenv(dispatch.ENV_VAR, "lacking")
    assert ops.get_backend("causal_conv1d_rows") == "torch" and ops.get_backend("ssd_scan") == "lacking"
    assert dispatch.resolve("causal_conv1d_rows") is ref_conv.causal_conv1d_rows
    with pytest.raises(ValueError, match="has no implementation of 'causal_conv1d_rows'"):
        ops.set_backend("lacking", ["causal_conv1d_rows"])


def test_mamba2_mixer_runs_the_c_conv_from_a_state(c_cache):
    """A Mamba-2 mixer's output, new conv state and gradients with the conv on ``cpu-c`` against the torch
    backend, prefilling from a non-zero state (the prefix path); the C conv is what ran."""
    torch.manual_seed(0)
    mixer = Mamba2Mixer(tiny_config(), layer_idx=0)
    h = torch.randn(2, 19, mixer.config.hidden_size, generator=torch.Generator().manual_seed(1))
    results = {}
    for backend in ("torch", "cpu-c"):
        state = mixer.init_state(2)
        state.conv_states["xbc"].normal_(generator=torch.Generator().manual_seed(2))
        mixer.zero_grad(set_to_none=True)
        with ops.use_backend(backend, ["causal_conv1d_rows"]):
            out = mixer(h, state)
        out.square().sum().backward()
        results[backend] = [out, state.conv_states["xbc"], *(p.grad for p in mixer.parameters())], out.grad_fn
    (want, _), (got, node) = results["torch"], results["cpu-c"]
    assert "CCausalConvBackward" in _backward_names(node)
    for w, g in zip(want, got, strict=True):
        assert (g - w).abs().max() <= 2 * F32_TOL * max(w.abs().max(), 1e-3)



def test_a_sum_gradient_is_read_while_alive(c_cache):
    """The gradient of a sum is an expanded tensor: the backward's contiguous copy of it must stay alive while
    C reads it (40 MB, above glibc's largest mmap threshold, so a copy freed too early is unmapped)."""
    g = torch.Generator().manual_seed(0)
    w, bias = torch.randn(160, 1, 4, generator=g), torch.randn(160, generator=g)
    big = torch.randn(1, 1 << 16, 160, generator=g, requires_grad=True)
    out, _ = c_conv.causal_conv1d_rows(big, w, bias, None, silu=True)
    out.sum().backward()  # an expanded gradient (stride 0)
    want = torch.autograd.grad(c_conv.causal_conv1d_rows(big, w, bias, None, silu=True)[0], big,
                               torch.ones(out.shape))[0]
    assert torch.equal(big.grad, want)
