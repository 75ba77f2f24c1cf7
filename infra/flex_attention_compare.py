"""Compare B'MOJO attention as `torch.nn.attention.flex_attention` against our reference op.

    python infra/flex_attention_compare.py --lengths 1024,4096            # CPU: forward only
    python infra/flex_attention_compare.py --lengths 1024,4096 --device cuda

The B'MOJO key set (in-context window, fading window, each chunk's memory slots) is
expressed as one flex-attention call over the concatenated keys
``[k (L) | k_fading (L) | memory (n_chunks * M)]`` with a block mask, so only the
blocks a query can read are computed. Both run compiled-or-eager as a user would:
flex attention through `torch.compile` (its only fast path), ours eagerly. Times are
the best of `--repeats` alternating runs after one warm-up; on CPU the clock is the
process's CPU time with one thread (robust on a shared machine), on CUDA the wall
clock after synchronising. On CPU, torch's flex attention has no backward, so only
the forward is compared there.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from bmojo_neuron.closed_stdout import exit_status_on_closed_stdout
from bmojo_neuron.ops.reference.eidetic_attention import eidetic_attention


def make_inputs(length: int, args: argparse.Namespace, grad: bool) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(0)
    b, h, d, n_chunks, m = args.batch, args.heads, args.head_dim, length // args.window, args.memory
    shapes = {"q": (b, h, length, d), "k": (b, h, length, d), "v": (b, h, length, d), "k_fading": (b, h, length, d),
              "v_fading": (b, h, length, d), "mem_k": (b, h, n_chunks, m, d), "mem_v": (b, h, n_chunks, m, d)}
    out = {n: torch.randn(*s, generator=g).to(args.device).requires_grad_(grad) for n, s in shapes.items()}
    valid = torch.rand(b, n_chunks, m, generator=g) > 0.2
    valid[:, 0] = False  # the first chunk sees an empty memory, as in the model
    out["mem_valid"] = valid.to(args.device)
    return out


def flex_runner(inputs: dict[str, Tensor], length: int, args: argparse.Namespace) -> Callable[[], Tensor]:
    """One compiled flex-attention call computing the same attention as `eidetic_attention`."""
    w = wf = c = args.window
    m = args.memory
    slots = inputs["mem_valid"].shape[1] * m
    valid = inputs["mem_valid"].reshape(-1, slots)

    def mask_mod(b, h, q, kv):
        in_context = (kv < length) & (kv <= q) & (kv > q - w)
        t = kv - length
        fading = (kv >= length) & (kv < 2 * length) & (t <= q - w) & (t > q - w - wf)
        slot = (kv - 2 * length).clamp(0, slots - 1)
        memory = (kv >= 2 * length) & (slot // m == q // c) & valid[b, slot]
        return in_context | fading | memory

    block_mask = create_block_mask(mask_mod, args.batch, None, length, 2 * length + slots, device=args.device)
    compiled = torch.compile(flex_attention)

    def run() -> Tensor:
        keys = torch.cat([inputs["k"], inputs["k_fading"], inputs["mem_k"].flatten(2, 3)], dim=2)
        values = torch.cat([inputs["v"], inputs["v_fading"], inputs["mem_v"].flatten(2, 3)], dim=2)
        return compiled(inputs["q"], keys, values, block_mask=block_mask)

    return run


def ours_runner(inputs: dict[str, Tensor], args: argparse.Namespace) -> Callable[[], Tensor]:
    def run() -> Tensor:
        return eidetic_attention(**inputs, window=args.window, fading_window=args.window, chunk=args.window)[0]

    return run


def timed(fn: Callable[[], Tensor], backward: bool, device: str) -> tuple[float, Tensor]:
    clock = time.perf_counter if device.startswith("cuda") else time.process_time
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = clock()
    if backward:
        out = fn()
        out.square().sum().backward()
    else:
        with torch.no_grad():
            out = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return clock() - start, out.detach()


def compare(length: int, args: argparse.Namespace) -> None:
    backward = args.device.startswith("cuda")
    inputs = make_inputs(length, args, grad=backward)
    runners = {"ours": ours_runner(inputs, args), "flex": flex_runner(inputs, length, args)}
    first = {name: timed(fn, backward, args.device) for name, fn in runners.items()}  # warm-up; compiles flex
    diff = (first["ours"][1] - first["flex"][1]).abs().max().item()
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(args.repeats):
        for name, fn in runners.items():
            times[name].append(timed(fn, backward, args.device)[0])
    best = {name: min(t) for name, t in times.items()}
    what = "forward + backward" if backward else "forward"
    print(f"L {length}: {what}: ours {best['ours'] * 1e3:.0f} ms, flex {best['flex'] * 1e3:.0f} ms, "
          f"flex / ours {best['flex'] / best['ours']:.2f}; flex compile {first['flex'][0]:.0f} s; "
          f"max |out difference| {diff:.1e}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="1024,4096")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--window", type=int, default=512, help="w = w_f = chunk, as in `bench`")
    parser.add_argument("--memory", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if not args.device.startswith("cuda"):
        torch.set_num_threads(1)
    for length in (int(x) for x in args.lengths.split(",")):
        compare(length, args)


if __name__ == "__main__":
    sys.exit(exit_status_on_closed_stdout(main))
