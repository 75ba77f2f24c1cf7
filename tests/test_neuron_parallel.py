"""Tensor and data parallelism in the Neuron training loop (``parallel.tp`` / ``parallel.zero1`` through NxD) on
test doubles.

No Neuron here. `doubles.neuron_sdk` plays torch-xla 2.9 and NxD 0.17; at tp = 2 NxD's layers run over a gloo
tensor-parallel group (`doubles.nxd_layers.GridGroup`), and at dp = 2 NxD's optimizer wrapper reduces the
gradients over the data groups (``bucket_allreduce_gradients``) or its ZeRO-1 optimizer shards the AdamW states
and fp32 copies over them (reduce-scatter, update of the shard, all-gather), as ``grads.py``,
``optimizer/zero_redundancy_optimizer.py`` and torch-xla's ``zero_redundancy_optimizer.py`` do at the pins. Two
gloo ranks run `train()` on a ``run.device: neuron`` recipe through the real loop, once at tp = 2 and once at
dp = 2 with ZeRO-1, and four ranks once at tp = 2 × dp = 2 without ZeRO-1; each must equal the one-process Neuron
run of the same recipe.

Tolerances (float32): logged losses and gradient norms rtol 1e-5, final weights rtol 1e-5 with atol 1e-6. At
tp = 2 a vocabulary- or head-sharded matmul adds its halves in another order, and at dp = 2 each data rank's loss
is the mean over its half of the micro-batch (MQAR scores the same number of tokens in every row, so the mean of
the two halves' means is the batch mean) and the gradients are summed over the ranks: float32 round-off only.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from doubles import neuron_sdk
from rank_processes import start_ranks
from test_neuron_train import TINY

from bmojo_neuron import BMojoForCausalLM
from bmojo_neuron.recipes import Recipe
from bmojo_neuron.training import train

WORLD = 2
STEPS = 2
SETTINGS = {"model.num_key_value_heads": 2, "model.ssm_n_groups": 2, "train.steps": STEPS, "eval.every": STEPS,
            "eval.batches": 1, "checkpoint.every": STEPS}
RUNS = {"tp2": {"parallel.tp": 2}, "dp2-zero1": {"parallel.zero1": True}}
RTOL, ATOL = 1e-5, 1e-6
TRAIN_KEYS = ("loss", "lm_loss", "aux_loss", "grad_norm", "lr", "tokens")


def recipe(**overrides) -> Recipe:
    return Recipe.from_dict(TINY).with_overrides({**SETTINGS, **overrides})


def _worker(rank: int, init: str, out: str) -> None:
    with neuron_sdk.gloo_rank(rank, init, WORLD) as log:
        summary = {}
        for name, overrides in RUNS.items():
            log.graphs.clear()
            result = train(recipe(**overrides), Path(out) / name, progress=False)
            updates = [g[1:] for g in log.graphs if any(e[0] == "optimizer_step" for e in g)]
            forwards = [g[1:] for g in log.graphs if any(e[:2] == ("forward", "train") for e in g)]
            summary[name] = {"metrics": result.metrics, "final": str(result.final_dir), "update": updates[-1],
                             "updates": len(updates), "forward": _collectives(forwards[0]),
                             "dist": list(log.dist_calls), "violations": list(log.violations)}
        (Path(out) / f"rank{rank}.json").write_text(json.dumps(summary, default=str))
        dist.barrier()


def _collectives(graph: list[tuple]) -> list[list[str]]:
    return [[kind, groups] for kind, groups, *_ in (e for e in graph if e[0] in COLLECTIVES)]


COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("neuron-tp-dp")
    start_ranks(_worker, (str(out / "init"), str(out)), nprocs=WORLD)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The one-process Neuron run of the same recipe (ZeRO-1 over one data rank is plain AdamW on fp32 copies)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BMOJO_OPS_BACKEND", "torch")
        mp.delenv("WORLD_SIZE", raising=False)
        neuron_sdk.install(mp)
        return train(recipe(), tmp_path_factory.mktemp("neuron-one"), progress=False)


def _records(metrics: list[dict], kind: str) -> list[dict]:
    return [r for r in metrics if r["type"] == kind]


def test_tp2_and_dp2_zero1_runs_equal_the_one_process_run(runs, one_process):
    want = _records(one_process.metrics, "train")
    final = BMojoForCausalLM.from_pretrained(one_process.final_dir).state_dict()
    for name in RUNS:
        got = _records(runs[0][name]["metrics"], "train")
        assert [r["step"] for r in got] == list(range(1, STEPS + 1)), name
        for g, w in zip(got, want, strict=True):
            for key in TRAIN_KEYS:
                assert g[key] == pytest.approx(w[key], rel=RTOL), (name, g["step"], key)
        (g,), (w,) = _records(runs[0][name]["metrics"], "eval"), _records(one_process.metrics, "eval")
        assert (g["eval_loss"], g["eval_accuracy"]) == pytest.approx((w["eval_loss"], w["eval_accuracy"]), rel=RTOL)
        weights = BMojoForCausalLM.from_pretrained(runs[0][name]["final"]).state_dict()
        for key, tensor in final.items():
            torch.testing.assert_close(weights[key], tensor, rtol=RTOL, atol=ATOL, msg=f"{name} {key}")
        for rank in range(WORLD):
            assert runs[rank][name]["dist"] == [] and runs[rank][name]["violations"] == [], (name, rank)



def test_the_ranks_issue_the_collectives_nxd_issues(runs):
    """The update graph of each step, on both ranks: at tp = 2, NxD's data-parallel gradient all-reduce (one bucket
    of all 44 gradients, over the one-rank data groups: torch-xla skips it only in a world of one) and the gradient
    norm's sum over the tensor-parallel group (grads.py 99-104, 259-327); at dp = 2 with ZeRO-1, the loss mean
    over the data group (ours), one reduce-scatter bucket, the norm's sum over the sharding (data) groups and one
    all-gather bucket (torch-xla's ``step``, NxD's ``_clip_grad_norm``); then our stop vote over every rank. The
    forward at tp = 2 sums the row-parallel outputs and the loss's max and sums over the tensor group."""
    one_rank_groups, pair = "[[0], [1]]", "[[0, 1]]"
    want = {"tp2": [["optimizer_step", "44"], ["all_reduce", one_rank_groups], ["all_reduce", pair],
                    ["all_reduce", "None"]],
            "dp2-zero1": [["all_reduce", pair], ["optimizer_step", "44"], ["reduce_scatter", pair],
                          ["all_reduce", pair], ["all_gather", pair], ["all_reduce", "None"]]}
    for name, events in want.items():
        for rank in range(WORLD):
            update = runs[rank][name]["update"]
            assert runs[rank][name]["updates"] == STEPS and [e[:2] for e in update] == events, (name, rank)
            buckets = [e for e in update if e[0] in ("reduce_scatter", "all_gather") or e[1] == one_rank_groups]
            assert all(e[2].count("(") == 44 for e in buckets), (name, rank)  # one bucket of every gradient
        assert runs[0][name]["update"] == runs[1][name]["update"], name
    forward = runs[0]["tp2"]["forward"]
    assert ["all_reduce", pair] in forward and forward == runs[1]["tp2"]["forward"]
    assert runs[0]["dp2-zero1"]["forward"] == []  # no tensor-parallel collective at tp = 1


