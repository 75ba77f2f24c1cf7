"""What the torch-xla and NxD doubles share: the log of what they saw, NxD's parallel grid and gloo groups."""

from __future__ import annotations

import importlib.machinery
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

PACKAGE_ROOT = str(Path(__file__).resolve().parents[2] / "bmojo_neuron")
# torch's lazy-tensor generator (torch/csrc/lazy/core/lazy_graph_executor.{h,cpp}, which torch-xla 2.9's
# XLAGraphExecutor reuses): a device's seed starts at 101; every random op traced steps the running seed with
# 214013 / 2531011 (``GetRngSeed``, also xla_graph_executor.cpp 147-181); every mark_step steps the base seed with
# 7012063 / 1012031 and restarts the running seed from it (``DeviceContextArena::MarkStep``); uint64 arithmetic.
XLA_DEFAULT_SEED = 101
SEED_OP_MUL, SEED_OP_ADD = 214013, 2531011
SEED_STEP_MUL, SEED_STEP_ADD = 7012063, 1012031
ON_DEVICE = "_bmojo_xla_batch"  # set by the MpDeviceLoader double on the tensors it hands out
ON_XLA_DEVICE = "_bmojo_on_xla_device"  # set on the parameters and buffers NxD's initialize_parallel_model moved


def fake_module(name: str, **attrs: Any) -> types.ModuleType:
    """A package named `name` holding `attrs`, fit for ``sys.modules`` (submodules resolve from there)."""
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, loader=None, is_package=True)
    module.__path__ = []
    module.__dict__.update(attrs)
    return module


