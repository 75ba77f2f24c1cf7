"""Tensor, sequence and data parallelism in the Neuron training loop (``parallel.tp`` / ``sp`` / ``zero1``
through NxD) on test doubles.

No Neuron here. `doubles.neuron_sdk` plays torch-xla 2.9 and NxD 0.17; at tp = 2 NxD's layers run over a gloo
tensor-parallel group (`doubles.nxd_layers.GridGroup`), with ``parallel.sp`` NxD's sequence-parallel layers
(all-gather before each column-parallel matmul, reduce-scatter after each row-parallel one) and NxD's optimizer
wrapper summing the marked norm and gain gradients over the tensor group (``grads.py``
``allreduce_sequence_parallel_gradients``), and at dp = 2 NxD's optimizer wrapper reduces the gradients over the
data groups (``bucket_allreduce_gradients``) or its ZeRO-1 optimizer shards the AdamW states and fp32 copies over
them (reduce-scatter, update of the shard, all-gather), as ``grads.py``, ``optimizer/zero_redundancy_optimizer.py``
and torch-xla's ``zero_redundancy_optimizer.py`` do at the pins. Two gloo ranks run `train()` on a
``run.device: neuron`` recipe through the real loop at tp = 2, at tp = 2 with sequence parallelism and at dp = 2,
and four ranks at tp = 2 × dp = 2 with ZeRO-1 and sequence parallelism (the 1.4B recipes' set-up); each must equal
the one-process Neuron run of the same recipe. The step graphs hold every collective NxD issues, the backward's
included (its autograd Functions', ``mappings.py`` and ``layers_utils.py``).

Tolerances (float32): logged losses and gradient norms rtol 1e-5, final weights rtol 1e-5 with atol 1e-6. At
tp = 2 a vocabulary- or head-sharded matmul adds its halves in another order, and at dp = 2 each data rank's loss
is the mean over its half of the micro-batch (MQAR scores the same number of tokens in every row, so the mean of
the two halves' means is the batch mean) and the gradients are summed over the ranks: float32 round-off only.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from doubles import mpmd, neuron_sdk
from rank_processes import start_ranks
from test_neuron_train import TINY

from bmojo_neuron import BMojoForCausalLM
from bmojo_neuron.recipes import Recipe
from bmojo_neuron.training import train

WORLD = 2
STEPS = 2
SETTINGS = {"model.num_key_value_heads": 2, "model.ssm_n_groups": 2, "train.steps": STEPS, "eval.every": STEPS,
            "eval.batches": 1, "checkpoint.every": STEPS}
RUNS = {"tp2": {"parallel.tp": 2}, "tp2-sp": {"parallel.tp": 2, "parallel.sp": True}, "dp2": {}}
FOUR_RUNS = {"tp2dp2": {"parallel.tp": 2, "parallel.sp": True, "parallel.zero1": True},  # the 1.4B recipes' set-up
             "tp2pp2": {"parallel.tp": 2, "parallel.pp": 2}}
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
    """``[kind, groups, shape, dtype, "backward" when a backward issued it]`` of each collective in `graph`."""
    return [[kind, groups, *rest] for kind, groups, *rest in (e for e in graph if e[0] in COLLECTIVES)]


COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter")


def _work(update: list[list[str]]) -> list[list[str]]:
    """``[kind, detail]`` of the events of an update graph but its constants (the special Python numbers of its ops,
    `xla_host.trace_python_scalars`): the optimizer step and the collectives, in order."""
    return [e[:2] for e in update if e[0] != "constant"]


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


def _assert_equals_one_process(run: dict, one_process, name: str) -> None:
    """Logged losses, gradient norms and eval numbers, and the exported weights, of `run` (rank 0's summary) against
    the one-process run (RTOL, ATOL)."""
    got, want = _records(run["metrics"], "train"), _records(one_process.metrics, "train")
    assert [r["step"] for r in got] == list(range(1, STEPS + 1)), name
    for g, w in zip(got, want, strict=True):
        for key in TRAIN_KEYS:
            assert g[key] == pytest.approx(w[key], rel=RTOL), (name, g["step"], key)
    (g,), (w,) = _records(run["metrics"], "eval"), _records(one_process.metrics, "eval")
    assert (g["eval_loss"], g["eval_accuracy"]) == pytest.approx((w["eval_loss"], w["eval_accuracy"]), rel=RTOL)
    weights = BMojoForCausalLM.from_pretrained(run["final"]).state_dict()
    for key, tensor in BMojoForCausalLM.from_pretrained(one_process.final_dir).state_dict().items():
        torch.testing.assert_close(weights[key], tensor, rtol=RTOL, atol=ATOL, msg=f"{name} {key}")


def test_tp2_tp2_sp_and_dp2_runs_equal_the_one_process_run(runs, one_process):
    for name in RUNS:
        _assert_equals_one_process(runs[0][name], one_process, name)
        for rank in range(WORLD):
            assert runs[rank][name]["dist"] == [] and runs[rank][name]["violations"] == [], (name, rank)


def _residual_width_vectors() -> int:
    """The parameters NxD's optimizer sums over the tensor group under sequence parallelism: the ones of the
    residual stream's width (its norms' weights and gains), each rank's gradient coming from half the sequence."""
    config = recipe().model_config()
    return sum(tuple(p.shape) == (config.hidden_size,) for p in BMojoForCausalLM(config).parameters())


