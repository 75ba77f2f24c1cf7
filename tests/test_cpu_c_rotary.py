"""The ``cpu-c`` backend's `rotary` op (`ops/cpu_c/rotary.c`) against the torch op and a float64 reference.

The forward is bit for bit the torch op's (each product rounded, then summed, as the torch
ops compute it); the backward sums two products per element, so it may differ from the torch
op's (whose `addcmul_` can fuse one product into the sum) by one rounding: within 2 float32
ulps of the float64 reference (`F32_TOL`, relative to the largest magnitude). The layouts
the model uses are covered: queries as a transposed view of a projection (the output comes
back contiguous, the gradient in the view's memory layout), the memory keys (batch, heads,
chunks, slots, D) with a table per chunk, and a decoding step's table of one position.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from test_cpu_c import _backward_names

from bmojo_neuron import ops
from bmojo_neuron.layers.rope import RotaryEmbedding
from bmojo_neuron.ops.cpu_c import build
from bmojo_neuron.ops.cpu_c import rotary as c_rotary
from bmojo_neuron.ops.reference import rotary as ref_rotary
from bmojo_neuron.ops.reference.eager_cpu import fused_kernels_disabled

F32_TOL = 2 * 2.0 ** -23  # two float32 ulps of the largest magnitude: a sum of two rounded products


def _case(name: str, dtype=torch.float32):
    """(x, cos, sin) in one of the model's layouts, odd sizes, float64 tables cast to `dtype`."""
    g = torch.Generator().manual_seed(0)
    rotary = RotaryEmbedding(6, 10000.0)
    if name == "queries":  # (batch, heads, L, D) viewed from a (batch, L, heads * D) projection
        cos, sin = rotary(torch.arange(37), torch.float64)
        x = torch.randn(3, 37, 5 * 6, generator=g, dtype=torch.float64).view(3, 37, 5, 6).transpose(1, 2)
    elif name == "memory":  # (batch, heads, chunks, slots, D), one position per chunk
        cos, sin = (t[:, None] for t in rotary(torch.tensor([0, 3, 11, 250]), torch.float64))
        x = torch.randn(2, 3, 4, 7, 6, generator=g, dtype=torch.float64)
    elif name == "decode":  # (batch, heads, slots, D) transposed from (batch, slots, heads, D), one position
        cos, sin = rotary(torch.tensor([19]), torch.float64)
        x = torch.randn(2, 9, 3, 6, generator=g, dtype=torch.float64).transpose(1, 2)
    else:  # any tables: the two halves of a row differ, so a kernel that reads the wrong half is caught
        cos, sin = torch.randn(2, 11, 8, generator=g, dtype=torch.float64)
        x = torch.randn(11, 8, generator=g, dtype=torch.float64)  # no leading axes at all
    return x.to(dtype), cos.to(dtype), sin.to(dtype)


def _forward_backward(fn, x, cos, sin, grad):
    leaf = x.detach().clone(memory_format=torch.preserve_format).requires_grad_()
    out = fn(leaf, cos, sin)
    out.backward(grad)
    return out, leaf.grad


