"""A one-token decode step compiled with `torch.compile(fullgraph=True)`: one graph, no recompiles, eager's numbers.

The decode cache holds fixed-size tensors written in place and a tensor position
(`BMojoCache`), so the step has static shapes and no Python branch on the position.
Graph capture is checked with dynamo's counting backend (it runs the captured graph
as it is, in seconds); inductor's generated code once, on the smallest model.
"""

from __future__ import annotations

import gc
import shutil
import warnings

import pytest
import torch
from naive import tiny_config
from torch._dynamo.testing import CompileCounter
from transformers import CompileConfig

from bmojo_neuron import BMojoCache, BMojoForCausalLM

# w = 4, w_f = 3, c = 5 (tiny_config): from a 9-token prompt, 21 steps fill the rings and end four chunks.
PROMPT, LENGTH = 9, 30


@pytest.fixture(autouse=True)
def one_graph_only():
    """A recompile fails the test (limit 1, hard failure); compiled graphs are dropped after each test."""
    config = torch._dynamo.config
    with config.patch(recompile_limit=1, fail_on_recompile_limit_hit=True):
        yield
    torch._dynamo.reset()
    gc.collect()


class SharedCompileCounter(CompileCounter):
    """Dynamo's counting backend, shared by the copies `CompileConfig.to_dict` makes (a deep copy)."""

    def __deepcopy__(self, memo: dict) -> SharedCompileCounter:
        return self


class StaticInputsCounter(CompileCounter):
    """Dynamo's counting backend that also records, for the cache's inputs of the last graph, whether dynamo took
    each as a static address (`torch._dynamo.mark_static_address`), which CUDA graphs then do not copy."""

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> object:
        self.cache_inputs = {node.name: node.meta.get("tensor_dict", {}).get("_dynamo_static_input_type")
                             for node in gm.graph.nodes if node.op == "placeholder" and node.name.startswith("l_cache")}
        return super().__call__(gm, example_inputs)


def build(**overrides) -> BMojoForCausalLM:
    torch.manual_seed(0)
    return BMojoForCausalLM(tiny_config(**overrides)).eval()


def token_ids(batch: int = 2, length: int = LENGTH, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, 60, (batch, length), generator=torch.Generator().manual_seed(seed))


def decode(model: BMojoForCausalLM, ids: torch.Tensor, step=None, max_length: int | None = 64) -> torch.Tensor:
    """Logits of the tokens after the prompt: the prompt through the parallel forward, then `step` (default the
    model) one token at a time."""
    step = model if step is None else step
    cache = BMojoCache(model.config.num_hidden_layers, max_length=max_length)
    with torch.no_grad():
        model(ids[:, :PROMPT], cache=cache, use_cache=True)
        logits = [step(ids[:, t : t + 1], cache=cache, use_cache=True).logits for t in range(PROMPT, ids.shape[1])]
    return torch.cat(logits, dim=1)