def test_the_ranks_issue_the_collectives_nxd_issues(runs):
    """The update graph of each step, on both ranks: at tp = 2, NxD's data-parallel gradient all-reduce (one bucket
    of all 44 gradients, over the one-rank data groups: torch-xla skips it only in a world of one) and the gradient
    norm's sum over the tensor-parallel group (grads.py 99-104, 259-327), under sequence parallelism after one
    all-reduce over the tensor group of each residual-width gradient (grads.py 330-346, trainer/optimizer.py
    127-128); at dp = 2, the loss mean over the data group (ours) and NxD's gradient all-reduce over it in one
    bucket (no norm collective at tp = pp = 1); then our stop vote over every rank. The forward at tp = 2 sums the
    row-parallel outputs and the loss's max and sums over the tensor group."""
    one_rank_groups, pair = "[[0], [1]]", "[[0, 1]]"
    sp_sums = [["all_reduce", pair]] * _residual_width_vectors()
    want = {"tp2": [["optimizer_step", "44"], ["all_reduce", one_rank_groups], ["all_reduce", pair],
                    ["all_reduce", "None"]],
            "tp2-sp": [["optimizer_step", "44"], *sp_sums, ["all_reduce", one_rank_groups], ["all_reduce", pair],
                       ["all_reduce", "None"]],
            "dp2": [["all_reduce", pair], ["optimizer_step", "44"], ["all_reduce", pair], ["all_reduce", "None"]]}
    for name, events in want.items():
        for rank in range(WORLD):
            update = runs[rank][name]["update"]
            assert runs[rank][name]["updates"] == STEPS and _work(update) == events, (name, rank)
            buckets = [e for e in update[1:-1] if e[1] == (pair if name == "dp2" else one_rank_groups)]
            assert all(e[2].count("(") == 44 for e in buckets), (name, rank)  # one bucket of every gradient
        assert runs[0][name]["update"] == runs[1][name]["update"], name
        assert runs[0][name]["forward"] == runs[1][name]["forward"], name
    assert ["all_reduce", pair] in [e[:2] for e in runs[0]["tp2"]["forward"]]
    assert runs[0]["dp2"]["forward"] == []  # no tensor-parallel collective at tp = 1


def _shape(event: list[str]) -> tuple[int, ...]:
    return ast.literal_eval(event[2])


