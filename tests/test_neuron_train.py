"""The Neuron training backend (`bmojo_neuron.training.backends.neuron`) on the torch-xla / NxD test doubles.

No Neuron here: `doubles.neuron_sdk` plays torch-xla 2.9 and NxD 0.17 on the CPU (one
process, tp = 1), so `train()` on a ``run.device: neuron`` recipe runs the real
loop — data loader, NxD wiring, step closures, sharded checkpoints, resume — and
must reproduce the CPU loop on the same recipe. What the doubles cannot check
(XLA compilation, NKI kernels, collectives across ranks, HBM) needs a Trn1.
"""

from __future__ import annotations

import json
import math
import sys
import warnings

import pytest
import torch
import torch.distributed as dist
from doubles import neuron_sdk
from doubles.nxd_runtime import local_world_size
from doubles.xla import RENDEZVOUS_GRAPH
from test_training import TINY_RECIPE

from bmojo_neuron import BMojoForCausalLM, cli
from bmojo_neuron.neuron import INSTALL_COMMAND, NeuronUnavailableError
from bmojo_neuron.recipes import Recipe
from bmojo_neuron.checkpoints import layout
from bmojo_neuron.checkpoints.neuron import dp_slice
from bmojo_neuron.training import TrainResult, train
from bmojo_neuron.training.data_order import DataOrder, position_after
from bmojo_neuron.training.neuron_data import StepRows
from bmojo_neuron.training.backends.neuron import select_ops_backend

# The CPU trainer tests' tiny recipe on the device, at Trainium shapes (sequence a multiple of 128 and of
# memory_chunk); 40 examples / batch 4 = 10 micro-batches per epoch, so 6 steps × 2 accumulated micro-batches
# cross an epoch boundary.
TINY = {**TINY_RECIPE, "run": {**TINY_RECIPE["run"], "device": "neuron"},
        "data": {**TINY_RECIPE["data"], "seq_len": 128}}
STEPS, ACCUM = TINY["train"]["steps"], TINY["train"]["grad_accum"]
RTOL = 1e-5  # fp32: the doubles' NxD clips over the optimizer's parameter order, the CPU loop over the model's


def recipe(**overrides) -> Recipe:
    return Recipe.from_dict(TINY).with_overrides(overrides) if overrides else Recipe.from_dict(TINY)


def train_records(records: list[dict]) -> list[dict]:
    return [r for r in records if r["type"] == "train"]


@pytest.fixture
def doubles(monkeypatch):
    """torch-xla and NxD doubles in sys.modules; the hot ops on the torch backend (the NKI kernels need a device)."""
    monkeypatch.setenv("BMOJO_OPS_BACKEND", "torch")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("NEURON_RT_STOCHASTIC_ROUNDING_EN", raising=False)
    return neuron_sdk.install(monkeypatch)


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory) -> TrainResult:
    return train(recipe(**{"run.device": "cpu"}), tmp_path_factory.mktemp("cpu"), progress=False)


