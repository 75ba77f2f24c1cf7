"""The ``cpu-c`` SwiGLU product (`ops/cpu_c/swiglu.c`): ``silu(gate) * up`` in C against float64 and torch.

Output and both gradients of the C path in float32 against the plain formula
differentiated in float64 and against the torch implementation in float32, over values
reaching silu's tails (|gate| up to 100, where the exponential is clamped) and a size
that is no multiple of the C code's spans or vector width; the same bits for one and two
threads and without grad; the fallbacks; and a tiny B'MOJO model whose norms and SwiGLU
products all run in C, against the torch backend.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from test_cpu_c import _backward_names

from bmojo_neuron import ops
from bmojo_neuron.ops.cpu_c import common
from bmojo_neuron.ops.cpu_c import swiglu as c_swiglu
from bmojo_neuron.ops.reference import elementwise as ref_elementwise
from bmojo_neuron.ops.reference.eager_cpu import fused_kernels_disabled

# Element-wise work: each float32 value is a few ulp off the float64 formula (exp to 1 ulp, a division, three
# products), compared relative to the largest magnitude (in silu's far tail, values of 1e-37, a relative error
# means nothing; the tails get their own check). Observed 6e-8 to 3e-7 of the scale, C and torch alike.
F32_TOL = 1e-6


def _inputs(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    gate = torch.randn(n, generator=g, dtype=torch.float64) * 4
    gate[:6] = torch.tensor([-100.0, -88.5, -30.0, 0.0, 30.0, 100.0], dtype=torch.float64)  # the clamped tails
    return gate, torch.randn(n, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64)


def _run(product, gate, up, grad):
    leaves = [gate.detach().clone().requires_grad_(), up.detach().clone().requires_grad_()]
    out = product(*leaves)
    (out * grad).sum().backward()
    return [out.detach(), leaves[0].grad, leaves[1].grad], out.grad_fn


def test_c_product_matches_float64_and_torch(c_cache):
    gate, up, grad = (t.reshape(3, 7, 433) for t in _inputs(3 * 7 * 433))  # 9,093 elements: two spans and a tail
    exact, _ = _run(lambda a, b: a * torch.sigmoid(a) * b, gate, up, grad)
    want32, _ = _run(ref_elementwise.swiglu_product, gate.float(), up.float(), grad.float())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got, node = _run(c_swiglu.swiglu_product, gate.float(), up.float(), grad.float())
    assert type(node).__name__ == "CSwiGLUProductBackward"
    for name, want, c, t in zip(("out", "d_gate", "d_up"), exact, got, want32):
        scale = want.abs().max().item()
        assert (c.double() - want).abs().max().item() < F32_TOL * scale, name
        assert (c - t).abs().max().item() < F32_TOL * scale, name
    tails = slice(0, 6)  # silu(-100) is 0 to float32's smallest scale, silu(100) = 100, d_gate 0 and 1 there
    assert torch.allclose(got[0].flatten()[tails].double(), exact[0].flatten()[tails], rtol=1e-6, atol=1e-30)


def test_same_bits_for_any_thread_count_and_without_grad(c_cache):
    gate, up, grad = (t.float() for t in _inputs(40_000))
    runs = []
    previous = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            runs.append(_run(c_swiglu.swiglu_product, gate, up, grad)[0])
    finally:
        torch.set_num_threads(previous)
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    with torch.no_grad():
        assert torch.equal(c_swiglu.swiglu_product(gate, up), runs[0][0])


def test_fallbacks_run_the_torch_path(c_cache):
    gate, up, _ = (t.float() for t in _inputs(30))
    common.warned.clear()
    for a, b, reason in ((gate.double(), up.double(), "float64 inputs"),
                         (gate.view(5, 6), up.view(1, 5, 6), "different shapes")):
        with pytest.warns(RuntimeWarning, match=f"swiglu_product runs the torch path: .*{reason}"):
            got = c_swiglu.swiglu_product(a, b)
        assert torch.equal(got, ref_elementwise.swiglu_product(a, b))
    with fused_kernels_disabled(), pytest.warns(RuntimeWarning, match="not eager CPU tensors"):
        assert torch.equal(c_swiglu.swiglu_product(gate, up), ref_elementwise.swiglu_product(gate, up))


def test_model_runs_the_c_kernels_through_the_dispatch(c_cache):
    """A tiny B'MOJO model (a Mamba-2 B layer: pre-norms, the gated norm, the SSM output's norm, the final
    norm, the SwiGLU MLP) with the three ops on ``cpu-c`` against the torch backend: the same loss and
    gradients to float32 round-off, and the C Functions are what ran."""
    from naive import tiny_config

    from bmojo_neuron import BMojoForCausalLM

    torch.manual_seed(0)
    model = BMojoForCausalLM(tiny_config(fading_norm=True)).train()
    ids = torch.randint(0, 64, (2, 23), generator=torch.Generator().manual_seed(0))
    results = {}
    for backend in ("torch", "cpu-c"):
        model.zero_grad(set_to_none=True)
        with ops.use_backend(backend, ["rms_norm", "gated_rms_norm", "swiglu_product"]):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        results[backend] = (loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None],
                            _backward_names(loss.grad_fn))
    (want, want_grads, torch_nodes), (got, got_grads, c_nodes) = results["torch"], results["cpu-c"]
    c_functions = {"CRMSNormBackward", "CGatedRMSNormBackward", "CSwiGLUProductBackward"}
    assert c_functions <= c_nodes and not c_functions & torch_nodes
    assert abs(got - want) <= 1e-6 * abs(want)
    for w, g in zip(want_grads, got_grads, strict=True):
        assert (g - w).abs().max() <= 1e-5 * max(w.abs().max(), 1e-3)

