"""Where a train step's time goes, per layer component: forward + backward CPU time, side by side.

    python infra/train_step_profile.py --length 1024 --rounds 3
    python infra/train_step_profile.py --length 1024 --ops bmojo    # also torch.profiler's op table of one step

Each candidate is built as `bmojo-neuron bench train-step` builds it (same shapes, matched
parameters, batch 4) and runs one forward over the same random tokens; the inputs of its
first layer's parts are captured on the way (the layer, its mixer, the B layer's SSM
mixer and MLP, and the `ssd_scan` and `eidetic_attention` ops it calls). Each part then
runs forward + backward on copies of those inputs (a fixed random output gradient), in
alternating rounds; the table gives each part's best and median CPU time with one
thread (robust on a shared machine). What a part costs beyond its sub-parts is what
the sub-parts do not explain: for the B mixer, its projections, rotary, innovation,
memory selection and gathers.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

import bmojo_neuron.layers.attention as attention_module
import bmojo_neuron.layers.mamba2 as mamba2_module
from bmojo_neuron.bench.candidates import CandidateFactory, Shape
from bmojo_neuron.closed_stdout import exit_status_on_closed_stdout


def _detached(x: Any) -> Any:
    if torch.is_tensor(x):
        return x.detach()
    if isinstance(x, dict):
        return {k: _detached(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_detached(v) for v in x)
    return x


class Capture:
    """The first call's inputs of modules and ops, by name."""

    def __init__(self) -> None:
        self.calls: dict[str, tuple[Callable, list, dict]] = {}

    def module(self, name: str, module: torch.nn.Module) -> None:
        def hook(mod, args, kwargs):
            self.calls.setdefault(name, (mod, _detached(list(args)), _detached(kwargs)))
        module.register_forward_pre_hook(hook, with_kwargs=True)

    def op(self, name: str, fn: Callable) -> Callable:
        def wrapped(*args, **kwargs):
            self.calls.setdefault(name, (fn, _detached(list(args)), _detached(kwargs)))
            return fn(*args, **kwargs)
        return wrapped


def forward_backward(fn: Callable, args: list, kwargs: dict) -> Callable[[], None]:
    """A closure running `fn` forward and backward on fresh leaves copied from `args`."""
    leaves = [a.clone().requires_grad_(a.is_floating_point()) if torch.is_tensor(a) else a for a in args]
    grads: dict[tuple, torch.Tensor] = {}

    def run() -> None:
        out = fn(*leaves, **kwargs)
        out = out[0] if isinstance(out, tuple) else out
        key = tuple(out.shape)
        if key not in grads:
            grads[key] = torch.randn(out.shape, generator=torch.Generator().manual_seed(0), dtype=out.dtype)
        out.backward(grads[key])
        for leaf in leaves:
            if torch.is_tensor(leaf):
                leaf.grad = None
        if isinstance(fn, torch.nn.Module):
            fn.zero_grad(set_to_none=True)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ops", default="", help="comma-separated candidates whose whole step to profile op by op")
    args = parser.parse_args()
    torch.set_num_threads(1)
    shape = Shape()
    factory = CandidateFactory(shape)
    ids = torch.randint(0, shape.vocab_size, (args.batch, args.length), generator=torch.Generator().manual_seed(0))
    capture = Capture()

    bmojo = factory.build("bmojo").model.train()
    layer = bmojo.model.layers[0]
    capture.module("bmojo: B layer", layer)
    capture.module("bmojo: B mixer", layer.mixer)
    capture.module("bmojo: Mamba-2 mixer in B", layer.mixer.ssm)
    capture.module("bmojo: SwiGLU", layer.mlp)
    attention_op, ssd_op = attention_module.ops.eidetic_attention, mamba2_module.ops.ssd_scan
    attention_module.ops.eidetic_attention = capture.op("bmojo: eidetic_attention op", attention_op)
    mamba2_module.ops.ssd_scan = capture.op("bmojo: ssd_scan op", ssd_op)
    try:
        with torch.no_grad():
            bmojo(input_ids=ids)
    finally:
        attention_module.ops.eidetic_attention, mamba2_module.ops.ssd_scan = attention_op, ssd_op
    models = {"bmojo": bmojo}
    for name in ("swa-only", "mamba-only", "hf-mistral-swa"):
        model = models[name] = factory.build(name).model.train()
        first = model.model.layers[0]
        capture.module(f"{name}: layer", first)
        capture.module(f"{name}: mixer", getattr(first, "mixer", None) or first.self_attn)
        capture.module(f"{name}: MLP", first.mlp)
        with torch.no_grad():
            model(input_ids=ids, **({} if name in ("swa-only", "mamba-only") else {"use_cache": False}))

    runs = {name: forward_backward(*call) for name, call in capture.calls.items()}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(args.rounds + 1):  # the first round warms up
        for name, run in runs.items():
            start = time.process_time()
            run()
            if r:
                times[name].append(time.process_time() - start)
    print(f"forward + backward of the first layer's parts, batch {args.batch}, L {args.length}, one thread, CPU ms")
    print("| part | best ms | median ms |\n|---|---|---|")
    for name in runs:
        print(f"| {name} | {1e3 * min(times[name]):.1f} | {1e3 * statistics.median(times[name]):.1f} |")

    for name in filter(None, args.ops.split(",")):
        model = models.get(name) or factory.build(name).model.train()

        def step() -> None:
            model.zero_grad(set_to_none=True)
            model(input_ids=ids, labels=ids).loss.backward()

        step()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            step()
        print(f"\n{name}: one step's ops by self CPU time")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))


if __name__ == "__main__":
    sys.exit(exit_status_on_closed_stdout(main))
