"""NxD pipeline parallelism / ZeRO-1 wiring (`bmojo_neuron.parallel.nxd_training`) with a test double of NxD.

No Neuron here: a double of ``neuronx_distributed``'s module API records the calls;
with tensor-parallel size 1 its layers are plain torch layers.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from doubles import nxd_api, nxd_gloo
from naive import tiny_config
from rank_processes import start_ranks
from test_parallel import assert_rank_matches, gather_grad, run_cases, single_process_run

from bmojo_neuron import BMojoConfig, BMojoForCausalLM
from bmojo_neuron.layers.decoder import BMojoDecoderLayer
from bmojo_neuron.layers.factory import use_layer_factory
from bmojo_neuron.parallel.sharding import shard_state_dict, split_dims
from bmojo_neuron.priming.distill import LayerwiseDistillation, freeze_shared
from bmojo_neuron.neuron import NeuronUnavailableError
from bmojo_neuron.parallel import nxd, nxd_training
from bmojo_neuron.parallel.nxd_pipeline import PipelineCausalLM, PipelineDecoderLayer
from bmojo_neuron.recipes import OptimSection, ParallelSection
from bmojo_neuron.training.optim import parameter_groups

WORLD = 2


def _config(**overrides):
    kwargs = dict(layer_pattern="BFMSA", num_attention_heads=4, num_key_value_heads=2,
                  tie_fading_projections=False, memory_decay=0.9)
    return tiny_config(**{**kwargs, **overrides})


@pytest.fixture
def fake_nxd(monkeypatch):
    """NxD's module API at tp = 1 and a spy of its trainer (`doubles.nxd_api`); the calls they recorded."""
    calls = {"layers": []}
    calls["modules"] = {nxd_api.TRAINER: nxd_api.spy_trainer(calls), **nxd_api.parallel_layers(calls["layers"])}
    nxd_api.patch_imports(monkeypatch, calls["modules"], nxd_training, nxd)
    return calls


def test_nxd_config_carries_the_recipe_degrees_and_zero1(fake_nxd):
    config = _config()
    parallel = ParallelSection(tp=2, pp=2, zero1=True, microbatches=4)
    cfg = nxd_training.nxd_config(parallel, activation_checkpointing=True, mixed_precision=True,
                                  model_config=config, max_grad_norm=0.5, grad_accum=3)
    kw = fake_nxd["config"]
    assert kw["tensor_parallel_size"] == 2 and kw["pipeline_parallel_size"] == 2
    assert kw["sequence_parallel"] is False
    assert kw["optimizer_config"] == {"zero_one_enabled": True, "grad_clipping": True, "max_grad_norm": 0.5}
    pc = kw["pipeline_config"]  # NxDPPModel's arguments (see tests/test_neuron_pipeline.py for what they do)
    assert pc["transformer_layer_cls"] is PipelineDecoderLayer and issubclass(PipelineDecoderLayer, BMojoDecoderLayer)
    assert pc["num_microbatches"] == 4 * 3  # parallel.microbatches x train.grad_accum: one run_train per step
    assert pc["input_names"] == ["input_ids", "labels"] and pc["output_loss_value_spec"] == (True, False)
    assert pc["pipeline_cuts"] == ["model.layers.2"] and pc["auto_partition"] is False  # split_layers(5, 2)
    assert pc["leaf_module_cls"] == ["RMSNorm"] and pc["tracer_cls"] == "torch"
    assert pc["autowrap_modules"] == [fake_nxd["modules"]["neuronx_distributed.parallel_layers.mappings"],
                                      fake_nxd["modules"]["neuronx_distributed.parallel_layers.loss_functions"]]
    assert pc["return_loss_on_cpu"] is False and pc["use_optimizer_wrapper"] is True
    assert pc["use_zero1_optimizer"] is True
    assert kw["activation_checkpoint_config"] is BMojoDecoderLayer
    assert kw["mixed_precision_config"] == {"use_master_weights": True, "use_fp32_grad_acc": True,
                                            "use_master_weights_in_ckpt": False}
    assert cfg["pipeline_parallel_size"] == 2

    nxd_training.nxd_config(ParallelSection(tp=1, pp=1, zero1=False), False, True, max_grad_norm=0.0)
    kw = fake_nxd["config"]
    assert kw["pipeline_config"] is None and kw["activation_checkpoint_config"] is None
    assert kw["optimizer_config"]["zero_one_enabled"] is False and kw["optimizer_config"]["grad_clipping"] is False
    assert kw["mixed_precision_config"]["use_master_weights"] is False  # NxD refuses master weights without ZeRO-1
    with pytest.raises(ValueError, match="microbatches"):
        nxd_training.nxd_config(ParallelSection(microbatches=2), False, False)