@pytest.mark.parametrize("name", ["queries", "memory", "decode", "any tables"])
def test_c_rotary_matches_torch_and_float64(c_cache, name):
    x64, cos64, sin64 = _case(name, torch.float64)
    grad64 = torch.randn(x64.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    want_out, want_grad = _forward_backward(ref_rotary.rotary, x64, cos64, sin64, grad64)
    x, cos, sin = _case(name)
    torch_out, torch_grad = _forward_backward(ref_rotary.rotary, x, cos, sin, grad64.float())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # float32 eager CPU inputs with a built library: no fallback
        c_out, c_grad = _forward_backward(c_rotary.rotary, x, cos, sin, grad64.float())
    assert c_out.grad_fn is not None and type(c_out.grad_fn).__name__ == "CRotaryBackward"
    assert torch.equal(c_out, torch_out)  # the forward bit for bit
    for got, want, exact in ((c_out, torch_out, want_out), (c_grad, torch_grad, want_grad)):
        scale = exact.abs().max().item()
        assert (got.double() - exact).abs().max().item() <= F32_TOL * scale
        assert (got - want).abs().max().item() <= F32_TOL * scale
    # Layouts: the output contiguous (what the attention op reads), the gradient in the input's memory layout.
    assert c_out.is_contiguous() and c_grad.stride() == x.stride()


def test_c_rotary_backward_is_the_transposed_rotation(c_cache):
    """A gradcheck in float32: <R x, g> = <x, R^T g> for the kernel's forward R and backward R^T, summed in
    float64 (the C path takes float32 only, so `gradcheck`'s float64 differences would run the torch path)."""
    x, cos, sin = _case("queries")
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    out, d_x = _forward_backward(c_rotary.rotary, x, cos, sin, g)
    left, right = (out.double() * g.double()).sum(), (x.double() * d_x.double()).sum()
    assert abs(left - right) <= 1e-6 * (out.double().abs() * g.double().abs()).sum()
    # and a rotation keeps each pair's norm: |out|^2 = |x|^2 row by row (cos^2 + sin^2 = 1)
    torch.testing.assert_close(out.pow(2).sum(-1), x.pow(2).sum(-1), rtol=1e-5, atol=1e-6)


def test_c_rotary_fallbacks_run_the_torch_op(fresh_build, monkeypatch):
    x, cos, sin = _case("queries")
    want = ref_rotary.rotary(x, cos, sin)
    monkeypatch.setenv("CC", "/nonexistent/cc")
    with pytest.warns(RuntimeWarning, match="rotary runs the torch path: no C compiler"):
        assert torch.equal(c_rotary.rotary(x, cos, sin), want)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per reason
        c_rotary.rotary(x, cos, sin)
    monkeypatch.delenv("CC")
    build.reset()
    x64, cos64, sin64 = _case("queries", torch.float64)
    with pytest.warns(RuntimeWarning, match="rotary runs the torch path: float64 inputs"):
        assert torch.equal(c_rotary.rotary(x64, cos64, sin64), ref_rotary.rotary(x64, cos64, sin64))
    with pytest.warns(RuntimeWarning, match="rotary runs the torch path: inputs that are not eager CPU"):
        with fused_kernels_disabled():  # what a traced Neuron graph runs: the plain expression
            assert torch.equal(c_rotary.rotary(x, cos, sin), want)
    monkeypatch.setenv(build.OFF_ENV, "0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # turned off on purpose: no warning
        out = c_rotary.rotary(x, cos, sin)
    assert torch.equal(out, want) and type(out.grad_fn).__name__ != "CRotaryBackward"


def test_rotary_dispatch_and_the_model_on_cpu_c(c_cache, monkeypatch):
    """`ops.rotary` runs the C op under ``cpu-c``, and a tiny model's loss and gradients match the torch
    backend's with the rotations in C (the C op's backward node is in the graph)."""
    from naive import tiny_config

    from bmojo_neuron import BMojoForCausalLM
    from bmojo_neuron.ops import dispatch

    monkeypatch.setattr(dispatch, "_active", {})
    monkeypatch.setenv(dispatch.ENV_VAR, "cpu-c")
    assert ops.get_backend("rotary") == "cpu-c" and dispatch.resolve("rotary") is c_rotary.rotary
    monkeypatch.setattr(dispatch, "_active", {})
    monkeypatch.delenv(dispatch.ENV_VAR)

    torch.manual_seed(0)
    model = BMojoForCausalLM(tiny_config()).train()
    ids = torch.randint(0, 64, (2, 23), generator=torch.Generator().manual_seed(0))
    results = {}
    for backend in ("torch", "cpu-c"):
        model.zero_grad(set_to_none=True)
        # Everything on torch (the default would run the other ops in C), then the rotations on `backend`.
        with ops.use_backend("torch"), ops.use_backend(backend, ["rotary"]):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        results[backend] = (loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None],
                            _backward_names(loss.grad_fn))
    (want, want_grads, torch_nodes), (got, got_grads, c_nodes) = results["torch"], results["cpu-c"]
    assert "CRotaryBackward" in c_nodes and "CRotaryBackward" not in torch_nodes
    assert abs(got - want) <= 1e-5 * abs(want)
    for w, g in zip(want_grads, got_grads, strict=True):
        assert (g - w).abs().max() <= 1e-5 * max(w.abs().max(), 1e-3)


def test_c_rotary_under_a_compiled_graph_runs_the_torch_op(c_cache):
    """A compiled layer (`fullgraph=True`) traces the torch op without a warning (Dynamo cannot trace one)."""
    x, cos, sin = _case("queries")
    with ops.use_backend("cpu-c", ["rotary"]):
        compiled = torch.compile(lambda t: ops.rotary(t, cos, sin), fullgraph=True, backend="eager")
        assert torch.equal(compiled(x), ref_rotary.rotary(x, cos, sin))
