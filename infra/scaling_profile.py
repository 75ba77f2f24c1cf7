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


if __name__ == "__main__":
    sys.exit(exit_status_on_closed_stdout(main))
