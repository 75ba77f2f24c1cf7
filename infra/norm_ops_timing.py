"""Forward + backward time of the norm ops and SwiGLU's product, ``torch`` against ``cpu-c``, alternating.

    python infra/norm_ops_timing.py --pairs 3

At the bench model's widths (batch 4, L 1K: RMS norm over d 256, the gated norm over the
SSM's inner width 512 in one group, SwiGLU's product at width 768), one thread, CPU clock
(`time.process_time`, so a loaded machine's other processes count less). Each pair runs
the torch backend then ``cpu-c`` on the same inputs; a run is the best of `--repeats`
forward + backward passes. Prints ms per op and backend, pair by pair, and the median cut.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from bmojo_neuron import ops

BATCH, LENGTH, HIDDEN, INNER, FFN = 4, 1024, 256, 512, 768


def _cases() -> dict[str, tuple[Callable, list[torch.Tensor]]]:
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return {
        "gated_rms_norm": (lambda x, z, w: ops.gated_rms_norm(x, z, w, INNER, 1e-5),
                           [r(BATCH, LENGTH, INNER), r(BATCH, LENGTH, INNER), r(INNER)]),
        "swiglu_product": (ops.swiglu_product, [r(BATCH, LENGTH, FFN), r(BATCH, LENGTH, FFN)]),
        "rms_norm": (lambda x, w: ops.rms_norm(x, w, 1e-5), [r(BATCH, LENGTH, HIDDEN), r(HIDDEN)]),
    }


def _time(fn: Callable, inputs: list[torch.Tensor], repeats: int) -> float:
    """Best CPU-clock ms of `repeats` forward + backward passes."""
    leaves = [t.clone().requires_grad_() for t in inputs]
    grad = torch.randn(fn(*leaves).shape)
    best = float("inf")
    for _ in range(repeats):
        for t in leaves:
            t.grad = None
        start = time.process_time()
        fn(*leaves).backward(grad)
        best = min(best, time.process_time() - start)
    return best * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cases = _cases()
    cuts: dict[str, list[float]] = {name: [] for name in cases}
    for pair in range(args.pairs):
        for name, (fn, inputs) in cases.items():
            times = {}
            for backend in ("torch", "cpu-c"):
                with ops.use_backend(backend, [name]):
                    times[backend] = _time(fn, inputs, args.repeats)
            cuts[name].append(1 - times["cpu-c"] / times["torch"])
            print(f"pair {pair + 1}  {name:15s} torch {times['torch']:7.2f} ms  cpu-c {times['cpu-c']:7.2f} ms  "
                  f"cut {cuts[name][-1]:5.1%}", flush=True)
    for name, values in cuts.items():
        print(f"median cut  {name:15s} {statistics.median(values):5.1%}")


if __name__ == "__main__":
    main()
