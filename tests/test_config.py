"""BMojoConfig: defaults derived from the design, and a clear ValueError naming each bad field."""

from __future__ import annotations

import json

import pytest
import torch
from naive import tiny_config
from transformers import AutoConfig

from bmojo_neuron import BMojoConfig, BMojoForCausalLM


def test_defaults_follow_the_design():
    config = BMojoConfig(hidden_size=256, num_hidden_layers=3, num_attention_heads=4, window_size=64)
    assert config.layer_pattern == "BBB"
    assert config.ssm_mixer == "mamba2"
    assert config.fading_window == 64 and config.memory_chunk == 64
    assert config.num_key_value_heads == 4 and config.head_dim == 64
    assert config.memory_lag == 1 + 2  # 1 + ceil((64 + 64) / 64)
    assert config.ssm_dt_rank == 16  # ceil(256 / 16) for mamba1
    assert config.intermediate_size % 128 == 0
    assert BMojoConfig(window_size=100, fading_window=30, memory_chunk=40, num_hidden_layers=1).memory_lag == 1 + 4


def test_the_ssm_output_enters_the_residual_stream_by_default_and_saved_configs_keep_their_layer(tmp_path):
    """ssm_residual is on by default (docs/design.md, step 6); a config.json written before the field existed
    (no key) loads with it off, the layer its weights were trained with, by every loading route."""
    assert BMojoConfig().ssm_residual is True
    tiny_config().save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["ssm_residual"] is True  # written out, so a later default cannot change a saved model
    del saved["ssm_residual"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    assert BMojoConfig.from_pretrained(tmp_path).ssm_residual is False
    assert BMojoConfig.from_json_file(tmp_path / "config.json").ssm_residual is False
    assert AutoConfig.from_pretrained(tmp_path).ssm_residual is False
    assert BMojoConfig.from_dict({"hidden_size": 32, "num_attention_heads": 4}).ssm_residual is True  # not a saved one


@pytest.mark.parametrize("window, fading, chunk, lag", [(100, 30, 40, 1 + 3), (30, 100, 40, 1 + 3), (64, 64, 64, 1 + 1)])
def test_overlapping_fading_keys_shorten_the_memory_lag(window, fading, chunk, lag):
    """Fading keys over the window: both windows reach back max(w, w_f), and the memory starts right behind."""
    config = BMojoConfig(window_size=window, fading_window=fading, memory_chunk=chunk, num_hidden_layers=1,
                         fading_overlap=True)
    assert config.memory_horizon == max(window, fading)
    assert config.memory_lag == lag  # 1 + ceil(max(w, w_f) / c)


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(layer_pattern="BXM", num_hidden_layers=3), "layer_pattern"),
        (dict(layer_pattern="BB", num_hidden_layers=3), "layer_pattern"),
        (dict(num_attention_heads=6, num_key_value_heads=4, head_dim=8), "num_key_value_heads"),
        (dict(head_dim=256), "head_dim"),
        (dict(head_dim=7), "head_dim"),
        (dict(rope_scaling_params={"rope_type": "yarn", "factor": 2.0}), "rope_scaling_params"),
        (dict(rope_scaling_params={"rope_type": "linear"}), "rope_scaling_params"),
        (dict(rope_scaling_params={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6}), "rope_scaling_params"),
        (dict(rope_scaling_params={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0,
                                   "high_freq_factor": 1.0, "original_max_position_embeddings": 64}),
         "rope_scaling_params"),
        (dict(memory_size=4, innovation_loss_weight=0.0), "innovation_loss_weight"),
        (dict(memory_picks=9, memory_chunk=5), "memory_picks"),
        (dict(memory_picks=0), "memory_picks"),
        (dict(memory_decay=1.5), "memory_decay"),
        (dict(window_size=0), "window_size"),
        (dict(fading_window=-1), "fading_window"),
        (dict(ssm_mixer="mamba3"), "ssm_mixer"),
        (dict(ssm_head_dim=7), "ssm_head_dim"),
        (dict(ssm_n_groups=3), "ssm_n_groups"),
        (dict(ssm_dt_min=0.5, ssm_dt_max=0.1), "ssm_dt_min"),
        (dict(ssm_A_init_range=[0, 16]), "ssm_A_init_range"),
        (dict(ssm_state_size=0), "ssm_state_size"),
        (dict(hidden_size=0), "hidden_size"),
        (dict(vocab_size=2.5), "vocab_size"),
        (dict(intermediate_size=-1), "intermediate_size"),
        (dict(ssm_residual_init=float("nan")), "ssm_residual_init"),
        (dict(ssm_residual_init="1"), "ssm_residual_init"),
        (dict(memory_decay="0.9"), "memory_decay"),  # a string from a hand-edited config.json
        (dict(memory_decay=float("nan")), "memory_decay"),
        (dict(rope_theta=float("inf")), "rope_theta"),
        (dict(rms_norm_eps=True), "rms_norm_eps"),
        (dict(innovation_loss_weight=float("inf")), "innovation_loss_weight"),
        (dict(ssm_dt_max="0.1"), "ssm_dt_max"),
        (dict(initializer_range=0.0), "initializer_range"),
    ],
)
def test_bad_fields_raise_value_error_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=rf"BMojoConfig\.{field}\b"):
        tiny_config(**overrides)


