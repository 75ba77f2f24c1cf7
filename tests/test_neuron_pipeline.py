"""Pipeline parallelism in the Neuron training loop (``parallel.pp > 1`` through NxD) on test doubles.

No Neuron here. `doubles.neuron_sdk` plays torch-xla 2.9 and NxD 0.17; its ``NxDPPModel``
(`doubles.nxd_pp`) traces and cuts the model with ``torch.fx`` as NxD 0.17 does and runs
one stage per process, sending activations and gradients over gloo. Two gloo ranks
(pp = 2) run `train()` on a ``run.device: neuron`` recipe through the real loop, and the
results must equal the one-process CPU loop on the same recipe.

The model is ``BMB`` (eidetic memory on both stages: the innovation sum crosses the cut
and its gradient flows back) with tied embeddings (NxD shares the Parameter between the
first and last stage). ``train.grad_accum=2`` × ``parallel.microbatches=2`` gives NxD
4 micro-batches per step; ``eval.batches=3`` makes evaluation pad its last group.

Tolerances (float32): logged losses, gradient norms and eval numbers rtol 1e-5; final
weights rtol 1e-5 with atol 1e-5 (as in tests/test_pipeline_training.py: splitting a
batch into micro-batches changes float32 summation order, which moves an AdamW update
of a near-zero gradient by a visible fraction of lr). A resumed run of the same degrees
is compared bitwise.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from doubles import mpmd, neuron_sdk, nxd_pp
from rank_processes import start_ranks
from safetensors.torch import load_file
from test_neuron_train import TINY

from bmojo_neuron import BMojoForCausalLM, cli
from bmojo_neuron.checkpoints import layout
from bmojo_neuron.checkpoints import sharded as fmt
from bmojo_neuron.parallel.pipeline import stage_of
from bmojo_neuron.parallel.sharding import shard_shapes
from bmojo_neuron.recipes import ParallelSection, Recipe
from bmojo_neuron.training import TrainResult, train

WORLD = 2
STEPS = 4
PP = {"parallel.pp": 2, "parallel.microbatches": 2}
NXD_MICROBATCHES = 4  # parallel.microbatches × train.grad_accum
SETTINGS = {"model.num_hidden_layers": 3, "model.layer_pattern": "BMB", "train.steps": STEPS, "eval.every": 2,
            "eval.batches": 3, "eval.length_multipliers": [1, 2], "checkpoint.every": 2}
ZERO1 = {"parallel.zero1": True, "train.activation_checkpointing": True}
RTOL, ATOL = 1e-5, 1e-5
TRAIN_KEYS = ("loss", "lm_loss", "aux_loss", "grad_norm", "lr", "tokens")
EVAL_KEYS = ("eval_loss", "eval_accuracy", "eval_tokens")


def recipe(**overrides) -> Recipe:
    return Recipe.from_dict(TINY).with_overrides({**SETTINGS, **overrides})


def _train(records: list[dict]) -> list[dict]:
    return [r for r in records if r["type"] == "train"]


def _evals(records: list[dict]) -> list[dict]:
    return [r for r in records if r["type"] == "eval"]


@pytest.fixture
def doubles(monkeypatch):
    monkeypatch.setenv("BMOJO_OPS_BACKEND", "torch")
    return neuron_sdk.install(monkeypatch)


@pytest.fixture
def nxd_state(doubles, tmp_path):
    """NxD's parallel state on a one-rank gloo group: NxD's layers (and our factory) read it when built."""
    from neuronx_distributed.parallel_layers import parallel_state

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    parallel_state.initialize_model_parallel()
    yield doubles
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


# ------------------------------------------------------------------ the traced pipeline model (one process)


def _reference(config, ids, labels):
    """The model, and its [loss, lm_loss, aux_loss, tokens, right answers] (read before the wrapper adopts its
    layers). Every other label is the model's own guess, so some answers are right."""
    model = BMojoForCausalLM(config)
    with torch.no_grad():
        guesses = model(ids).logits[:, :-1].argmax(-1)
        labels = labels.clone()
        labels[:, 1::2] = torch.where(labels[:, 1::2] == -100, -100, guesses[:, ::2])
        out = model(ids, labels=labels)
    scored = labels[:, 1:] != -100
    correct = ((out.logits[:, :-1].argmax(-1) == labels[:, 1:]) & scored).sum()
    return model, labels, torch.stack([out.loss, out.lm_loss, out.aux_loss, scored.sum().float(), correct.float()])


