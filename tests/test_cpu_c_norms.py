"""The ``cpu-c`` norms (`ops/cpu_c/norms.c`): `rms_norm` and `gated_rms_norm` in C against float64 and torch.

Outputs and every gradient of the C path in float32 are compared with an independent
plain formula differentiated by autograd in float64, and with the torch implementation in
float32, on odd widths (below, at and above the C code's 16 summing lanes), several
groups and more rows than one weight-gradient block (64), so the last block is partial.
Then: the same bits for one and two threads (the weight gradient's fixed reduction order),
a central finite difference of the C forward against its backward, the no-grad forward,
the fallbacks (float64, traced/`fused_kernels_disabled`, no gate, no compiler, the off
switch) and the dispatch (``cpu-c`` has the norms, the NKI backends send them to torch).
"""

from __future__ import annotations

import warnings

import pytest
import torch

from bmojo_neuron import ops
from bmojo_neuron.ops import dispatch
from bmojo_neuron.ops.cpu_c import build, common
from bmojo_neuron.ops.cpu_c import norms as c_norms
from bmojo_neuron.ops.reference import elementwise as ref_elementwise
from bmojo_neuron.ops.reference.eager_cpu import fused_kernels_disabled

# Each float32 output and gradient is within this much of the float64 formula, relative to the formula's
# largest magnitude: round-off of sums over at most a few hundred terms (the per-row mean over <= 40
# channels, the weight gradient over <= 150 rows). Observed: C 1e-7 to 3e-7, the torch float32 path the same.
F32_TOL = 2e-6
EPS = 1e-5


def _plain(x, z, weight, group_size):
    """The norm written out: ``h / sqrt(mean(h^2) + eps) * weight`` per group, h = x * z * sigmoid(z) (or x)."""
    h = x if z is None else x * (z * torch.sigmoid(z))
    grouped = h.unflatten(-1, (-1, group_size))
    return (grouped / torch.sqrt(grouped.pow(2).mean(-1, keepdim=True) + EPS)).flatten(-2) * weight


