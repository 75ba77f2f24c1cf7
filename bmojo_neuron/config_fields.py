"""The hyper-parameters of a B'MOJO language model: fields, defaults, derived sizes, validation.

`BMojoFields` holds no Hugging Face machinery and imports neither transformers nor
torch. `BMojoConfig` (configuration_bmojo.py) is these same fields on a transformers
`PretrainedConfig`; the recipe schema checks a recipe's model section with
`BMojoFields` itself, so `bmojo-neuron plan`, `train --dry-run` and every recipe
check run the model's own validation without paying the transformers import (seconds).
The fields follow the model definition in docs/design.md. Validation runs at
construction and raises `ValueError` naming the offending field.
The saved-config helpers (`saved_defaults`, `model_fields_as_trained`) and
`transformer_family` live here too, free of torch, so the CLI can check a checkpoint's
config.json against a recipe or an export before torch loads.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

LAYER_KINDS = {
    "B": "B'MOJO: attention over in-context + fading + eidetic memory",
    "F": "B'MOJO-F: attention over in-context + fading memory",
    "M": "SSM only (Mamba)",
    "S": "sliding-window attention only",
    "A": "full causal attention",
}
SSM_MIXERS = ("mamba1", "mamba2")
MAX_HEAD_DIM = 128  # Trainium partition limit; the attention kernel puts head_dim on partitions.


class BMojoFields:
    """Every hyper-parameter of `BMojoModel` / `BMojoForCausalLM`, checked when built.

    Layer layout:
        layer_pattern: one letter per layer from `LAYER_KINDS` (default: all ``B``).

    Attention (letters B, F, S, A):
        num_attention_heads, num_key_value_heads (GQA), head_dim (<= 128, even),
        rope_theta, rope_scaling_params (None, or a ``linear`` / ``llama3`` frequency
        scaling, see `layers.rope`), attention_bias (on q/k/v and, unless
        attention_output_bias says otherwise, on o), qk_norm (an RMSNorm over head_dim
        on every query and key head before RoPE, as in Qwen3), window_size ``w``,
        fading_window ``w_f`` (default ``w``; 0 disables the fading path),
        tie_fading_projections; how the SSM output ``S`` of a B/F layer enters it:
        ssm_residual (default on: the output gains ``g * S``, ``g`` initialised at
        ssm_residual_init, default 0),
        fading_overlap (fading keys over the window), fading_norm (docs/design.md).

    Eidetic memory (letter B):
        memory_size ``M`` slots, memory_chunk ``c`` (default ``w``), memory_picks
        ``k`` per chunk, memory_decay ``gamma`` in [0, 1], innovation_loss_weight
        ``lambda`` (must be > 0 when ``M > 0``: the predictor learns only from it),
        freeze_innovation_predictor (keep the predictor at its initialisation; the
        ablation that allows ``lambda = 0``).

    SSM (letters B, F, M): ssm_mixer (``mamba2`` or ``mamba1``), ssm_expand,
        ssm_state_size ``N``, ssm_head_dim ``P`` and ssm_n_groups (mamba2),
        ssm_dt_rank (mamba1, ``"auto"`` = ceil(d/16)), ssm_conv_kernel,
        ssm_chunk_size, ssm_dt_min/max/init_floor, ssm_A_init_range (mamba2),
        ssm_conv_bias, ssm_proj_bias.

    MLP and the rest: intermediate_size (SwiGLU; 0 = no MLP), rms_norm_eps,
        initializer_range, rescale_prenorm_residual, tie_word_embeddings.

    The fields every Hugging Face config has (tie_word_embeddings, the special token
    ids, anything passed by keyword beyond these) are set by `_set_common_fields`.
    """

    def __init__(
        self,
        vocab_size: int = 50304,
        hidden_size: int = 768,
        num_hidden_layers: int = 12,
        layer_pattern: str | None = None,
        # attention
        num_attention_heads: int = 12,
        num_key_value_heads: int | None = None,
        head_dim: int | None = None,
        rope_theta: float = 10000.0,
        rope_scaling_params: dict[str, Any] | None = None,
        attention_bias: bool = False,
        attention_output_bias: bool | None = None,
        qk_norm: bool = False,
        window_size: int = 512,
        fading_window: int | None = None,
        tie_fading_projections: bool = True,
        fading_norm: bool = False,
        fading_overlap: bool = False,
        ssm_residual: bool = True,
        ssm_residual_init: float = 0.0,
        # eidetic memory
        memory_size: int = 64,
        memory_chunk: int | None = None,
        memory_picks: int = 8,
        memory_decay: float = 0.99,
        innovation_loss_weight: float = 0.01,
        freeze_innovation_predictor: bool = False,
        # SSM
        ssm_mixer: str = "mamba2",
        ssm_expand: int = 2,
        ssm_state_size: int = 64,
        ssm_head_dim: int = 64,
        ssm_n_groups: int = 1,
        ssm_dt_rank: int | str = "auto",
        ssm_conv_kernel: int = 4,
        ssm_chunk_size: int = 128,
        ssm_dt_min: float = 0.001,
        ssm_dt_max: float = 0.1,
        ssm_dt_init_floor: float = 1e-4,
        ssm_A_init_range: tuple[float, float] | list[float] = (1.0, 16.0),
        ssm_conv_bias: bool = True,
        ssm_proj_bias: bool = False,
        # MLP, norms, init
        intermediate_size: int | None = None,
        rms_norm_eps: float = 1e-5,
        initializer_range: float = 0.02,
        rescale_prenorm_residual: bool = True,
        tie_word_embeddings: bool = True,
        use_cache: bool = True,
        pad_token_id: int | None = None,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        **kwargs: Any,
    ) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.layer_pattern = layer_pattern if layer_pattern is not None else "B" * num_hidden_layers

        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads if num_key_value_heads is not None else num_attention_heads
        self.head_dim = head_dim if head_dim is not None else hidden_size // max(num_attention_heads, 1)
        self.rope_theta = rope_theta
        self.rope_scaling_params = dict(rope_scaling_params) if rope_scaling_params is not None else None
        self.attention_bias = attention_bias
        self.attention_output_bias = attention_bias if attention_output_bias is None else attention_output_bias
        self.qk_norm = qk_norm
        self.window_size = window_size
        self.fading_window = fading_window if fading_window is not None else window_size
        self.tie_fading_projections = tie_fading_projections
        self.fading_norm = fading_norm
        self.fading_overlap = fading_overlap
        self.ssm_residual = ssm_residual
        self.ssm_residual_init = ssm_residual_init

        self.memory_size = memory_size
        self.memory_chunk = memory_chunk if memory_chunk is not None else window_size
        self.memory_picks = memory_picks
        self.memory_decay = memory_decay
        self.innovation_loss_weight = innovation_loss_weight
        self.freeze_innovation_predictor = freeze_innovation_predictor

        self.ssm_mixer = ssm_mixer
        self.ssm_expand = ssm_expand
        self.ssm_state_size = ssm_state_size
        self.ssm_head_dim = ssm_head_dim
        self.ssm_n_groups = ssm_n_groups
        self.ssm_dt_rank = math.ceil(hidden_size / 16) if ssm_dt_rank == "auto" else ssm_dt_rank
        self.ssm_conv_kernel = ssm_conv_kernel
        self.ssm_chunk_size = ssm_chunk_size
        self.ssm_dt_min = ssm_dt_min
        self.ssm_dt_max = ssm_dt_max
        self.ssm_dt_init_floor = ssm_dt_init_floor
        self.ssm_A_init_range = list(ssm_A_init_range)
        self.ssm_conv_bias = ssm_conv_bias
        self.ssm_proj_bias = ssm_proj_bias

        self.intermediate_size = intermediate_size if intermediate_size is not None else _swiglu_size(hidden_size)
        self.rms_norm_eps = rms_norm_eps
        self.initializer_range = initializer_range
        self.rescale_prenorm_residual = rescale_prenorm_residual
        self.use_cache = use_cache
        self._set_common_fields(
            tie_word_embeddings=tie_word_embeddings,
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            **kwargs,
        )
        if head_dim is None:  # before validate_bmojo, whose head_dim checks would blame the derived value
            self._check_heads_divide_hidden()
        self.validate_bmojo()

    def _set_common_fields(self, **fields: Any) -> None:
        """Keep the fields every model config has as attributes (`BMojoConfig` hands them to `PretrainedConfig`)."""
        for name, value in fields.items():
            setattr(self, name, value)

    # ------------------------------------------------------------------ derived sizes
    @property
    def ssm_inner_size(self) -> int:
        """Channels of the SSM (``d_inner = expand * hidden_size``)."""
        return self.ssm_expand * self.hidden_size

    @property
    def ssm_num_heads(self) -> int:
        """Mamba-2 heads (``d_inner / ssm_head_dim``)."""
        return self.ssm_inner_size // self.ssm_head_dim

    @property
    def memory_horizon(self) -> int:
        """How far back the windows reach: ``w + w_f``, or ``max(w, w_f)`` when the fading keys overlap the window."""
        if self.fading_overlap:
            return max(self.window_size, self.fading_window)
        return self.window_size + self.fading_window

    @property
    def memory_lag(self) -> int:
        """Chunks between a token's pick and its visibility: ``g = 1 + ceil(memory_horizon / c)``, so a
        memory token is older than both windows of every query that reads it."""
        return 1 + -(-self.memory_horizon // self.memory_chunk)

    def layer_kind(self, layer_idx: int) -> str:
        return self.layer_pattern[layer_idx]

    def ssm_layers(self) -> list[int]:
        """Indices of the layers that build an SSM: M, F with a fading window, B with fading or memory."""
        builds = {"M": True, "F": self.fading_window > 0, "B": self.fading_window > 0 or self.memory_size > 0}
        return [i for i, kind in enumerate(self.layer_pattern) if builds.get(kind, False)]

    def uses_ssm(self) -> bool:
        return any(kind in "BFM" for kind in self.layer_pattern)

    # ------------------------------------------------------------------ validation
    def validate_bmojo(self) -> None:
        """Raise `ValueError` naming the first inconsistent field."""
        _require(isinstance(self.layer_pattern, str), "layer_pattern", f"must be a string, got {self.layer_pattern!r}")
        bad = sorted(set(self.layer_pattern) - set(LAYER_KINDS))
        _require(not bad, "layer_pattern", f"has letters {bad}; allowed letters are {''.join(LAYER_KINDS)}")
        _require(
            len(self.layer_pattern) == self.num_hidden_layers,
            "layer_pattern",
            f"has {len(self.layer_pattern)} letters but num_hidden_layers is {self.num_hidden_layers}",
        )
        for name in ("vocab_size", "hidden_size", "num_hidden_layers"):
            _require_int(self, name, minimum=1)
        _require_int(self, "intermediate_size", minimum=0)
        self._validate_attention()
        self._validate_memory()
        self._validate_ssm()
        _require_real(self, "rms_norm_eps", above=0.0)
        _require_real(self, "initializer_range", above=0.0)

    def _validate_attention(self) -> None:
        if not any(kind in "BFSA" for kind in self.layer_pattern):
            return
        _require_int(self, "num_attention_heads", minimum=1)
        _require_int(self, "num_key_value_heads", minimum=1)
        _require(
            self.num_attention_heads % self.num_key_value_heads == 0,
            "num_key_value_heads",
            f"({self.num_key_value_heads}) must divide num_attention_heads ({self.num_attention_heads})",
        )
        _require_int(self, "head_dim", minimum=2)
        _require(
            self.head_dim <= MAX_HEAD_DIM,
            "head_dim",
            f"is {self.head_dim}; at most {MAX_HEAD_DIM} (one Trainium partition tile)",
        )
        _require(self.head_dim % 2 == 0, "head_dim", f"is {self.head_dim}; RoPE needs an even head_dim")
        _require_real(self, "rope_theta", above=0.0)
        problem = check_rope_scaling(self.rope_scaling_params)
        _require(problem is None, "rope_scaling_params", problem or "")
        _require_int(self, "window_size", minimum=1)
        _require_int(self, "fading_window", minimum=0)
        _require(
            isinstance(self.ssm_residual_init, (int, float)) and not isinstance(self.ssm_residual_init, bool)
            and math.isfinite(self.ssm_residual_init),
            "ssm_residual_init",
            f"is {self.ssm_residual_init!r}; must be a finite number",
        )

    def _check_heads_divide_hidden(self) -> None:
        """Without an explicit head_dim the heads must split hidden_size exactly, or some dims go unused."""
        ints = all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                   for v in (self.hidden_size, self.num_attention_heads))
        if not (ints and isinstance(self.layer_pattern, str) and any(k in "BFSA" for k in self.layer_pattern)):
            return  # validate_bmojo reports what is wrong with these
        _require(
            self.hidden_size % self.num_attention_heads == 0,
            "num_attention_heads",
            f"({self.num_attention_heads}) must divide hidden_size ({self.hidden_size}) when head_dim is not set: "
            f"head_dim {self.head_dim} would attend over {self.head_dim * self.num_attention_heads} of "
            f"{self.hidden_size} dimensions; pick a divisor, or set head_dim explicitly",
        )

    def _validate_memory(self) -> None:
        if "B" not in self.layer_pattern:
            return
        _require_int(self, "memory_size", minimum=0)
        _require_int(self, "memory_chunk", minimum=1)
        _require_real(self, "memory_decay", at_least=0.0, at_most=1.0)
        _require_real(self, "innovation_loss_weight", at_least=0.0)
        if self.memory_size == 0:
            return
        _require_int(self, "memory_picks", minimum=1)
        _require(
            self.memory_picks <= self.memory_chunk,
            "memory_picks",
            f"({self.memory_picks}) cannot exceed memory_chunk ({self.memory_chunk})",
        )
        _require(
            self.innovation_loss_weight > 0 or self.freeze_innovation_predictor,
            "innovation_loss_weight",
            f"is 0 but memory_size is {self.memory_size}: the innovation predictor learns only "
            "from the auxiliary loss, so memory selection would never improve; set it > 0, or memory_size=0, "
            "or freeze_innovation_predictor=true to select with the predictor as initialised (an ablation)",
        )

    def _validate_ssm(self) -> None:
        if not self.uses_ssm():
            return
        _require(
            self.ssm_mixer in SSM_MIXERS, "ssm_mixer", f"is {self.ssm_mixer!r}; choose one of {list(SSM_MIXERS)}"
        )
        for name in ("ssm_expand", "ssm_state_size", "ssm_conv_kernel", "ssm_chunk_size"):
            _require_int(self, name, minimum=1)
        _require_real(self, "ssm_dt_min", above=0.0)
        _require_real(self, "ssm_dt_max", above=0.0)
        _require(self.ssm_dt_min <= self.ssm_dt_max, "ssm_dt_min", "must satisfy 0 < ssm_dt_min <= ssm_dt_max")
        _require_real(self, "ssm_dt_init_floor", above=0.0)
        if self.ssm_mixer == "mamba1":
            _require_int(self, "ssm_dt_rank", minimum=1)
            return
        _require_int(self, "ssm_head_dim", minimum=1)
        _require_int(self, "ssm_n_groups", minimum=1)
        _require(
            self.ssm_inner_size % self.ssm_head_dim == 0,
            "ssm_head_dim",
            f"({self.ssm_head_dim}) must divide ssm_expand * hidden_size ({self.ssm_inner_size})",
        )
        _require(
            self.ssm_num_heads % self.ssm_n_groups == 0,
            "ssm_n_groups",
            f"({self.ssm_n_groups}) must divide the number of SSM heads ({self.ssm_num_heads})",
        )
        low, high = (self.ssm_A_init_range + [None, None])[:2]
        _require(
            len(self.ssm_A_init_range) == 2 and 0 < low <= high,
            "ssm_A_init_range",
            f"is {self.ssm_A_init_range}; must be [low, high] with 0 < low <= high",
        )



MODEL_TYPE = "bmojo"  # the ``model_type`` of a saved B'MOJO config.json (`BMojoConfig.model_type`)

# Fields whose default has changed, with the value they had before they were written to
# config.json: a saved B'MOJO config without the field comes from a model trained with that value.
DEFAULTS_BEFORE_SAVED = {"ssm_residual": False}


def saved_defaults(config_dict: dict[str, Any]) -> dict[str, Any]:
    """`config_dict` with `DEFAULTS_BEFORE_SAVED` filled in when it is a saved B'MOJO config (it names the model type)."""
    if config_dict.get("model_type") != MODEL_TYPE:
        return config_dict
    return {**DEFAULTS_BEFORE_SAVED, **config_dict}