def test_build_nxd_model_hands_the_pipeline_a_model_sharing_the_tied_embedding(fake_nxd):
    cfg = nxd_training.nxd_config(ParallelSection(pp=2, microbatches=2), False, False, model_config=_config())
    model = nxd_training.build_nxd_model(_config(tie_word_embeddings=True), cfg)
    assert isinstance(model, PipelineCausalLM) and fake_nxd["model"][0] is cfg
    assert model.lm_head.weight is model.model.embed_tokens.weight  # one Parameter: NxD shares it across stages
    assert all(isinstance(layer, PipelineDecoderLayer) for layer in model.model.layers)
    untied = nxd_training.build_nxd_model(_config(tie_word_embeddings=False), cfg)
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight
    # pp = 1: the causal LM itself, tied
    tied = nxd_training.build_nxd_model(_config(), nxd_training.nxd_config(ParallelSection(), False, False))
    assert isinstance(tied, BMojoForCausalLM) and tied.lm_head.weight is tied.model.embed_tokens.weight


def test_build_nxd_optimizer_uses_the_decay_and_no_decay_groups(fake_nxd):
    cfg = nxd_training.nxd_config(ParallelSection(zero1=True), False, False)
    model = nxd_training.build_nxd_model(_config(), cfg)
    o = OptimSection(lr=3e-4, weight_decay=0.05, betas=[0.8, 0.9], eps=1e-6)
    opt = nxd_training.build_nxd_optimizer(parameter_groups(model, o.weight_decay), cfg, o)
    got_cfg, cls, groups, defaults = fake_nxd["optimizer"]
    assert got_cfg is cfg and cls is torch.optim.AdamW
    # max_norm: NxD 0.17 does not pass optimizer_config["max_grad_norm"] to its ZeRO-1 optimizer;
    # capturable: AdamW's step on the device, so the update graph is the same at every update
    assert defaults == {"lr": 3e-4, "betas": (0.8, 0.9), "eps": 1e-6, "weight_decay": 0.05, "max_norm": 1.0,
                        "capturable": True}
    want = parameter_groups(model, 0.05)
    assert [g["name"] for g in groups] == ["decay", "no_decay"]
    for g, w in zip(groups, want):
        assert g["names"] == w["names"] and g["weight_decay"] == w["weight_decay"]
    assert any(n.endswith("A_log") for n in groups[1]["names"]) and "model.embed_tokens.weight" in groups[0]["names"]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]


def test_without_neuron_every_function_says_what_to_install():
    with pytest.raises(NeuronUnavailableError, match="neuronx"):
        nxd_training.nxd_config(ParallelSection(), False, False)
    with pytest.raises(NeuronUnavailableError, match="neuronx"):
        nxd_training.build_nxd_model(_config(), {"pipeline_parallel_size": 1})
    with pytest.raises(NeuronUnavailableError, match="neuronx"):
        nxd_training.build_nxd_optimizer(parameter_groups(torch.nn.Linear(2, 2), 0.1), {}, OptimSection())


# ---------------------------------------------------------------- sequence parallelism on NxD
SP_KWARGS = {"sequence_parallel_enabled": True, "sequence_dimension": 1}  # batch-first (B, S, H)


