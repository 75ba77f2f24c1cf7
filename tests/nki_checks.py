"""Checks shared by the NKI kernel tests (kernels run through the emulator: the `nki-sim` ops backend)."""

from __future__ import annotations

import torch

from bmojo_neuron import ops


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| over the whole tensor (b is the reference)."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _loss_and_grads(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    out = model(ids, labels=ids)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_model_matches_on_nki_sim(model: torch.nn.Module, ids: torch.Tensor, sim_ops: tuple[str, ...],
                                    label: str = "") -> None:
    """`model`'s loss on `ids` (its own labels) and every gradient are the same with the `nki-sim` ops
    (`sim_ops` must run there) as with the torch ones: loss within 1e-5 relative, each gradient within
    1e-4 of its max magnitude (fp32)."""
    ref_loss, ref_grads = _loss_and_grads(model, ids)
    with ops.use_backend("nki-sim"):
        assert all(ops.get_backend(op) == "nki-sim" for op in sim_ops), sim_ops
        loss, grads = _loss_and_grads(model, ids)
    assert abs(float(loss - ref_loss)) <= 1e-5 * abs(float(ref_loss)), label
    for name, g in ref_grads.items():
        assert rel_err(grads[name], g) <= 1e-4, f"{label} {name}".strip()