@pytest.fixture(scope="module")
def neuron_run(tmp_path_factory):
    """(result, doubles' log, host reads inside steps) of one uninterrupted run on the doubles."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BMOJO_OPS_BACKEND", "torch")
        mp.delenv("WORLD_SIZE", raising=False)
        log = neuron_sdk.install(mp)
        with neuron_sdk.host_reads_in_steps(log) as reads:
            result = train(recipe(), tmp_path_factory.mktemp("neuron"), progress=False)
    return result, log, reads


# ------------------------------------------------------------------ equal to the CPU loop


def test_neuron_run_equals_the_cpu_run(cpu_run, neuron_run):
    result, _, _ = neuron_run
    got, want = train_records(result.metrics), train_records(cpu_run.metrics)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    for g, w in zip(got, want):
        for key in ("loss", "lm_loss", "aux_loss", "grad_norm", "lr"):
            assert g[key] == pytest.approx(w[key], rel=RTOL), (g["step"], key)
        assert g["tokens"] == w["tokens"]
    evals = [r for r in result.metrics if r["type"] == "eval"]
    want_evals = [r for r in cpu_run.metrics if r["type"] == "eval"]
    assert [r["step"] for r in evals] == [r["step"] for r in want_evals] == [3, 6]
    for g, w in zip(evals, want_evals):
        assert (g["eval_loss"], g["eval_accuracy"], g["eval_tokens"]) == pytest.approx(
            (w["eval_loss"], w["eval_accuracy"], w["eval_tokens"]), rel=RTOL)
    neuron_final = BMojoForCausalLM.from_pretrained(result.final_dir).state_dict()
    cpu_final = BMojoForCausalLM.from_pretrained(cpu_run.final_dir).state_dict()
    assert neuron_final.keys() == cpu_final.keys()
    for name, tensor in cpu_final.items():
        torch.testing.assert_close(neuron_final[name], tensor, rtol=RTOL, atol=1e-6, msg=name)
    assert result.params == cpu_run.params and result.step == STEPS


def step_graphs(log) -> list[list[tuple]]:
    """The graphs the doubles saw cut that hold training work: micro-batch forwards or the optimizer step."""
    return [g[1:] for g in log.graphs if any(e[0] == "optimizer_step" or e[:2] == ("forward", "train") for e in g)]


def test_the_run_calls_no_deprecated_torch_xla_function(neuron_run):
    """torch-xla 2.9 deprecates ``xm.mark_step`` and ``xm.xla_device`` (a DeprecationWarning at every call):
    the trainer cuts its graphs with ``torch_xla.sync`` and takes its device from ``torch_xla.device``."""
    _, log, _ = neuron_run
    assert log.deprecated == []
    assert [s["source"] for s in log.syncs].count("code") >= STEPS  # its own syncs went through torch_xla.sync


def test_no_graph_draws_a_random_number_on_the_device(neuron_run):
    """No graph draws a random number (the model has no dropout): a random op traced inside NxD's model wrapper
    would be recorded here. Each would take the next XLA seed, which a resumed run reproduces
    (`test_resume_reproduces_the_uninterrupted_run`)."""
    _, log, _ = neuron_run
    assert log.train_forwards > 0 and log.random_ops == []


def test_a_graph_per_micro_batch_one_for_the_update_and_no_host_reads_inside(neuron_run):
    result, log, reads = neuron_run
    assert reads == []  # no .item() / .tolist() / float() by our code between a batch and its mark_step
    assert log.host_transfers == []  # no host tensor made inside a step and copied into its graph
    assert log.host_reads == []  # no .cpu() / .to("cpu") / .item() of a device value by our code in a step
    assert log.cpu_fallbacks == []  # no op of a step (forward, backward, update) on torch-xla's CPU fallback
    assert log.violations == []  # no eval forward, no host copy while a step graph was pending
    graphs = step_graphs(log)
    kinds = [[e[0] for e in g if e[0] in ("forward", "optimizer_step")] for g in graphs]
    assert kinds == ([["forward"]] * ACCUM + [["optimizer_step"]]) * STEPS
    # every micro-batch is a device input of its own: the same shapes in every micro-batch graph
    assert len({tuple(g) for g, k in zip(graphs, kinds) if k == ["forward"]}) == 1
    assert len({tuple(g) for g, k in zip(graphs, kinds) if k == ["optimizer_step"]}) == 1  # one update graph
    # the loader's fetch cut the graph before every micro-batch but a step's first; ours cut before the update
    # and ran it
    assert [s["source"] for s in log.step_syncs()] == (["loader"] * (ACCUM - 1) + ["code"]) * STEPS
    assert log.fetches == STEPS * ACCUM
    assert log.closures_run == STEPS and len(train_records(result.metrics)) == STEPS  # log_every 1: read in closures
    assert log.calls["initialize_model_parallel"] == 1


def test_grad_accum_4_cuts_one_graph_per_micro_batch_and_one_for_the_update(doubles, tmp_path):
    """Four micro-batches: four graphs of one forward + backward each, then the update in a graph of its own
    (a step graph would otherwise grow with grad_accum); 4 loader fetches and 2 mark_steps of ours a step."""
    steps = 2
    result = train(recipe(**{"train.grad_accum": 4, "train.batch_size": 2, "train.steps": steps, "eval.every": 2,
                             "checkpoint.every": 2}), tmp_path / "run", progress=False)
    assert result.step == steps
    kinds = [[e[0] for e in g if e[0] in ("forward", "optimizer_step")] for g in step_graphs(doubles)]
    assert kinds == ([["forward"]] * 4 + [["optimizer_step"]]) * steps
    assert doubles.fetches == 4 * steps
    cuts = [s["source"] for s in doubles.step_syncs()]
    assert cuts == (["loader"] * 3 + ["code"]) * steps


def test_the_update_graph_stays_the_same_past_the_update_where_adamw_s_corrections_reach_1(doubles, tmp_path,
                                                                                            monkeypatch):
    """The update graph is the same at every update, across the warm-up's end and the update where the
    non-capturable AdamW's ``bias_correction2 ** 0.5`` (a Python float) turns exactly 1.0 (709 with beta2 = 0.95),
    which torch-xla would make a graph constant instead of device data (`xla_host.trace_python_scalars`): the
    Neuron AdamW keeps its bias corrections on the device (``capturable``). AdamW's ``step`` is moved to 707 after
    the first update, so the run's updates are 1, 708 (past the warm-up) and 709. (A non-capturable AdamW traces
    as many constants at 1 as at 709, so 708 must be among them.) One row a micro-batch, one eval batch and no
    plot keep the run short."""
    adamw_step, updates = torch.optim.AdamW.step, []

    def step_then_skip_ahead(self, *args, **kwargs):
        out = adamw_step(self, *args, **kwargs)
        updates.append(self)
        if len(updates) == 1:
            for state in self.state.values():
                state["step"].fill_(707)
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", step_then_skip_ahead)
    monkeypatch.setattr("bmojo_neuron.training.trainer.plot_training", lambda *args, **kwargs: None)
    steps = 3
    result = train(recipe(**{"train.grad_accum": 1, "train.batch_size": 1, "train.steps": steps,
                             "optim.warmup_steps": 2, "eval.every": 10, "eval.batches": 1, "checkpoint.every": 10}),
                   tmp_path / "run", progress=False)
    assert result.step == steps and len(updates) == steps
    assert all(float(s["step"]) == 707 + steps - 1 for s in updates[-1].state.values())
    update_graphs = [tuple(g) for g in step_graphs(doubles) if any(e[0] == "optimizer_step" for e in g)]
    assert len(update_graphs) == steps and len(set(update_graphs)) == 1


# ------------------------------------------------------------------ checkpoints and resume


def test_checkpoints_use_the_sharded_layout_and_consolidate_to_a_hf_model(neuron_run, tmp_path):
    from transformers import AutoModelForCausalLM

    result, _, _ = neuron_run
    run_dir = result.run_dir
    assert sorted(p.name for p in layout.list_checkpoints(run_dir)) == ["step-0000003", "step-0000006"]
    last = layout.latest_checkpoint(run_dir)
    assert sorted(p.name for p in last.iterdir()) == ["config.json", "manifest.json", "optim-00-00-000.pt",
                                                      "parallel.json", "rank-00-00.safetensors", "recipe.json",
                                                      "trainer_state.json"]
    meta = json.loads((last / "parallel.json").read_text())
    assert (meta["tp"], meta["pp"], meta["dp"], meta["zero1"]) == (1, 1, 1, False)
    out = tmp_path / "full"
    assert cli.main(["checkpoint", "consolidate", str(run_dir), str(out)]) == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    final = BMojoForCausalLM.from_pretrained(result.final_dir)
    for name, tensor in final.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    states = torch.load(out / "training_state.pt", weights_only=False)
    assert {"exp_avg", "exp_avg_sq", "step"} <= set(states["optimizer"]["model.embed_tokens.weight"])


def test_resume_reproduces_the_uninterrupted_run(neuron_run, doubles, tmp_path):
    result, log, _ = neuron_run
    first = train(recipe(), tmp_path, progress=False, stop_after=3)
    assert first.final_dir is None and first.step == 3 and layout.latest_checkpoint(tmp_path).name == "step-0000003"
    second = train(recipe(), tmp_path, resume=True, progress=False)
    # torch-xla's seed (``get_rng_state``) at every sync of steps 4-6 is the uninterrupted run's, though the
    # uninterrupted run synced for its eval and checkpoint before step 4 and the resumed one for its start-up
    seeds = [s["rng"] for s in doubles.step_syncs()]
    assert len(seeds) == 2 * 3 * ACCUM and seeds[3 * ACCUM:] == [s["rng"] for s in log.step_syncs()][3 * ACCUM:]
    keys = ("step", "loss", "lm_loss", "aux_loss", "grad_norm", "lr", "tokens")
    assert [[r[k] for k in keys] for r in train_records(second.metrics)] == \
        [[r[k] for k in keys] for r in train_records(result.metrics)]  # bitwise
    resumed = BMojoForCausalLM.from_pretrained(second.final_dir).state_dict()
    for name, tensor in BMojoForCausalLM.from_pretrained(result.final_dir).state_dict().items():
        assert torch.equal(resumed[name], tensor), name


def test_zero1_bf16_keeps_fp32_masters_and_resumes_exactly(doubles, tmp_path):
    """ZeRO-1 + bf16 + activation checkpointing: bf16 model, fp32 master weights in the checkpoint,
    NxD's fp32 master / accumulation config, and a resumed run equal to the uninterrupted one."""
    import os

    settings = {"parallel.zero1": True, "train.precision": "bf16", "train.activation_checkpointing": True,
                "train.steps": 4, "eval.every": 4, "checkpoint.every": 2}
    whole = train(recipe(**settings), tmp_path / "whole", progress=False)
    assert os.environ["NEURON_RT_STOCHASTIC_ROUNDING_EN"] == "0"  # fp32 master weights: round to nearest
    config = doubles.calls["config"]
    assert config["mixed_precision_config"] == {"use_master_weights": True, "use_fp32_grad_acc": True,
                                                "use_master_weights_in_ckpt": False}
    assert config["activation_checkpoint_config"].__name__ == "BMojoDecoderLayer"
    assert doubles.calls["optimizer_defaults"]["max_norm"] == 1.0  # optim.grad_clip reaches NxD's ZeRO-1

    from safetensors.torch import load_file

    weights = load_file(str(layout.latest_checkpoint(tmp_path / "whole") / "rank-00-00.safetensors"))
    assert all(w.dtype == torch.float32 for w in weights.values())
    assert any(not torch.equal(w.bfloat16().float(), w) for w in weights.values())  # masters, not bf16 params

    (tmp_path / "cut").mkdir()
    train(recipe(**settings), tmp_path / "cut", progress=False, stop_after=2)
    resumed = train(recipe(**settings), tmp_path / "cut", resume=True, progress=False)
    keys = ("step", "loss", "grad_norm", "lr")
    assert [[r[k] for k in keys] for r in train_records(resumed.metrics)] == \
        [[r[k] for k in keys] for r in train_records(whole.metrics)]
    cut = load_file(str(layout.latest_checkpoint(tmp_path / "cut") / "rank-00-00.safetensors"))
    assert all(torch.equal(cut[k], v) for k, v in weights.items())