def model_fields_as_trained(model_fields: dict[str, Any], saved_config: dict[str, Any] | None) -> dict[str, Any]:
    """A recipe's ``model`` section with every field of `DEFAULTS_BEFORE_SAVED` written out: as the saved
    config of a checkpoint says its weights were trained (`saved_config`, its config.json), or today's
    default. A resumed run compares these, so a changed default cannot silently change the layer."""
    out = dict(model_fields)
    saved = saved_defaults(saved_config) if saved_config is not None else {}
    defaults = inspect.signature(BMojoFields.__init__).parameters
    for name in DEFAULTS_BEFORE_SAVED:
        out.setdefault(name, saved.get(name, defaults[name].default))
    return out


def transformer_family(config: BMojoFields) -> str:
    """``llama``, ``qwen2`` or ``qwen3``: the Hugging Face family whose layout holds this all-attention config;
    ValueError for any other (`export-transformer` checks a saved config.json with it before torch loads)."""
    if set(config.layer_pattern) != {"A"}:
        raise ValueError(f"layer_pattern {config.layer_pattern!r}: only an all-attention (all A) model is a "
                         "transformer; prime turns transformers into hybrids, not back")
    if config.intermediate_size == 0:
        raise ValueError("intermediate_size 0 (no MLP): Llama and Qwen layers always have one")
    output_bias = config.attention_output_bias
    if config.qk_norm:
        if config.attention_bias != output_bias:
            raise ValueError("qk_norm with biases on q/k/v but not o has no Hugging Face family (Qwen3 has both or neither)")
        return "qwen3"
    if config.attention_bias and not output_bias:
        return "qwen2"
    if output_bias and not config.attention_bias:
        raise ValueError("a bias on o but not on q/k/v has no Hugging Face family")
    return "llama"


