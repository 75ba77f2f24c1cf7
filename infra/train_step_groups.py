"""A train step's time split by the model's own parts, forward and backward, beyond products and attention.

    python infra/train_step_groups.py --length 1024 --rounds 3
    python infra/train_step_groups.py --candidate hf-mistral-swa

Builds the candidate as `bmojo-neuron bench train-step` does (batch 4, and the same
allocator setting, `host_allocator.keep_freed_memory`, so that no row counts the page
faults of fresh activation memory the bench never pays) and profiles whole train steps (forward, loss, backward) with `torch.profiler`, one thread. Every
B'MOJO part of interest (conv + SiLU, the SSD op, the gated norm, the RMS norms, the
rotary, memory selection, memory gathers, the attention op, ...) runs inside a
`record_function` scope; each op's self CPU time goes to the innermost scope around it.
A backward op has no scope of its own: it goes to the scope of the forward op whose
autograd node it runs, matched by the autograd sequence number both events carry.

Each op is also put in one kind: matrix products (``mm``/``addmm``), the attention
kernels (fused SDPA forward and backward), or everything else (the work a fused kernel
could remove). The table gives, per part, "everything else" forward and backward (the
median over the rounds) and the products and attention kernels together.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import statistics
import sys
from collections import defaultdict
from collections.abc import Callable, Iterator

import torch

import bmojo_neuron.layers.attention as attention_module
import bmojo_neuron.layers.mamba2 as mamba2_module
from bmojo_neuron import ops
from bmojo_neuron.bench.candidates import CandidateFactory, Shape
from bmojo_neuron.closed_stdout import exit_status_on_closed_stdout
from bmojo_neuron.host_allocator import keep_freed_memory
from bmojo_neuron.layers import norms as norms_module
from bmojo_neuron.ops.cpu_c import ssd as cpu_c_ssd
from bmojo_neuron.ops.reference import ssd as ssd_module
from bmojo_neuron.layers.decoder import BMojoDecoderLayer
from bmojo_neuron.layers.mlp import SwiGLU

SCOPE = "part: "
PRODUCTS = ("aten::mm", "aten::addmm")
ATTENTION = ("aten::_scaled_dot_product_flash_attention_for_cpu",
             "aten::_scaled_dot_product_flash_attention_for_cpu_backward")


def _scoped(name: str, fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with torch.profiler.record_function(SCOPE + name):
            return fn(*args, **kwargs)
    return wrapped


@contextlib.contextmanager
def bmojo_scopes() -> Iterator[None]:
    """Wrap B'MOJO's parts in named scopes for the block (restored afterwards)."""
    patches = [
        (BMojoDecoderLayer, "forward", "layer: residual adds"),
        (attention_module.BMojoAttention, "forward", "B mixer: q/k/v/o, innovation proj, rest"),
        (attention_module.BMojoAttention, "_rotate", "B mixer: rotary (q, k, fading k)"),
        (attention_module.BMojoAttention, "_rotary_tables", "B mixer: rotary (q, k, fading k)"),
        (attention_module.BMojoAttention, "_select_memory", "B mixer: memory selection (innovation, picks)"),
        (attention_module.BMojoAttention, "_memory_for_chunks", "B mixer: memory gathers + rotation"),
        (attention_module.BMojoAttention, "_output", "B mixer: o_proj + gain * S"),
        (attention_module.ops, "eidetic_attention", "attention op (pieces, merges; kernels apart)"),
        (mamba2_module.Mamba2Mixer, "forward", "Mamba-2: projections, A, reshapes"),
        (ops, "causal_conv1d_rows", "Mamba-2: conv + SiLU (x and B/C)"),
        (ops, "ssd_scan", "Mamba-2: ssd_scan op (softplus, pad, D, casts)"),
        (ssd_module, "_scan_fused", "Mamba-2: SSD chunk core"),
        (cpu_c_ssd, "_scan_in_c", "Mamba-2: SSD chunk core"),  # under cpu-c: the whole op in C
        (norms_module.GatedRMSNorm, "forward", "Mamba-2: gated RMS norm"),
        (norms_module.RMSNorm, "forward", "RMS norms (pre-norms, final)"),
        (SwiGLU, "forward", "SwiGLU MLP (silu * up)"),
    ]
    saved = [(owner, attr, owner.__dict__[attr]) for owner, attr, _ in patches]
    try:
        for owner, attr, name in patches:
            setattr(owner, attr, _scoped(name, owner.__dict__[attr]))
        yield
    finally:
        for owner, attr, original in saved:
            setattr(owner, attr, original)


def _kind(name: str) -> str:
    if name in PRODUCTS:
        return "products"
    if name in ATTENTION:
        return "attention"
    return "else"


def _scope_of(event) -> str:
    parent = event
    while parent is not None:
        if parent.name.startswith(SCOPE):
            return parent.name[len(SCOPE):]
        parent = parent.cpu_parent
    return "model: embedding, loss, final norm, rest"


def split(events) -> dict[tuple[str, str, str], float]:
    """(part, forward/backward, kind) -> self CPU ms of one profiled step."""
    by_seq: dict[int, str] = {}
    for e in events:  # forward ops that made an autograd node: the scope of their node
        if e.sequence_nr >= 0 and not _in_backward(e):
            by_seq.setdefault(e.sequence_nr, _scope_of(e))
    out: dict[tuple[str, str, str], float] = defaultdict(float)
    for e in events:
        if e.name.startswith(SCOPE):
            continue
        root = _backward_root(e)
        if root is None:
            key = (_scope_of(e), "forward")
        else:
            key = (by_seq.get(root.sequence_nr, "unmatched backward"), "backward")
        out[(*key, _kind(e.name))] += e.self_cpu_time_total / 1e3
    return out


def _backward_root(event):
    node = event
    while node is not None:
        if node.name.startswith("autograd::engine::evaluate_function"):
            return node
        node = node.cpu_parent
    return None


def _in_backward(event) -> bool:
    return _backward_root(event) is not None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--candidate", default="bmojo")
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    keep_freed_memory()  # as `bench` times (`commands/bench.py`)
    shape = Shape()
    model = CandidateFactory(shape).build(args.candidate).model.train()
    ids = torch.randint(0, shape.vocab_size, (args.batch, args.length), generator=torch.Generator().manual_seed(0))

    def step() -> None:
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()

    rounds: list[dict] = []
    with bmojo_scopes():
        step()
        for _ in range(args.rounds):
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                step()
            rounds.append(split(prof.events()))
    keys = sorted({k for r in rounds for k in r})
    median = {k: statistics.median(r.get(k, 0.0) for r in rounds) for k in keys}
    parts = sorted({k[0] for k in keys}, key=lambda p: -sum(median.get((p, d, "else"), 0) for d in ("forward", "backward")))
    print(f"{args.candidate}: one train step, batch {args.batch}, L {args.length}, one thread, self CPU ms, "
          f"median of {args.rounds} profiled steps")
    print("| part | else fwd | else bwd | else total | products + attention |\n|---|---|---|---|---|")
    totals = defaultdict(float)
    for p in parts:
        f, b = median.get((p, "forward", "else"), 0.0), median.get((p, "backward", "else"), 0.0)
        pa = sum(median.get((p, d, k), 0.0) for d in ("forward", "backward") for k in ("products", "attention"))
        totals["f"] += f
        totals["b"] += b
        totals["pa"] += pa
        print(f"| {p} | {f:,.0f} | {b:,.0f} | {f + b:,.0f} | {pa:,.0f} |")
    print(f"| **all** | {totals['f']:,.0f} | {totals['b']:,.0f} | {totals['f'] + totals['b']:,.0f} | {totals['pa']:,.0f} |")
    for kind in ("products", "attention", "else"):
        print(f"{kind}: {sum(v for k, v in median.items() if k[2] == kind):,.0f} ms")


if __name__ == "__main__":
    sys.exit(exit_status_on_closed_stdout(main))