# ------------------------------------------------------------------ failures and pieces


def test_without_neuron_train_names_the_missing_packages(tmp_path):
    with pytest.raises(NeuronUnavailableError) as error:
        train(recipe(), tmp_path / "run", progress=False)
    for name in ("torch_neuronx", "torch_xla", "neuronx_distributed", "neuronxcc", "nki"):
        assert name in str(error.value)
    assert INSTALL_COMMAND in str(error.value) and not (tmp_path / "run").exists()


def test_hot_ops_default_to_nki(monkeypatch):
    monkeypatch.delenv("BMOJO_OPS_BACKEND", raising=False)
    assert select_ops_backend() == "nki"
    monkeypatch.setenv("BMOJO_OPS_BACKEND", "torch")
    assert select_ops_backend() == "torch"


def test_the_backend_runs_the_attention_an_xla_graph_runs(doubles):
    """The doubles' XLA device is the CPU: for the whole run the reference attention is the blocked op (what a
    Neuron graph is traced from), not the CPU-only fused kernels; `close` gives them back."""
    from bmojo_neuron.ops.reference.eager_cpu import fused_kernel_available
    from bmojo_neuron.training.backends.neuron import NeuronBackend

    q = torch.zeros(1, 2, 128, 8)
    assert fused_kernel_available(q)
    backend = NeuronBackend.start(recipe())
    try:
        assert not fused_kernel_available(q)
    finally:
        backend.close()
    assert fused_kernel_available(q)