def bmojo_caller() -> str:
    """The innermost bmojo_neuron frame on the stack ("file:line"), or "" when none."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_filename.startswith(PACKAGE_ROOT):
            return f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno}"
        frame = frame.f_back
    return ""


@dataclass
class XlaLog:
    """What the doubles saw."""

    syncs: list[dict] = field(default_factory=list)  # {"source": "loader" | "code", "step_work", "forwards", "rng"}
    fetches: int = 0
    train_forwards: int = 0
    eval_forwards: int = 0
    step_work: bool = False  # a training forward ran since the last sync: a step graph is pending
    in_step: bool = False  # between a loader fetch and the next sync
    closures: list[Callable[[], None]] = field(default_factory=list)
    closures_run: int = 0
    violations: list[str] = field(default_factory=list)  # eval / host copies while a step was pending
    rendezvous: list[str] = field(default_factory=list)
    deprecated: list[str] = field(default_factory=list)  # deprecated torch-xla calls made by bmojo_neuron code
    dist_calls: list[str] = field(default_factory=list)  # torch.distributed collectives called by bmojo_neuron code
    calls: dict[str, Any] = field(default_factory=dict)  # NxD calls: config kwargs, optimizer defaults ...
    rng: int = XLA_DEFAULT_SEED  # the running seed ``xm.get_rng_state`` returns
    rng_base: int = XLA_DEFAULT_SEED  # the seed the pending graph's random ops start from
    random_ops: list[str] = field(default_factory=list)  # random ops traced into a graph (aten names)
    env: Any = None  # the `Env` of the doubles (set by `neuron_sdk.install`)
    graphs: list[list[tuple]] = field(default_factory=list)  # what each cut graph held (see `trace`)
    extraction_reads: list[str] = field(default_factory=list)  # device values read with NEURON_EXTRACT_GRAPHS_ONLY
    host_transfers: list[str] = field(default_factory=list)  # host tensors copied into a step's graph (xla_host)
    host_reads: list[str] = field(default_factory=list)  # device values our code copied or read to the host in a step
    host_tensors: Any = None  # the `xla_host.HostTensors` mode while a step runs
    moved_modules: list = field(default_factory=list)  # what NxD's initialize_parallel_model moved to the device
    cpu_fallbacks: list[str] = field(default_factory=list)  # aten ops of a step torch-xla has no kernel for
    fallback_mode: Any = None  # the `xla_lowerings.CpuFallbacks` mode while a step runs
    # Steps whose ops are still to be checked: every step of a run traces the same ops (the static-shape tests
    # hold that), and the mode's Python call at every aten op would slow each later step down. A step counts as
    # checked at the sync that follows its optimizer update (`update_traced`), so under gradient accumulation
    # the first micro-batch's graph and the update's graph are checked.
    fallback_steps_left: int = 1
    micro_batch_checked: bool = False  # the first step's first graph went through the fallback check
    update_traced: bool = False  # an optimizer update (NxD's optimizer double) traced since the step began
    _forwards: int = 0  # training forwards since the last sync
    _events: list[tuple] = field(default_factory=list)  # traced since the last graph cut

    def trace(self, *event: Any) -> None:
        """Record what the pending graph holds: a forward, a collective, an optimizer step, a batch (with the
        shapes and groups that make two graphs differ). Ranks whose host-side decisions differ trace different
        events, or cut their graphs at different points (`doubles.mpmd`)."""
        self._events.append(tuple(str(e) for e in event))

    def pending(self) -> bool:
        """Whether work was traced since the last cut (a sync of device data alone executes no graph)."""
        return bool(self._events)

    def cut(self, source: str) -> None:
        """A graph boundary: the events traced since the last one form a graph."""
        self.graphs.append([(source,), *self._events])
        self._events = []

    def set_seed(self, seed: int) -> None:
        """``xm.set_rng_state``: the base and the running seed (``DeviceContextArena::SetRngSeed``)."""
        self.rng = self.rng_base = seed

    def random_op(self, name: str) -> None:
        """A random op traced into the pending graph takes the next running seed (``GetRngSeed``)."""
        self.random_ops.append(name)
        self.trace("random", name)
        self.rng = (SEED_OP_ADD + SEED_OP_MUL * self.rng) % 2**64

    def sync(self, source: str) -> None:
        """A ``mark_step`` from the loader, our code or NxD's pipeline (``"pipeline"``: the graphs NxD cuts
        inside ``run_train`` / ``run_eval``; the step stays pending until the caller's own mark_step). Each one
        steps the XLA seed (``DeviceContextArena::MarkStep``), random ops traced or not."""
        self.syncs.append({"source": source, "step_work": self.step_work, "forwards": self._forwards,
                           "rng": self.rng})  # the seed ``get_rng_state`` gave just before this sync
        self.cut(source)
        self.rng = self.rng_base = (SEED_STEP_ADD + SEED_STEP_MUL * self.rng_base) % 2**64
        if source == "pipeline":
            # NxD's pipeline cuts with ``xm.mark_step()`` (pipeline/model.py 1934-1936), which is
            # ``torch_xla.sync()``: it runs the queued step closures too (torch_xla.py 78-96)
            self._run_closures()
            return
        from .xla_host import enter_step, leave_step

        # Under gradient accumulation our code cuts the last micro-batch's graph itself, and the optimizer update
        # (with what comes before it in the step) traces into a graph of its own: still the step's.
        update_follows = source == "code" and self.step_work and not self.update_traced and self.fetches > 0
        leave_step(self)
        self.step_work = self.in_step = False
        self._forwards = 0
        self._run_closures()
        if update_follows:
            self.in_step = True
            enter_step(self, update=True)

    def _run_closures(self) -> None:
        """``xm._run_step_closures`` (xla_model.py 1011-1028): after the graph ran, in the order they were added."""
        closures, self.closures = self.closures, []
        for closure in closures:
            closure()
            self.closures_run += 1

    def step_syncs(self) -> list[dict]:
        return [s for s in self.syncs if s["step_work"]]

    def forward_seen(self, training: bool, shapes: Any = ()) -> None:
        """A forward of NxD's model wrapper: training work makes a step graph pending."""
        self.trace("forward", "train" if training else "eval", shapes)
        if training:
            self.train_forwards += 1
            self._forwards += 1
            self.step_work = True
        else:
            self.eval_forwards += 1
            if self.step_work:
                self.violations.append("an eval forward while a step graph was pending")


