"""Do the ranks of a run build the same graphs? (XLA on Neuron runs one program per pipeline stage.)

Each rank's `XlaLog.graphs` lists the graphs it cut, in order: the sync that cut each
and the events traced into it (forwards with their shapes, collectives with their
groups, shapes and dtypes, optimizer steps, batches). Ranks whose host-side decisions
differ (a value read on one rank only, a branch on ``rank == 0`` around device work,
a collective one rank skips) cut different graphs, which on Trainium means graphs
compiled and loaded for one rank only and collectives that never meet.

`mismatches` compares the ranks' logs: ranks of the same pipeline stage must cut the
same graphs at the same kind of sync with the same events; across stages (which run
different parts of the model, in graphs of their own) the collectives whose groups
span several stages must come in the same order with the same shapes.
"""

from __future__ import annotations

import ast
from typing import Any

COLLECTIVES = ("all_reduce", "all_gather")


def _cross_stage(graphs: list[list[tuple]], stage_of: dict[int, int]) -> list[tuple]:
    """The collectives whose groups hold ranks of more than one stage, in order."""
    found = []
    for graph in graphs:
        for event in graph:
            if event and event[0] in COLLECTIVES:
                groups = ast.literal_eval(event[1]) or []
                if any(len({stage_of.get(r, -1) for r in group}) > 1 for group in groups):
                    found.append(event)
    return found


def mismatches(graphs: dict[int, list[list[tuple]]], stage_of: dict[int, int] | None = None) -> list[str]:
    """What differs between the ranks' graphs (empty when they run one program per stage)."""
    stage_of = stage_of or {rank: 0 for rank in graphs}
    ranks = sorted(graphs)
    found = []
    for rank in ranks[1:]:
        ref = next(r for r in ranks if stage_of[r] == stage_of[rank])
        mine, theirs = graphs[rank], graphs[ref]
        if ref != rank:
            if len(mine) != len(theirs):
                found.append(f"rank {rank} cut {len(mine)} graphs, rank {ref} {len(theirs)} (stage {stage_of[rank]})")
            for i, (a, b) in enumerate(zip(mine, theirs)):
                if a[0] != b[0]:
                    found.append(f"graph {i}: rank {rank} cut it at a {a[0][0]} sync, rank {ref} at a {b[0][0]} sync")
                elif a != b:
                    found.append(f"graph {i}: ranks {ref} and {rank} (stage {stage_of[rank]}) traced different "
                                 f"work: {sorted(set(a) ^ set(b))[:4]}")
                if len(found) >= 5:
                    return found
        cross, first = _cross_stage(mine, stage_of), _cross_stage(graphs[ranks[0]], stage_of)
        if cross != first:
            found.append(f"collectives across stages differ: rank {rank} {cross[:3]}..., rank {ranks[0]} "
                         f"{first[:3]}...")
    return found


def without_zero_constants(graphs: dict[int, list[list[tuple]]]) -> dict[int, list[list[tuple]]]:
    """The ranks' graphs less their constant-0 events. The vocabulary shard's first index, 0 on tensor rank 0 and
    ``rank * shard`` on the others, is a Python number in NxD's ``ParallelEmbedding`` (parallel_layers/layers.py
    342-345: ``input_ >= start_index``, ``input_.clone() - start_index``) and ``parallel_cross_entropy``
    (loss_functions.py 36-37): torch-xla makes the 0 a graph constant and the others device data (`xla_host.trace_python_scalars`), so tensor rank 0 traces its
    own variant of those graphs (one more compile, at the first step only). Comparing the rest checks that the
    ranks run one program otherwise."""
    return {rank: [[e for e in graph if e[:2] != ("constant", "0.0")] for graph in ranked]
            for rank, ranked in graphs.items()}


def graphs_of(log: Any) -> list[list[list[str]]]:
    """A rank's graphs as JSON-friendly lists (to carry them out of a spawned process)."""
    return [[list(event) for event in graph] for graph in log.graphs]


def from_json(graphs: list[list[list[str]]]) -> list[list[tuple]]:
    return [[tuple(event) for event in graph] for graph in graphs]