def test_pipeline_causal_lm_is_the_model():
    """Same losses and counts as `BMojoForCausalLM` for every layer kind; same parameters, names and tie."""
    from naive import tiny_config

    from bmojo_neuron.parallel.nxd_pipeline import PipelineCausalLM

    config = tiny_config(num_hidden_layers=5, layer_pattern="BFMSA", num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (2, 24))
    labels = torch.where(torch.rand(2, 24) < 0.5, ids, torch.full_like(ids, -100))
    model, labels, want = _reference(config, ids, labels)
    names = [n for n, _ in model.named_parameters()]
    wrapped = PipelineCausalLM(model, count_correct=True)
    assert wrapped.memory_layers == 1 and [n for n, _ in wrapped.named_parameters()] == names
    assert wrapped.lm_head.weight is wrapped.model.embed_tokens.weight
    with torch.no_grad():
        loss, stats = wrapped(ids, labels)
    torch.testing.assert_close(stats, want, rtol=1e-6, atol=0)
    assert stats[2] > 0 and 0 < stats[4] < stats[3] and loss == stats[0]


def _nxd_model(doubles, pattern: str, tied: bool):
    """A `BMojoForCausalLM` built with NxD's (double) layers, and the `PipelineCausalLM` of it."""
    from naive import tiny_config

    from bmojo_neuron.layers.factory import use_layer_factory
    from bmojo_neuron.parallel.nxd import NxDTensorParallelFactory
    from bmojo_neuron.parallel.nxd_pipeline import PipelineCausalLM

    config = tiny_config(num_hidden_layers=len(pattern), layer_pattern=pattern, tie_word_embeddings=tied)
    torch.manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (2, 24))
    with use_layer_factory(NxDTensorParallelFactory()):
        model, labels, want = _reference(config, ids, ids)
    return config, PipelineCausalLM(model, count_correct=True), ids, labels, want


def test_pipeline_config_traces_and_cuts_where_nxd_needs_it(nxd_state):
    """NxD's tracing of `PipelineCausalLM` with our pipeline_config: cut after `split_layers`' blocks (not NxD's
    auto split), stages equal to the model, only batch-first tensors crossing the cut, the tied embedding one
    Parameter in both stages. Dropping our leaf / autowrap settings breaks the trace, as it would in NxD."""
    doubles = nxd_state
    from bmojo_neuron.parallel.nxd_training import pipeline_config

    config, wrapped, ids, labels, want = _nxd_model(doubles, "BMB", tied=True)
    cfg = pipeline_config(ParallelSection(pp=2, microbatches=2), config, grad_accum=2)
    assert cfg["pipeline_cuts"] == ["model.layers.1"] and cfg["num_microbatches"] == NXD_MICROBATCHES
    layers = [f"model.layers.{i}" for i in range(3)]
    assert nxd_pp.create_partitions(2, layers) == ["model.layers.0"]  # NxD's auto_partition would differ

    def traced(**drop):
        settings = {k: v for k, v in cfg.items() if k not in drop}
        return nxd_pp.trace(wrapped, settings["input_names"], [*settings.get("leaf_module_cls", []),
                                   cfg["transformer_layer_cls"].__name__], settings.get("autowrap_modules", []), [],
                                   doubles.env)

    top, qualnames = nxd_pp.split(traced(), cfg["pipeline_cuts"])
    owner, inputs = nxd_pp.stage_io(top)
    crossing = [a for a in inputs[1] if a.op != "placeholder"]
    values = {}
    top.submod_0.register_forward_hook(lambda m, a, out: values.update(out=out))
    with torch.no_grad():
        loss, stats = top(input_ids=ids, labels=labels)
    torch.testing.assert_close(stats, want, rtol=1e-6, atol=0)
    leaves = [t for t in torch.utils._pytree.tree_leaves(values["out"]) if isinstance(t, torch.Tensor)]
    assert len(crossing) == 1 and [t.dim() for t in leaves] == [3, 1]  # (hidden, innovation sum)
    stages = [{qualnames[f"submod_{k}.{n.split('.')[0]}"] + n[len(n.split('.')[0]):]
               for n, _ in top.get_submodule(f"submod_{k}").named_parameters(remove_duplicate=False)} for k in (0, 1)]
    for k, names in enumerate(stages):
        assert names == {n for n in wrapped.state_dict() if stage_of(n, config, 2) == k}, k
    assert top.submod_0.model_embed_tokens.weight is top.submod_1.lm_head.weight  # NxD shares it

    # without our RMSNorm leaf, its weight is read by the traced top level: NxD cannot pass it between stages
    with pytest.raises(RuntimeError, match="model.norm.weight"):
        nxd_pp.stage_io(nxd_pp.split(traced(leaf_module_cls=True), cfg["pipeline_cuts"])[0])
    # without NxD's loss_functions in autowrap_modules, its autograd Function is traced into
    with pytest.raises(RuntimeError, match="autowrap_modules"):
        traced(autowrap_modules=True)


