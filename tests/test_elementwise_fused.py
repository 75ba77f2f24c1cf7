"""The row-sliced element-wise Functions of eager CPU (`ops/reference/elementwise_fused.py`).

Each is checked against an independent plain-torch formula, in float64 to 1e-10 and in
float32 to round-off, with slices small enough that the loops run several slices and a
short last one, and with gradcheck; and the layers are checked to take them on eager CPU.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from baseline import reference_ops

import bmojo_neuron.ops.reference.elementwise_fused as elementwise_fused
from bmojo_neuron.layers.norms import GatedRMSNorm, RMSNorm
from bmojo_neuron.layers.ssm_state import causal_conv1d, causal_conv1d_rows
from bmojo_neuron.ops.reference.eager_cpu import fused_kernels_disabled

MATH_TOL = 1e-10  # float64 against the plain formula
F32_TOL = 2e-6  # float32, relative to the largest magnitude (sums over a few hundred terms)


@pytest.fixture
def tiny_slices(monkeypatch):
    """Slices of a few rows, so every loop runs several slices and a partial last one."""
    monkeypatch.setattr(elementwise_fused, "SLICE_BYTES", 3 * 40 * 8)


def _plain_gated_norm(x, z, weight, group_size, eps):
    h = x * (z * torch.sigmoid(z))
    grouped = h.unflatten(-1, (-1, group_size))
    normed = grouped / torch.sqrt(grouped.pow(2).mean(-1, keepdim=True) + eps)
    return normed.flatten(-2) * weight


def _names(node, depth: int = 3) -> set[str]:
    """Names of the autograd nodes within `depth` steps of `node` (views wrap a Function's output)."""
    if node is None or depth == 0:
        return set()
    return {type(node).__name__}.union(*(_names(n, depth - 1) for n, _ in node.next_functions))


def _run(fn, leaves, grad):
    ins = [t.clone().requires_grad_() for t in leaves]
    out = fn(*ins)
    out.backward(grad)
    return [out.detach()] + [t.grad for t in ins]


@pytest.mark.parametrize("group_size", [40, 8])
def test_gated_norm_equals_plain_formula(tiny_slices, group_size):
    g = torch.Generator().manual_seed(group_size)
    x, z = (torch.randn(2, 11, 40, generator=g, dtype=torch.float64) for _ in range(2))
    weight = torch.rand(40, generator=g, dtype=torch.float64) + 0.5
    grad = torch.randn(2, 11, 40, generator=g, dtype=torch.float64)
    assert elementwise_fused.rows_per_slice(40 * 8) == 3  # 22 rows: 8 slices, the last of one row
    got = _run(lambda a, b, w: elementwise_fused.gated_rms_norm(a, b, w, group_size, 1e-5), [x, z, weight], grad)
    want = _run(lambda a, b, w: _plain_gated_norm(a, b, w, group_size, 1e-5), [x, z, weight], grad)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=MATH_TOL, rtol=0)
    inputs = [t.clone().requires_grad_() for t in (x[:, :4], z[:, :4], weight)]
    assert torch.autograd.gradcheck(
        lambda a, b, w: elementwise_fused.gated_rms_norm(a, b, w, group_size, 1e-5), inputs, eps=1e-6, atol=1e-7)


