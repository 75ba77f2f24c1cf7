"""Plain linear projections that read one input, with that input's gradient summed inside the products.

When several projections read the same tensor (q, k and v; the SSM's input projections;
the MLP's gate and up), autograd computes one input gradient per product and sums them
with a separate elementwise add per extra reader, each a full pass over (batch * L, d).
`shared_input_linears` runs the products as the modules would (one `F.linear` each, no
concatenation: splitting a concatenated output would copy every output gradient) and
builds the input gradient as one chain of GEMMs, each accumulating into the previous
result (``addmm_``, beta 1). Weight and bias gradients are the products autograd's own
`linear` backward makes.

It applies only where it gives what the modules give: eager, untraced tensors
(`eager_untraced`) and projections that are exactly `nn.Linear` without hooks. A
sharded projection (NxD's column-parallel linears) has its own backward, which
all-reduces or gathers the input gradient across ranks, and a traced graph (Neuron/XLA,
`torch.compile`) is compiled as a whole from the plain module calls, so the step graphs
stay as they are; both keep calling the modules.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.reference.eager_cpu import fused_kernel_available

__all__ = ["eager_untraced", "shared_input_linears"]

_TRACED_DEVICES = ("xla", "meta")  # lazy-graph and shape-only devices: their programs are traced, not run op by op


def eager_untraced(*tensors: Tensor | None) -> bool:
    """Whether these tensors (None skipped) run op by op outside any trace, on any device but XLA.

    Unlike `fused_kernel_available` (CPU float32/float64 only, for the CPU kernels), this
    asks only what a graph-shape decision needs: no `torch.compile`/`torch.jit` trace, no
    `fused_kernels_disabled` block (the CPU stand-in of a Neuron/XLA run), plain tensors
    (no fake, functional or proxy wrappers), and a device that executes eagerly.
    """
    if torch.jit.is_tracing() or not fused_kernel_available():  # no tensors: only the trace and disabled checks
        return False
    return all(
        type(t) in (torch.Tensor, nn.Parameter) and t.device.type not in _TRACED_DEVICES
        for t in tensors if t is not None
    )


def _fusable(x: Tensor, linears: tuple[nn.Module, ...]) -> bool:
    if not torch.is_grad_enabled() or torch.is_autocast_enabled(x.device.type):
        return False  # nothing to accumulate; autocast casts module calls, which the products here bypass
    if not all(type(m) is nn.Linear and not m._forward_hooks and not m._forward_pre_hooks for m in linears):
        return False
    if not (x.requires_grad or any(m.weight.requires_grad for m in linears)):
        return False
    return eager_untraced(x, *(m.weight for m in linears))


def shared_input_linears(x: Tensor, *linears: nn.Module) -> tuple[Tensor, ...]:
    """``tuple(m(x) for m in linears)``; for plain eager `nn.Linear` under autograd, with one accumulated input gradient."""
    if not _fusable(x, linears):
        return tuple(m(x) for m in linears)
    params = [t for m in linears for t in (m.weight, m.bias)]
    return _SharedInputLinears.apply(x, *params)


class _SharedInputLinears(torch.autograd.Function):
    """Forward: `F.linear(x, w_i, b_i)` for each (weight, bias) pair. Backward: dx = sum_i g_i w_i in one GEMM chain."""

    @staticmethod
    def forward(ctx, x: Tensor, *params: Tensor | None) -> tuple[Tensor, ...]:
        weights, biases = params[0::2], params[1::2]
        rows = x.reshape(-1, x.shape[-1])  # what `F.linear` folds a 3-D input into (one GEMM over all rows)
        lead = x.shape[:-1]
        outputs = tuple(F.linear(rows, w, b).view(*lead, w.shape[0]) for w, b in zip(weights, biases))
        ctx.save_for_backward(rows, *weights)
        ctx.input_shape = x.shape
        ctx.set_materialize_grads(False)  # an output nobody used contributes nothing, not a product with zeros
        return outputs

    @staticmethod
    def backward(ctx, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        rows, *weights = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grad_x = None
        param_grads: list[Tensor | None] = []
        for i, (g, w) in enumerate(zip(grads, weights)):
            needs_w, needs_b = needs[1 + 2 * i], needs[2 + 2 * i]
            if g is None:
                param_grads += [None, None]
                continue
            g = g.reshape(-1, w.shape[0])
            if needs[0]:
                grad_x = g.mm(w) if grad_x is None else grad_x.addmm_(g, w)
            # as `linear`'s own backward: (x^T g)^T for the weight, the column sums for the bias
            param_grads.append(rows.t().mm(g).t() if needs_w else None)
            param_grads.append(g.sum(0) if needs_b else None)
        if grad_x is not None:
            grad_x = grad_x.view(ctx.input_shape)
        return (grad_x, *param_grads)