@pytest.mark.parametrize("epoch, position", [(0, 0), (0, 7), (0, 10), (2, 3)])
def test_position_after_matches_data_order(epoch, position):
    order = DataOrder(43, 4, seed=5, epoch=epoch, position=position)  # 10 micro-batches per epoch
    for taken in range(1, 26):
        order.next()
        assert position_after(epoch, position, order.per_epoch, taken) == (order.epoch, order.position), taken


def test_step_rows_split_the_cpu_micro_batches_over_data_ranks():
    order = DataOrder(40, 4, seed=3)
    want = [[order.next() for _ in range(ACCUM)] for _ in range(5)]
    ranks = [list(StepRows(40, 4, 3, 0, 0, ACCUM, rank, 2, steps=5)) for rank in range(2)]
    for step in range(5):
        assert all(len(r[step]) == ACCUM * 2 for r in ranks)  # a fixed shape every step
        for micro in range(ACCUM):
            rows = ranks[0][step][micro * 2:(micro + 1) * 2] + ranks[1][step][micro * 2:(micro + 1) * 2]
            assert rows == want[step][micro]


def test_device_eval_equals_the_cpu_evaluate(doubles):
    """Loss, perplexity and MQAR recall as `evaluate` computes them (recall strictly between 0 and 1 here)."""
    from bmojo_neuron.data import build_datasets
    from bmojo_neuron.evaluation import evaluate
    from bmojo_neuron.training.neuron_eval import evaluate_on_device
    from bmojo_neuron.training.neuron_runtime import NeuronRuntime

    r = recipe()
    _, data = build_datasets(r)
    torch.manual_seed(0)
    model = BMojoForCausalLM(r.model_config())
    with torch.no_grad():  # make half of the answers the model's own predictions: recall ~ 1/2
        guess = model(data[:]["input_ids"]).logits[:, :-1].argmax(-1)
    labels = data[:]["labels"].clone()
    answers = (labels[:, 1:] != -100).nonzero()
    keep = answers[::2]
    labels[keep[:, 0], keep[:, 1] + 1] = guess[keep[:, 0], keep[:, 1]]
    data = {"input_ids": data[:]["input_ids"], "labels": labels}
    runtime = NeuronRuntime.start({})
    runtime.state.initialize_model_parallel()  # as the trainer's NxD config does: the ranks are NxD's
    try:
        got = evaluate_on_device(model, data, 4, runtime, max_batches=3, mqar=True)
    finally:
        runtime.close()
    want = evaluate(model, data, 4, "cpu", max_batches=3, mqar=True)
    assert 0.3 < want["accuracy"] < 0.9 and got["tokens"] == want["tokens"]
    assert got == pytest.approx(want, rel=RTOL)


