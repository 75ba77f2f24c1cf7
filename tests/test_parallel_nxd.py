"""NxD pipeline parallelism / ZeRO-1 wiring (`bmojo_neuron.parallel.nxd_training`) with a test double of NxD.

No Neuron here: a double of ``neuronx_distributed``'s module API records the calls;
with tensor-parallel size 1 its layers are plain torch layers.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from bmojo_neuron import BMojoForCausalLM
from bmojo_neuron.layers.decoder import BMojoDecoderLayer
from bmojo_neuron.neuron import NeuronUnavailableError
from bmojo_neuron.parallel import nxd, nxd_training
from bmojo_neuron.recipes import OptimSection, ParallelSection
from bmojo_neuron.training.optim import parameter_groups
from naive import tiny_config


def _config(**overrides):
    kwargs = dict(layer_pattern="BFMSA", num_attention_heads=4, num_key_value_heads=2,
                  tie_fading_projections=False, memory_decay=0.9)
    return tiny_config(**{**kwargs, **overrides})


@pytest.fixture
def fake_nxd(monkeypatch):
    calls = {}

    def config(**kwargs):
        calls["config"] = kwargs
        return dict(kwargs, expert_parallel_size=1)

    def initialize_parallel_model(nxd_cfg, model_fn, *args, **kwargs):
        calls["model"] = (nxd_cfg, args, kwargs)
        return model_fn(*args, **kwargs)

    def initialize_parallel_optimizer(nxd_cfg, optimizer_class, parameters, **defaults):
        calls["optimizer"] = (nxd_cfg, optimizer_class, parameters, defaults)
        return optimizer_class(parameters, **defaults)

    fake = {
        "neuronx_distributed.trainer": SimpleNamespace(
            neuronx_distributed_config=config, initialize_parallel_model=initialize_parallel_model,
            initialize_parallel_optimizer=initialize_parallel_optimizer,
        ),
        "neuronx_distributed.parallel_layers.layers": SimpleNamespace(
            ColumnParallelLinear=lambda i, o, bias, gather_output: torch.nn.Linear(i, o, bias=bias),
            RowParallelLinear=lambda i, o, bias, input_is_parallel: torch.nn.Linear(i, o, bias=bias),
            ParallelEmbedding=torch.nn.Embedding,
        ),
        "neuronx_distributed.parallel_layers.mappings": SimpleNamespace(
            copy_to_tensor_model_parallel_region=lambda x: x,
            reduce_from_tensor_model_parallel_region=lambda x: x,
            gather_from_tensor_model_parallel_region=lambda x: x,
        ),
        "neuronx_distributed.parallel_layers.parallel_state": SimpleNamespace(
            get_tensor_model_parallel_size=lambda: 1, get_tensor_model_parallel_rank=lambda: 0
        ),
        "neuronx_distributed.parallel_layers.loss_functions": SimpleNamespace(
            parallel_cross_entropy=lambda logits, labels: torch.nn.functional.cross_entropy(
                logits, labels, reduction="none")
        ),
    }
    monkeypatch.setattr(nxd_training, "import_neuron_module", lambda name, feature: fake[name])
    monkeypatch.setattr(nxd, "import_neuron_module", lambda name, feature: fake[name])
    return calls


def test_nxd_config_carries_the_recipe_degrees_and_zero1(fake_nxd):
    config = _config()
    parallel = ParallelSection(tp=2, pp=2, zero1=True, microbatches=4)
    cfg = nxd_training.nxd_config(parallel, activation_checkpointing=True, mixed_precision=True,
                                  model_config=config, max_grad_norm=0.5)
    kw = fake_nxd["config"]
    assert kw["tensor_parallel_size"] == 2 and kw["pipeline_parallel_size"] == 2
    assert kw["sequence_parallel"] is False
    assert kw["optimizer_config"] == {"zero_one_enabled": True, "grad_clipping": True, "max_grad_norm": 0.5}
    pc = kw["pipeline_config"]
    assert pc["transformer_layer_cls"] is BMojoDecoderLayer
    assert pc["num_microbatches"] == 4 and pc["input_names"] == ["input_ids", "labels"] and pc["auto_partition"]
    assert kw["activation_checkpoint_config"] is BMojoDecoderLayer
    assert kw["mixed_precision_config"] == {"use_master_weights": True, "use_fp32_grad_acc": True,
                                            "use_master_weights_in_ckpt": False}
    assert cfg["pipeline_parallel_size"] == 2

    # The loss spec must name exactly the keys the model returns (NxD checks set equality).
    for pattern in ("BFMSA", "MSA"):
        c = _config(layer_pattern=pattern)
        ids = torch.randint(0, c.vocab_size, (1, 8))
        with torch.no_grad():
            out = BMojoForCausalLM(c)(ids, labels=ids)
        spec = nxd_training.loss_value_spec(c)
        assert set(spec) == set(out.keys()) and [k for k, v in spec.items() if v] == ["loss"]

    nxd_training.nxd_config(ParallelSection(tp=1, pp=1, zero1=False), False, True, max_grad_norm=0.0)
    kw = fake_nxd["config"]
    assert kw["pipeline_config"] is None and kw["activation_checkpoint_config"] is None
    assert kw["optimizer_config"]["zero_one_enabled"] is False and kw["optimizer_config"]["grad_clipping"] is False
    assert kw["mixed_precision_config"]["use_master_weights"] is False  # NxD refuses master weights without ZeRO-1
    with pytest.raises(ValueError, match="parallel.sp"):
        nxd_training.nxd_config(ParallelSection(tp=2, sp=True), False, False)
    with pytest.raises(ValueError, match="microbatches"):
        nxd_training.nxd_config(ParallelSection(microbatches=2), False, False)


def test_build_nxd_model_rejects_tied_embeddings_under_pp(fake_nxd):
    cfg = nxd_training.nxd_config(ParallelSection(pp=2, microbatches=2), False, False, model_config=_config())
    with pytest.raises(ValueError, match="tie_word_embeddings=false"):
        nxd_training.build_nxd_model(_config(tie_word_embeddings=True), cfg)
    assert "model" not in fake_nxd
    model = nxd_training.build_nxd_model(_config(tie_word_embeddings=False), cfg)
    assert isinstance(model, BMojoForCausalLM) and fake_nxd["model"][0] is cfg
    # pp = 1 keeps tied embeddings
    tied = nxd_training.build_nxd_model(_config(), nxd_training.nxd_config(ParallelSection(), False, False))
    assert tied.lm_head.weight is tied.model.embed_tokens.weight


def test_build_nxd_optimizer_uses_the_decay_and_no_decay_groups(fake_nxd):
    cfg = nxd_training.nxd_config(ParallelSection(zero1=True), False, False)
    model = nxd_training.build_nxd_model(_config(), cfg)
    o = OptimSection(lr=3e-4, weight_decay=0.05, betas=[0.8, 0.9], eps=1e-6)
    opt = nxd_training.build_nxd_optimizer(model, cfg, o)
    got_cfg, cls, groups, defaults = fake_nxd["optimizer"]
    assert got_cfg is cfg and cls is torch.optim.AdamW
    assert defaults == {"lr": 3e-4, "betas": (0.8, 0.9), "eps": 1e-6, "weight_decay": 0.05}
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
        nxd_training.build_nxd_optimizer(torch.nn.Linear(2, 2), {}, OptimSection())
