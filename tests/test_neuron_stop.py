"""A stop asked on one Neuron rank stops every rank together, in the step loop and in the finish.

A signal reaches the ranks of a job at different moments. Two gloo ranks run the
Neuron backend on the torch-xla / NxD doubles (pp = 2, as in tests/test_neuron_pipeline.py:
the stages trace different graphs, and a rank that stops alone leaves the other waiting in a
collective) and only one rank is asked to stop. Every rank must stop at the same step with
the same checkpoint, or skip the same part of the finish. The parent waits `DEADLINE_S` for
the ranks: a rank stuck in a collective fails the test instead of blocking it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch.distributed as dist
from doubles import mpmd, neuron_sdk
from rank_processes import start_ranks
from test_neuron_pipeline import PP, recipe

from bmojo_neuron.checkpoints import layout

WORLD = 2
STEPS = 5
ASKED_AFTER_STEP = 2  # the asked rank's request comes while it traces this step
DEADLINE_S = 240  # a healthy pair of ranks needs a fraction of this on two busy cores
SETTINGS = {**PP, "train.steps": STEPS, "checkpoint.every": STEPS, "eval.every": STEPS,
            "eval.length_multipliers": [1, 2]}


def _stop_worker(rank: int, init: str, out: str, asked: int, where: str) -> None:
    """Train on rank `rank`; on rank `asked` only, ask to stop while tracing step ``ASKED_AFTER_STEP`` (`where` =
    "step") or after the first length of the finish's length evaluation ("finish")."""
    with neuron_sdk.gloo_rank(rank, init, WORLD, timeout_s=DEADLINE_S) as log:
        from bmojo_neuron.training import Trainer
        from bmojo_neuron.training.backend import open_backend

        run_dir = Path(out) / "run"
        r = recipe(**SETTINGS)
        backend = open_backend(r)
        trainer = Trainer(r, backend, run_dir, progress=False)
        if rank == asked and where == "step":
            step, steps = backend.step, []

            def step_then_ask(*args):
                out = step(*args)
                steps.append(len(steps) + 1)
                if steps[-1] == ASKED_AFTER_STEP:
                    trainer.request_stop()
                return out
            backend.step = step_then_ask
        elif rank == asked:
            length_eval = backend.length_eval

            def length_then_ask(*args):
                out = length_eval(*args)
                trainer.request_stop()
                return out
            backend.length_eval = length_then_ask
        try:
            with neuron_sdk.host_reads_in_steps(log) as reads:
                result = trainer.run()
        finally:
            backend.close()
        dist.barrier()  # every rank is back before any looks at the run directory
        latest = layout.latest_checkpoint(run_dir)
        summary = {"step": result.step, "final": str(result.final_dir), "latest": latest.name,
                   "files": sorted(p.name for p in latest.iterdir()),
                   "train_steps": [x["step"] for x in result.metrics if x["type"] == "train"],
                   "reads": reads, "violations": log.violations,
                   "host_transfers": log.host_transfers, "graphs": mpmd.graphs_of(log)}
        (Path(out) / f"rank{rank}.json").write_text(json.dumps(summary, default=str))
        dist.barrier()  # all ranks done before any tears the group down: an early exit can abort a peer


def _run_ranks(out: Path, asked: int, where: str) -> list[dict]:
    """Both ranks' summaries; fails when they are not back within `DEADLINE_S` (a rank waits in a collective)."""
    context = start_ranks(_stop_worker, (str(out / "init"), str(out), asked, where), nprocs=WORLD, join=False)
    deadline = time.monotonic() + DEADLINE_S
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            pytest.fail(f"the ranks were not back after {DEADLINE_S} s: one waits in a collective the other "
                        "never joins")
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(WORLD)]


def test_a_stop_asked_on_one_rank_stops_every_rank_at_the_same_step_with_one_checkpoint(tmp_path):
    """Rank 1 (not the main rank) asks while tracing step 2: its flag rides in step 2's graph, summed over the
    ranks there, and every rank reads the sum after queuing step 3 (docs/trn1.md, Stopping a run). So both stop
    after step 3, log it, and write checkpoint step 3 whole (both stages' files); no host read inside a step,
    no host tensor in a step graph but the stop flag's uploads, and the stages' collectives (the flag's
    all-reduce among them) meet."""
    ranks = _run_ranks(tmp_path, asked=1, where="step")
    for rank, got in enumerate(ranks):
        assert got["step"] == ASKED_AFTER_STEP + 1 and got["final"] == "None", (rank, got["step"])
        assert got["latest"] == "step-0000003" and got["train_steps"] == [1, 2, 3], rank
        assert got["reads"] == [] and got["violations"] == [], rank
        # the stop flag is a graph input uploaded when this rank's wish changes, not at every step: once at
        # step 1 (no stop) and, on the asking rank, once more at step 2 (stop)
        assert [t.split(" at ")[1].split(":")[0] for t in got["host_transfers"]] == ["neuron.py"] * (1 + rank), rank
    assert {"rank-00-00.safetensors", "rank-00-01.safetensors", "optim-00-00-000.pt",
            "optim-00-01-000.pt"} <= set(ranks[0]["files"])
    graphs = {rank: mpmd.from_json(got["graphs"]) for rank, got in enumerate(ranks)}
    assert mpmd.mismatches(graphs, {0: 0, 1: 1}) == []
    world_sums = [e for g in graphs[0] for e in g if e[0] == "all_reduce" and e[1] == "None"]
    assert len(world_sums) == 3  # one per step graph: steps 1-3


def test_a_stop_asked_on_one_rank_in_the_finish_skips_the_same_work_on_every_rank(tmp_path):
    """After the last step rank 0 asks once the x1 length is evaluated: both ranks skip x2 and the export
    (neither waits for the other in the export's rendezvous) and keep the last step's checkpoint."""
    ranks = _run_ranks(tmp_path, asked=0, where="finish")
    for rank, got in enumerate(ranks):
        assert got["step"] == STEPS and got["final"] == "None", (rank, got["final"])
        assert got["latest"] == f"step-{STEPS:07d}", rank
    assert not (tmp_path / "run" / layout.FINAL).exists()