def test_a_pjrt_device_other_than_neuron_is_refused_before_nxd_meets_it(doubles, monkeypatch):
    """With ``PJRT_DEVICE`` other than NEURON, NxD v2.28's ``get_local_world_size`` (parallel_layers/utils.py
    246-256) reads ``xenv.HOST_WORLD_SIZE``, which torch-xla 2.9 no longer has (the double raises that
    AttributeError); the runtime refuses such a setting at start, naming it."""
    from bmojo_neuron.training.neuron_runtime import NeuronRuntime

    assert local_world_size() == 1  # NEURON: torch-xla's local process count
    monkeypatch.setenv("PJRT_DEVICE", "CPU")
    with pytest.raises(AttributeError, match="HOST_WORLD_SIZE"):
        local_world_size()
    with pytest.raises(ValueError, match=r"^PJRT_DEVICE is 'CPU': Neuron training runs on PJRT_DEVICE=NEURON"):
        NeuronRuntime.start({})
    assert not dist.is_initialized()  # refused before the process group


def test_a_negative_seed_seeds_the_xla_generator_as_torch_reads_it(doubles):
    """``run.seed`` may be negative (torch.manual_seed takes it as seed + 2**64); torch-xla's generator takes an
    unsigned 64-bit seed only, so the runtime hands it the seed torch uses."""
    from bmojo_neuron.training.neuron_runtime import NeuronRuntime

    runtime = NeuronRuntime.start({})
    try:
        runtime.seed(-3)
        torch.manual_seed(-3)
        assert runtime.rng_state() == torch.initial_seed() == 2**64 - 3
        runtime.seed(7)
        assert runtime.rng_state() == 7
        runtime.set_rng_state_one_sync_back(7)  # what a resumed pipeline's first step starts from
        runtime.sync()
        assert runtime.rng_state() == 7
    finally:
        runtime.close()


