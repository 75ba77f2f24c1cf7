"""Projections of one input with one accumulated input gradient (`layers.shared_input`), and the eager gate."""

from __future__ import annotations

import pytest
import torch
from naive import tiny_config
from torch import nn

from bmojo_neuron import BMojoCache, BMojoForCausalLM
from bmojo_neuron.layers import shared_input
from bmojo_neuron.layers.attention import BMojoAttention
from bmojo_neuron.layers.shared_input import eager_untraced, shared_input_linears
from bmojo_neuron.ops.reference.eager_cpu import fused_kernels_disabled


def _linears() -> tuple[nn.Linear, ...]:
    """Three projections of a 6-wide input: with a bias, without one, and one whose weight is frozen."""
    torch.manual_seed(0)
    linears = (nn.Linear(6, 5), nn.Linear(6, 4, bias=False), nn.Linear(6, 3))
    linears[2].weight.requires_grad_(False)
    return tuple(m.double() for m in linears)


def _grads(linears, x, used, fused: bool) -> tuple[list[torch.Tensor], dict[str, torch.Tensor | None]]:
    """Outputs and the gradients (x, each weight and bias) of a loss reading the outputs in `used`."""
    for m in linears:
        m.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(x.requires_grad)
    outs = shared_input_linears(x, *linears) if fused else tuple(m(x) for m in linears)
    if fused:  # the fused path is the one taken
        assert type(outs[0].grad_fn).__name__ == "_SharedInputLinearsBackward"
    loss = sum((outs[i] * torch.linspace(-1, 2, outs[i].numel(), dtype=x.dtype).view_as(outs[i])).sum() for i in used)
    loss.backward()
    grads = {"x": x.grad}
    for i, m in enumerate(linears):
        grads |= {f"{i}.weight": m.weight.grad, f"{i}.bias": None if m.bias is None else m.bias.grad}
    return [o.detach() for o in outs], grads


@pytest.mark.parametrize(("shape", "used", "x_grad"), [((2, 7, 6), (0, 1, 2), True), ((7, 6), (1, 2), True),
                                                      ((2, 7, 6), (0, 2), False)])
def test_shared_input_linears_equal_the_module_calls_with_every_gradient(shape, used, x_grad):
    """Outputs equal the module calls bit for bit; the gradients of x, of every weight and bias equal autograd's
    own (float64, atol 1e-12), including outputs that get no gradient (their weights get none), a frozen weight,
    a missing bias, an input that needs no gradient, 2-D and 3-D inputs."""
    linears = _linears()
    x = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).requires_grad_(x_grad)
    want_outs, want = _grads(linears, x, used, fused=False)
    got_outs, got = _grads(linears, x, used, fused=True)
    for w, g in zip(want_outs, got_outs):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    assert got.keys() == want.keys()
    for name, grad in want.items():
        if grad is None:
            assert got[name] is None, name
        else:
            torch.testing.assert_close(got[name], grad, rtol=0, atol=1e-12, msg=lambda m: f"{name}: {m}")


def test_shared_input_linears_call_the_modules_where_the_fused_path_does_not_apply():
    """No autograd, a subclass of nn.Linear (a sharded or wrapped layer), a forward hook, a traced run
    (`fused_kernels_disabled`: the CPU stand-in of a Neuron run) and nothing needing a gradient: the modules are
    called as they are."""
    linears = _linears()
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)

    class Wrapped(nn.Linear):
        pass

    fused = lambda *mods: type(shared_input_linears(x, *mods)[0].grad_fn).__name__ == "_SharedInputLinearsBackward"  # noqa: E731
    assert fused(*linears)
    with torch.no_grad():
        assert shared_input_linears(x, *linears)[0].grad_fn is None
    assert not fused(Wrapped(6, 2).double(), *linears)
    with fused_kernels_disabled():
        assert not fused(*linears)
    handle = linears[0].register_forward_hook(lambda *args: None)
    assert not fused(*linears)
    handle.remove()
    frozen = nn.Linear(6, 2, bias=False).double().requires_grad_(False)
    assert shared_input_linears(x.detach(), frozen)[0].grad_fn is None


