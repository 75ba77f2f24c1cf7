"""Where each weight of a primed B'MOJO model comes from.

Shared weights are copied from the source (`shared_weights`): embeddings, final norm,
LM head, and per layer the two RMSNorms, the SwiGLU MLP and -- in every attention
layer (``A``, ``S``, ``F``, ``B``) -- q/k/v/o with their biases and Qwen3's q/k norms.

New weights (`new_weights`) get values chosen so that training starts close to the
source (docs/priming.md explains the choices):

* the Mamba-2 SSM of ``B``, ``F`` and ``M`` layers is read as linear attention and
  seeded from the layer's own attention (`ssm_from_attention`): values into ``x``,
  keys into ``B``, queries into ``C``, ``o_proj`` into ``out_proj``, and the gate ``z``
  from ``0.5 * (o_proj^T + v_proj)`` (the gate initialisation reported by
  awslabs/hybrid-model-factory); the causal convs start as the identity, so at the
  first step ``x``, ``B``, ``C`` are exactly SiLU of those projections;
* untied fading projections start as copies of ``k_proj`` / ``v_proj``;
* the innovation predictor starts at zero, so the first memory selections pick the
  tokens with the largest keys, until the auxiliary loss has trained it.

Everything else new (``dt``, ``A_log``, ``D``, norms) keeps the Mamba initialisation.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..configuration_bmojo import BMojoConfig

# source (Llama layout) name inside a decoder layer -> B'MOJO name
LAYER_NORMS = {"input_layernorm.weight": "mixer_norm.weight", "post_attention_layernorm.weight": "mlp_norm.weight"}
MLP = ("gate_proj", "up_proj", "down_proj")
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
QK_NORMS = ("q_norm", "k_norm")
SSM_INITS = ("attention", "random")


def shared_weights(tensors: dict[str, Tensor], config: BMojoConfig) -> dict[str, Tensor]:
    """The B'MOJO state-dict entries copied verbatim from the source `tensors` (Llama names)."""
    out = {
        "model.embed_tokens.weight": _take(tensors, "model.embed_tokens.weight"),
        "model.norm.weight": _take(tensors, "model.norm.weight"),
    }
    if not config.tie_word_embeddings:
        out["lm_head.weight"] = _take(tensors, "lm_head.weight")
    for i, kind in enumerate(config.layer_pattern):
        src, dst = f"model.layers.{i}.", f"model.layers.{i}."
        for name, new in LAYER_NORMS.items():
            out[dst + new] = _take(tensors, src + name)
        for proj in MLP:
            out[f"{dst}mlp.{proj}.weight"] = _take(tensors, f"{src}mlp.{proj}.weight")
        if kind == "M":
            continue
        for proj in ATTENTION:
            for part in ("weight", "bias"):
                name = f"{src}self_attn.{proj}.{part}"
                if part == "weight" or name in tensors:
                    out[f"{dst}mixer.{proj}.{part}"] = _take(tensors, name)
        for norm in QK_NORMS:
            name = f"{src}self_attn.{norm}.weight"
            if name in tensors:
                out[f"{dst}mixer.{norm}.weight"] = _take(tensors, name)
    return out


def new_weights(tensors: dict[str, Tensor], config: BMojoConfig, ssm_init: str) -> dict[str, Tensor]:
    """Primed values of the new parameters (those `shared_weights` does not cover) that are not left at their init."""
    out: dict[str, Tensor] = {}
    for i, kind in enumerate(config.layer_pattern):
        if kind not in "BFM":
            continue
        layer = f"model.layers.{i}."
        attention = {f"{proj}.{part}": tensors.get(f"{layer}self_attn.{proj}.{part}")
                     for proj in ATTENTION for part in ("weight", "bias")}
        has_ssm = kind == "M" or config.fading_window > 0 or (kind == "B" and config.memory_size > 0)
        if has_ssm and ssm_init == "attention":
            prefix = f"{layer}mixer." if kind == "M" else f"{layer}mixer.ssm."
            out.update({prefix + name: t for name, t in ssm_from_attention(attention, config).items()})
        if kind in "BF" and config.fading_window > 0 and not config.tie_fading_projections:
            for proj, fading in (("k_proj", "k_fading_proj"), ("v_proj", "v_fading_proj")):
                for part in ("weight", "bias"):
                    if attention[f"{proj}.{part}"] is not None:
                        out[f"{layer}mixer.{fading}.{part}"] = attention[f"{proj}.{part}"].clone()
        if kind == "B" and config.memory_size > 0:
            width = config.num_key_value_heads * config.head_dim
            out[f"{layer}mixer.innovation_proj.weight"] = torch.zeros(width, config.hidden_size)
    return out


def seeded_paths(names: Any) -> list[str]:
    """What the `new_weights` entries `names` seeded, in words, in a fixed order (for the priming summary)."""
    names = list(names)
    found = {
        "SSM as linear attention": any(not ("fading_proj" in n or "innovation_proj" in n) for n in names),
        "untied fading projections": any("fading_proj" in n for n in names),
        "zero innovation predictor": any("innovation_proj" in n for n in names),
    }
    return [what for what, present in found.items() if present]