def test_sequence_parallel_builds_batch_first_nxd_layers_and_marks_the_norms(fake_nxd):
    cfg = nxd_training.nxd_config(ParallelSection(tp=2, sp=True), False, False)
    assert fake_nxd["config"]["sequence_parallel"] is True  # NxD's optimizer sums the marked grads over tp
    config = _config(ssm_mixer="mamba1")
    model = nxd_training.build_nxd_model(config, cfg)
    assert model.factory.sequence_parallel

    layers = fake_nxd["layers"]
    assert layers[0] == ("embedding", (64, 32), {})  # NxD's SP embedding is sequence-first: not used
    columns = [(args, kw) for kind, args, kw in layers if kind == "column"]
    rows = [(args, kw) for kind, args, kw in layers if kind == "row"]
    # Mamba-1's x_proj (row) and dt_proj (column) work on the whole sequence: no SP arguments.
    ssms = [m for _, m in model.named_modules() if type(m).__name__ == "Mamba1Mixer"]
    assert len(ssms) == 3  # B and F layers read a fading memory from their own SSM
    dt = (ssms[0].dt_rank, config.ssm_inner_size)
    assert [a for a, kw in columns if "sequence_parallel_enabled" not in kw] == [dt] * 3
    assert [kw for a, kw in rows if "sequence_parallel_enabled" not in kw] == [{"bias": False, "input_is_parallel": True}] * 3
    # every other layer reads or writes the (sequence-sharded) residual stream
    assert [kw for a, kw in columns if a != dt] == [{"bias": False, "gather_output": False, **SP_KWARGS}] * (len(columns) - 3)
    assert all(a[0] == 32 for a, _ in columns if a != dt)
    assert [kw for a, kw in rows if a[1] == 32] == [{"bias": False, "input_is_parallel": True, **SP_KWARGS}] * (len(rows) - 3)

    marked = {n for n, p in model.named_parameters() if getattr(p, "sequence_parallel_enabled", False)}
    norms = {n for n, m in model.named_modules() if type(m).__name__ == "RMSNorm"}
    gains = {n for n, _ in model.named_parameters() if n.endswith("ssm_residual_gain")}  # scale the residual stream
    assert len(gains) == 2  # the B and the F layer's
    assert marked == {f"{n}.weight" for n in norms} | gains and "model.norm.weight" in marked
    assert len(marked) == 2 * config.num_hidden_layers + 1 + len(gains)

    # tp = 1 doubles: the model computes what the single-device model computes.
    torch.manual_seed(0)
    reference = BMojoForCausalLM(config)
    model.load_state_dict(reference.state_dict())
    ids = torch.randint(0, config.vocab_size, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(ids, labels=ids).loss, reference(ids, labels=ids).loss)

    model.factory.tp_size = 2
    with pytest.raises(ValueError, match="sequence length 5 is not divisible by the tensor-parallel size 2"):
        model.factory.scatter_sequence(torch.zeros(1, 5, 32))
    # without parallel.sp nothing is marked and no SP arguments are passed
    fake_nxd["layers"].clear()
    plain = nxd_training.build_nxd_model(config, nxd_training.nxd_config(ParallelSection(tp=2), False, False))
    assert fake_nxd["config"]["sequence_parallel"] is False and not plain.factory.sequence_parallel
    assert not any("sequence_parallel_enabled" in kw for _, _, kw in fake_nxd["layers"])
    assert not any(hasattr(p, "sequence_parallel_enabled") for p in plain.parameters())


def _nxd_shard(full, factory, rank: int):
    """`full`'s model built through `factory` (NxD's layers in ``factory.dtype``) holding this rank's shard."""
    with use_layer_factory(factory):
        model = BMojoForCausalLM(full.config)
    shapes = {name: p.shape for name, p in model.state_dict().items()}
    model.load_state_dict(shard_state_dict(full.state_dict(), shapes, rank, WORLD))
    return model.to(factory.dtype), shapes


