"""The Neuron trainer's start-up on the torch-xla / NxD doubles: the model's host memory and its HBM figures.

- `build_nxd_model(one_device_init=True)` builds the one-device model in waves of
  local ranks (`bmojo_neuron.launch.host_memory`), a rendezvous after each wave, and
  still hands every rank its shard of the one-device initialisation;
- what the model and NxD's optimizer hold after a step is what `bmojo-neuron plan`
  counts per parameter (bf16 weights, NxD's fp32 ``main_grad`` under ZeRO-1, the
  optimizer's fp32 master and states).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from doubles import neuron_sdk
from naive import tiny_config

from bmojo_neuron import BMojoForCausalLM
from bmojo_neuron.launch import host_memory
from bmojo_neuron.launch.memory import parameter_bytes
from bmojo_neuron.parallel import nxd_training, one_device_init
from bmojo_neuron.recipes import OptimSection, ParallelSection
from bmojo_neuron.training.optim import parameter_groups


@pytest.fixture
def doubles(monkeypatch, tmp_path):
    """The doubles in sys.modules and a one-rank gloo group (NxD initialises its parallel state on it)."""
    log = neuron_sdk.install(monkeypatch)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield log
    dist.destroy_process_group()


def _config():
    return tiny_config(layer_pattern="BM", num_attention_heads=4, num_key_value_heads=2, ssm_n_groups=2)


def test_host_estimate_is_the_measured_build_arithmetic():
    from bmojo_neuron.recipes import load_recipe

    r = load_recipe("trn1/bmojo-1.4b")
    full = host_memory.full_model_bytes(r.model_config())
    est = host_memory.estimate_host_memory(r, 32, "trn1.32xlarge")
    per_wave = int(one_device_init.HOST_BUILD_BUDGET // (host_memory.BUILD_OVERHEAD * full))
    assert est.full_model == full and 1 < est.ranks_per_wave == per_wave < 32 and est.waves == -(-32 // per_wave)
    assert est.per_rank_building - est.per_rank_after == int(host_memory.BUILD_OVERHEAD * full)
    assert est.node_peak == 32 * est.per_rank_after + per_wave * int(host_memory.BUILD_OVERHEAD * full)
    assert per_wave * int(host_memory.BUILD_OVERHEAD * full) <= one_device_init.HOST_BUILD_BUDGET
    assert est.node_peak < 0.7 * 32 * est.per_rank_building  # all 32 at once: about 250 GB
    assert est.node_peak < est.host_memory
    assert host_memory.build_waves(32, full, budget=1) == 32  # one rank at a time at the least


def test_host_memory_measurement_reports_a_bad_recipe_in_one_error_line(capsys):
    """docs/trn1.md's `python -m bmojo_neuron.launch.host_memory RECIPE`: a misspelt recipe or key is one
    `error:` line and status 2 (as the CLI reports it), checked before any model is built."""
    assert host_memory.main(["trn1/bmojo-130mm"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: recipe 'trn1/bmojo-130mm' not found") and err.count("\n") == 1
    assert host_memory.main([]) == 2 and capsys.readouterr().err.startswith("usage: ")


def test_one_device_build_runs_in_waves_and_hands_out_the_one_device_weights(doubles, monkeypatch):
    """Local rank 1 of 3, one rank per wave: it builds in the second wave (after the first rendezvous), every
    rank meets all three rendezvous, and the weights and the RNG afterwards are the one-device build's."""
    from bmojo_neuron.parallel import sharding

    config = _config()
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    monkeypatch.setattr(one_device_init, "HOST_BUILD_BUDGET", host_memory.full_model_bytes(config) * 2)  # 1 a wave
    built_after = []
    shard = sharding.shard_state_dict
    monkeypatch.setattr(one_device_init, "shard_state_dict",
                        lambda *a: built_after.append(list(doubles.rendezvous)) or shard(*a))
    torch.manual_seed(3)
    cfg = nxd_training.nxd_config(ParallelSection(), False, False)
    model = nxd_training.build_nxd_model(config, cfg, one_device_init=True)
    after = torch.rand(3)

    torch.manual_seed(3)
    reference = BMojoForCausalLM(config)
    assert torch.equal(after, torch.rand(3))  # the RNG as if only the one-device model had been built
    assert built_after == [["bmojo-one-device-build-0"]]
    waves = [t for t in doubles.rendezvous if t.startswith("bmojo-one-device-build")]
    assert waves == [f"bmojo-one-device-build-{w}" for w in range(3)]
    for name, tensor in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name


def test_one_wave_needs_no_rendezvous(doubles, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "5")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "32")  # a tiny model: all 32 build at once
    nxd_training.build_nxd_model(_config(), nxd_training.nxd_config(ParallelSection(), False, False),
                                 one_device_init=True)
    assert not [t for t in doubles.rendezvous if t.startswith("bmojo-one-device-build")]


@pytest.mark.parametrize("zero1", [False, True])
def test_bytes_per_parameter_after_a_step_are_the_plans(doubles, zero1):
    """bf16 through NxD's trainer (doubles): weights, gradients (NxD's fp32 main_grad under ZeRO-1) and the
    optimizer's tensors hold exactly what `parameter_bytes` counts per parameter (dp = 1)."""
    config = _config()
    cfg = nxd_training.nxd_config(ParallelSection(zero1=zero1), False, True)
    model = nxd_training.build_nxd_model(config, cfg, dtype=torch.bfloat16, one_device_init=True)
    optim = OptimSection()
    optimizer = nxd_training.build_nxd_optimizer(parameter_groups(model, optim.weight_decay), cfg, optim)
    ids = torch.randint(0, config.vocab_size, (2, 10))
    model(ids, labels=ids).loss.backward()
    params = list({id(p): p for p in model.parameters()}.values())
    n = sum(p.numel() for p in params)
    grads = sum(g.nbytes for p in params for g in (p.grad, getattr(p, "main_grad", None)) if g is not None)
    optimizer.step()
    inner = optimizer.optimizer
    if zero1:  # fp32 master shards and their AdamW states
        held = sum(s.nbytes for g in inner.base_optimizer.param_groups for s in g["params"])
        held += sum(v.nbytes for st in inner.base_optimizer.state.values() for v in st.values() if v.dim())
    else:
        held = sum(v.nbytes for st in inner.state.values() for v in st.values() if v.dim())
    weights = sum(p.nbytes for p in params)
    assert (weights, grads, held) == tuple(b * n for b in parameter_bytes("bf16", zero1))