def test_the_eager_gate_depends_on_the_device_kind_and_the_trace_not_on_the_cpu_kernels():
    """The fading cut and the memory skip ask `eager_untraced`: CPU tensors of any dtype (bfloat16 included, which
    the CPU kernels' gate refuses, as it refuses CUDA tensors) run eagerly; XLA-like devices, shape-only tensors,
    fake tensors and `fused_kernels_disabled` do not."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    assert eager_untraced(torch.zeros(2), torch.zeros(2, dtype=torch.bfloat16), None)
    assert not eager_untraced(torch.zeros(2, device="meta"))
    assert shared_input._TRACED_DEVICES == ("xla", "meta") and "cuda" not in shared_input._TRACED_DEVICES
    with FakeTensorMode():
        assert not eager_untraced(torch.zeros(2))
    with fused_kernels_disabled():
        assert not eager_untraced(torch.zeros(2))
    assert BMojoAttention._cuts_fading(False, nn.Linear(2, 2), nn.Linear(2, 2), torch.zeros(1, 2, 2))
    assert not BMojoAttention._cuts_fading(True, nn.Linear(2, 2), nn.Linear(2, 2), torch.zeros(1, 2, 2))


def test_the_fading_cut_applies_to_tensors_the_cpu_kernels_refuse(monkeypatch):
    """A bfloat16 forward (whose tensors `fused_kernel_available` refuses, as it refuses CUDA tensors) projects the
    fading keys only where read, with the same output as projecting every position (bit for bit: each row's
    products are the same)."""
    from bmojo_neuron.layers import attention

    torch.manual_seed(0)
    layer = BMojoAttention(tiny_config(window_size=4, fading_window=3), 0).to(torch.bfloat16).eval()
    rows_seen = []
    layer.k_proj.register_forward_hook(lambda module, args, out: rows_seen.append(args[0].shape[1]))
    x = torch.randn(2, 13, 32, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got, _ = layer(x)
        assert rows_seen == [13, 13 - 4]
        monkeypatch.setattr(attention, "eager_untraced", lambda *tensors: False)
        want, _ = layer(x)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize(("pattern", "options"), [
    ("BS", dict(attention_bias=True, ssm_proj_bias=True, qk_norm=True, freeze_innovation_predictor=True)),
    ("F", dict(tie_fading_projections=False, fading_norm=True)),
])
def test_model_output_and_every_gradient_equal_the_module_calls(pattern, options, monkeypatch):
    """A model whose projections accumulate their input gradients in the GEMMs gives the loss and every
    parameter's gradient of the plain module calls (float64, atol 1e-12): biases, qk_norm, a frozen innovation
    predictor, untied fading projections; and, under autograd, a prefill plus decoding equals the forward
    (float64, atol 1e-9)."""
    torch.manual_seed(0)
    model = BMojoForCausalLM(tiny_config(layer_pattern=pattern, num_hidden_layers=len(pattern), **options)).double()
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(3))

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        out = model(ids, labels=ids)
        out.loss.backward()
        return out.logits.detach(), {n: p.grad for n, p in model.named_parameters()}

    logits, got = loss_and_grads()
    with monkeypatch.context() as plain:
        plain.setattr(shared_input, "_fusable", lambda x, linears: False)
        want_logits, want = loss_and_grads()
    torch.testing.assert_close(logits, want_logits, rtol=0, atol=1e-12)
    for name, grad in want.items():
        if grad is None:
            assert got[name] is None, name
        else:
            torch.testing.assert_close(got[name], grad, rtol=0, atol=1e-12, msg=lambda m: f"{name}: {m}")
    assert any(p.grad is None for p in model.parameters()) == options.get("freeze_innovation_predictor", False)

    cache = BMojoCache(model.config.num_hidden_layers)
    decoded = [model(ids[:, :9], cache=cache, use_cache=True).logits.detach()]  # prefill under autograd
    with torch.no_grad():
        decoded += [model(ids[:, t:t + 1], cache=cache, use_cache=True).logits for t in range(9, ids.shape[1])]
    torch.testing.assert_close(torch.cat(decoded, dim=1), logits, rtol=0, atol=1e-9)
