"""Where the scaling suite's time per token grows with L: the attention op against the rest of the layer.

    python infra/scaling_profile.py                    # d 256, L 1K ... 16K, batch 1
    python infra/scaling_profile.py --rounds 5

Builds the one-layer B'MOJO model `bmojo-neuron bench scaling` times (same shape), and
at each length times forward + backward of the layer and of the `eidetic_attention` op
it calls, on copies of the op's own inputs captured from the layer's forward (one
thread, CPU time, best of `--rounds`, lengths alternating within a round so machine
noise spreads evenly; the host allocator kept as `bench` keeps it). *rest* is the layer
minus the op: projections, the SSM mixer, memory selection and gathers, norms, the MLP.

It also counts the key pairs each query meets in the fused eager-CPU op, averaged over
the sequence: *needed* (its in-context window, its fading window and the memory entries
it can see) and *computed* (every kernel call works on whole ``block x block`` tiles per
query block; masked and causal tiles cost as much as full ones at these sizes). The op
grows with L while the windows and the memory fill; the rest should not grow at all.
The exponents printed are the scaling suite's fit (least-squares slope of log time
against log L) for the layer, the op, the rest, and the layer with the op held at its
per-token cost at the longest length (what the windows filling adds).

Last, the floor: the exponent the layer would have if its attention computed exactly the
needed pairs, no more, at the rate torch's fused CPU kernel reaches on this core (measured
here on the op's tile shape: about the core's matrix-product ceiling). Forward and backward
of one query-key pair of one head cost ``14 * head_dim`` flops as the kernel does them (the
backward recomputes the scores), ``12 * head_dim`` if the scores were kept. With the rest
linear, this is the lowest exponent any exact implementation of the attention reaches on
this machine: the keys a query needs double from 1K to 16K by the model's definition.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable

import numpy as np
import torch
from train_step_profile import Capture, forward_backward

import bmojo_neuron.layers.attention as attention_module
from bmojo_neuron.bench.candidates import CandidateFactory, Shape, first_layer
from bmojo_neuron.bench.harness import fit_exponent
from bmojo_neuron.closed_stdout import exit_status_on_closed_stdout
from bmojo_neuron.host_allocator import keep_freed_memory
from bmojo_neuron.ops.reference.eidetic_attention_fused import call_pieces, default_block

_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
# Flops per query-key pair and head, per unit of head_dim, forward + backward: the forward's two products
# (scores, values) and the backward's five (scores again, the values' and the probabilities' gradients, the
# queries' and the keys' gradients), each a multiply and an add per element; two fewer if scores were kept.
FLOPS_PER_PAIR_RECOMPUTED = 14
FLOPS_PER_PAIR_KEPT = 12


def key_pairs(length: int, config) -> tuple[float, float]:
    """(computed, needed) key pairs per query of one call of the fused op, averaged over the sequence."""
    window, fading, chunk = config.window_size, config.fading_window, config.memory_chunk
    size, picks = config.memory_size, config.memory_picks
    block = default_block(window, length)
    n_blocks = -(-length // block)
    pieces = call_pieces(length, window, fading, block, torch.float32, "cpu")
    band = sum((n_blocks - piece.offset) * block * block for piece in pieces)
    computed = band / length + size  # the memory piece reads all M slots of its chunk, empty ones masked
    i = np.arange(length)
    # A query in chunk j reads the memory after chunk j - lag: the picks of chunks 0 .. j - lag, up to M.
    seen = np.minimum(np.maximum(i // chunk - config.memory_lag + 1, 0) * picks, size)
    needed = np.minimum(i + 1, window) + np.clip(i + 1 - window, 0, fading) + seen
    return computed, float(needed.mean())


def layer_and_op(layer: torch.nn.Module, length: int, hidden: int) -> tuple[Callable[[], None], Callable[[], None]]:
    """Forward + backward closures of `layer` on a (1, length, hidden) input and of its attention op."""
    x = torch.randn(1, length, hidden, generator=torch.Generator().manual_seed(length))
    capture = Capture()
    op = attention_module.ops.eidetic_attention
    attention_module.ops.eidetic_attention = capture.op("op", op)
    try:
        with torch.no_grad():
            layer(x)
    finally:
        attention_module.ops.eidetic_attention = op

    def layer_run() -> None:
        layer.zero_grad(set_to_none=True)
        out, innovation = layer(x.detach().requires_grad_(True))
        (out.square().mean() + (0 if innovation is None else innovation)).backward()

    return layer_run, forward_backward(*capture.calls["op"])


def kernel_flops_per_second(heads: int, head_dim: int, block: int, rounds: int) -> float:
    """Flops per second of torch's fused CPU attention, forward + backward, on (block x 3 block) tiles."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, heads * 4, block, head_dim, generator=g)
    k, v = (torch.randn(1, heads * 4, 3 * block, head_dim, generator=g) for _ in range(2))
    grad = torch.randn_like(q)

    def run() -> None:
        out, lse = _flash(q, k, v)
        _flash_backward(grad, q, k, v, out, lse, 0.0, False)

    seconds = math.inf
    for r in range(rounds + 1):  # the first round warms up
        start = time.process_time()
        run()
        if r:
            seconds = min(seconds, time.process_time() - start)
    return FLOPS_PER_PAIR_RECOMPUTED * head_dim * q.shape[1] * block * 3 * block / seconds