def decode_static_eagerly(model: BMojoForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    """`decode` with the positions as the cache's tensor, as a compiled step reads them, run without compiling."""
    cache = BMojoCache(model.config.num_hidden_layers, max_length=64)
    with torch.no_grad():
        model(ids[:, :PROMPT], cache=cache, use_cache=True)
        logits = []
        for t in range(PROMPT, ids.shape[1]):
            hidden = model.model._decode_token(model.model.embed_tokens(ids[:, t : t + 1]), cache, static=True)
            logits.append(model.lm_head(hidden.last_hidden_state))
    return torch.cat(logits, dim=1)


@pytest.mark.parametrize("options", [
    {"layer_pattern": "BFMSA"},
    {"layer_pattern": "BFM", "ssm_mixer": "mamba1", "fading_overlap": True},
    {"layer_pattern": "BF", "tie_fading_projections": False, "fading_norm": True, "qk_norm": True},
    {"layer_pattern": "B", "memory_decay": 0.0},
])
def test_tensor_positions_decode_what_int_positions_decode(options):
    """The static form of the step (writes made unconditionally or through torch.where, the chunk's end as a
    branch on a tensor) decodes what the eager form (Python branches on an int position) and the forward give."""
    model = build(**options)
    ids = token_ids()
    with torch.no_grad():
        full = model(ids).logits[:, PROMPT:]
    static = decode_static_eagerly(model, ids)
    torch.testing.assert_close(static, decode(model, ids, max_length=None), rtol=0, atol=1e-6)
    torch.testing.assert_close(static, full, rtol=0, atol=1e-4)


@pytest.mark.parametrize("mixer", ["mamba2", "mamba1"])
def test_compiled_decode_step_is_one_graph_for_every_position(mixer):
    """fullgraph=True (a graph break raises), one frame compiled for 21 steps that fill the windows and end four
    memory chunks (a recompile raises), every layer kind, and the eager step's logits."""
    model = build(layer_pattern="BFMSA", ssm_mixer=mixer)
    ids = token_ids()
    counter = CompileCounter()
    compiled = decode(model, ids, torch.compile(model, fullgraph=True, dynamic=False, backend=counter))
    assert counter.frame_count == 1
    torch.testing.assert_close(compiled, decode(model, ids), rtol=0, atol=1e-6)


def test_compiled_decode_continues_after_a_beam_reorder_and_on_a_copy():
    """Beam search's reorder and `select_rows` / `copy` give caches with the same layout: the same graph decodes
    them, as the eager step does; dynamo takes every cache tensor as a static address."""
    model = build(layer_pattern="BMA")
    ids = token_ids(batch=3)
    counter = StaticInputsCounter()
    compiled_model = torch.compile(model, fullgraph=True, dynamic=False, backend=counter)
    results = []
    for step in (model, compiled_model):
        cache = BMojoCache(model.config.num_hidden_layers, max_length=64)
        with torch.no_grad():
            model(ids[:, :PROMPT], cache=cache, use_cache=True)
            step(ids[:, PROMPT : PROMPT + 1], cache=cache, use_cache=True)
            cache.reorder_cache(torch.tensor([2, 0, 0]))
            twin = cache.select_rows(torch.tensor([1, 2, 0])).copy()
            out = [step(ids[:, t : t + 1], cache=c, use_cache=True).logits
                   for t in range(PROMPT + 1, PROMPT + 8) for c in (cache, twin)]
        results.append(torch.cat(out, dim=1))
        # As transformers' StaticCache: every decode tensor marked a static address (CUDA graphs do not copy it
        # in at each step), the new tensors of a reorder and a copy too.
        for c in (cache, twin):
            assert {getattr(t, "_dynamo_static_input_type", None) for t in c.tensors()} == {"unguarded"}
    assert counter.frame_count == 1
    assert len(counter.cache_inputs) == 20 and set(counter.cache_inputs.values()) == {"unguarded"}
    torch.testing.assert_close(results[1], results[0], rtol=0, atol=1e-6)


def test_compiled_decode_continues_after_an_a_layer_buffer_grew_eagerly():
    """An A layer's buffer that doubles in an eager step is replaced by a new tensor, marked static as the one it
    replaces: a compiled step after it takes every cache input as a static address and gives eager's logits.
    Grown under torch.inference_mode(), an ordinary cache's buffer stays ordinary: the cache continues outside it."""
    model = build(layer_pattern="BA")
    ids = token_ids(length=PROMPT + 12)
    counter = StaticInputsCounter()
    compiled_model = torch.compile(model, fullgraph=True, dynamic=False, backend=counter)
    results = []
    for step in (model, compiled_model):
        cache = BMojoCache(model.config.num_hidden_layers)  # no max_length: the prompt's 9 tokens, room for 16
        with torch.no_grad():
            model(ids[:, :PROMPT], cache=cache, use_cache=True)
        with torch.inference_mode():  # the token at position 16 doubles the buffer
            out = [model(ids[:, t : t + 1], cache=cache, use_cache=True).logits.clone() for t in range(PROMPT, 17)]
        assert cache.layers[1].kv.shape[3] == 32 and not cache.layers[1].kv.is_inference()
        with torch.no_grad():
            out += [step(ids[:, t : t + 1], cache=cache, use_cache=True).logits for t in range(17, ids.shape[1])]
        results.append(torch.cat(out, dim=1))
        assert {getattr(t, "_dynamo_static_input_type", None) for t in cache.tensors()} == {"unguarded"}
    assert counter.frame_count == 1
    assert counter.cache_inputs and set(counter.cache_inputs.values()) == {"unguarded"}
    torch.testing.assert_close(results[1], results[0], rtol=0, atol=1e-6)


def test_compiled_a_layers_need_the_cache_sized_for_the_generation():
    """A compiled step cannot grow an A layer's buffer: writing past it fails rather than decoding wrong tokens."""
    model = build(layer_pattern="A")
    compiled_model = torch.compile(model, fullgraph=True, dynamic=False, backend=CompileCounter())
    with pytest.raises(Exception, match="out of (bounds|range)"):
        decode(model, token_ids(), compiled_model, max_length=None)  # the prompt's 9 tokens: room for 16


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="inductor needs a C++ compiler")
def test_inductor_compiled_decode_equals_eager():
    """Inductor's generated code for the step of a B layer (the memory's chunk end included) gives eager's logits
    within float32 rounding."""
    model = build(layer_pattern="B", intermediate_size=0)
    ids = token_ids(batch=1, length=PROMPT + 7)  # ends chunk 1 (position 9) and starts chunk 2's
    compiled = decode(model, ids, torch.compile(model, fullgraph=True, dynamic=False, backend="inductor"))
    torch.testing.assert_close(compiled, decode(model, ids), rtol=0, atol=1e-5)


