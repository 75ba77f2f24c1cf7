"""B'MOJO language model: `BMojoModel` and `BMojoForCausalLM` (Hugging Face `PreTrainedModel`).

The model is a stack of `BMojoDecoderLayer`s whose kinds come from
``config.layer_pattern``. `BMojoForCausalLM` reports two losses separately:
``lm_loss`` (next-token cross-entropy) and ``aux_loss`` (innovation auxiliary loss,
``innovation_loss_weight * mean innovation`` over the B layers); ``loss`` is their
sum. Generation uses the recurrent `BMojoCache`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.generation import GenerationMode
from transformers.generation import utils as generation_utils
from transformers.utils import ModelOutput, logging

from .cache_bmojo import AttentionLayerCache, BMojoCache, RowGroup
from .configuration_bmojo import BMojoConfig
from .layers.decoder import BMojoDecoderLayer
from .layers.factory import IGNORE_INDEX, LayerFactory, check_tp_split, get_layer_factory
from .layers.norms import norm_rows
from .padding import PackedLayout, has_padding, mask_for_inputs, pack, packed_layout, real_token_targets, unpack

logger = logging.get_logger(__name__)


@dataclass
class BMojoModelOutput(ModelOutput):
    last_hidden_state: Tensor | None = None
    cache: BMojoCache | None = None
    hidden_states: tuple[Tensor, ...] | None = None
    innovation: Tensor | None = None  # mean innovation over the B layers (differentiable in the predictors)


@dataclass
class BMojoCausalLMOutput(ModelOutput):
    loss: Tensor | None = None
    logits: Tensor | None = None
    lm_loss: Tensor | None = None
    aux_loss: Tensor | None = None
    cache: BMojoCache | None = None
    hidden_states: tuple[Tensor, ...] | None = None


# Tensor-parallel layers (ours and NxD's) initialise like the plain ones they replace.
PARALLEL_LINEARS = ("ColumnParallelLinear", "RowParallelLinear")
PARALLEL_EMBEDDINGS = ("VocabParallelEmbedding", "ParallelEmbedding")


class BMojoPreTrainedModel(PreTrainedModel):
    config_class = BMojoConfig
    config: BMojoConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["BMojoDecoderLayer"]
    _is_stateful = True
    # A one-token decode step compiles as one graph with static shapes (`BMojoCache`; docs/hf.md,
    # "Compiled decoding"); tests/test_compiled_decode.py checks it.
    _can_compile_fullgraph = True

    def __init__(self, config: BMojoConfig, *inputs: Any, **kwargs: Any) -> None:
        # `from_pretrained(path, window_size=...)` sets keyword overrides on the config after
        # BMojoConfig.__init__ has checked it, so the model checks it again before building.
        config.validate_bmojo()
        super().__init__(config, *inputs, **kwargs)

    def _refuse_attention_outputs(self, output_attentions: bool | None) -> None:
        """Refuse ``output_attentions`` (argument, or the config's when unset) rather than ignore it.

        The SSM and eidetic-memory parts have no attention matrix to return. Ignoring the
        request would hand back outputs without ``attentions``, and `generate` would then
        fail reading them; an error says why instead (docs/hf.md, "Generation").
        """
        requested = self.config.output_attentions if output_attentions is None else output_attentions
        if requested:
            raise ValueError(
                f"{type(self).__name__}: output_attentions is not supported: B'MOJO's SSM and memory layers have no "
                "attention weights to return; leave output_attentions unset or False (argument, config or generate)"
            )

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Normal(0, initializer_range) for projections and embeddings; Mamba init for SSM parameters.

        Residual output projections are scaled by 1/sqrt(2 * layers) when
        `rescale_prenorm_residual` is set. Writes go through `transformers.initialization`,
        which skips tensors already loaded by `from_pretrained`.
        """
        std = self.config.initializer_range
        kind = type(module).__name__
        if getattr(module, "ssm_residual_gain", None) is not None:
            init.constant_(module.ssm_residual_gain, self.config.ssm_residual_init)
        if isinstance(module, nn.Linear) or kind in PARALLEL_LINEARS:
            if getattr(module, "is_residual_output", False) and self.config.rescale_prenorm_residual:
                std = std / math.sqrt(2 * self.config.num_hidden_layers)
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding) or kind in PARALLEL_EMBEDDINGS:
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.Conv1d):
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                init.zeros_(module.bias)
        elif hasattr(module, "reset_ssm_parameters"):
            loaded = [getattr(p, "_is_hf_initialized", False) for p in module.parameters(recurse=False)]
            if not all(loaded):
                module.reset_ssm_parameters()
        elif isinstance(module, nn.Module) and hasattr(module, "weight") and "RMSNorm" in type(module).__name__:
            init.ones_(module.weight)


