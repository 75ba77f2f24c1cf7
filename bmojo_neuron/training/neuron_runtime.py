"""The Neuron side of a training process: XLA device, process group, NxD ranks, step marks.

`NeuronRuntime.start` is the only place the Neuron trainer imports torch-xla and
NeuronX Distributed (lazily, through `bmojo_neuron.neuron`, so a machine without
them gets `NeuronUnavailableError` naming the packages). The loop then talks to
the device through a handful of methods: `sync` (the one graph cut of a step),
`add_step_closure`, the data-parallel collectives, `to_cpu` and `barrier`. The graph cut
and the device come from ``torch_xla.sync`` / ``torch_xla.device``: torch-xla 2.9 deprecates
``xm.mark_step`` / ``xm.xla_device`` (a ``DeprecationWarning`` at every call).

The torch-xla and NxD calls used here, and the upstream sources they were read from,
are listed in docs/trn1.md ("Sources and status").

NxD is imported only through `bmojo_neuron.neuron`, whose package check first gives it
the ``transformers.utils.fx`` module it needs (gone in transformers 5; `nxd_compat`).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import Tensor

from bmojo_neuron.launch.plan import CONFLICTING_ENV, conflicting_env
from bmojo_neuron.neuron import TRAINING_FEATURE as FEATURE
from bmojo_neuron.neuron import TRAINING_PACKAGES, import_neuron_module, require_neuron

EXTRACT_GRAPHS_ONLY = "NEURON_EXTRACT_GRAPHS_ONLY"


# torch-xla 2.9's generator is torch's lazy-tensor one: every ``torch_xla.sync`` / ``mark_step`` sets the device's
# seed to ``seed * 7012063 + 1012031`` mod 2**64 (torch/csrc/lazy/core/lazy_graph_executor.cpp,
# ``DeviceContextArena::MarkStep``, which torch-xla's XLAGraphExecutor reuses). The multiplier is odd, so the step
# can be undone.
SYNC_SEED_MUL, SYNC_SEED_ADD = 7012063, 1012031


def seed_before_sync(seed: int) -> int:
    """The XLA seed that one sync turns into `seed` (the inverse of torch-xla's step of the seed at a sync)."""
    return (seed - SYNC_SEED_ADD) * pow(SYNC_SEED_MUL, -1, 2**64) % 2**64


def extracting_graphs() -> bool:
    """Whether this process is ``neuron_parallel_compile``'s trial run: torch-neuronx then only extracts the
    graphs and executes empty stubs with zero outputs, so no device value read back means anything."""
    return os.environ.get(EXTRACT_GRAPHS_ONLY, "") not in ("", "0")


def require_neuron_training() -> None:
    """`NeuronUnavailableError` naming every missing package (and the install command) unless all import."""
    require_neuron(FEATURE, TRAINING_PACKAGES)


@dataclass
class NeuronRuntime:
    """One torchrun process on one NeuronCore."""

    xla: Any  # torch_xla
    xm: Any  # torch_xla.core.xla_model
    state: Any  # neuronx_distributed.parallel_layers.parallel_state
    nxd_utils: Any  # neuronx_distributed.parallel_layers.utils
    device: torch.device
    rank: int
    world: int
    owns_process_group: bool = False
    _tmp: Any = field(default=None, repr=False)

    @classmethod
    def start(cls, env: dict[str, str]) -> NeuronRuntime:
        """Check the packages, join (or create) the ``xla`` process group and pick this process's XLA device.

        `env` (`bmojo_neuron.launch.plan.runtime_env`) is set where the environment does not already say
        otherwise, before the Neuron runtime reads it.
        """
        require_neuron_training()
        if bad := conflicting_env(os.environ):
            raise ValueError(f"unset {', '.join(bad)}: the trainer casts the model itself (model.to(bfloat16)); "
                             f"{' and '.join(CONFLICTING_ENV)} would recast it (and make NxD's ZeRO-1 optimizer "
                             "float64)")
        for key, value in env.items():
            os.environ.setdefault(key, value)
        xla = import_neuron_module("torch_xla", FEATURE)
        if (pjrt := os.environ.get("PJRT_DEVICE")) != "NEURON":
            # ``import torch_xla`` sets NEURON when it finds the Neuron plugin and nothing set it before; with
            # another device NxD (v2.28 parallel_layers/utils.py 246-256) reads ``xenv.HOST_WORLD_SIZE``, which
            # torch-xla 2.9 no longer has: an AttributeError in the first ZeRO-1 or one-device build, not here.
            raise ValueError(f"PJRT_DEVICE is {pjrt!r}: Neuron training runs on PJRT_DEVICE=NEURON (unset it, and "
                             "import torch_xla picks NEURON on a Trn1 host)")
        xm = import_neuron_module("torch_xla.core.xla_model", FEATURE)
        import_neuron_module("torch_xla.distributed.xla_backend", FEATURE)  # registers the "xla" backend
        state = import_neuron_module("neuronx_distributed.parallel_layers.parallel_state", FEATURE)
        nxd_utils = import_neuron_module("neuronx_distributed.parallel_layers.utils", FEATURE)
        owns, tmp = False, None
        if not dist.is_initialized():
            if "WORLD_SIZE" in os.environ:  # torchrun: rank, world and the rendezvous come from its env://
                dist.init_process_group("xla")
            else:  # one process without torchrun: a private file store
                tmp = tempfile.TemporaryDirectory(prefix="bmojo-xla-pg-")
                dist.init_process_group("xla", init_method=f"file://{tmp.name}/store", rank=0, world_size=1)
            owns = True
        return cls(xla, xm, state, nxd_utils, xla.device(), dist.get_rank(), dist.get_world_size(), owns, tmp)

    # ------------------------------------------------------------------ NxD ranks (after NxD's init)

    @property
    def extracting(self) -> bool:
        """``neuron_parallel_compile``'s graph-extraction run (`extracting_graphs`): trace and cut every graph
        as a real run would, read nothing back."""
        return extracting_graphs()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def tp(self) -> int:
        return self.state.get_tensor_model_parallel_size()

    @property
    def pp(self) -> int:
        return self.state.get_pipeline_model_parallel_size()

    @property
    def dp(self) -> int:
        return self.state.get_data_parallel_size()

    @property
    def tp_rank(self) -> int:
        return self.state.get_tensor_model_parallel_rank()

    @property
    def pp_rank(self) -> int:
        return self.state.get_pipeline_model_parallel_rank()

    @property
    def dp_rank(self) -> int:
        return self.state.get_data_parallel_rank()

    @property
    def last_stage(self) -> bool:
        """Whether this rank runs the last pipeline stage (always with pp = 1)."""
        return self.pp_rank == self.pp - 1

    # ------------------------------------------------------------------ graph and host

    def sync(self) -> None:
        """Cut and run the pending graph (``torch_xla.sync``), then run the queued step closures."""
        self.xla.sync()

    def add_step_closure(self, fn: Callable[..., None], args: tuple = ()) -> None:
        """Run ``fn(*args)`` right after the next `sync` executed the graph (its tensors are then on device)."""
        self.xm.add_step_closure(fn, args)

    def to_cpu(self, data: Any) -> Any:
        """`data` with every XLA tensor copied to the host, after one sync of all of them."""
        return self.nxd_utils.move_all_tensor_to_cpu(data)

    def barrier(self, tag: str) -> None:
        self.xm.rendezvous(tag)

    def seed(self, seed: int) -> None:
        """Seed the XLA generator with `seed` as torch.manual_seed reads it: torch-xla's binding takes an unsigned
        64-bit seed only (a negative one is a TypeError), and torch maps a negative seed to ``seed + 2**64``."""
        self.xm.set_rng_state(seed % 2**64)

    def rng_state(self) -> int:
        return int(self.xm.get_rng_state())

    def set_rng_state(self, value: int | None) -> None:
        if value is not None:
            self.xm.set_rng_state(int(value))

    def set_rng_state_one_sync_back(self, value: int) -> None:
        """Set the XLA seed that one ``torch_xla.sync`` turns into `value` (`seed_before_sync`)."""
        self.xm.set_rng_state(seed_before_sync(value))

    # ------------------------------------------------------------------ data-parallel collectives

    def mean_over_dp(self, x: Tensor) -> Tensor:
        """Mean over the data-parallel replicas (inside the graph; identity for dp = 1)."""
        if self.dp == 1:
            return x
        return self.xm.all_reduce(self.xm.REDUCE_SUM, x, scale=1.0 / self.dp,
                                  groups=self.state.get_data_parallel_replica_groups())

    def sum_over_dp(self, x: Tensor) -> Tensor:
        if self.dp == 1:
            return x
        return self.xm.all_reduce(self.xm.REDUCE_SUM, x, groups=self.state.get_data_parallel_replica_groups())

    def sum_over_pp(self, x: Tensor) -> Tensor:
        """Sum over the pipeline stages (inside the graph; identity for pp = 1): the last stage's numbers
        on every stage when the others contribute zeros."""
        if self.pp == 1:
            return x
        return self.xm.all_reduce(self.xm.REDUCE_SUM, x,
                                  groups=self.state.get_pipeline_model_parallel_replica_groups())

    def sum_over_world(self, x: Tensor) -> Tensor:
        """Sum over every rank of the run (inside the graph; ``groups=None`` is one group of all replicas in
        torch-xla 2.9's ``all_reduce``, a clone with one replica)."""
        return self.xm.all_reduce(self.xm.REDUCE_SUM, x)

    def gather_over(self, x: Tensor, groups: Any) -> Tensor:
        """Concatenation along dim 0 of `x` from every rank of this rank's group in `groups`."""
        return self.xm.all_gather(x, dim=0, groups=groups, pin_layout=False)

    def close(self) -> None:
        """Tear down NxD's groups and the process group if this runtime created them (a next run re-creates)."""
        if self.state.model_parallel_is_initialized():
            self.state.destroy_model_parallel()
        if self.owns_process_group and dist.is_initialized():
            dist.destroy_process_group()
        if self._tmp is not None:
            self._tmp.cleanup()