def test_rms_norm_equals_plain_formula(tiny_slices):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 11, 40, generator=g, dtype=torch.float64) * 3
    weight = torch.rand(40, generator=g, dtype=torch.float64) + 0.5
    grad = torch.randn(2, 11, 40, generator=g, dtype=torch.float64)
    got = _run(lambda a, w: elementwise_fused.rms_norm(a, w, 1e-6), [x, weight], grad)
    want = _run(lambda a, w: a / torch.sqrt(a.pow(2).mean(-1, keepdim=True) + 1e-6) * w, [x, weight], grad)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=MATH_TOL, rtol=0)
    inputs = [t.clone().requires_grad_() for t in (x[:, :4], weight)]
    assert torch.autograd.gradcheck(lambda a, w: elementwise_fused.rms_norm(a, w, 1e-6), inputs, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("silu", [True, False])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("length", [1, 13])
def test_conv_rows_equals_conv1d(tiny_slices, with_bias, length, silu):
    """`conv_rows` (through `causal_conv1d_rows`) equals `causal_conv1d`, then `F.silu` if asked, in outputs,
    the returned state and every gradient, continuing from a prefix."""
    g = torch.Generator().manual_seed(length)
    leaves = [torch.randn(2, length, 5, generator=g, dtype=torch.float64),
              torch.randn(5, 1, 4, generator=g, dtype=torch.float64),
              torch.randn(2, 5, 3, generator=g, dtype=torch.float64)]
    if with_bias:
        leaves.append(torch.randn(5, generator=g, dtype=torch.float64))
    grad_out = torch.randn(2, length, 5, generator=g, dtype=torch.float64)
    grad_tail = torch.randn(2, 5, 3, generator=g, dtype=torch.float64)

    def run(fused: bool):
        x, w, prefix, *bias = ins = [t.clone().requires_grad_() for t in leaves]
        bias = bias[0] if bias else None
        if fused:
            out, tail = causal_conv1d_rows(x, w, bias, prefix, silu=silu)
            assert _names(out.grad_fn) & {"_ConvRowsBackward"}
        else:
            out, tail = causal_conv1d(x.transpose(1, 2), w, bias, prefix)
            out = out.transpose(1, 2)
            out = F.silu(out) if silu else out
        ((out * grad_out).sum() + (tail * grad_tail).sum()).backward()
        return [out, tail] + [t.grad for t in ins]

    for got, want in zip(run(True), run(False)):
        torch.testing.assert_close(got, want, atol=MATH_TOL, rtol=0)
    padded = torch.randn(2, length + 3, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(5, dtype=torch.float64, requires_grad=True) if with_bias else None
    assert torch.autograd.gradcheck(lambda p, w, b: elementwise_fused.conv_rows(p, w, b, silu), (padded, weight, bias),
                                   eps=1e-6, atol=1e-7)


@reference_ops()
def test_layers_take_the_sliced_chains_on_eager_cpu_only():
    """Under the torch ops (the default sends eager CPU float32 to C, tests/test_cpu_c*.py), on eager CPU
    float32 the norms and the conv + SiLU run the sliced Functions, with the plain path's values to
    round-off at a size where the slices are real (several, 256 KiB each); under `fused_kernels_disabled`
    (what traced graphs run) they do not; bfloat16 keeps the plain path."""
    g = torch.Generator().manual_seed(0)
    norm = GatedRMSNorm(512, group_size=256)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5, generator=g)
    x, z = (torch.randn(3, 700, 512, generator=g) for _ in range(2))
    fast = norm(x.requires_grad_(), z)
    assert _names(fast.grad_fn) & {"_GatedRMSNormBackward"}
    with fused_kernels_disabled():
        plain = norm(x, z)
        conv_plain, _ = causal_conv1d_rows(x, torch.randn(512, 1, 4, generator=g), None, silu=True)
    assert not _names(plain.grad_fn) & {"_GatedRMSNormBackward"}
    scale = plain.abs().max()
    assert ((fast - plain).abs().max() / scale).item() < F32_TOL
    assert not _names(conv_plain.grad_fn) & {"_ConvRowsBackward"}

    plain_norm = RMSNorm(512)
    fast = plain_norm(x)
    assert _names(fast.grad_fn) & {"_RMSNormBackward"}
    with fused_kernels_disabled():
        plain = plain_norm(x)
    assert not _names(plain.grad_fn) & {"_RMSNormBackward"}
    assert ((fast - plain).abs().max() / plain.abs().max()).item() < F32_TOL
    assert not _names(plain_norm(x.detach().bfloat16().requires_grad_()).grad_fn) & {"_RMSNormBackward"}