def _inputs(shape, gated, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    z = torch.randn(*shape, generator=g, dtype=torch.float64) * 3 if gated else None  # silu's tails too
    return x, z, torch.randn(shape[-1], generator=g, dtype=torch.float64)


def _run(norm, x, z, weight, grad):
    """The norm's output and the gradients of ``sum(out * grad)`` for x, z (None if no gate), weight."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, z, weight)]
    out = norm(*leaves)
    (out * grad).sum().backward()
    return [out.detach()] + [t.grad if t is not None else None for t in leaves], out.grad_fn


CASES = [  # (shape, group_size or None for the plain norm)
    ((3, 50, 40), None),     # 150 rows: three weight-gradient blocks, the last of 22
    ((1, 5, 7), None),       # narrower than the 16 lanes: the tail alone
    ((2, 37, 16), None),     # exactly the lanes
    ((3, 50, 36), 9),        # four groups of 9
    ((2, 70, 40), 40),       # one group (the model's), 140 rows
    ((1, 3, 34), 17),        # two groups of 17: one pass of the lanes and a tail of 1
]


def _norms(group_size):
    if group_size is None:
        return (lambda x, z, w: c_norms.rms_norm(x, w, EPS), lambda x, z, w: ref_elementwise.rms_norm(x, w, EPS))
    return (lambda x, z, w: c_norms.gated_rms_norm(x, z, w, group_size, EPS),
            lambda x, z, w: ref_elementwise.gated_rms_norm(x, z, w, group_size, EPS))


@pytest.mark.parametrize("shape, group_size", CASES)
def test_c_norms_match_float64_and_torch(c_cache, shape, group_size):
    gated = group_size is not None
    x, z, weight = _inputs(shape, gated)
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    c_norm, torch_norm = _norms(group_size)
    exact, _ = _run(lambda a, b, w: _plain(a, b, w, group_size or shape[-1]), x, z, weight, grad)
    f32 = [t.float() if t is not None else None for t in (x, z, weight, grad)]
    want32, _ = _run(torch_norm, *f32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # float32 eager CPU with a built library: no fallback
        got, node = _run(c_norm, *f32)
    assert type(node).__name__ in ("CRMSNormBackward", "CGatedRMSNormBackward", "ViewBackward0")
    assert "CRMSNorm" in str(node.next_functions) or "CGatedRMSNorm" in str(node.next_functions)
    for name, want, c, t in zip(("out", "dx", "dz", "dweight"), exact, got, want32):
        if want is None:
            continue
        scale = want.abs().max().item()
        err = (c.double() - want).abs().max().item() / scale
        assert err < F32_TOL, f"{name}: C off the float64 formula by {err:.2e} of its scale"
        err_torch = (c - t).abs().max().item() / scale
        assert err_torch < F32_TOL, f"{name}: C off the torch float32 path by {err_torch:.2e} of its scale"


def test_same_bits_for_any_thread_count_and_without_grad(c_cache):
    """The weight gradient's per-block partials are added in block order: one or two threads, the same bits;
    under no_grad the forward alone runs, with the same output."""
    x, z, weight = (t.float() for t in _inputs((2, 90, 24), gated=True))
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    runs = []
    previous = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            runs.append(_run(lambda a, b, w: c_norms.gated_rms_norm(a, b, w, 8, EPS), x, z, weight, grad)[0]
                        + _run(lambda a, b, w: c_norms.rms_norm(a, w, EPS), x, None, weight, grad)[0])
    finally:
        torch.set_num_threads(previous)
    for one, two in zip(*runs):
        assert one is None and two is None or torch.equal(one, two)
    with torch.no_grad():
        assert torch.equal(c_norms.gated_rms_norm(x, z, weight, 8, EPS), runs[0][0])
        assert torch.equal(c_norms.rms_norm(x, weight, EPS), runs[0][4])


def test_backward_matches_a_finite_difference_of_the_forward(c_cache):
    """``<grads, v>`` against ``(L(p + h v) - L(p - h v)) / 2h`` of the C forward, L = sum(out * g) summed in
    float64. At h = 1e-3 the h^2 term is 5e-5 relative (the float64 torch path is off by as much), float32
    round-off over 2h about 1e-5."""
    x, z, weight = (t.float() for t in _inputs((2, 9, 12), gated=True))
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    v = [torch.randn(t.shape, generator=torch.Generator().manual_seed(4 + i)) for i, t in enumerate((x, z, weight))]
    h = 1e-3
    for norm, inputs in ((lambda a, b, w: c_norms.gated_rms_norm(a, b, w, 4, EPS), (x, z, weight)),
                         (lambda a, b, w: c_norms.rms_norm(a, w, EPS), (x, None, weight))):
        (_, *grads), _ = _run(norm, *inputs, g)
        def loss(step: float) -> float:
            moved = [t + step * d if t is not None else None for t, d in zip(inputs, v)]
            return (norm(*moved).double() * g.double()).sum().item()

        numeric = (loss(h) - loss(-h)) / (2 * h)
        analytic = sum((gr.double() * d.double()).sum().item() for gr, d in zip(grads, v) if gr is not None)
        assert abs(numeric - analytic) <= 2e-4 * abs(analytic), (numeric, analytic)


@pytest.fixture
def no_compiler(c_cache, monkeypatch, tmp_path):
    """A build that cannot start (no compiler); the session's library afterwards."""
    monkeypatch.setenv(build.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv("CC", "/nonexistent/cc")
    common.warned.clear()
    build.reset()
    yield
    build.reset()
    common.warned.clear()


def test_fallbacks_run_the_torch_path(c_cache, monkeypatch):
    x, z, weight = (t.float() for t in _inputs((2, 5, 8), gated=True))
    common.warned.clear()
    cases = [  # (inputs, what the warning names)
        ((x.double(), z.double(), weight.double()), "float64 inputs"),
        ((x, z.double(), weight), "float64 inputs"),
        ((x, None, weight), "no gate"),
    ]
    for (a, b, w), reason in cases:
        common.warned.clear()
        with pytest.warns(RuntimeWarning, match=f"gated_rms_norm runs the torch path: {reason}"):
            got = c_norms.gated_rms_norm(a, b, w, 4, EPS)
        assert torch.equal(got, ref_elementwise.gated_rms_norm(a, b, w, 4, EPS))
    with pytest.warns(RuntimeWarning, match="rms_norm runs the torch path: float64 inputs"):
        assert torch.equal(c_norms.rms_norm(x.double(), weight.double(), EPS),
                           ref_elementwise.rms_norm(x.double(), weight.double(), EPS))
    with fused_kernels_disabled():  # a traced graph's stand-in: the plain expressions, as the torch backend runs
        with pytest.warns(RuntimeWarning, match="not eager CPU tensors"):
            got = c_norms.gated_rms_norm(x, z, weight, 4, EPS)
        assert torch.equal(got, ref_elementwise.gated_rms_norm(x, z, weight, 4, EPS))
        with pytest.warns(RuntimeWarning, match="rms_norm runs the torch path: inputs that are not eager"):
            assert torch.equal(c_norms.rms_norm(x, weight, EPS), ref_elementwise.rms_norm(x, weight, EPS))
    with pytest.warns(RuntimeWarning, match="shapes that do not fit"), pytest.raises(RuntimeError):
        c_norms.rms_norm(x, weight[:5], EPS)  # the torch path's own error, not a read past the weight
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per op and reason
        c_norms.gated_rms_norm(x, None, weight, 4, EPS)
        c_norms.rms_norm(x.double(), weight.double(), EPS)
    monkeypatch.setenv(build.OFF_ENV, "0")
    common.warned.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # turned off on purpose: no warning
        assert torch.equal(c_norms.rms_norm(x, weight, EPS), ref_elementwise.rms_norm(x, weight, EPS))


def test_no_compiler_runs_the_torch_path(no_compiler):
    x, z, weight = (t.float() for t in _inputs((2, 5, 8), gated=True))
    with pytest.warns(RuntimeWarning, match="gated_rms_norm runs the torch path: no C compiler"):
        assert torch.equal(c_norms.gated_rms_norm(x, z, weight, 8, EPS),
                           ref_elementwise.gated_rms_norm(x, z, weight, 8, EPS))


def test_dispatch_routes_the_norms(c_cache, monkeypatch):
    """``cpu-c`` implements both norms; a backend without them leaves them on torch."""
    monkeypatch.setattr(dispatch, "_active", {})
    monkeypatch.setenv(dispatch.ENV_VAR, "cpu-c")
    for op, impl in (("rms_norm", c_norms.rms_norm), ("gated_rms_norm", c_norms.gated_rms_norm)):
        assert ops.get_backend(op) == "cpu-c" and dispatch.resolve(op) is impl
    # A backend with only ssd_scan, as the NKI ones (selective_scan, ssd_scan, eidetic_attention; importing
    # their emulator costs seconds): the norms stay on torch.
    scans_only = dispatch.Backend("scans-only", lambda: (True, ""), lambda: {"ssd_scan": ref_elementwise.rms_norm})
    monkeypatch.setitem(dispatch._BACKENDS, "scans-only", scans_only)
    monkeypatch.setattr(dispatch, "_active", {})
    monkeypatch.setenv(dispatch.ENV_VAR, "scans-only")
    assert ops.get_backend("ssd_scan") == "scans-only"
    assert ops.get_backend("rms_norm") == ops.get_backend("gated_rms_norm") == "torch"
    assert dispatch.resolve("gated_rms_norm") is ref_elementwise.gated_rms_norm
    with pytest.raises(ValueError, match="has no implementation of 'rms_norm'"):
        ops.set_backend("scans-only", ["rms_norm"])
