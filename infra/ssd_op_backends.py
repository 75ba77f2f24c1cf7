"""How long `ssd_scan` takes, forward and backward, on the torch and ``cpu-c`` backends, side by side.

    python infra/ssd_op_backends.py                 # the bench's Mamba-2 layer: batch 4, L 1K, 8 x 64, N 64
    python infra/ssd_op_backends.py --rounds 5 --backends cpu-c

One thread, CPU time, random inputs with D and dt_bias as the model passes them; each round
runs every backend once (alternating, so machine noise spreads evenly) and the best round
is printed, forward and backward apart and their best sum.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from bmojo_neuron import ops
from bmojo_neuron.closed_stdout import exit_status_on_closed_stdout


def _inputs(batch: int, length: int, heads: int, head_dim: int, state: int) -> dict:
    g = torch.Generator().manual_seed(0)
    leaf = lambda *shape: torch.randn(*shape, generator=g).requires_grad_()  # noqa: E731
    return dict(x=leaf(batch, length, heads, head_dim), dt=leaf(batch, length, heads),
                A=(-torch.rand(heads, generator=g) - 0.5).requires_grad_(), B=leaf(batch, length, 1, state),
                C=leaf(batch, length, 1, state), D=leaf(heads), dt_bias=leaf(heads))


def _time_once(backend: str, inputs: dict, chunk: int, gy: torch.Tensor) -> tuple[float, float]:
    """CPU ms of one forward and one backward."""
    with ops.use_backend(backend, ["ssd_scan"]):
        t0 = time.process_time()
        y = ops.ssd_scan(chunk_size=chunk, **inputs)
        t1 = time.process_time()
        y.backward(gy)
        t2 = time.process_time()
    return 1e3 * (t1 - t0), 1e3 * (t2 - t1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", nargs="+", default=["torch", "cpu-c"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--state", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=128, help="the model's chunk_size")
    args = parser.parse_args()
    torch.set_num_threads(1)
    inputs = _inputs(args.batch, args.length, args.heads, args.head_dim, args.state)
    gy = torch.randn(inputs["x"].shape, generator=torch.Generator().manual_seed(1))
    times: dict[str, list[tuple[float, float]]] = {b: [] for b in args.backends}
    for backend in args.backends:  # warm-up: builds, first allocations
        _time_once(backend, inputs, args.chunk, gy)
    for _ in range(args.rounds):
        for backend in args.backends:
            times[backend].append(_time_once(backend, inputs, args.chunk, gy))
    print(f"ssd_scan, batch {args.batch}, L {args.length}, {args.heads} heads x {args.head_dim}, N {args.state}, "
          f"one thread, CPU ms, best of {args.rounds} alternating rounds")
    print("| backend | forward | backward | forward + backward |\n|---|---|---|---|")
    for backend, rows in times.items():
        print(f"| {backend} | {min(f for f, _ in rows):.1f} | {min(b for _, b in rows):.1f} | "
              f"{min(f + b for f, b in rows):.1f} |")


if __name__ == "__main__":
    sys.exit(exit_status_on_closed_stdout(main))