def test_trainium_checks_accept_tied_embeddings_under_pp():
    """The Trn1 recipes tie their embeddings, and pp > 1 trains them."""
    from bmojo_neuron.launch.plan import validate_for_trainium
    from bmojo_neuron.recipes import load_recipe

    r = load_recipe("trn1/bmojo-130m", ["parallel.pp=2", "train.batch_size=128"])
    assert r.model_config().tie_word_embeddings
    validate_for_trainium(r, 32)


# ------------------------------------------------------------------ training on two ranks (`rank_processes`)


def _worker(rank: int, init: str, out: str) -> None:
    with neuron_sdk.gloo_rank(rank, init, WORLD) as log:
        out_dir, summary = Path(out), {}
        with neuron_sdk.host_reads_in_steps(log) as reads:
            whole = train(recipe(**PP), out_dir / "whole", progress=False)
        summary["whole"] = _summary(whole, log, reads)
        train(recipe(**PP), out_dir / "cut", progress=False, stop_after=2)
        before = len(log.syncs)
        summary["resumed"] = _summary(train(recipe(**PP), out_dir / "cut", resume=True, progress=False))
        summary["resumed"]["step_seeds"] = _step_seeds(log.syncs[before:])
        train(recipe(**PP, **ZERO1), out_dir / "zero1", progress=False, stop_after=2)
        summary["zero1"] = _summary(train(recipe(**PP, **ZERO1), out_dir / "zero1", resume=True,
                                               progress=False))
        (out_dir / f"rank{rank}.json").write_text(json.dumps(summary))
        dist.barrier()  # all ranks done before any tears the group down: an early exit can abort a peer


def _step_seeds(syncs: list[dict]) -> list[int]:
    """torch-xla's seed at our sync of each step (after NxD's pipeline syncs inside the step)."""
    return [s["rng"] for s in syncs if s["source"] == "code" and s["step_work"]]


def _summary(result, log=None, reads=None) -> dict:
    out = {"metrics": result.metrics, "lengths": [x.__dict__ for x in result.length_eval],
           "final": str(result.final_dir)}
    if log is not None:
        out["log"] = {"syncs": log.syncs, "violations": log.violations, "reads": reads, "dist": log.dist_calls,
                      "host_transfers": log.host_transfers, "cpu_fallbacks": log.cpu_fallbacks, "host_reads": log.host_reads,
                      "train_forwards": log.train_forwards, "eval_forwards": log.eval_forwards,
                      "closures_run": log.closures_run, "pipeline": log.calls["pipeline"],
                      "shared": log.calls["shared_weights"], "graphs": mpmd.graphs_of(log)}
    return json.loads(json.dumps(out, default=str))  # a copy: the doubles' log goes on recording


@pytest.fixture(scope="module")
def pp_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("neuron-pp")
    start_ranks(_worker, (str(out / "init"), str(out)), nprocs=WORLD)
    return out, [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory) -> TrainResult:
    return train(recipe(**{"run.device": "cpu"}), tmp_path_factory.mktemp("cpu"), progress=False)


def _assert_numbers_equal(got: dict, cpu: TrainResult) -> None:
    for g, w in zip(_train(got["metrics"]), _train(cpu.metrics), strict=True):
        for key in TRAIN_KEYS:
            assert g[key] == pytest.approx(w[key], rel=RTOL), (g["step"], key)
    for g, w in zip(_evals(got["metrics"]), _evals(cpu.metrics), strict=True):
        assert (g["step"], *[g[k] for k in EVAL_KEYS]) == pytest.approx((w["step"], *[w[k] for k in EVAL_KEYS]),
                                                                         rel=RTOL)
    one, two = got["lengths"]
    assert one["loss"] == pytest.approx(cpu.length_eval[0].loss, rel=RTOL) and one["sequences"] == 12
    assert two["loss"] is None and "parallel.pp" in two["skipped"]
    final = BMojoForCausalLM.from_pretrained(got["final"]).state_dict()
    for name, tensor in BMojoForCausalLM.from_pretrained(cpu.final_dir).state_dict().items():
        torch.testing.assert_close(final[name], tensor, rtol=RTOL, atol=ATOL, msg=name)