def attention_ssm_mismatch(config: BMojoConfig) -> str | None:
    """Why the SSM cannot be seeded from the attention weights (None if it can)."""
    heads, head_dim = config.num_attention_heads, config.head_dim
    wanted = {
        "ssm_mixer": ("mamba2", config.ssm_mixer),
        "ssm_head_dim": (head_dim, config.ssm_head_dim),
        "ssm_state_size": (head_dim, config.ssm_state_size),
        "ssm_n_groups": (heads, config.ssm_n_groups),
        "ssm_expand * hidden_size": (heads * head_dim, config.ssm_inner_size),
    }
    wrong = [f"{key} is {have}, not {need}" for key, (need, have) in wanted.items() if need != have]
    return "; ".join(wrong) or None


def ssm_from_attention(attention: dict[str, Tensor | None], config: BMojoConfig) -> dict[str, Tensor]:
    """Mamba-2 mixer weights (names inside the mixer) that make it a linear-attention reading of `attention`.

    `attention` maps ``{q,k,v,o}_proj.{weight,bias}`` to the source tensors (bias None
    when absent). Needs `attention_ssm_mismatch(config)` to be None: one SSM head per
    query head (P = N = head_dim) and one B/C group per head, so head ``h`` reads
    value and key head ``h // (heads / kv_heads)`` (GQA) and its own query.
    """
    problem = attention_ssm_mismatch(config)
    if problem is not None:
        raise ValueError(f"the SSM cannot be seeded from attention: {problem}")
    heads, kv_heads, head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    repeat = heads // kv_heads
    q_w, k_w, v_w, o_w = (attention[f"{p}.weight"] for p in ATTENTION)
    v_rep = _repeat_heads(v_w, kv_heads, repeat)
    k_rep = _repeat_heads(k_w, kv_heads, repeat)
    # in_proj_bc is group-major: [B_0, C_0, B_1, C_1, ...], each head_dim rows
    bc = torch.stack([k_rep.view(heads, head_dim, -1), q_w.view(heads, head_dim, -1)], dim=1)
    out = {
        "in_proj_x.weight": v_rep,
        "in_proj_bc.weight": bc.reshape(2 * heads * head_dim, -1),
        "in_proj_z.weight": 0.5 * (o_w.t() + v_rep),
        "out_proj.weight": o_w.clone(),
    }
    for conv in ("conv_x", "conv_bc"):
        channels = out["in_proj_x.weight" if conv == "conv_x" else "in_proj_bc.weight"].shape[0]
        identity = torch.zeros(channels, 1, config.ssm_conv_kernel)
        identity[:, 0, -1] = 1.0  # the last tap multiplies the current token
        out[f"{conv}.weight"] = identity
        if config.ssm_conv_bias:
            out[f"{conv}.bias"] = torch.zeros(channels)
    if config.ssm_proj_bias:
        out.update(_ssm_biases(attention, config, kv_heads, repeat))
    return out


def _ssm_biases(attention: dict[str, Any], config: BMojoConfig, kv_heads: int, repeat: int) -> dict[str, Tensor]:
    """Biases of the SSM projections: the attention's where it has them, zero elsewhere."""
    heads, head_dim, d = config.num_attention_heads, config.head_dim, config.hidden_size
    zeros = torch.zeros
    q_b = attention["q_proj.bias"] if attention["q_proj.bias"] is not None else zeros(heads * head_dim)
    k_b = attention["k_proj.bias"] if attention["k_proj.bias"] is not None else zeros(kv_heads * head_dim)
    v_b = attention["v_proj.bias"] if attention["v_proj.bias"] is not None else zeros(kv_heads * head_dim)
    o_b = attention["o_proj.bias"] if attention["o_proj.bias"] is not None else zeros(d)
    k_rep = _repeat_heads(k_b[:, None], kv_heads, repeat)[:, 0]
    v_rep = _repeat_heads(v_b[:, None], kv_heads, repeat)[:, 0]
    bc = torch.stack([k_rep.view(heads, head_dim), q_b.view(heads, head_dim)], dim=1)
    return {
        "in_proj_x.bias": v_rep,
        "in_proj_bc.bias": bc.reshape(-1),
        "in_proj_z.bias": 0.5 * v_rep,
        "in_proj_dt.bias": zeros(heads),
        "out_proj.bias": o_b.clone(),
    }


def _repeat_heads(weight: Tensor, kv_heads: int, repeat: int) -> Tensor:
    """(kv_heads * head_dim, d) -> (kv_heads * repeat * head_dim, d): each kv head's rows `repeat` times."""
    return weight.view(kv_heads, 1, -1, weight.shape[-1]).expand(-1, repeat, -1, -1).reshape(-1, weight.shape[-1]).clone()


def _take(tensors: dict[str, Tensor], name: str) -> Tensor:
    if name not in tensors:
        raise ValueError(f"source weights have no {name!r} (is the checkpoint complete?)")
    return tensors[name]
