"""Per-token decode latency of the bench's B'MOJO model, eager and compiled, side by side in one process.

    python infra/compiled_decode_latency.py --context 1024 --rounds 8

The `bmojo` candidate of `bmojo-neuron bench decode` (same shapes) is prefilled with a
random context; two copies of its cache then decode the same token, one through the
model as it is and one through `torch.compile(model, fullgraph=True, dynamic=False)`
(`--backend`, default inductor). Printed: the compile time (the first compiled token),
then this process's CPU time per token with one thread, best and median of `--rounds`
alternating rounds of `--tokens` tokens each (robust on a shared machine), the ratio of
the medians, and the largest logit difference between the two on the last token.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from bmojo_neuron import BMojoCache
from bmojo_neuron.bench.candidates import CandidateFactory, Shape
from bmojo_neuron.closed_stdout import exit_status_on_closed_stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=30, help="tokens per timed round")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--backend", default="inductor")
    args = parser.parse_args()
    torch.set_num_threads(1)
    decoded = 4 + 2 * args.rounds * args.tokens  # warm-up and timed tokens of one cache
    shape = Shape(max_length=max(args.context + decoded, Shape().max_length))
    model = CandidateFactory(shape).build("bmojo").model.eval()
    context = torch.randint(0, shape.vocab_size, (1, args.context), generator=torch.Generator().manual_seed(0))
    cache = BMojoCache(model.config.num_hidden_layers, max_length=args.context + decoded)
    with torch.no_grad():
        token = model(context, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1:].argmax(-1)
    caches = {"eager": cache.copy(), "compiled": cache.copy()}
    steps = {"eager": model, "compiled": torch.compile(model, fullgraph=True, dynamic=False, backend=args.backend)}

    def step(name: str) -> torch.Tensor:
        with torch.no_grad():
            return steps[name](token, cache=caches[name], use_cache=True).logits

    start = time.perf_counter()
    step("compiled")
    print(f"compile (first compiled token): {time.perf_counter() - start:.1f} s wall")
    step("eager")
    for name in steps:
        for _ in range(3):
            step(name)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name in steps:
            start = time.process_time()
            for _ in range(args.tokens):
                step(name)
            times[name].append((time.process_time() - start) / args.tokens * 1e3)
    for name, t in times.items():
        print(f"{name}: {min(t):.2f} ms/token best, {statistics.median(t):.2f} median")
    ratio = statistics.median(times["eager"]) / statistics.median(times["compiled"])
    difference = (step("eager") - step("compiled")).abs().max().item()
    print(f"eager / compiled (medians): {ratio:.2f}; largest logit difference on the next token: {difference:.2e}")


if __name__ == "__main__":
    sys.exit(exit_status_on_closed_stdout(main))