def test_pipeline_run_equals_the_cpu_run(pp_runs, cpu_run):
    _, (main, _) = pp_runs
    assert [r["step"] for r in _train(main["whole"]["metrics"])] == list(range(1, STEPS + 1))
    assert [r["step"] for r in _evals(main["whole"]["metrics"])] == [2, 4]
    _assert_numbers_equal(main["whole"], cpu_run)


def test_both_stages_cut_the_same_graphs_and_collectives(pp_runs):
    """The stages run graphs of their own, but the collectives that span them meet: same order, same shapes
    (`doubles.mpmd`)."""
    _, ranks = pp_runs
    graphs = {rank: mpmd.from_json(summary["whole"]["log"]["graphs"]) for rank, summary in enumerate(ranks)}
    assert len(graphs[0]) > 3 * STEPS
    assert mpmd.mismatches(graphs, {0: 0, 1: 1}) == []
    assert mpmd.mismatches(graphs, {0: 0, 1: 0})  # as one stage they would differ: the check can fail
    assert any(e[0] == "all_reduce" for g in graphs[0] for e in g)  # sum_over_pp: collectives to compare


def test_pipeline_step_marks_once_reads_nothing_and_passes_nxd_our_settings(pp_runs):
    """Each rank: NxD cuts its own graphs inside run_train; our loop adds exactly one mark_step per step, no
    host read inside a step, the loss stays on the device; NxD got host batches, our cuts and spec, and shares
    the tied embedding between stage 0 (the embedding) and stage 1 (lm_head). Our code calls no
    torch.distributed collective (on the "xla" group a ``dist.barrier`` would meet no one)."""
    _, ranks = pp_runs
    for rank, summary in enumerate(ranks):
        log = summary["whole"]["log"]
        assert log["reads"] == [] and log["violations"] == [] and log["dist"] == [], rank
        assert log["cpu_fallbacks"] == [], rank  # no op of a stage's step on torch-xla's CPU fallback
        assert log["host_reads"] == [], rank  # no device value copied to the host by our code in a step
        # no host tensor in a step graph but the stop flag, uploaded once (at the first step: no rank asks)
        assert [t.split(" at ")[1].split(":")[0] for t in log["host_transfers"]] == ["neuron.py"], rank
        ours = [s for s in log["syncs"] if s["source"] == "code" and s["step_work"]]
        assert len(ours) == STEPS and not any(s["source"] == "loader" for s in log["syncs"])
        assert sum(s["source"] == "pipeline" for s in log["syncs"]) > 2 * STEPS
        assert log["closures_run"] == STEPS
        assert log["train_forwards"] == STEPS * NXD_MICROBATCHES
        assert log["eval_forwards"] == 3 * 2 * NXD_MICROBATCHES  # 2 evals + the ×1 length row, 2 groups each
        pipeline = log["pipeline"]
        assert pipeline["pipeline_cuts"] == ["model.layers.1"] and pipeline["num_microbatches"] == NXD_MICROBATCHES
        assert pipeline["return_loss_on_cpu"] is False and pipeline["use_optimizer_wrapper"] is True
        assert pipeline["tracer_cls"] == "torch" and pipeline["auto_partition"] is False
        assert pipeline["output_loss_value_spec"] == [True, False] and pipeline["input_names"] == ["input_ids",
                                                                                                  "labels"]
        assert log["shared"] == [["model_embed_tokens.weight"], ["lm_head.weight"]][rank]


def test_pipeline_checkpoints_hold_each_stage_and_consolidate(pp_runs, tmp_path):
    from transformers import AutoModelForCausalLM

    out, (main, _) = pp_runs
    run_dir = out / "whole"
    last = layout.latest_checkpoint(run_dir)
    assert sorted(p.name for p in last.iterdir()) == [
        "config.json", "manifest.json", "optim-00-00-000.pt", "optim-00-01-000.pt", "parallel.json",
        "rank-00-00.safetensors", "rank-00-01.safetensors", "recipe.json", "trainer_state.json"]
    config = recipe().model_config()
    full = set(shard_shapes(config, 1)) - {fmt.TIED_HEAD}  # the tied head is the embedding, stored once
    for stage in (0, 1):
        names = set(load_file(str(last / fmt.model_file(0, stage))))
        assert names == {n for n in full if stage_of(n, config, 2) == stage}, stage
        states = torch.load(last / fmt.optim_file(0, stage, 0), weights_only=False)["optimizer"]
        assert set(states) == names, stage
    assert json.loads((last / "parallel.json").read_text())["pp"] == 2
    assert cli.main(["checkpoint", "consolidate", str(run_dir), str(tmp_path / "full")]) == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "full")
    for name, tensor in BMojoForCausalLM.from_pretrained(main["whole"]["final"]).state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name