ROPE_TYPES = {  # rope_type -> required keys of rope_scaling_params
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


def check_rope_scaling(params: Any) -> str | None:
    """None if `params` is a supported RoPE frequency scaling (`layers.rope`), else what is wrong."""
    if params is None:
        return None
    if not isinstance(params, dict):
        return f"must be a mapping with rope_type, got {params!r}"
    rope_type = params.get("rope_type", "default")
    if rope_type not in ROPE_TYPES:
        return f"has rope_type {rope_type!r}; supported: {', '.join(ROPE_TYPES)}"
    missing = [key for key in ROPE_TYPES[rope_type] if not isinstance(params.get(key), (int, float))]
    if missing:
        return f"({rope_type}) needs numeric {', '.join(missing)}"
    unknown = sorted(set(params) - {"rope_type", *ROPE_TYPES[rope_type]})
    if unknown:  # e.g. a rope_theta here would silently disagree with the rope_theta field
        return f"({rope_type}) has keys it does not use: {', '.join(unknown)}"
    if rope_type != "default" and params["factor"] <= 0:
        return f"has factor {params['factor']}; must be > 0"
    if rope_type == "llama3" and not 0 < params["low_freq_factor"] < params["high_freq_factor"]:
        return "(llama3) needs 0 < low_freq_factor < high_freq_factor"
    return None


def _swiglu_size(hidden_size: int) -> int:
    """LLaMA-style SwiGLU width: 8/3 * d rounded up to a multiple of 128."""
    return 128 * -(-(8 * hidden_size // 3) // 128)




def _require(condition: bool, field: str, message: str) -> None:
    if not condition:
        raise ValueError(f"BMojoConfig.{field} {message}")


def _require_real(config: BMojoFields, field: str, above: float | None = None, at_least: float | None = None,
                  at_most: float | None = None) -> None:
    """A finite int or float (not a bool or a string from a hand-edited JSON) within the given bounds."""
    value = getattr(config, field)
    bounds = [f"> {above}" if above is not None else "", f">= {at_least}" if at_least is not None else "",
              f"<= {at_most}" if at_most is not None else ""]
    wanted = " ".join(["a finite number", " and ".join(b for b in bounds if b)]).strip()
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (above is None or value > above) and (at_least is None or value >= at_least)
    ok = ok and (at_most is None or value <= at_most)
    _require(ok, field, f"must be {wanted}, got {value!r}")


def _require_int(config: BMojoFields, field: str, minimum: int) -> None:
    value = getattr(config, field)
    _require(
        isinstance(value, int) and not isinstance(value, bool) and value >= minimum,
        field,
        f"must be an integer >= {minimum}, got {value!r}",
    )
