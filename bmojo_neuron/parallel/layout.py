"""How the ranks of a job are split into data-, pipeline- and tensor-parallel groups.

``world = pp × dp × tp``, in NeuronX Distributed's order (v2.28.0,
`parallel_layers/parallel_state.py`: `initialize_model_parallel` reshapes the ranks to
``[pp, dp, cp, tp]``, lines 619-636, and `ascending_ring_PG_group`, the grouping NxD
chooses on trn1, lines 107-174 and 341-388, takes each group along one axis): tensor
parallelism fastest, so ranks ``0..tp-1`` form the first tensor-parallel group on
neighbouring cores, pipeline parallelism slowest. A global rank is
``(pp_rank * dp + dp_rank) * tp + tp_rank``. A run on torch.distributed places its ranks by
the same arithmetic, so it is grouped as the same recipe is on Trainium.

NxD makes one exception on trn1, at tp = 4 (lines 594-618): `trainium_groups` gives the
groups a Trainium job gets, that case included.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ParallelLayout:
    """The coordinates of one rank in a ``pp × dp × tp`` grid (no process groups: pure arithmetic)."""

    tp: int
    pp: int
    dp: int
    rank: int = 0

    def __post_init__(self) -> None:
        for key in ("tp", "pp", "dp"):
            if getattr(self, key) < 1:
                raise ValueError(f"parallel.{key} must be >= 1, got {getattr(self, key)}")
        if not 0 <= self.rank < self.world:
            raise ValueError(f"rank {self.rank} is outside a world of {self.world} ranks")

    @classmethod
    def from_world(cls, world: int, tp: int, pp: int, rank: int = 0) -> ParallelLayout:
        """The layout for `world` ranks; dp is what tp × pp leave (an error if they do not divide it)."""
        if tp < 1 or pp < 1:
            raise ValueError(f"parallel.tp and parallel.pp must be >= 1, got tp={tp}, pp={pp}")
        if world % (tp * pp):
            raise ValueError(f"the world size {world} (torchrun --nproc-per-node × nodes) is not divisible by "
                             f"parallel.tp × parallel.pp = {tp} × {pp}")
        return cls(tp, pp, world // (tp * pp), rank)

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def pp_rank(self) -> int:
        return self.rank // (self.tp * self.dp)

    @property
    def dp_rank(self) -> int:
        return (self.rank // self.tp) % self.dp

    def rank_of(self, dp_rank: int, pp_rank: int, tp_rank: int) -> int:
        return (pp_rank * self.dp + dp_rank) * self.tp + tp_rank

    def tp_groups(self) -> list[list[int]]:
        return [[self.rank_of(d, p, t) for t in range(self.tp)] for p in range(self.pp) for d in range(self.dp)]

    def pp_groups(self) -> list[list[int]]:
        return [[self.rank_of(d, p, t) for p in range(self.pp)] for d in range(self.dp) for t in range(self.tp)]

    def dp_groups(self) -> list[list[int]]:
        return [[self.rank_of(d, p, t) for d in range(self.dp)] for p in range(self.pp) for t in range(self.tp)]


# NxD groups a trn1 job's tensor-parallel ranks of 4 across the node (parallel_state.py lines 594-618), so that
# none of them sits on another node. Its reshape needs every node to hold whole data-parallel blocks.
TRN1_STRIDED_TP = 4


def trainium_groups(world: int, tp: int, pp: int, local_world: int) -> dict[str, list[list[int]]]:
    """The tensor-, pipeline- and data-parallel groups NxD v2.28 builds for a trn1 job of `world` ranks,
    `local_world` per node (torchrun's ``LOCAL_WORLD_SIZE``, NxD's reading of it at line 608).

    As `ParallelLayout`, except at tp = 4: NxD then lays the ranks out as ``[pp, dp // n, tp, n]`` with
    ``n = local_world // 4`` and swaps the last two axes, so a tensor group takes every n-th core of one node
    (``[0, 8, 16, 24]`` on a trn1.32xlarge) and a data group blocks of n neighbours. ValueError where that
    reshape fails in NxD (`check_trainium_layout`).
    """
    layout = ParallelLayout.from_world(world, tp, pp)
    if tp != TRN1_STRIDED_TP:
        return {"tp": layout.tp_groups(), "pp": layout.pp_groups(), "dp": layout.dp_groups()}
    check_trainium_layout(world, tp, pp, local_world)
    n, dp = local_world // tp, layout.dp

    def rank(p: int, d: int, t: int) -> int:  # NxD's [p, d, t] after the swap: [p, d // n, t, d % n] before it
        return ((p * (dp // n) + d // n) * tp + t) * n + d % n

    return {"tp": [[rank(p, d, t) for t in range(tp)] for p in range(pp) for d in range(dp)],
            "pp": [[rank(p, d, t) for p in range(pp)] for d in range(dp) for t in range(tp)],
            "dp": [[rank(p, d, t) for d in range(dp)] for p in range(pp) for t in range(tp)]}


def check_trainium_layout(world: int, tp: int, pp: int, local_world: int) -> None:
    """Refuse, before any launch, a trn1 layout that NxD v2.28's `initialize_model_parallel` cannot build.

    At tp = 4 it reshapes the ranks to ``[pp, dp // n, 1, 4, n]`` with ``n = local_world // 4`` (parallel_state.py
    lines 607-612, a floor division): that fails on every rank at start-up when a node has fewer than 4 ranks
    (n = 0: ``dp // 0``) or when n does not divide dp (torch's reshape). Nothing else is refused there: a node of,
    say, 6 ranks gives n = 1 and NxD's contiguous groups of 4, which then span nodes.
    """
    if tp != TRN1_STRIDED_TP:
        return
    dp = world // (tp * pp)
    n = local_world // tp
    if n == 0:
        raise ValueError(
            f"parallel.tp=4 on {local_world} NeuronCores per node: on trn1 NeuronX Distributed places tp=4 groups "
            f"within a node and needs at least 4 NeuronCores per node; use parallel.tp 1 or 2")
    if dp % n:
        raise ValueError(
            f"parallel.tp=4 with parallel.pp={pp} on {world} NeuronCores ({local_world} per node) leaves a "
            f"data-parallel degree of {dp}: on trn1 NeuronX Distributed places tp=4 groups across each node and "
            f"needs the data-parallel degree to be a multiple of {n} (NeuronCores per node // 4); "
            f"use parallel.tp 2 or 8, a smaller parallel.pp, or more nodes")


@dataclass
class ProcessGroups:
    """This rank's tensor-, pipeline- and data-parallel process groups (and their rank lists)."""

    layout: ParallelLayout
    tp: Any = None
    pp: Any = None
    dp: Any = None
    ranks: dict[str, list[int]] = field(default_factory=dict)

    @classmethod
    def create(cls, layout: ParallelLayout) -> ProcessGroups:
        """Create every group (each rank must call `new_group` for all of them, in the same order)."""
        import torch.distributed as dist  # here, so that the layout arithmetic (`plan`) does not load torch

        if not dist.is_initialized():
            raise RuntimeError("ProcessGroups.create needs torch.distributed to be initialised first")
        if dist.get_world_size() != layout.world:
            raise ValueError(f"the layout has {layout.world} ranks but the process group has {dist.get_world_size()}")
        groups = cls(layout)
        for kind, lists in (("tp", layout.tp_groups()), ("pp", layout.pp_groups()), ("dp", layout.dp_groups())):
            for ranks in lists:
                group = dist.new_group(ranks)
                if layout.rank in ranks:
                    setattr(groups, kind, group)
                    groups.ranks[kind] = ranks
        return groups


def torchrun_nodes() -> int:
    """How many nodes a torchrun job spans: ``WORLD_SIZE`` over ``LOCAL_WORLD_SIZE`` (the ranks of this node),
    rounded up; 1 without torchrun. torch's elastic agent sets both for every worker
    (`torch/distributed/elastic/agent/server/local_elastic_agent.py` lines 420-421, torch 2.13)."""
    try:
        world, local = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_WORLD_SIZE", 0))
    except ValueError as error:
        raise ValueError(f"WORLD_SIZE / LOCAL_WORLD_SIZE must be integers: {error}") from None
    return -(-world // local) if local > 0 else 1


def torchrun_env() -> tuple[int, int, int]:
    """``(rank, local_rank, world_size)`` from the variables torchrun sets (``(0, 0, 1)`` without it)."""
    try:
        return int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    except ValueError as error:
        raise ValueError(f"RANK / LOCAL_RANK / WORLD_SIZE must be integers: {error}") from None