class BMojoModel(BMojoPreTrainedModel):
    """Embeddings, decoder layers and the final norm; returns hidden states."""

    def __init__(self, config: BMojoConfig) -> None:
        super().__init__(config)
        self.factory = get_layer_factory()
        self.embed_tokens = self.factory.embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(BMojoDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = self.factory.norm(config.hidden_size, eps=config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.embed_tokens = value

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        cache: BMojoCache | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        past_key_values: BMojoCache | None = None,
        **kwargs: Any,
    ) -> BMojoModelOutput | tuple:
        """Hidden states of `input_ids` (or `inputs_embeds`); `cache` continues a sequence.

        Unset options take the config's values, as in transformers: ``use_cache``
        (never in training mode, nor under sequence parallelism unless asked for),
        ``output_hidden_states``, ``return_dict``. An `attention_mask` (batch, L), or
        covering the cached tokens too, removes the tokens where it is 0 from their
        sequences (`bmojo_neuron.padding`; docs/hf.md, "Padding"). The positional order
        (`input_ids`, `attention_mask`, `inputs_embeds`) and the older name of the cache
        argument, `past_key_values`, are `BMojoForCausalLM`'s and transformers' decoder models'.
        """
        self._refuse_attention_outputs(kwargs.get("output_attentions"))
        cache = cache if cache is not None else past_key_values
        check_cache_type(cache, type(self).__name__)
        if cache is not None:
            cache.check_continuable()
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("BMojoModel: pass exactly one of input_ids or inputs_embeds")
        output_hidden_states = self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        return_dict = self.config.return_dict if return_dict is None else return_dict
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training and not self.factory.sequence_parallel
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            use_cache = self._cache_under_checkpointing(cache, use_cache)
        tokens = input_ids if input_ids is not None else inputs_embeds
        if attention_mask is not None:
            attention_mask = mask_for_inputs(attention_mask, tokens.shape[1])
        if kwargs.get("position_ids") is not None:
            check_position_ids(kwargs["position_ids"], attention_mask)
        if use_cache and cache is None:
            cache = BMojoCache(self.config.num_hidden_layers)
        if cache is not None and attention_mask is not None and (cache.groups is not None or has_padding(attention_mask)):
            output = self._forward_rows(input_ids, inputs_embeds, attention_mask, cache, output_hidden_states)
        else:
            layout = None
            if attention_mask is not None and cache is None:
                if self.factory.sequence_parallel and has_padding(attention_mask):
                    raise ValueError("BMojoModel: padded batches (attention_mask with zeros) are not supported "
                                     "under sequence parallelism; batch sequences of equal length")
                layout = None if self.factory.sequence_parallel else packed_layout(attention_mask)
            output = self._forward_packed(input_ids, inputs_embeds, layout, cache, output_hidden_states)
        if not use_cache:
            output.cache = None
        return output if return_dict else output.to_tuple()

    @staticmethod
    def _cache_under_checkpointing(cache: BMojoCache | None, use_cache: bool) -> bool:
        """`use_cache` when the backward pass will replay every layer: a replayed layer would
        advance the recurrent cache a second time, so no cache is kept (as transformers' models
        do) and continuing a given one is refused rather than silently corrupted."""
        if cache is not None:
            raise ValueError(
                "BMojoModel: cannot continue a cache with gradient checkpointing in training mode (the backward "
                "pass replays each layer, which would advance the cache twice); call model.eval(), run under "
                "torch.no_grad(), or turn gradient checkpointing off"
            )
        if use_cache:
            logger.warning_once("BMojoModel: use_cache=True is incompatible with gradient checkpointing in "
                                "training mode; setting use_cache=False")
        return False

    def _forward_packed(
        self,
        input_ids: Tensor | None,
        inputs_embeds: Tensor | None,
        layout: PackedLayout | None,
        cache: BMojoCache | None,
        output_hidden_states: bool,
    ) -> BMojoModelOutput:
        """The layers over a batch whose rows' real tokens come first (`layout`), or all real (None)."""
        if layout is not None:
            input_ids = None if input_ids is None else input_ids.gather(1, layout.order)
            inputs_embeds = None if inputs_embeds is None else pack(inputs_embeds, layout)
        hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if self.factory.sequence_parallel:
            if cache is not None:
                raise ValueError("BMojoModel: decoding with a cache is not supported under sequence parallelism")
            hidden = self.factory.scatter_sequence(hidden)
        # Decoding is chosen on the cache's structure, not its position's value (a compiled step reads the position
        # as a tensor): a cache holds a position once a forward has read a token.
        if cache is not None and layout is None and cache.position is not None and hidden.shape[1] == 1:
            return self._decode_token(hidden, cache, output_hidden_states=output_hidden_states)
        start = cache.seen_tokens if cache is not None else 0
        real = layout.real if layout is not None else None
        all_hidden = (hidden,) if output_hidden_states else None
        innovations = []
        for idx, layer in enumerate(self.layers):
            layer_cache = self._layer_cache(cache, idx, layer, hidden) if cache is not None else None
            hidden, innovation = layer(hidden, start, layer_cache, real)
            if innovation is not None:
                innovations.append(innovation)
            if output_hidden_states:
                all_hidden += (hidden,)
        hidden = self.norm(hidden)
        if output_hidden_states:
            all_hidden = all_hidden[:-1] + (hidden,)
        if cache is not None:
            cache.advance(hidden.shape[1], hidden.device)  # no sequence parallelism here (checked above)
            cache.note_new_tensors()  # the buffers a compiled decode step will write in place
        if layout is not None:
            hidden = unpack(hidden, layout)
            all_hidden = None if all_hidden is None else tuple(unpack(h, layout) for h in all_hidden)

        innovation = torch.stack(innovations).mean() if innovations else None
        return BMojoModelOutput(hidden, cache, all_hidden, innovation)

    def _decode_token(self, hidden: Tensor, cache: BMojoCache, static: bool | None = None,
                      output_hidden_states: bool = False) -> BMojoModelOutput:
        """One token (batch, 1, d) at the cache's position through every layer's decode step, as rows (batch, d).

        What the layer loop of `_forward_packed` does for a decoded token, without a module
        call and a sequence axis added and dropped per layer (at one token per step those
        cost about as much as a norm). The layers get the position as an int eagerly (their
        Python branches skip what a token does not need), and as the cache's 0-d tensor when
        `static` (default: under `torch.compile`), so one graph serves every position, hidden
        states asked for or not (`generate(output_hidden_states=True)` compiled).
        """
        static = torch.compiler.is_compiling() if static is None else static
        position = cache.position if static else cache.seen_tokens  # eagerly the host int: no read of the tensor
        h = hidden.squeeze(1)
        layer_inputs = []  # kept only when asked for: otherwise each layer's rows are freed as the next one runs
        for idx, layer in enumerate(self.layers):
            if output_hidden_states:
                layer_inputs.append(h)
            h = layer.decode_token(h, position, self._layer_cache(cache, idx, layer, hidden))
        cache.count_decoded_token(static)
        out = norm_rows(self.norm, h).unsqueeze(1)
        # As the layer loop: the embeddings, each layer's output, the last one after the final norm.
        all_hidden = tuple(x.unsqueeze(1) for x in layer_inputs) + (out,) if output_hidden_states else None
        return BMojoModelOutput(out, cache, all_hidden, None)

    def _forward_rows(
        self,
        input_ids: Tensor | None,
        inputs_embeds: Tensor | None,
        attention_mask: Tensor,
        cache: BMojoCache,
        output_hidden_states: bool,
    ) -> BMojoModelOutput:
        """A padded batch with a cache: rows continue in groups of equal length.

        Rows that have read different numbers of real tokens sit at different positions
        and their memory chunks end at different steps, so the cache keeps the rows in
        groups (`BMojoCache.groups`) that have read the same number; the rows of a group
        that get the same number of real tokens now run as one batch (a group splits
        when they do not). Outputs are placed as in the packed layout, so masked
        positions read the last real token's output.
        """
        batch, length = attention_mask.shape
        real = attention_mask != 0
        counts = real.sum(dim=1).tolist()
        cache.start_row_groups(batch)
        packed = [None] * (1 + (len(self.layers) + 1 if output_hidden_states else 0))
        innovation_sum, innovation_tokens = 0.0, 0
        groups = []
        for group in cache.groups:
            for n, members in _members_by_count(group.rows, counts).items():
                rows = [group.rows[m] for m in members]
                sub = group.cache
                if len(members) < len(group.rows):
                    sub = sub.select_rows(torch.tensor(members, device=attention_mask.device))
                groups.append(RowGroup(rows, sub))
                if n == 0:
                    continue
                keep = real[rows]
                out = self(
                    input_ids=None if input_ids is None else input_ids[rows][keep].view(len(rows), n),
                    inputs_embeds=None if inputs_embeds is None else inputs_embeds[rows][keep].view(len(rows), n, -1),
                    cache=sub, use_cache=True, output_hidden_states=output_hidden_states, return_dict=True,
                )
                for k, value in enumerate([out.last_hidden_state, *(out.hidden_states or ())]):
                    if packed[k] is None:
                        packed[k] = value.new_zeros(batch, length, value.shape[-1])
                    packed[k][rows, :n] = value
                if out.innovation is not None:
                    innovation_sum = innovation_sum + out.innovation * (n * len(rows))
                    innovation_tokens += n * len(rows)
        cache.groups = groups
        cache.advance(length, attention_mask.device)

        if packed[0] is None:  # no real token in this call
            reference = inputs_embeds if inputs_embeds is not None else self.get_input_embeddings().weight
            packed = [reference.new_zeros(batch, length, self.config.hidden_size) for _ in packed]
        layout = packed_layout(attention_mask)
        outputs = [unpack(p, layout) for p in packed]
        innovation = innovation_sum / innovation_tokens if innovation_tokens else None
        return BMojoModelOutput(outputs[0], cache, tuple(outputs[1:]) if output_hidden_states else None, innovation)

    @staticmethod
    def _layer_cache(cache: BMojoCache, idx: int, layer: BMojoDecoderLayer, hidden: Tensor):
        if cache.layers[idx] is None:
            if layer.kind == "M":
                cache.layers[idx] = layer.mixer.init_state(hidden.shape[0], hidden.device, hidden.dtype)
            else:
                cache.layers[idx] = AttentionLayerCache(max_length=cache.max_length)
        return cache.layers[idx]


class BMojoForCausalLM(BMojoPreTrainedModel, GenerationMixin):
    """`BMojoModel` with a language-modelling head (tied to the embeddings by default)."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    # Assisted and prompt-lookup decoding verify drafts by cropping the cache back,
    # which a recurrent state cannot do. transformers 5.24 and 5.25 ask each model for the modes
    # it supports; 5.24 also refuses assisted decoding for any `_is_stateful` model.
    _supported_generation_modes = [
        GenerationMode.GREEDY_SEARCH,
        GenerationMode.SAMPLE,
        GenerationMode.BEAM_SEARCH,
        GenerationMode.BEAM_SAMPLE,
    ]

    def __init__(self, config: BMojoConfig) -> None:
        super().__init__(config)
        self.factory = get_layer_factory()
        self.model = BMojoModel(config)
        check_tp_split("vocab_size", config.vocab_size, self.factory.tp_size)
        self.lm_head = self.factory.column_linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        cache: BMojoCache | None = None,
        labels: Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | Tensor = 0,
        past_key_values: BMojoCache | None = None,
        **kwargs: Any,
    ) -> BMojoCausalLMOutput | tuple:
        """Logits and, given targets, the losses, with transformers' loss conventions.

        Targets: `labels` (shifted inside: position t is scored against ``labels[t + 1]``)
        or the keyword ``shift_labels`` (already aligned with the logits, as sequence- and
        context-parallel trainers pass them; they win over `labels`); -100 is ignored.
        ``shift_labels`` comes through `kwargs`, as in transformers' models, because
        `Trainer` takes every named forward argument containing "label" for a label it
        must find in each evaluation batch.
        With an `attention_mask`, masked positions are never scored and a real token's
        target is the label of the next real token of its row: the loss of the
        sequences with their masked tokens removed.
        ``num_items_in_batch`` (a keyword `Trainer` passes under gradient accumulation)
        turns the mean into a sum over this micro-batch divided by that count.

        ``loss = lm_loss + aux_loss``; ``aux_loss`` (the innovation loss) is reported
        whenever the model has eidetic memory, with or without targets, and is scaled
        like the LM loss's share of the batch when ``num_items_in_batch`` is given (the
        accumulated innovation loss then equals one big batch's only when every micro-batch
        has as many real tokens per target; docs/hf.md, "Fine-tuning with `Trainer`").
        """
        self._refuse_attention_outputs(kwargs.get("output_attentions"))
        cache = cache if cache is not None else past_key_values
        shift_labels: Tensor | None = kwargs.get("shift_labels")
        return_dict = self.config.return_dict if return_dict is None else return_dict
        outputs = self.model(
            input_ids=input_ids,
            inputs_embeds=inputs_embeds,
            cache=cache,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            attention_mask=attention_mask,
            return_dict=True,
            position_ids=kwargs.get("position_ids"),
        )
        hidden = outputs.last_hidden_state
        if not self.factory.sequence_parallel:
            hidden = positions_to_keep(hidden, logits_to_keep)
        logits = self.lm_head(hidden)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # this rank's vocabulary shard (all of it on one device)

        aux_loss = None
        if outputs.innovation is not None:
            aux_loss = self.config.innovation_loss_weight * outputs.innovation
        lm_loss = loss = None
        if labels is not None or shift_labels is not None:
            if attention_mask is not None:  # score real tokens against the next real token only
                mask = mask_for_inputs(attention_mask, (labels if shift_labels is None else shift_labels).shape[1])
                if shift_labels is not None:
                    shift_labels = shift_labels.masked_fill(mask == 0, IGNORE_INDEX)
                else:
                    shift_labels = real_token_targets(labels, mask)
            num_items = kwargs.get("num_items_in_batch")
            lm_loss = causal_lm_loss(logits, labels, self.factory, shift_labels=shift_labels, num_items_in_batch=num_items)
            if aux_loss is not None and num_items is not None:
                targets = shift_labels if shift_labels is not None else shift_targets(labels)
                aux_loss = aux_loss * (targets != IGNORE_INDEX).sum() / num_items
            loss = lm_loss if aux_loss is None else lm_loss + aux_loss
        logits = self.factory.gather_vocab(logits)
        output = BMojoCausalLMOutput(loss, logits, lm_loss, aux_loss, outputs.cache, outputs.hidden_states)
        return output if return_dict else output.to_tuple()

    # ------------------------------------------------------------------ generation
    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # B'MOJO brings its own recurrent cache

    def _prepare_cache_for_generation(self, generation_config, model_kwargs: dict, generation_mode, batch_size: int,
                                      max_cache_length: int) -> None:
        """With a ``compile_config`` or a ``prefill_chunk_size`` and no cache given, start `generate` with a
        `BMojoCache` sized for the whole generation (its A layers' buffers hold ``max_cache_length`` tokens), where
        `generate` looks for one when deciding whether to compile and before prefilling in chunks (it refuses to
        without); otherwise as transformers does (the first step makes the cache)."""
        super()._prepare_cache_for_generation(generation_config, model_kwargs, generation_mode, batch_size,
                                              max_cache_length)
        name = _generation_cache_name()
        given = model_kwargs.get(name) if model_kwargs.get(name) is not None else model_kwargs.get("past_key_values")
        if getattr(generation_config, "prefill_chunk_size", None) is not None and isinstance(given, BMojoCache) \
                and given.position is not None:
            # Its first chunk would be read as the whole sequence, and cut by what the cache holds (`_unseen_inputs`).
            raise ValueError(f"{type(self).__name__}.generate: prefill_chunk_size starts from an empty cache; this "
                             "cache already holds tokens: prefill the rest of the prompt in one piece instead")
        wanted = (generation_config.compile_config is not None
                  or getattr(generation_config, "prefill_chunk_size", None) is not None)
        if (wanted and generation_config.use_cache is not False
                and model_kwargs.get(name) is None and model_kwargs.get("past_key_values") is None):
            model_kwargs[name] = BMojoCache(self.config.num_hidden_layers, max_length=max_cache_length)

    def _valid_auto_compile_criteria(self, model_kwargs: dict, generation_config) -> bool:
        """Whether `generate` runs its decode steps through `torch.compile` (transformers' hook, read once per call).

        Only when asked, with a ``compile_config`` (compiling costs seconds to minutes, more
        than short generations gain), on any device (CPU included), for a batch without
        padding: a padded batch decodes its rows in groups of changing size (docs/hf.md,
        "Padding"), which one graph cannot hold, so it decodes eagerly.
        """
        if generation_config.compile_config is None or generation_config.disable_compile:
            return False
        cache = model_kwargs.get(_generation_cache_name())
        mask = model_kwargs.get("attention_mask")
        reason = None
        if not isinstance(cache, BMojoCache):
            reason = "no cache (use_cache=False)"
        elif cache.groups is not None or (mask is not None and has_padding(mask)):
            reason = "a padded batch decodes its rows in groups"
        elif getattr(self, "hf_quantizer", None) is not None and not self.hf_quantizer.is_compileable:
            reason = "the quantization method does not compile"
        if reason is not None:
            logger.warning_once(f"{type(self).__name__}.generate: compile_config given, decoding eagerly: {reason}")
            return False
        return True

    def prepare_inputs_for_generation(
        self,
        input_ids: Tensor,
        cache: BMojoCache | None = None,
        past_key_values: BMojoCache | None = None,
        attention_mask: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        use_cache: bool | None = True,
        logits_to_keep: int | None = None,
        next_sequence_length: int | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """Feed only what the cache has not seen: the whole prompt first, then one token per step.

        Without a cache (``use_cache=False``) every step feeds the whole sequence. A
        prompt given as `inputs_embeds` is fed once; the generated ids follow it.
        Other keywords (``output_hidden_states``, ...) reach `forward` unchanged.
        """
        cache = cache if cache is not None else past_key_values
        check_cache_type(cache, type(self).__name__)
        if use_cache is not False and cache is None:
            cache = BMojoCache(self.config.num_hidden_layers)
        # Own copies with their own strides: a slice of the growing sequence has a stride that changes every step,
        # which a compiled decode step would take for a new input layout and recompile for.
        unseen = {name: t.clone(memory_format=torch.contiguous_format)
                  for name, t in _unseen_inputs(input_ids, inputs_embeds, cache, next_sequence_length).items()}
        if attention_mask is not None and cache is not None and cache.groups is None and cache.position is not None \
                and not has_padding(attention_mask):
            # A mask of ones changes nothing once the cache holds an unpadded batch; left out, a compiled decode step
            # does not see an input that grows by a column per token.
            attention_mask = None
        inputs: dict[str, Any] = {"cache": cache, "use_cache": use_cache, "attention_mask": attention_mask, **unseen}
        if logits_to_keep is not None:
            inputs["logits_to_keep"] = logits_to_keep
        for name, value in kwargs.items():
            if name not in GENERATE_ONLY_KEYWORDS and name not in inputs:
                inputs[name] = value
        return inputs

    def _update_model_kwargs_for_generation(self, outputs: ModelOutput, model_kwargs: dict, *args, **kwargs) -> dict:
        """Keep the cache under the key this transformers' `generate` reorders for beam search; none without one."""
        model_kwargs = super()._update_model_kwargs_for_generation(outputs, model_kwargs, *args, **kwargs)
        for name in ("cache", "past_key_values"):
            model_kwargs.pop(name, None)
        if outputs.cache is not None:
            model_kwargs[_generation_cache_name()] = outputs.cache
        return model_kwargs


# `generate`'s own bookkeeping, never a `forward` input (transformers drops them the same way).
GENERATE_ONLY_KEYWORDS = frozenset({"labels", "is_first_iteration", "cache_position", "position_ids"})


def check_position_ids(position_ids: Tensor, attention_mask: Tensor | None) -> None:
    """Accept `position_ids` only where they say what the model counts itself: one more from each real token to the
    next real token of its row (what `generate` and a padding tokenizer give); the values are not read further.

    The model counts positions from the cache and the attention mask. Ids that restart inside a row mark packed
    documents (transformers' `DataCollatorWithFlattening`), which attention models keep apart by their positions;
    here the SSM state, windows and memory would carry from one document into the next, so they are refused. One
    read of a flag back to the host, only when `position_ids` are given (`generate` does not pass them).
    """
    ids = position_ids.reshape(-1, position_ids.shape[-1])
    steps = ids[:, 1:] - ids[:, :-1]
    if attention_mask is not None:
        real = attention_mask != 0
        steps = torch.where(real[:, 1:] & real[:, :-1], steps, 1)  # pads take any id
    if bool((steps != 1).any()):
        raise ValueError(
            "BMojoModel: position_ids must count up by one from token to token within a row; ids that restart "
            "(packed documents, as DataCollatorWithFlattening makes) are not supported: the SSM state, windows and "
            "memory would run on from one document into the next. Put each document in its own row, padded, "
            "with an attention_mask"
        )


def check_cache_type(cache: object, owner: str) -> None:
    """Refuse a cache that is not a `BMojoCache` (e.g. transformers' `DynamicCache`) with a clear error.

    A transformers `Cache` holds per-layer keys and values (and, for Mamba2, conv and
    SSM states); B'MOJO's layers keep windows, fading keys and an eidetic memory it has
    no slots for. Read without this check, such a cache fails deep inside with an
    `AttributeError`; filled silently in its place, the caller's object would stay empty.
    """
    if cache is not None and not isinstance(cache, BMojoCache):
        raise TypeError(
            f"{owner}: cache must be a BMojoCache (the `.cache` of an earlier forward or generate, or a new "
            f"BMojoCache(config.num_hidden_layers)), got {type(cache).__name__}; transformers' Cache classes "
            "cannot hold B'MOJO's windows and memory"
        )


def _unseen_inputs(
    input_ids: Tensor, inputs_embeds: Tensor | None, cache: BMojoCache | None, next_sequence_length: int | None
) -> dict[str, Tensor]:
    """The part of the sequence `cache` has not read, as ``input_ids`` or ``inputs_embeds``.

    The sequence is the prompt (ids, or `inputs_embeds` whose ids `generate` does not
    know) followed by the generated ids. transformers >= 5.24 says how many tokens are
    new (`next_sequence_length`); otherwise the cache's length tells, unless the ids are
    no longer than what the cache holds, so cannot be the whole sequence: then they are
    the new ones (transformers 5.25's chunked prefill passes its chunks after the first
    so, `GenerationMixin._prefill`; its first chunk starts an empty cache, below).
    A count of zero or less (a cache that holds the whole prompt already) is refused:
    `nothing_left_to_read`.
    """
    seen = cache.seen_tokens if cache is not None else 0
    if next_sequence_length is not None and next_sequence_length <= 0:
        raise ValueError(nothing_left_to_read(seen, seen + next_sequence_length))
    if next_sequence_length is None and inputs_embeds is None and 0 < input_ids.shape[1] <= seen:
        next_sequence_length = input_ids.shape[1]  # no longer than what the cache holds: not the whole sequence
    if inputs_embeds is not None and cache is None:
        raise ValueError("BMojoForCausalLM.generate from inputs_embeds needs use_cache=True: without a cache, "
                         "later steps would have to re-read the prompt, which generate passes only once")
    if inputs_embeds is not None and seen < inputs_embeds.shape[1]:
        return {"inputs_embeds": inputs_embeds[:, seen:]}
    if next_sequence_length is not None:
        return {"input_ids": input_ids[:, -next_sequence_length:]}
    if inputs_embeds is not None:  # input_ids hold only the ids generated after the embedded prompt
        return {"input_ids": input_ids[:, seen - inputs_embeds.shape[1]:]}
    return {"input_ids": input_ids[:, seen:] if cache is not None else input_ids}


def nothing_left_to_read(seen: int, prompt_length: int) -> str:
    """Why `generate` cannot start from a cache that has read the whole prompt (or more), and what to do instead.

    The first new token is drawn from the logits of the prompt's last token, which the
    cache has already read. transformers 5.25 computes the count of new tokens as prompt
    length minus cache length (`GenerationMixin._prefill`, src/transformers/generation/utils.py
    lines 4321-4336, 5.25.0) and slices ``input_ids[:, -0:]`` for a count of 0 (line 704), so Mistral and Mamba2 read the whole
    prompt a second time on top of their cache; a shorter prompt slices to nothing and
    fails inside the model. Its authors' remedy is to roll the cache back one token and
    read that token again; a recurrent state cannot be rolled back, so the caller leaves
    the last token out of the prefill instead (docs/hf.md, "Generation").
    """
    return (f"BMojoForCausalLM.generate: the cache has already read {seen} tokens and the prompt has {prompt_length}, "
            "so no prompt token is left to read, and the first new token comes from the logits of the prompt's last "
            "token, which a recurrent cache cannot read again; fill the cache with all but the prompt's last token "
            "(model(input_ids[:, :-1], cache=cache)) and pass the whole prompt, the tokens the cache has read included")


@functools.cache  # read per decode step; the installed transformers does not change
def _generation_cache_name() -> str:
    """The model_kwargs key under which this transformers' `generate` finds (and beam search reorders) a cache.

    transformers 5.24 calls it ``cache``; earlier 5.x releases only look under
    ``past_key_values``: a cache kept under another key is silently never reordered.
    """
    names = getattr(generation_utils, "ALL_CACHE_NAMES", ["past_key_values"])
    return "cache" if "cache" in names else "past_key_values"


def _members_by_count(rows: list[int], counts: list[int]) -> dict[int, list[int]]:
    """Offsets within a group of its rows, by how many real tokens each row gets now."""
    members: dict[int, list[int]] = {}
    for offset, row in enumerate(rows):
        members.setdefault(counts[row], []).append(offset)
    return members


def positions_to_keep(hidden: Tensor, logits_to_keep: int | Tensor) -> Tensor:
    """The rows of `hidden` (batch, L, d) whose logits are computed, read as transformers' causal LMs read
    `logits_to_keep` (`slice_logits_to_keep`, src/transformers/modeling_utils.py, 5.25.0): an int N keeps the last N
    positions (0: all); a 1-D tensor, these positions of every row; a 2-D integer tensor (batch, n), these positions
    of each row; a 2-D boolean mask (batch, L), its True positions, flattened to (count, d)."""
    if isinstance(logits_to_keep, int):
        return hidden[:, -logits_to_keep:] if logits_to_keep else hidden
    if logits_to_keep.ndim == 2 and logits_to_keep.dtype == torch.bool:
        return hidden[logits_to_keep]
    if logits_to_keep.ndim == 2:
        return hidden.gather(1, logits_to_keep.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
    return hidden[:, logits_to_keep]


def shift_targets(labels: Tensor) -> Tensor:
    """Targets aligned with the logits: position t gets ``labels[t + 1]``, the last position -100."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def causal_lm_loss(
    logits: Tensor,
    labels: Tensor | None,
    factory: LayerFactory,
    *,
    shift_labels: Tensor | None = None,
    num_items_in_batch: Tensor | int | None = None,
) -> Tensor:
    """Next-token cross-entropy of `logits` (batch, L, V); -100 is ignored.

    Position t is scored against ``labels[t + 1]``, or against ``shift_labels[t]`` when
    those (already aligned) targets are given. The mean over the counted targets, or
    with `num_items_in_batch` their sum divided by it. `logits` may be a vocabulary
    shard: the factory's cross-entropy combines the shards (and keeps static shapes:
    no selection of the counted rows).
    """
    if shift_labels is not None:
        targets = shift_labels
    elif factory.cross_entropy_writes_logits:
        # The last position has no target: leave it out, which also hands the factory a copy of the
        # logits for batches > 1 (NxD's cross-entropy shifts its input in place).
        logits, targets = logits[:, :-1], labels[:, 1:]
    else:
        # The last position's target is -100, as transformers' loss pads its labels: the logits are
        # read where they are, never copied (forward, nor their gradient in the backward).
        targets = shift_targets(labels)
    flat = targets.reshape(-1).to(logits.device)
    mean = factory.cross_entropy(logits.reshape(-1, logits.shape[-1]), flat)
    if num_items_in_batch is None:
        return mean
    if isinstance(num_items_in_batch, Tensor):
        num_items_in_batch = num_items_in_batch.to(mean.device)
    return mean * (flat != IGNORE_INDEX).sum() / num_items_in_batch