def test_ssm_residual_init_sets_every_b_and_f_layers_gain_and_survives_save_and_load(tmp_path):
    """The gain g of step 6 starts at ssm_residual_init (0 by default: the layer starts as steps 1-5)."""
    from bmojo_neuron import BMojoForCausalLM

    assert BMojoConfig().ssm_residual_init == 0.0
    model = BMojoForCausalLM(tiny_config(layer_pattern="BFMS", ssm_residual_init=0.75))
    gains = [layer.mixer.ssm_residual_gain for layer in model.model.layers
             if getattr(layer.mixer, "ssm_residual_gain", None) is not None]
    assert len(gains) == 2 and all(torch.equal(g, torch.full_like(g, 0.75)) for g in gains)
    assert all(g._no_weight_decay for g in gains)
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        gains[0].fill_(-2.0)
    model.save_pretrained(tmp_path)
    loaded = BMojoForCausalLM.from_pretrained(tmp_path)  # trained gains load over the init
    assert torch.equal(loaded.model.layers[0].mixer.ssm_residual_gain, gains[0])
    assert loaded.config.ssm_residual_init == 0.75


def test_memory_checks_apply_only_to_models_with_b_layers():
    config = tiny_config(layer_pattern="MS", memory_size=4, innovation_loss_weight=0.0)
    assert config.memory_size == 4
    assert tiny_config(memory_size=0, innovation_loss_weight=0.0).memory_size == 0


def test_zero_innovation_weight_needs_the_frozen_predictor_ablation():
    import torch

    from bmojo_neuron import BMojoForCausalLM

    config = tiny_config(innovation_loss_weight=0.0, freeze_innovation_predictor=True)
    model = BMojoForCausalLM(config)
    predictor = model.model.layers[0].mixer.innovation_proj.weight
    assert not predictor.requires_grad
    before = predictor.clone()
    model(torch.randint(0, 64, (1, 20)), labels=torch.randint(0, 64, (1, 20))).loss.backward()
    assert predictor.grad is None and torch.equal(predictor, before)


def test_round_trips_through_dict():
    config = tiny_config(layer_pattern="BFMSA", ssm_mixer="mamba1", memory_decay=0.25)
    again = BMojoConfig.from_dict(config.to_dict())
    assert again.to_dict() == config.to_dict()


def test_heads_must_split_hidden_size_unless_head_dim_is_given():
    with pytest.raises(ValueError, match=r"num_attention_heads \(5\) must divide hidden_size \(64\).* 60 of 64"):
        BMojoConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=5)
    assert BMojoConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=5, head_dim=16).head_dim == 16
    assert BMojoConfig(hidden_size=64, num_hidden_layers=1, layer_pattern="M", num_attention_heads=5).hidden_size == 64
    saved = BMojoConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=5, head_dim=12)
    assert BMojoConfig.from_dict(saved.to_dict()).head_dim == 12  # a saved config names its head_dim: reloads


@pytest.mark.parametrize(
    "overrides, field",
    [(dict(window_size=0), "window_size"), (dict(num_hidden_layers=3), "layer_pattern"),
     (dict(memory_picks=100), "memory_picks"), (dict(memory_decay="0.5"), "memory_decay")],
)
def test_from_pretrained_overrides_are_checked_before_the_model_is_built(tmp_path, overrides, field):
    """`from_pretrained(path, field=value)` sets the value on the loaded config after its own
    checks ran; the model checks again, so a bad override is a ValueError naming the field."""
    BMojoForCausalLM(tiny_config(layer_pattern="BM", num_hidden_layers=2)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=rf"BMojoConfig\.{field}\b"):
        BMojoForCausalLM.from_pretrained(tmp_path, **overrides)
    config = BMojoConfig.from_pretrained(tmp_path)
    config.window_size = 0  # set by hand after construction
    with pytest.raises(ValueError, match=r"BMojoConfig\.window_size\b"):
        BMojoForCausalLM(config)
