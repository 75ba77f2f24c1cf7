"""How long the eager CPU SSD takes, forward + backward, in each chunk length it could run a model chunk in.

    python infra/ssd_chunk_sweep.py            # the shapes of docs/ops.md's table
    python infra/ssd_chunk_sweep.py --rounds 5

`ssd_scan` on eager CPU runs the model's chunk in sub-chunks (`ssd.fused_chunk`, chunking
is exact); this times the op alone on random inputs, one thread, CPU time, for every
power-of-two sub-chunk from 8 up to the model's chunk (capped at 64), rounds alternating
so machine noise spreads evenly, and marks the one `fused_chunk` picks.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch

from bmojo_neuron.closed_stdout import exit_status_on_closed_stdout
import bmojo_neuron.ops.reference.ssd as ssd

# (name, batch, length, heads, head_dim P, state N, model chunk)
SHAPES = [
    ("cpu-tiny (the default run)", 32, 64, 8, 32, 4, 32),
    ("recall grid, L 256", 32, 256, 8, 32, 16, 64),
    ("recall grid, L 512", 32, 512, 8, 32, 16, 64),
    ("bench train-step, L 1K", 4, 1024, 8, 64, 64, 128),
]


def scan_step(batch: int, length: int, heads: int, head_dim: int, state: int, chunk: int) -> Callable[[], None]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, length, heads, head_dim, generator=g, requires_grad=True)
    dt = torch.randn(batch, length, heads, generator=g).requires_grad_()
    A = (-torch.rand(heads, generator=g) - 0.5).requires_grad_()
    B = torch.randn(batch, length, 1, state, generator=g).requires_grad_()
    C = torch.randn(batch, length, 1, state, generator=g).requires_grad_()
    dt_bias, gy = torch.zeros(heads), torch.randn(batch, length, heads, head_dim, generator=g)

    def run() -> None:
        ssd.ssd_scan(x, dt, A, B, C, chunk, dt_bias=dt_bias).backward(gy)
    return run


def sweep(shape: tuple, rounds: int, repeats: int) -> dict[int, float]:
    """Median CPU ms per sub-chunk length, best over rounds."""
    _, batch, length, heads, head_dim, state, chunk = shape
    run = scan_step(batch, length, heads, head_dim, state, chunk)
    subs = [c for c in (64, 32, 16, 8) if c <= chunk and chunk % c == 0]
    times: dict[int, list[float]] = {c: [] for c in subs}
    saved = ssd.FUSED_CHUNK, ssd.FUSED_CHUNK_MIN
    try:
        for _ in range(rounds):
            for sub in subs:
                ssd.FUSED_CHUNK = ssd.FUSED_CHUNK_MIN = sub  # force this sub-chunk
                run()
                samples = []
                for _ in range(repeats):
                    t0 = time.process_time()
                    run()
                    samples.append(time.process_time() - t0)
                times[sub].append(1000 * statistics.median(samples))
    finally:
        ssd.FUSED_CHUNK, ssd.FUSED_CHUNK_MIN = saved
    return {sub: min(v) for sub, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| shape | batch x L, P, N (model chunk) | " + " | ".join(f"in {c}" for c in (64, 32, 16, 8))
          + " | picked |")
    print("|---|---|---|---|---|---|---|")
    for shape in SHAPES:
        name, batch, length, _, head_dim, state, chunk = shape
        ms = sweep(shape, args.rounds, args.repeats)
        best = min(ms, key=ms.get)
        cells = [("**%.1f**" if c == best else "%.1f") % ms[c] if c in ms else "" for c in (64, 32, 16, 8)]
        picked = ssd.fused_chunk(chunk, head_dim, state)
        print(f"| {name} | {batch} x {length}, {head_dim}, {state} ({chunk}) | " + " | ".join(cells)
              + f" | {picked} |", flush=True)


if __name__ == "__main__":
    sys.exit(exit_status_on_closed_stdout(main))
