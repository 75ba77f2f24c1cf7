"""The state-dict names and shapes of a B'MOJO model, from its fields alone (no torch, no transformers).

What `BMojoForCausalLM(config).state_dict()` holds at tensor-parallel degree 1, worked out from the
`BMojoFields` as the layers build their parameters (modeling_bmojo.py, layers/decoder.py, attention.py,
mamba1.py, mamba2.py, mlp.py). `train` compares a recipe's model with the one saved behind ``init.weights``
with it before torch loads (`checkpoints.initial_config`); `tests/test_parameter_shapes.py` holds it to the
model built on the meta device, layer kind by layer kind and option by option. The weights themselves are
checked again, with torch, when they load (`checkpoints.inference.load_initial_weights`).
"""

from __future__ import annotations

from bmojo_neuron.config_fields import BMojoFields

Shapes = dict[str, tuple[int, ...]]


def parameter_shapes(config: BMojoFields) -> Shapes:
    """Name -> shape of every tensor in the state dict of `config`'s causal LM (a tied ``lm_head`` included, as
    the state dict lists it)."""
    d, vocab = config.hidden_size, config.vocab_size
    shapes: Shapes = {"model.embed_tokens.weight": (vocab, d)}
    for index, kind in enumerate(config.layer_pattern):
        prefix = f"model.layers.{index}."
        shapes[f"{prefix}mixer_norm.weight"] = (d,)
        mixer = ssm_shapes(config) if kind == "M" else attention_shapes(config, kind)
        shapes.update({f"{prefix}mixer.{name}": shape for name, shape in mixer.items()})
        if config.intermediate_size > 0:
            shapes[f"{prefix}mlp_norm.weight"] = (d,)
            shapes.update({f"{prefix}mlp.{name}": shape for name, shape in mlp_shapes(config).items()})
    shapes["model.norm.weight"] = (d,)
    shapes["lm_head.weight"] = (vocab, d)
    return shapes


def linear(name: str, out_features: int, in_features: int, bias: bool) -> Shapes:
    shapes = {f"{name}.weight": (out_features, in_features)}
    if bias:
        shapes[f"{name}.bias"] = (out_features,)
    return shapes


def mlp_shapes(config: BMojoFields) -> Shapes:
    """SwiGLU: gate and up project to intermediate_size, down back; no biases."""
    d, inner = config.hidden_size, config.intermediate_size
    return {**linear("gate_proj", inner, d, False), **linear("up_proj", inner, d, False),
            **linear("down_proj", d, inner, False)}


def attention_shapes(config: BMojoFields, kind: str) -> Shapes:
    """A B, F, S or A layer's mixer: q/k/v/o, qk norms, and for B and F the SSM of the fading path and the
    eidetic memory, with the options that add tensors (untied fading projections, fading_norm, ssm_residual)."""
    d, bias, head = config.hidden_size, config.attention_bias, config.head_dim
    q_width, kv_width = config.num_attention_heads * head, config.num_key_value_heads * head
    shapes = {**linear("q_proj", q_width, d, bias), **linear("k_proj", kv_width, d, bias),
              **linear("v_proj", kv_width, d, bias), **linear("o_proj", d, q_width, config.attention_output_bias)}
    if config.qk_norm:
        shapes.update({"q_norm.weight": (head,), "k_norm.weight": (head,)})
    fading = config.fading_window if kind in "BF" else 0
    memory = config.memory_size if kind == "B" else 0
    if fading > 0 or memory > 0:
        shapes.update({f"ssm.{name}": shape for name, shape in ssm_shapes(config).items()})
        if config.fading_norm:
            shapes["ssm_norm.weight"] = (d,)
        if config.ssm_residual:
            shapes["ssm_residual_gain"] = (d,)
    if fading > 0 and not config.tie_fading_projections:
        shapes.update({**linear("k_fading_proj", kv_width, d, bias), **linear("v_fading_proj", kv_width, d, bias)})
    if memory > 0:
        shapes.update(linear("innovation_proj", kv_width, d, False))
    return shapes


def ssm_shapes(config: BMojoFields) -> Shapes:
    """The SSM mixer of ``ssm_mixer``: an M layer's, or the one inside a B or F layer."""
    d, inner, state = config.hidden_size, config.ssm_inner_size, config.ssm_state_size
    kernel, bias, conv_bias = config.ssm_conv_kernel, config.ssm_proj_bias, config.ssm_conv_bias
    if config.ssm_mixer == "mamba1":
        rank = config.ssm_dt_rank
        return {**linear("in_proj_x", inner, d, bias), **linear("in_proj_z", inner, d, bias),
                **conv("conv_x", inner, kernel, conv_bias), **linear("x_proj", rank + 2 * state, inner, False),
                **linear("dt_proj", inner, rank, False), "dt_bias": (inner,), "A_log": (inner, state),
                "D": (inner,), **linear("out_proj", d, inner, bias)}
    heads, bc = config.ssm_num_heads, 2 * config.ssm_n_groups * state
    return {**linear("in_proj_z", inner, d, bias), **linear("in_proj_x", inner, d, bias),
            **linear("in_proj_bc", bc, d, bias), **linear("in_proj_dt", heads, d, bias),
            **conv("conv_x", inner, kernel, conv_bias), **conv("conv_bc", bc, kernel, conv_bias),
            "dt_bias": (heads,), "A_log": (heads,), "D": (heads,), "norm.weight": (inner,),
            **linear("out_proj", d, inner, bias)}


def conv(name: str, channels: int, kernel: int, bias: bool) -> Shapes:
    """A depthwise causal convolution (`layers.ssm_state.depthwise_conv`)."""
    shapes = {f"{name}.weight": (channels, 1, kernel)}
    if bias:
        shapes[f"{name}.bias"] = (channels,)
    return shapes
