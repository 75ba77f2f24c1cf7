"""Host (CPU) memory of the Neuron trainer's start-up, as `bmojo-neuron plan` prints it.

Every rank of a run builds its tensor shard of the model on the host before NxD moves
it to the device, and builds the whole one-device model in fp32 once, the ranks of a
node in waves (`bmojo_neuron.parallel.one_device_init`). `estimate_host_memory` adds
it up per rank and per node; `measure_build` (``python -m
bmojo_neuron.launch.host_memory RECIPE``) measures the build on this machine's CPU,
which is where `BUILD_OVERHEAD` and `CPU_BASELINE_BYTES` come from (docs/trn1.md has the
numbers and the command). `CPU_BASELINE_BYTES` is a process that imported torch,
transformers and bmojo_neuron; on a Trn1 torch-xla and the Neuron runtime add to it,
which the estimate leaves out.
"""

from __future__ import annotations

import gc
import resource
import sys
from dataclasses import asdict, dataclass
from typing import Any

from bmojo_neuron.closed_stdout import exit_status_on_closed_stdout
from bmojo_neuron.launch.memory import ModelShapes, stage_parameters
from bmojo_neuron.modeling_bmojo import BMojoForCausalLM
from bmojo_neuron.parallel.one_device_init import (
    BUILD_OVERHEAD,
    FP32,
    build_waves,
    full_model_bytes,
    ranks_per_wave,
)
from bmojo_neuron.recipes import load_recipe

GIB = 1024**3
MIB = 1024**2
CPU_BASELINE_BYTES = 333 * MIB  # measured: RSS after importing torch 2.13, transformers, bmojo_neuron
HOST_MEMORY = {"trn1.32xlarge": 512 * GIB, "trn1.2xlarge": 32 * GIB}


@dataclass
class HostMemoryEstimate:
    """Host bytes of the start-up on one node (see the module docstring for what is left out)."""

    local_world: int  # ranks on the node
    full_model: int  # fp32 bytes of the one-device model
    shard: int  # bytes of one rank's shard in the training dtype (the largest stage's)
    per_rank_building: int  # one rank while it builds: baseline + shard + full build
    per_rank_after: int  # one rank once built (before NxD moves the shard to the device)
    ranks_per_wave: int
    waves: int
    node_peak: int  # every rank's baseline and shard + one wave of full builds
    host_memory: int | None  # the instance's host memory, when known

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def estimate_host_memory(recipe: Any, local_world: int, instance: str | None = None,
                         one_device_init: bool = True, shapes: ModelShapes | None = None) -> HostMemoryEstimate:
    """Host memory at start-up of `recipe` on a node of `local_world` ranks (its ``parallel`` degrees); `shapes`:
    its model's `bmojo_neuron.launch.memory.model_shapes` at ``parallel.tp``, when the caller has them already."""
    config = recipe.model_config()
    p = recipe.parallel
    element = 2 if recipe.train.precision == "bf16" else FP32
    shard = element * max(s.total for s in stage_parameters(config, p.tp, p.pp, shapes=shapes))
    full = full_model_bytes(config, shapes.full if shapes is not None else None)
    build = int(BUILD_OVERHEAD * full) if one_device_init else 0
    per_wave = min(ranks_per_wave(full), local_world) if one_device_init else local_world
    waves = build_waves(local_world, full) if one_device_init else 1
    after = CPU_BASELINE_BYTES + shard
    return HostMemoryEstimate(
        local_world=local_world, full_model=full, shard=shard, per_rank_building=after + build,
        per_rank_after=after, ranks_per_wave=per_wave, waves=waves,
        node_peak=local_world * after + per_wave * build,
        host_memory=HOST_MEMORY.get(instance or ""),
    )


def measure_build(recipe_name: str) -> dict[str, float]:
    """Build `recipe_name`'s one-device model in fp32 on the CPU; MiB of RSS before and after, and the ratio."""
    config = load_recipe(recipe_name).model_config()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    model = BMojoForCausalLM(config)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    params = sum(p.numel() for p in model.parameters())
    del model
    gc.collect()
    return {"parameters": params, "fp32_mib": params * FP32 / MIB, "baseline_mib": before / MIB,
            "peak_mib": peak / MIB, "build_overhead": (peak - before) / (params * FP32)}


def main(argv: list[str]) -> int:
    """`python -m bmojo_neuron.launch.host_memory RECIPE` (docs/trn1.md): the measurement as JSON; a bad recipe
    name or key is one `error:` line and status 2, as the CLI reports it."""
    import json

    if len(argv) != 1:
        print("usage: python -m bmojo_neuron.launch.host_memory RECIPE (e.g. trn1/bmojo-130m)", file=sys.stderr)
        return 2
    try:
        measured = measure_build(argv[0])
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(measured, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(exit_status_on_closed_stdout(lambda: main(sys.argv[1:])))
