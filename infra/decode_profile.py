"""Per-token decode cost of bench candidates, side by side: dispatched torch ops and CPU time.

    python infra/decode_profile.py --context 1024 --candidates bmojo,hf-mistral-swa

Each candidate is built as `bmojo-neuron bench decode` builds it (same shapes, matched
parameters), prefilled with the same random context, then decodes the same token
repeatedly. The op count is every call that reaches torch's dispatcher during one
token (views included), counted with a `TorchDispatchMode`, with the most frequent
ops; the time is this process's CPU time per token with one thread, the best and the
median of `--rounds` alternating rounds of `--tokens` tokens (robust on a shared
machine; the bench suite gives the same ratio with `--clock cpu --threads 1`).
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bmojo_neuron.bench.candidates import CandidateFactory, Shape
from bmojo_neuron.bench.suites import Decoder
from bmojo_neuron.closed_stdout import exit_status_on_closed_stdout


class OpCounter(TorchDispatchMode):
    """Counts the ops that reach the dispatcher, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--candidates", default="bmojo,hf-mistral-swa")
    parser.add_argument("--tokens", type=int, default=30, help="tokens per timed round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    shape = Shape(max_length=max(args.context + 64, Shape().max_length))
    factory = CandidateFactory(shape)
    context = torch.randint(0, shape.vocab_size, (1, args.context), generator=torch.Generator().manual_seed(0))
    decoders = {}
    for name in args.candidates.split(","):
        decoder = Decoder(name, factory.build(name).model.eval(), context)
        decoder.prefill()
        for _ in range(3):
            decoder.step()
        with OpCounter() as counter:
            decoder.step()
        top = ", ".join(f"{op} {n}" for op, n in counter.counts.most_common(8))
        print(f"{name}: {sum(counter.counts.values())} ops per token ({top}, ...)")
        decoders[name] = decoder
    times = collections.defaultdict(list)
    for _ in range(args.rounds):
        for name, decoder in decoders.items():
            start = time.process_time()
            for _ in range(args.tokens):
                decoder.step()
            times[name].append((time.process_time() - start) / args.tokens * 1e3)
    first = next(iter(decoders))
    for name, t in times.items():
        ratio = statistics.median(times[first]) / statistics.median(t)
        print(f"{name}: {min(t):.2f} ms/token best, {statistics.median(t):.2f} median; {first} / {name} {ratio:.2f}")


if __name__ == "__main__":
    sys.exit(exit_status_on_closed_stdout(main))
