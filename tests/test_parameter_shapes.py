"""`parameter_shapes` (torch-free) against the state dict of the model built on the meta device."""

from __future__ import annotations

import pytest
import torch

from bmojo_neuron import BMojoConfig, BMojoForCausalLM
from bmojo_neuron.config_fields import BMojoFields
from bmojo_neuron.parameter_shapes import parameter_shapes

BASE = dict(vocab_size=50, hidden_size=32, num_attention_heads=4, intermediate_size=48, window_size=8,
            memory_chunk=8, memory_picks=2, ssm_head_dim=16, ssm_state_size=8)


@pytest.mark.parametrize("changes", [
    {"layer_pattern": "BFMSA", "num_hidden_layers": 5},
    {"layer_pattern": "BFMSA", "num_hidden_layers": 5, "ssm_mixer": "mamba1", "ssm_dt_rank": 3},
    {"layer_pattern": "BF", "num_hidden_layers": 2, "tie_fading_projections": False, "fading_norm": True,
     "ssm_residual": False, "attention_bias": True, "qk_norm": True, "num_key_value_heads": 2},
    {"layer_pattern": "BFM", "num_hidden_layers": 3, "ssm_conv_bias": False, "ssm_proj_bias": True,
     "ssm_n_groups": 2, "ssm_expand": 1, "attention_output_bias": True},
    {"layer_pattern": "BF", "num_hidden_layers": 2, "fading_window": 0, "memory_size": 0},
    {"layer_pattern": "BBF", "num_hidden_layers": 3, "fading_window": 0, "intermediate_size": 0},
    {"layer_pattern": "BA", "num_hidden_layers": 2, "head_dim": 16, "tie_word_embeddings": False,
     "tie_fading_projections": False, "ssm_mixer": "mamba1"},
], ids=["every-kind", "mamba1", "options", "ssm-biases", "no-ssm", "memory-only-no-mlp", "untied"])
def test_parameter_shapes_are_the_meta_models_state_dict(changes):
    fields = {**BASE, **changes}
    with torch.device("meta"):
        model = BMojoForCausalLM(BMojoConfig(**fields))
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    assert parameter_shapes(BMojoFields(**fields)) == expected