@dataclass
class Env:
    """What the torch-xla and NxD doubles share: the log, NxD's parallel grid and the gloo groups."""

    log: XlaLog
    grid: dict[str, int] = field(default_factory=dict)  # tp, pp, dp once NxD's parallel state is initialised
    replica_groups: dict[str, list[list[int]]] = field(default_factory=dict)  # NxD's groups by kind ("tp", "dp" ...)
    platform: str = "trn1"  # what torch-neuronx's ``get_platform_target()`` says NxD runs on (a Trn1 instance)
    groups: dict[tuple[int, ...], Any] = field(default_factory=dict)
    nxd_packages: list[types.ModuleType] = field(default_factory=list)  # NxD's own autowrap modules
    parallel_functions: list[Callable] = field(default_factory=list)  # NxD's PARALLEL_FUNCTIONS
    rendezvous: Callable[[str], Any] = lambda tag: None  # ``xm.rendezvous`` (set by the torch-xla double)
    all_reduce: Callable[..., Any] | None = None  # ``xm.all_reduce`` (set by the torch-xla double)

    def rank(self) -> int:
        return dist.get_rank() if dist.is_initialized() else 0

    def world(self) -> int:
        """The ranks of NxD's grid (tp x pp x dp)."""
        return self.grid["tp"] * self.grid["pp"] * self.grid["dp"]

    def group_index(self, kind: str) -> tuple[list[int], int]:
        """This rank's group among NxD's `kind` replica groups ("tp", "dp", "pp") and its index in it: NxD's rank
        in that group (parallel_state.py's getters); before NxD's initialisation, a group of this rank alone."""
        rank = self.rank()
        mine = next((list(g) for g in self.replica_groups.get(kind, []) if rank in g), [rank])
        return mine, mine.index(rank)

    def pp_rank(self) -> int:
        """This rank's pipeline stage: its index in its pipeline group (0 before NxD's initialisation)."""
        return self.group_index("pp")[1] if self.grid.get("pp", 1) > 1 else 0

    def global_rank(self, pp_rank: int) -> int:
        """The rank holding stage `pp_rank` in this rank's pipeline group (NxD's send / recv peers)."""
        return self.group_index("pp")[0][pp_rank]

    def pp_groups(self) -> list[list[int]]:
        """NxD's pipeline groups once its parallel state is initialised (before: the one stage)."""
        return self.replica_groups.get("pp") or [list(range(self.grid.get("pp", 1)))]

    def dp_groups(self) -> list[list[int]]:
        """NxD's data-parallel groups once its parallel state is initialised (before: every rank in one)."""
        world = dist.get_world_size() if dist.is_initialized() else 1
        return self.replica_groups.get("dp") or [list(range(world))]

    def group_of(self, ranks: list[int]) -> Any:
        """The gloo group of `ranks` (created on first use: every rank must ask, in the same order)."""
        key = tuple(sorted(ranks))
        if key not in self.groups:
            self.groups[key] = dist.new_group(list(key))
        return self.groups[key]

    def reduce(self, x: torch.Tensor, groups: Any, scale: float = 1.0, trace: bool = True) -> torch.Tensor:
        """``xm.all_reduce(REDUCE_SUM, x, scale, groups)``: over this rank's group of `groups`, every rank when
        `groups` is None or empty (torch-xla 2.9: one group of all replicas); world 1: x. `trace`: record it in
        the pending graph (False for a tensor of a coalesced list, recorded once for the list)."""
        if trace:
            self.log.trace("all_reduce", groups, tuple(x.shape), x.dtype)
        world = dist.get_world_size() if dist.is_initialized() else 1
        mine = next((g for g in (groups or [list(range(world))]) if self.rank() in g), [self.rank()])
        if len(mine) == 1:
            return x * scale
        out = x.detach().clone()
        dist.all_reduce(out, group=self.group_of(mine))
        return out * scale


# The aten ops (overload packets, trailing "_" dropped) that take a seed from torch-xla's generator when traced:
# each calls ``XLAGraphExecutor::GetRngSeed`` once (torch_xla/csrc/tensor_methods.cpp: bernoulli, dropout,
# exponential, normal, random, randperm, uniform ...).
RANDOM_OPS = frozenset({"bernoulli", "cauchy", "exponential", "geometric", "log_normal", "multinomial",
                        "native_dropout", "normal", "poisson", "rand", "rand_like", "randint", "randint_like",
                        "randn", "randn_like", "random", "randperm", "rrelu_with_noise", "uniform"})


# Device tensors of zeros torch's composites make: ``zeros`` is ``empty`` + ``zero_``, and torch-xla's ``zero_`` fills
# with ``GetIrValueForScalar(0.0)`` (torch_xla/csrc/tensor_methods.cpp 3878-3882), a special scalar, so a constant of
# the graph. ``dropout`` at p = 1 is one: torch's ``_dropout_impl`` returns ``input * at::zeros({})`` and draws nothing.
ZERO_FACTORIES = frozenset({"zeros", "zero"})


class DeviceRandomOps(TorchDispatchMode):
    """Inside NxD's model wrapper (where every tensor is on the XLA device): each random op is recorded and steps
    the XLA running seed, as tracing it on XLA would (`XlaLog.random_op`); a tensor of zeros is traced as the
    constant 0 it is on XLA (`ZERO_FACTORIES`)."""

    def __init__(self, log: XlaLog) -> None:
        super().__init__()
        self.log = log

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        name = func.overloadpacket.__name__.rstrip("_")
        if name in RANDOM_OPS:
            self.log.random_op(name)
        elif name in ZERO_FACTORIES:
            self.log.trace("constant", 0.0)
        return func(*args, **(kwargs or {}))