def test_pipeline_resume_reproduces_the_uninterrupted_run(pp_runs):
    _, ranks = pp_runs
    for summary in ranks:  # each stage's XLA seed sequence over steps 3.. is the uninterrupted one's
        whole = _step_seeds(summary["whole"]["log"]["syncs"])
        assert len(whole) == STEPS and summary["resumed"]["step_seeds"] == whole[2:]
    main = ranks[0]
    keys = ("step", *TRAIN_KEYS)
    assert [[r[k] for k in keys] for r in _train(main["resumed"]["metrics"])] == \
        [[r[k] for k in keys] for r in _train(main["whole"]["metrics"])]  # bitwise
    resumed = BMojoForCausalLM.from_pretrained(main["resumed"]["final"]).state_dict()
    for name, tensor in BMojoForCausalLM.from_pretrained(main["whole"]["final"]).state_dict().items():
        assert torch.equal(resumed[name], tensor), name


def test_pipeline_zero1_with_activation_checkpointing_resumes_to_the_cpu_run(pp_runs, cpu_run):
    """ZeRO-1 (the tied copy's states and master weight restored from stage 0's files) + activation
    checkpointing of the pipeline's layers, cut and resumed: the one-process numbers."""
    _, (main, _) = pp_runs
    _assert_numbers_equal(main["zero1"], cpu_run)



# 2 rows per data rank and step: NxD's 2 micro-batches. Two steps, one eval batch: the cheap end of the CPU run.
PP_DP = {"parallel.pp": 2, "parallel.microbatches": 1, "train.steps": 2, "eval.every": 2, "eval.batches": 1,
         "eval.length_multipliers": [1]}


def _worker_of_four(rank: int, init: str, out: str) -> None:
    with neuron_sdk.gloo_rank(rank, init, 4) as log:
        result = train(recipe(**PP_DP), Path(out) / "pp2dp2", progress=False)
        (Path(out) / f"four{rank}.json").write_text(json.dumps(_summary(result, log)))
        dist.barrier()


def test_pp2_dp2_on_four_ranks_equals_the_cpu_run(tmp_path, cpu_run):
    """pp = 2 × dp = 2: NxD's pipeline groups [[0, 2], [1, 3]] (the stage is the index in the group: ranks 0 and 1
    hold the first stage) and data groups [[0, 1], [2, 3]]; the tied embedding's gradient summed over each pipeline
    group, the gradients averaged over the data groups and the norm summed over the pipeline groups. The two steps'
    numbers and weights are the one-process CPU run's after its step 2; each pipeline's stages cut matching graphs."""
    start_ranks(_worker_of_four, (str(tmp_path / "init"), str(tmp_path)), nprocs=4)
    runs = [json.loads((tmp_path / f"four{r}.json").read_text()) for r in range(4)]
    for g, w in zip(_train(runs[0]["metrics"]), _train(cpu_run.metrics)[:2], strict=True):
        for key in TRAIN_KEYS:
            assert g[key] == pytest.approx(w[key], rel=RTOL), (g["step"], key)
    final = BMojoForCausalLM.from_pretrained(runs[0]["final"]).state_dict()
    step2 = load_file(str(layout.list_checkpoints(cpu_run.run_dir)[0] / "model.safetensors"))
    assert step2.keys() <= final.keys()
    for name, tensor in step2.items():
        torch.testing.assert_close(final[name], tensor, rtol=RTOL, atol=ATOL, msg=name)
    graphs = {rank: mpmd.from_json(run["log"]["graphs"]) for rank, run in enumerate(runs)}
    assert mpmd.mismatches(graphs, {0: 0, 1: 0, 2: 1, 3: 1}) == []
    for rank, run in enumerate(runs):
        assert run["log"]["dist"] == [] and run["log"]["violations"] == [], rank
        update = next(g for g in reversed(graphs[rank]) if any(e[0] == "optimizer_step" for e in g))
        reduced = {e[1] for e in update if e[0] == "all_reduce"}
        assert {"[[0, 1], [2, 3]]", "[[0, 2], [1, 3]]"} <= reduced, (rank, reduced)
