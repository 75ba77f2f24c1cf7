"""The gate of the B layer's eager-only shape cuts (`layers.eager_gate`): any device that runs op by op."""

from __future__ import annotations

import pytest
import torch
from naive import tiny_config
from torch import nn

from bmojo_neuron.layers import attention, eager_gate
from bmojo_neuron.layers.attention import BMojoAttention
from bmojo_neuron.layers.eager_gate import eager_untraced, executes_eagerly
from bmojo_neuron.ops.reference.eager_cpu import fused_kernels_disabled


def test_the_gate_depends_on_the_device_kind_and_the_trace_not_on_the_cpu_kernels():
    """CUDA, MPS and CPU run op by op, XLA and meta do not; CPU tensors of any dtype (bfloat16 included, which the
    CPU kernels' gate refuses) pass; fake tensors (the step-graph export), `fused_kernels_disabled` (the CPU
    stand-in of a Neuron run) and a prefill do not cut."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    assert [executes_eagerly(kind) for kind in ("cpu", "cuda", "mps", "xla", "meta")] == [True] * 3 + [False] * 2
    assert eager_untraced(torch.zeros(2), torch.zeros(2, dtype=torch.bfloat16), None)
    assert not eager_untraced(torch.zeros(2, device="meta"))
    with FakeTensorMode():
        assert not eager_untraced(torch.zeros(2))
    with fused_kernels_disabled():
        assert not eager_untraced(torch.zeros(2))
    linears, s = (nn.Linear(2, 2), nn.Linear(2, 2)), torch.zeros(1, 2, 2)
    assert BMojoAttention._cuts_fading(False, *linears, s) and not BMojoAttention._cuts_fading(True, *linears, s)


@pytest.mark.parametrize("eager_meta", [True, False])
def test_a_device_other_than_the_cpu_gets_the_cut_when_it_runs_eagerly(eager_meta, monkeypatch):
    """Without a GPU, meta tensors stand in for another device (one `fused_kernel_available` refuses, as it
    refuses CUDA): counted as eager, the layer projects the fading keys of the 13 - w positions read and selects
    no memory (one chunk of 5 reads none: lag 3), forward and backward; counted as traced, every position and
    the selection are kept, as before."""
    if eager_meta:
        monkeypatch.setattr(eager_gate, "_TRACED_DEVICES", ("xla",))
    selected = []
    select = attention.select_memory
    monkeypatch.setattr(attention, "select_memory", lambda *a, **k: selected.append(1) or select(*a, **k))
    torch.manual_seed(0)
    layer = BMojoAttention(tiny_config(window_size=4, fading_window=3), 0).to("meta").train()
    rows = []
    layer.k_proj.register_forward_hook(lambda module, args, out: rows.append(args[0].shape[1]))
    x = torch.randn(2, 13, 32, device="meta", requires_grad=True)
    out, mean_innovation = layer(x)
    (out.sum() + mean_innovation).backward()
    assert rows == ([13, 13 - 4] if eager_meta else [13, 13])
    assert selected == ([] if eager_meta else [1])
    assert out.shape == x.grad.shape == x.shape


def test_the_fading_cut_applies_to_tensors_the_cpu_kernels_refuse(monkeypatch):
    """A bfloat16 forward (whose tensors `fused_kernel_available` refuses) projects the fading keys only where read,
    with the same output as projecting every position, bit for bit (each row's products are the same)."""
    torch.manual_seed(0)
    layer = BMojoAttention(tiny_config(window_size=4, fading_window=3), 0).to(torch.bfloat16).eval()
    rows = []
    layer.k_proj.register_forward_hook(lambda module, args, out: rows.append(args[0].shape[1]))
    x = torch.randn(2, 13, 32, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got, _ = layer(x)
        assert rows == [13, 13 - 4]
        monkeypatch.setattr(attention, "eager_untraced", lambda *tensors: False)
        want, _ = layer(x)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