def _check_nxd_case(rank: int, mixer: str, sequence_parallel: bool) -> None:
    """fp32 through NxD's layers against the float64 one-device model (NxD's embedding hands out fp32 or bf16
    only at tp > 1, so float64 cannot go through it)."""
    config = _config(ssm_mixer=mixer, ssm_n_groups=2)
    full, ids, labels, ref = single_process_run(config, 16)
    nxd_gloo.BUILT.clear()
    model, shapes = _nxd_shard(full, nxd.NxDTensorParallelFactory(sequence_parallel=sequence_parallel), rank)
    out = model(ids, labels=labels)
    out.loss.backward()
    # what NxD's optimizer wrapper does when its config has sequence_parallel=True
    nxd_gloo.modules()["neuronx_distributed.parallel_layers.grads"].allreduce_sequence_parallel_gradients(
        torch.optim.SGD(model.parameters(), lr=0.0))

    sp_layers = [kw for _, _, kw in nxd_gloo.BUILT if kw.get("sequence_parallel_enabled")]
    assert len(sp_layers) > 0 if sequence_parallel else not sp_layers
    assert_rank_matches(model, out, full, ref, shapes, WORLD, rtol=2e-4, atol=1e-5)


def _check_nxd_bf16(rank: int, mixer: str, sequence_parallel: bool) -> None:
    """bf16 at tp = 2: every NxD layer's output and the residual stream stay bf16 end to end, so what the
    checkpointed layers keep is what `bmojo-neuron plan` counts; built for fp32 and cast afterwards, NxD's
    embedding hands out fp32 (the failure this guards against)."""
    from doubles.nxd_runtime import nxd_checkpoint_wrapper
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

    from bmojo_neuron.launch.memory import estimate_memory
    from bmojo_neuron.recipes import Recipe

    config = _config(ssm_mixer=mixer, ssm_n_groups=2)
    torch.manual_seed(0)
    full = BMojoForCausalLM(config)
    ids = torch.randint(0, config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    late, _ = _nxd_shard(full, nxd.NxDTensorParallelFactory(sequence_parallel=sequence_parallel), rank)
    late.to(torch.bfloat16)  # built for fp32, cast afterwards: NxD's embedding keeps dtype=fp32
    assert late.model.embed_tokens(ids).dtype == torch.float32
    with pytest.raises(ValueError, match="NxD layers not in torch.bfloat16"):
        nxd.check_nxd_dtypes(late, torch.bfloat16)

    factory = nxd.NxDTensorParallelFactory(sequence_parallel=sequence_parallel, dtype=torch.bfloat16)
    model, _ = _nxd_shard(full, factory, rank)
    nxd.check_nxd_dtypes(model, torch.bfloat16)
    apply_activation_checkpointing(model, checkpoint_wrapper_fn=nxd_checkpoint_wrapper,
                                   check_fn=lambda m: isinstance(m, BMojoDecoderLayer))  # NxD's, reentrant
    outputs, kept = {}, []
    for name, module in model.named_modules():
        module.register_forward_hook(lambda m, a, o, name=name: outputs.update({name: o}))  # returns None
        if type(module).__name__ == "NxDCheckpointWrapper":  # reentrant checkpoint: it keeps the tensor inputs
            module.register_forward_pre_hook(lambda m, a: kept.extend(t.nbytes for t in a if torch.is_tensor(t)))
    out = model(ids, labels=ids)
    out.loss.backward()
    wrong = {n: o.dtype for n, o in outputs.items() if torch.is_tensor(o) and o.is_floating_point()
             and o.dtype != torch.bfloat16}
    layer_outputs = {n: o[0].dtype for n, o in outputs.items() if isinstance(o, tuple) and n.endswith("layers.0")}
    assert not wrong and layer_outputs, (wrong, layer_outputs)
    assert all(p.grad is not None for p in model.parameters())  # reentrant checkpointing: grads reach every layer
    _assert_bf16_gradients_near(model, full, ids)

    fields = inspect.signature(BMojoConfig.__init__).parameters
    recipe = Recipe.from_dict({
        "run": {"name": "bf16-tp2", "device": "neuron"},
        "model": {k: v for k, v in config.to_dict().items() if k in fields},
        "data": {"kind": "mqar", "seq_len": ids.shape[1], "num_kv_pairs": 2, "vocab_size": config.vocab_size},
        "train": {"batch_size": 2, "precision": "bf16", "activation_checkpointing": True},
        "parallel": {"tp": WORLD, "sp": sequence_parallel},
    })
    planned = estimate_memory(recipe, WORLD).stages[0]
    assert sum(kept) == planned.layer_inputs, (sum(kept), planned.layer_inputs)


def _assert_bf16_gradients_near(model, full, ids) -> None:
    """Every gradient of the bf16 tp = 2 model within 5 % (relative norm) of the fp32 one-device model's: bf16
    round-off only. A column-parallel layer whose input-gradient all-reduce NxD drops (bf16 weights, fp32
    ``reduce_dtype``, no sequence parallelism) leaves every layer below it with about half a gradient."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import _CHECKPOINT_PREFIX

    nxd_gloo.modules()["neuronx_distributed.parallel_layers.grads"].allreduce_sequence_parallel_gradients(
        torch.optim.SGD(model.parameters(), lr=0.0))  # what NxD's optimizer wrapper does under sp
    full.zero_grad()
    full(ids, labels=ids).loss.backward()
    local = {n.replace(_CHECKPOINT_PREFIX, ""): p for n, p in model.named_parameters()}
    dims = split_dims(full.state_dict(), {n: p.shape for n, p in local.items()}, WORLD)
    for name, param in full.named_parameters():
        grad = gather_grad(local[name].grad.float(), dims[name], WORLD)
        error = (grad - param.grad).norm() / param.grad.norm().clamp(min=1e-12)
        assert error < 0.05, f"grad of {name}: relative error {error:.3f}"


def _check_nxd_distill(rank: int, mixer: str, sequence_parallel: bool) -> None:
    """The distillation objective at tp = 2 through NxD's layers: the teacher pass runs through the student's own
    sharded layers (teacher and student sharded alike, no second model), and the loss, its parts and the new
    paths' gradients equal the float64 one-device objective's; the frozen weights get no gradient."""
    config = _config(layer_pattern="BFSA", ssm_mixer=mixer, ssm_n_groups=2)
    torch.manual_seed(0)
    full = BMojoForCausalLM(config).double()
    ids = torch.randint(0, config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    objective = LayerwiseDistillation(kl_weight=0.5)
    freeze_shared(full)
    ref_loss, ref_parts = objective(full, ids)
    ref_loss.backward()
    model, shapes = _nxd_shard(full, nxd.NxDTensorParallelFactory(sequence_parallel=sequence_parallel), rank)
    freeze_shared(model)
    loss, parts = objective(model, ids)
    loss.backward()
    torch.testing.assert_close(parts.double(), ref_parts, rtol=2e-4, atol=1e-7)
    dims, full_params = split_dims(full.state_dict(), shapes, WORLD), dict(full.named_parameters())
    for name, param in model.named_parameters():
        if not param.requires_grad:
            assert param.grad is None and full_params[name].grad is None, name
            continue
        grad = gather_grad(param.grad, dims[name], WORLD)
        torch.testing.assert_close(grad.double(), full_params[name].grad, rtol=2e-4, atol=1e-5,
                                   msg=lambda m, name=name: f"grad of {name}: {m}")


def _nxd_worker(rank: int, init_file: str) -> None:
    nxd.import_neuron_module = lambda name, feature: nxd_gloo.modules()[name]  # this rank's process only
    run_cases(rank, init_file, WORLD, _check_nxd_case, [("mamba1", True), ("mamba2", True), ("mamba2", False)])
    run_cases(rank, init_file + "-bf16", WORLD, _check_nxd_bf16, [("mamba2", False), ("mamba2", True)])
    run_cases(rank, init_file + "-distill", WORLD, _check_nxd_distill, [("mamba2", False)])


def test_nxd_factory_over_gloo_doubles_equals_single_process(tmp_path):
    """Two ranks, NxD's layers and collectives played by `doubles.nxd_gloo` (NxD 0.17 semantics on gloo):
    in fp32, loss, logits and every gradient equal the float64 single-process model (rtol 2e-4, atol 1e-5),
    with and without sequence parallelism; in bf16 every output stays bf16 and the checkpointed layer
    inputs are the bytes the plan counts; the distillation objective equals the one-device one."""
    start_ranks(_nxd_worker, (str(tmp_path / "init"),), nprocs=WORLD)