def test_generate_with_a_compile_config_compiles_the_decode_steps():
    """`generate(compile_config=...)` on CPU: transformers compiles the decode steps (the prefill runs eagerly)
    into one graph, with scores, logits and hidden states asked for (they come from the same one-token step);
    greedy and beam search give the eager outputs, and each eager step's hidden states are the forward's."""
    model = build(layer_pattern="BMA")
    prompt = token_ids(length=PROMPT)
    counter = SharedCompileCounter()
    config = CompileConfig(fullgraph=True, dynamic=False, backend=counter, mode=None)
    outputs = dict(return_dict_in_generate=True, output_scores=True, output_logits=True, output_hidden_states=True)
    eager = {}
    for beams in (1, 2):
        kwargs = dict(max_new_tokens=12, do_sample=False, num_beams=beams, pad_token_id=63, **outputs)
        eager[beams] = model.generate(prompt, **kwargs)
        compiled = model.generate(prompt, compile_config=config, **kwargs)
        assert torch.equal(compiled.sequences, eager[beams].sequences)
        for got, want in [(compiled.scores, eager[beams].scores), (compiled.logits, eager[beams].logits),
                          *zip(compiled.hidden_states, eager[beams].hidden_states)]:
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert counter.frame_count == 1
    greedy = eager[1]
    with torch.no_grad():
        forward = model(greedy.sequences[:, :-1], output_hidden_states=True, use_cache=False).hidden_states
    for step, per_layer in enumerate(greedy.hidden_states[1:], start=PROMPT):
        for got, want in zip(per_layer, forward, strict=True):
            torch.testing.assert_close(got, want[:, step : step + 1], rtol=1e-4, atol=1e-4)


def test_generate_decodes_a_padded_batch_eagerly_with_a_compile_config():
    """Padded rows decode in groups of changing size: with a compile_config they decode eagerly, with a warning."""
    model = build(layer_pattern="BM")
    prompt = token_ids(length=PROMPT)
    mask = torch.ones_like(prompt)
    mask[0, :3] = 0
    counter = SharedCompileCounter()
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=63)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = model.generate(prompt, compile_config=CompileConfig(backend=counter, mode=None), **kwargs)
    assert counter.frame_count == 0
    assert torch.equal(got, model.generate(prompt, **kwargs))