def bmm_flops_per_second(heads: int, head_dim: int, block: int, rounds: int) -> float:
    """Flops per second of `torch.bmm` on the kernel's products at the same tile: scores (block x head_dim by
    head_dim x 3 block) and values (block x 3 block by 3 block x head_dim), the ceiling a kernel written for the
    op would work under."""
    g = torch.Generator().manual_seed(1)
    n = heads * 4
    q, kt = torch.randn(n, block, head_dim, generator=g), torch.randn(n, head_dim, 3 * block, generator=g)
    p, v = torch.randn(n, block, 3 * block, generator=g), torch.randn(n, 3 * block, head_dim, generator=g)
    seconds = math.inf
    for r in range(rounds + 1):  # the first round warms up
        start = time.process_time()
        torch.bmm(q, kt)
        torch.bmm(p, v)
        if r:
            seconds = min(seconds, time.process_time() - start)
    return 2 * 2 * n * block * 3 * block * head_dim / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="1024,2048,4096,8192,16384")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    keep_freed_memory()  # as `bench` times (`host_allocator`)
    shape = Shape()
    built = CandidateFactory(shape, num_layers=1, causal_lm=False).build("bmojo")
    layer = first_layer(built).train()
    lengths = [int(v) for v in args.lengths.split(",")]
    runs = {length: layer_and_op(layer, length, shape.hidden_size) for length in lengths}

    best = {(length, part): math.inf for length in lengths for part in (0, 1)}
    for r in range(args.rounds + 1):  # the first round warms up
        for length, pair in runs.items():
            for part, run in enumerate(pair):
                start = time.process_time()
                run()
                if r:
                    best[length, part] = min(best[length, part], time.process_time() - start)

    print("one B'MOJO layer, forward + backward, batch 1, one thread, best CPU time; us per token")
    print("| L | layer | attention op | rest | key pairs per query: needed | computed |\n|---|---|---|---|---|---|")
    layer_us, op_us = (np.array([best[length, part] / length * 1e6 for length in lengths]) for part in (0, 1))
    for length, total, op in zip(lengths, layer_us, op_us):
        computed, needed = key_pairs(length, built.config)
        print(f"| {length:,} | {total:.1f} | {op:.1f} | {total - op:.1f} | {needed:,.0f} | {computed:,.0f} |")

    def exponent(per_token: np.ndarray) -> float | None:
        return fit_exponent(lengths, list(np.array(lengths) * per_token))

    print(f"\ntime exponents: layer {exponent(layer_us)}, attention op {exponent(op_us)}, "
          f"rest {exponent(layer_us - op_us)}; the layer with the op at its L={lengths[-1]:,} cost per token "
          f"throughout {exponent(layer_us - op_us + op_us[-1])}")

    config = built.config
    heads, head_dim = config.num_attention_heads, config.head_dim
    rate = kernel_flops_per_second(heads, head_dim, default_block(config.window_size, lengths[-1]), args.rounds)
    needed = np.array([key_pairs(length, config)[1] for length in lengths])
    rest = layer_us - op_us
    bmm = bmm_flops_per_second(heads, head_dim, default_block(config.window_size, lengths[-1]), args.rounds)
    print(f"\nthe fused kernel, forward + backward: {rate / 1e9:.1f} GFLOP/s on this core (torch.bmm on the same "
          f"products: {bmm / 1e9:.1f}); an attention computing only the needed pairs at that rate would leave the "
          f"layer's exponent at")
    for label, flops in (("scores recomputed in the backward", FLOPS_PER_PAIR_RECOMPUTED),
                         ("scores kept from the forward", FLOPS_PER_PAIR_KEPT)):
        ideal_us = needed * heads * flops * head_dim / rate * 1e6
        print(f"  {exponent(rest + ideal_us)} ({label}; attention {ideal_us[0]:.1f} -> {ideal_us[-1]:.1f} us per token)")


if __name__ == "__main__":
    sys.exit(exit_status_on_closed_stdout(main))