def test_local_tensor_shards_get_nxd_attributes(doubles):
    """At tp = 2 the Mamba tensors built at 1/tp size are marked for NxD's gradient norm; NxD's own layers
    (marked by NxD) and replicated tensors are left alone."""
    from naive import tiny_config

    from bmojo_neuron.checkpoints.sharded import parallel_meta
    from bmojo_neuron.layers.factory import use_layer_factory
    from bmojo_neuron.parallel import sharding
    from bmojo_neuron.parallel import tensor_parallel as tpl
    from bmojo_neuron.training.backends.neuron import mark_tensor_shards

    config = tiny_config(layer_pattern="MB", ssm_n_groups=2, num_attention_heads=4, num_key_value_heads=2)
    with torch.device("meta"), use_layer_factory(sharding.shape_only_factory(2, 0)):
        model = BMojoForCausalLM(config)
    nxd_layers = (tpl.ColumnParallelLinear, tpl.RowParallelLinear, tpl.VocabParallelEmbedding)
    own = {f"{m}.{n}" for m, module in model.named_modules() if isinstance(module, nxd_layers)
           for n, p in module.named_parameters(recurse=False)}
    for name, param in model.named_parameters():
        if name in own:
            param.tensor_model_parallel = True  # what NxD's layers do for their weights
    local = {k: v.shape for k, v in model.state_dict().items()}
    dims = parallel_meta(sharding.shard_shapes(config, 1), local, 2, 1, 1, False, False)["split_dims"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # NxD warns when num_partitions is left out; the double does too
        marked = mark_tensor_shards(model, dims, sys.modules["neuronx_distributed.parallel_layers.utils"], 2)
    assert set(marked) == {n for n, _ in model.named_parameters() if dims[n] is not None and n not in own}
    for suffix in ("ssm.A_log", "ssm.D", "ssm.dt_bias", "ssm.conv_x.weight"):
        assert any(n.endswith(suffix) for n in marked), suffix
    params = dict(model.named_parameters())
    assert all(params[n].partition_dim == dims[n] and params[n].num_partitions == 2 for n in marked)
    assert not any(getattr(params[n], "tensor_model_parallel", False) for n in params if dims[n] is None)


def test_dp_slice_is_torch_xla_zero1_sharding():
    full = torch.arange(10.0).reshape(5, 2)
    assert torch.equal(dp_slice(full, 2, 0), full[:3])
    assert torch.equal(dp_slice(full, 2, 1), torch.tensor([[6.0, 7.0], [8.0, 9.0], [0.0, 0.0]]))  # zero-padded
    assert torch.equal(dp_slice(torch.tensor(3.0), 4, 2), torch.tensor(3.0))  # a scalar (AdamW step) is shared


# ------------------------------------------------------------------ neuron_parallel_compile's trial run


def test_graph_extraction_run_reads_no_device_value_finishes_and_cuts_the_real_graphs(doubles, tmp_path,
                                                                                       monkeypatch):
    """`bmojo-neuron precompile`'s trial run (its overrides) under NEURON_EXTRACT_GRAPHS_ONLY, where the device
    values are zeros from empty stubs: it reads none of them (no loss closure, no eval sums, no checkpoint
    copies), finishes, and traces and cuts the very graphs the real run does (steps, evals, the ZeRO-1 save).
    The real run meets at more rendezvous (a checkpoint's), each cutting the one rendezvous graph, which the
    trial run cuts too."""
    from bmojo_neuron.launch.precompile import trial_overrides

    settings = {"parallel.zero1": True, "train.precision": "bf16", "train.activation_checkpointing": True}
    trial = dict(o.split("=", 1) for o in trial_overrides(3, tmp_path / "unused"))
    trial = {k: int(v) for k, v in trial.items() if k != "run.output_dir"}  # steps, eval and checkpoint cadence

    def graphs(run_dir):
        start = len(doubles.graphs)
        with neuron_sdk.host_reads_in_steps(doubles) as reads:
            result = train(recipe(**settings, **trial), run_dir, progress=False)
        work = [g[1:] for g in doubles.graphs[start:] if g[1:]]  # what each graph holds, whatever cut it
        assert RENDEZVOUS_GRAPH in work
        return result, [g for g in work if g != RENDEZVOUS_GRAPH], reads

    real, real_graphs, _ = graphs(tmp_path / "real")
    assert doubles.extraction_reads == []
    monkeypatch.setenv("NEURON_EXTRACT_GRAPHS_ONLY", "1")
    trial_run, trial_graphs, reads = graphs(tmp_path / "trial")
    assert doubles.extraction_reads == [] and reads == []  # nothing read back
    assert doubles.host_transfers == [] and doubles.host_reads == []  # ZeRO-1, bf16, activation checkpointing:
    # no host tensor in a step, no device value copied to the host in one
    assert doubles.cpu_fallbacks == []  # nor an op torch-xla would run on its CPU fallback
    assert trial_run.step == 3 and trial_graphs == real_graphs  # the same graphs, in the same order
    assert any(e[0] == "all_gather" for g in trial_graphs for e in g)  # the ZeRO-1 save's graph is among them
    assert not train_records(trial_run.metrics) and not layout.list_checkpoints(tmp_path / "trial")
    evals = [r for r in trial_run.metrics if r["type"] == "eval"]
    assert evals and all(math.isnan(r["eval_loss"]) for r in evals)
    assert not (tmp_path / "trial" / "final").exists()


def test_a_zero1_checkpoint_reads_everything_in_one_host_copy(doubles):
    """ZeRO-1 + bf16: the save all-gathers every state and fp32 master, then copies them to the host once: one
    graph for the whole save (a copy per parameter would compile and run one small graph each)."""
    from naive import tiny_config

    from bmojo_neuron.checkpoints.neuron import host_state
    from bmojo_neuron.parallel import nxd_training
    from bmojo_neuron.recipes import OptimSection, ParallelSection
    from bmojo_neuron.training.neuron_runtime import NeuronRuntime
    from bmojo_neuron.training.optim import parameter_groups

    runtime = NeuronRuntime.start({})
    try:
        config = tiny_config(layer_pattern="BM", ssm_n_groups=2)
        cfg = nxd_training.nxd_config(ParallelSection(zero1=True), False, True)
        model = nxd_training.build_nxd_model(config, cfg, dtype=torch.bfloat16, one_device_init=True)
        optim = OptimSection()
        optimizer = nxd_training.build_nxd_optimizer(parameter_groups(model, optim.weight_decay), cfg, optim)
        ids = torch.randint(0, config.vocab_size, (2, 10))
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        runtime.sync()
        before = len(doubles.graphs)
        weights, states = host_state(model, optimizer, runtime)
    finally:
        runtime.close()
    save = doubles.graphs[before:]
    assert [g[0] for g in save] == [("to_cpu",)]  # one host copy
    gathers = [e for e in save[0] if e[0] == "all_gather"]
    params = [n for n, _ in model.named_parameters() if n != "lm_head.weight"]  # the tied head is stored once
    assert len(gathers) == 3 * len(params)  # exp_avg, exp_avg_sq, the fp32 master of every parameter
    assert set(states) == set(params) and all(w.dtype == torch.float32 for w in weights.values())
    zero = optimizer.optimizer
    masters = {id(p): s for g, sg in zip(zero.param_groups, zero.base_optimizer.param_groups)
               for p, s in zip(g["params"], sg["params"])}
    for name, p in model.named_parameters():
        if name in params:
            assert torch.equal(weights[name], masters[id(p)].detach()), name  # the exact fp32 master


def test_a_save_writes_its_host_copies_before_the_next_step(doubles, tmp_path):
    """NxD's ``move_all_tensor_to_cpu`` hands a host tensor back as an alias (utils.py 230-243; torch-xla's rewrite
    shallow-copies it, torch_xla/utils/utils.py 198-204) and NxD's own async save queues what it returns as it is
    (trainer/checkpoint.py 151-159, 174-183): nothing copies it. AdamW's ``step`` is such a host tensor unless
    ``capturable`` (ours is, but a non-capturable one must save right too), so `save_checkpoint` has to write its
    files before it returns: the file keeps the step of the save while the host copy it wrote from follows the
    next update."""
    from naive import tiny_config

    from bmojo_neuron.checkpoints import sharded
    from bmojo_neuron.checkpoints.neuron import host_state, save_checkpoint
    from bmojo_neuron.checkpoints.state import TrainerState
    from bmojo_neuron.parallel import nxd_training
    from bmojo_neuron.recipes import OptimSection, ParallelSection
    from bmojo_neuron.training.neuron_runtime import NeuronRuntime
    from bmojo_neuron.training.optim import parameter_groups

    runtime = NeuronRuntime.start({})
    try:
        config = tiny_config(layer_pattern="BM")
        cfg = nxd_training.nxd_config(ParallelSection(), False, True)
        model = nxd_training.build_nxd_model(config, cfg, dtype=torch.float32, one_device_init=True)
        optimizer = nxd_training.build_nxd_optimizer(parameter_groups(model, 0.1), cfg, OptimSection())
        for group in optimizer.param_groups:
            group["capturable"] = False  # its ``step`` on the host (torch optim/adam.py ``_init_group``)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        ids = torch.randint(0, config.vocab_size, (2, 10))

        def update() -> None:
            model(ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            runtime.sync()

        update()
        saved = save_checkpoint(tmp_path, runtime, model, optimizer, scheduler, TrainerState(step=1), {}, 2, {}, 7)
        _, read = host_state(model, optimizer, runtime)  # the host copies a save writes from
        update()
    finally:
        runtime.close()
    name = next(iter(read))
    assert read[name]["step"].item() == 2.0  # the alias followed the second update
    written = torch.load(saved / sharded.optim_file(0, 0, 0), weights_only=False)["optimizer"]
    assert set(written) == set(read) and {s["step"].item() for s in written.values()} == {1.0}