def _worker_of_four(rank: int, init: str, out: str) -> None:
    with neuron_sdk.gloo_rank(rank, init, 4) as log:
        result = train(recipe(**{"parallel.tp": 2}), Path(out) / "tp2dp2", progress=False)
        updates = [g[1:] for g in log.graphs if any(e[0] == "optimizer_step" for e in g)]
        summary = {"metrics": result.metrics, "final": str(result.final_dir), "update": updates[-1],
                   "dist": list(log.dist_calls), "violations": list(log.violations)}
        (Path(out) / f"four{rank}.json").write_text(json.dumps(summary, default=str))
        dist.barrier()


def test_tp2_dp2_on_four_ranks_equals_the_one_process_run(tmp_path, one_process):
    """tp = 2 × dp = 2 without ZeRO-1: NxD's layers over the tensor groups [[0, 1], [2, 3]], the gradients averaged
    over the data groups [[0, 2], [1, 3]] in one bucket, the norm summed over the tensor groups."""
    start_ranks(_worker_of_four, (str(tmp_path / "init"), str(tmp_path)), nprocs=4)
    runs = [json.loads((tmp_path / f"four{r}.json").read_text()) for r in range(4)]
    for g, w in zip(_records(runs[0]["metrics"], "train"), _records(one_process.metrics, "train"), strict=True):
        for key in TRAIN_KEYS:
            assert g[key] == pytest.approx(w[key], rel=RTOL), (g["step"], key)
    weights = BMojoForCausalLM.from_pretrained(runs[0]["final"]).state_dict()
    for key, tensor in BMojoForCausalLM.from_pretrained(one_process.final_dir).state_dict().items():
        torch.testing.assert_close(weights[key], tensor, rtol=RTOL, atol=ATOL, msg=key)
    for rank, run in enumerate(runs):
        assert run["dist"] == [] and run["violations"] == [], rank
        assert [e[:2] for e in run["update"]] == [
            ["all_reduce", "[[0, 2], [1, 3]]"], ["optimizer_step", "44"], ["all_reduce", "[[0, 2], [1, 3]]"],
            ["all_reduce", "[[0, 1], [2, 3]]"], ["all_reduce", "None"]], rank
