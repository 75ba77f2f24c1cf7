"""How long Mamba-2's two convs with their SiLU take on the ``torch`` and ``cpu-c`` backends, side by side.

    python infra/causal_conv_timing.py                 # batch 4, L 1K, the bench model's widths
    python infra/causal_conv_timing.py --rounds 5 --length 16384 --batch 1

Times the `causal_conv1d_rows` op alone on random inputs, one thread, CPU time: one
layer's pair of convs (x: 512 channels, B/C: 128; K 4, with bias and SiLU, as
`bmojo-neuron bench train-step`'s model has them), forward alone and forward + backward,
the median of `--repeats` runs per round, rounds alternating between the backends so
that the machine's load falls on both alike.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch

from bmojo_neuron import ops
from bmojo_neuron.closed_stdout import exit_status_on_closed_stdout

BACKENDS = ("torch", "cpu-c")


def conv_pair(batch: int, length: int, widths: list[int], kernel: int) -> tuple[Callable[[], None], Callable[[], None]]:
    """The forward, and the forward + backward, of one conv + SiLU per width on random inputs."""
    g = torch.Generator().manual_seed(0)
    convs = [(torch.randn(batch, length, c, generator=g, requires_grad=True),
              (torch.randn(c, 1, kernel, generator=g) * 0.5).requires_grad_(),
              torch.randn(c, generator=g).requires_grad_(), torch.randn(batch, length, c, generator=g))
             for c in widths]

    def forward() -> None:
        with torch.no_grad():
            for x, w, b, _ in convs:
                ops.causal_conv1d_rows(x, w, b, silu=True)

    def forward_backward() -> None:
        for x, w, b, grad in convs:
            out, _ = ops.causal_conv1d_rows(x, w, b, silu=True)
            out.backward(grad)
    return forward, forward_backward


def median_ms(fn: Callable[[], None], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.process_time()
        fn()
        times.append((time.process_time() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--widths", default="512,128", help="channels of each conv, comma-separated")
    parser.add_argument("--kernel", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    forward, forward_backward = conv_pair(args.batch, args.length, [int(w) for w in args.widths.split(",")],
                                          args.kernel)
    print(f"causal_conv1d_rows + SiLU, widths {args.widths}, batch {args.batch}, L {args.length}, K {args.kernel}, "
          f"one thread, CPU ms, median of {args.repeats}")
    print("| round | backend | forward | forward + backward |\n|---|---|---|---|")
    for r in range(args.rounds):
        for name in BACKENDS:
            with ops.use_backend(name, ["causal_conv1d_rows"]):
                forward_backward()  # warm: the C library is built and loaded on first use
                f, fb = median_ms(forward, args.repeats), median_ms(forward_backward, args.repeats)
            print(f"| {r + 1} | {name} | {f:.1f} | {fb:.1f} |", flush=True)


if __name__ == "__main__":
    sys.exit(exit_status_on_closed_stdout(main))