def test_the_backward_issues_the_collectives_of_nxds_autograd_functions(runs):
    """The micro-batch graph (forward and backward) at tp = 2, every collective over the tensor group. With sequence
    parallelism each column-parallel matmul all-gathers its sequence shard in the forward (layers_utils.py 56) and,
    in the backward, all-gathers it again for the weight gradient, then reduce-scatters the input gradient in fp32
    (85, 132); each row-parallel reduce-scatter's backward is an all-gather (mappings.py 461-467), and so is the
    backward of the embedding output's scatter to the sequence (390-392). Without sequence parallelism the backward
    of each column-parallel matmul is one fp32 all-reduce of its input gradient (layers_utils.py 98-102), and no
    other backward issues one (the row-parallel and vocabulary all-reduces' backward is the identity, the vocabulary
    gather's a split)."""
    seq_len, pair = recipe().data.seq_len, "[[0, 1]]"
    events = runs[0]["tp2-sp"]["forward"]
    assert all(e[1] == pair for e in events)
    forward, backward = [e for e in events if len(e) == 4], [e for e in events if e[4:] == ["backward"]]
    columns = [e for e in forward if e[0] == "all_gather" and _shape(e)[1] == seq_len // WORLD]
    rows = [e for e in forward if e[0] == "reduce_scatter"]
    assert columns and rows and len(forward) + len(backward) == len(events)
    kinds = [e[0] for e in backward]
    assert kinds.count("reduce_scatter") == len(columns), kinds
    assert kinds.count("all_gather") == len(columns) + len(rows) + 1, kinds
    for i, event in enumerate(backward):
        if event[0] == "reduce_scatter":  # the column's re-gather of its input, then its input gradient's sum
            gathered = backward[i - 1]
            assert gathered[0] == "all_gather" and _shape(gathered)[1] * WORLD == _shape(event)[1], (i, kinds)
            assert event[3] == "torch.float32"
    plain = [e for e in runs[0]["tp2"]["forward"] if e[4:] == ["backward"]]
    assert [e[0] for e in plain] == ["all_reduce"] * len(columns), plain  # one per column-parallel matmul
    assert all(e[1] == pair and _shape(e)[1] == seq_len for e in plain)


def _worker_of_four(rank: int, init: str, out: str) -> None:
    with neuron_sdk.gloo_rank(rank, init, 4) as log:
        summary = {}
        for name, overrides in FOUR_RUNS.items():
            log.graphs.clear()
            result = train(recipe(**overrides), Path(out) / name, progress=False)
            updates = [g[1:] for g in log.graphs if any(e[0] == "optimizer_step" for e in g)]
            summary[name] = {"metrics": result.metrics, "final": str(result.final_dir), "update": updates[-1],
                             "dist": list(log.dist_calls), "violations": list(log.violations),
                             "graphs": mpmd.graphs_of(log)}
        (Path(out) / f"four{rank}.json").write_text(json.dumps(summary, default=str))
        dist.barrier()


@pytest.fixture(scope="module")
def four_runs(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("neuron-four")
    start_ranks(_worker_of_four, (str(out / "init"), str(out)), nprocs=4)
    return [json.loads((out / f"four{r}.json").read_text()) for r in range(4)]


def test_tp2_dp2_zero1_sp_on_four_ranks_equals_the_one_process_run(four_runs, one_process):
    """tp = 2 × dp = 2 with ZeRO-1 and sequence parallelism: NxD's layers over the tensor groups [[0, 1], [2, 3]];
    in the update, the loss mean over the data groups [[0, 2], [1, 3]] (ours), the residual-width gradients summed
    over the tensor groups, then ZeRO-1's reduce-scatter bucket over the data (sharding) groups, the norm summed over
    the tensor groups and then the sharding groups (grads.py 99-117) and the all-gather bucket over the data groups
    (torch-xla's ``step``); our stop vote over every rank."""
    runs = [run["tp2dp2"] for run in four_runs]
    _assert_equals_one_process(runs[0], one_process, "tp2dp2-zero1-sp")
    data, tensor = "[[0, 2], [1, 3]]", "[[0, 1], [2, 3]]"
    want = [["all_reduce", data], ["optimizer_step", "44"], *[["all_reduce", tensor]] * _residual_width_vectors(),
            ["reduce_scatter", data], ["all_reduce", tensor], ["all_reduce", data], ["all_gather", data],
            ["all_reduce", "None"]]
    for rank, run in enumerate(runs):
        assert run["dist"] == [] and run["violations"] == [], rank
        assert _work(run["update"]) == want, rank


def test_tp2_pp2_on_four_ranks_equals_the_one_process_run(four_runs, one_process):
    """tp = 2 inside each stage of pp = 2, which NxD 0.17 runs (its pipeline sends over the pipeline groups,
    pipeline/model.py, and its layers reduce over the tensor groups): NxD's tensor groups [[0, 1], [2, 3]] are the
    stages, its pipeline groups [[0, 2], [1, 3]] pair each tensor rank's two stages. The numbers and exported
    weights are the one-process run's; the two tensor ranks of a stage cut the same graphs, and the stages' shared
    collectives meet; the update ends with the norm summed over the tensor group, then the pipeline group (grads.py
    99-110), and our stop vote."""
    runs = [run["tp2pp2"] for run in four_runs]
    _assert_equals_one_process(runs[0], one_process, "tp2pp2")
    graphs = {rank: mpmd.from_json(run["graphs"]) for rank, run in enumerate(runs)}
    assert mpmd.mismatches(mpmd.without_zero_constants(graphs), {0: 0, 1: 0, 2: 1, 3: 1}) == []
    for rank, run in enumerate(runs):
        assert run["dist"] == [] and run["violations"] == [], rank
        assert _work(run["update"])[-3:] == [["all_reduce", "[[0, 1], [2, 3]]"],
                                                       ["all_reduce", "[[0, 2], [1, 3]]"], ["all_reduce", "None"]], rank
