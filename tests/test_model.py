"""BMojoForCausalLM on the reference path: decode = forward, causality, generate, losses, round trip."""

from __future__ import annotations

import pytest
import torch
from naive import tiny_config
from transformers import AutoConfig, AutoModelForCausalLM

from bmojo_neuron import BMojoCache, BMojoConfig, BMojoForCausalLM


def build(config: BMojoConfig, seed: int = 0, dtype=torch.float32) -> BMojoForCausalLM:
    torch.manual_seed(seed)
    return BMojoForCausalLM(config).to(dtype).eval()


def decode_logits(model: BMojoForCausalLM, ids: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """Prefill `prompt_len` tokens through the parallel forward, then one token at a time."""
    cache = BMojoCache(model.config.num_hidden_layers)
    with torch.no_grad():
        logits = [model(ids[:, :prompt_len], cache=cache, use_cache=True).logits]
        for t in range(prompt_len, ids.shape[1]):
            logits.append(model(ids[:, t : t + 1], cache=cache, use_cache=True).logits)
    assert cache.get_seq_length() == ids.shape[1]
    return torch.cat(logits, dim=1)


# w = 4, w_f = 3, c = 5, M = 3, k = 2 (tiny_config): prompts of 2 tokens (< w), 9 (> w + w_f) and
# 23 (several chunks); 40 tokens span 8 chunks, so 16 picks overflow the 3 slots.
PROMPTS = (1, 2, 9, 23)
LENGTH = 40


@pytest.mark.parametrize("mixer", ["mamba2", "mamba1"])
@pytest.mark.parametrize("decay", [0.0, 0.5, 1.0])
def test_decode_equals_forward_bmojo_layer(mixer, decay):
    model = build(tiny_config(ssm_mixer=mixer, memory_decay=decay))
    ids = torch.randint(0, 64, (2, LENGTH), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids).logits
    for prompt_len in PROMPTS:
        torch.testing.assert_close(decode_logits(model, ids, prompt_len), full, rtol=0, atol=1e-4)


def test_decode_cache_stays_the_same_size_and_a_copy_decodes_on_its_own():
    """B/F/S layers decode from fixed buffers written in place: the cache holds as many bytes after 17 more tokens
    as after the prompt, and a copy of the cache (beam search, padded rows) is not written by the original."""
    from bmojo_neuron.bench.harness import tensor_bytes

    model = build(tiny_config(layer_pattern="BFS"))
    ids = torch.randint(0, 64, (2, LENGTH), generator=torch.Generator().manual_seed(3))
    cache = BMojoCache(model.config.num_hidden_layers)
    with torch.no_grad():
        model(ids[:, :23], cache=cache, use_cache=True)  # 4 chunks: as many snapshots as decoding keeps
        after_prompt = [tensor_bytes(layer) for layer in cache.layers]
        twin = cache.copy()
        model(ids[:, 23:24], cache=cache, use_cache=True)
        sizes = [tensor_bytes(layer) for layer in cache.layers]
        # no view of the prompt's activations kept (a step's conv state is a view of its K-wide window)
        assert all(a <= b for a, b in zip(after_prompt, sizes)), (after_prompt, sizes)
        for t in range(24, LENGTH):
            last = model(ids[:, t : t + 1], cache=cache, use_cache=True).logits
        assert [tensor_bytes(layer) for layer in cache.layers] == sizes
        for t in range(23, LENGTH):
            again = model(ids[:, t : t + 1], cache=twin, use_cache=True).logits
    torch.testing.assert_close(again, last, rtol=0, atol=0)


@pytest.mark.parametrize("pattern", ["B", "BF"])
@pytest.mark.parametrize(("overlap", "tied"), [(True, True), (True, False), (False, False)])
def test_decode_equals_forward_with_every_ssm_option(pattern, overlap, tied):
    """fading_norm, ssm_residual (gain made non-zero), fading_overlap and untied fading projections keep
    decode = forward (fading keys go straight to the fading ring with overlap, through the side ring without)."""
    model = build(tiny_config(layer_pattern=pattern, fading_norm=True, ssm_residual=True, fading_overlap=overlap,
                              tie_fading_projections=tied))
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mixer.ssm_residual_gain.normal_()
    ids = torch.randint(0, 64, (2, LENGTH), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = model(ids).logits
    for prompt_len in PROMPTS:
        torch.testing.assert_close(decode_logits(model, ids, prompt_len), full, rtol=0, atol=1e-4)


@pytest.mark.parametrize("mixer", ["mamba2", "mamba1"])
@pytest.mark.parametrize("pattern", ["F", "M", "S", "A", "BFMSA"])
def test_decode_equals_forward_other_layers(pattern, mixer):
    model = build(tiny_config(layer_pattern=pattern, ssm_mixer=mixer))
    ids = torch.randint(0, 64, (2, LENGTH), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids).logits
    for prompt_len in (1, 9):
        torch.testing.assert_close(decode_logits(model, ids, prompt_len), full, rtol=0, atol=1e-4)


def decode_logits_with_autograd(model: BMojoForCausalLM, ids: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """`decode_logits` with autograd on: the decode steps then run projection by projection, without packs."""
    cache = BMojoCache(model.config.num_hidden_layers)
    with torch.enable_grad():
        logits = [model(ids[:, :prompt_len], cache=cache, use_cache=True).logits.detach()]
        for t in range(prompt_len, ids.shape[1]):
            logits.append(model(ids[:, t : t + 1], cache=cache, use_cache=True).logits.detach())
    return torch.cat(logits, dim=1)


def _packs(model: BMojoForCausalLM) -> list:
    """The decode packs (`layers.decode_pack`) the model's modules hold, None where one does not apply."""
    return [m.__dict__["_decode_packed"].value for m in model.modules() if "_decode_packed" in m.__dict__]


@pytest.mark.parametrize(("pattern", "options"), [
    ("B", {}),
    ("BFM", {"attention_bias": True, "ssm_proj_bias": True, "fading_norm": True}),
    ("BF", {"ssm_conv_bias": False, "attention_output_bias": False, "attention_bias": True}),
])
def test_packed_decode_step_equals_the_step_projection_by_projection(pattern, options):
    """Without autograd the SSM step's input projections and a B/F layer's k/v/q run as one product each over
    packed weights, with one conv and one rotation; that decodes what the projections one by one decode."""
    model = build(tiny_config(layer_pattern=pattern, **options))
    ids = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(8))
    packed = decode_logits(model, ids, 9)
    mixers = sum(kind in "BF" for kind in pattern) * 2 + pattern.count("M")  # attention + SSM packs; M: SSM only
    assert len(_packs(model)) == mixers and all(p is not None for p in _packs(model))
    torch.testing.assert_close(packed, decode_logits_with_autograd(model, ids, 9), rtol=0, atol=1e-5)


def test_layers_without_a_pack_decode_projection_by_projection():
    """Per-head q/k norms leave the attention unpacked (the SSM step still packs); decode still equals forward."""
    model = build(tiny_config(layer_pattern="BF", qk_norm=True))
    ids = torch.randint(0, 64, (1, 20), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        full = model(ids).logits
    torch.testing.assert_close(decode_logits(model, ids, 6), full, rtol=0, atol=1e-4)
    assert sum(p is None for p in _packs(model)) == 2 and sum(p is not None for p in _packs(model)) == 2


def test_decode_packs_follow_the_weights():
    """Weights changed in place between two decodes (an optimizer step) are read by the next cache's packs."""
    model = build(tiny_config(layer_pattern="BM"))
    ids = torch.randint(0, 64, (1, 20), generator=torch.Generator().manual_seed(10))
    decode_logits(model, ids, 6)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(part in name for part in ("k_proj", "q_proj", "in_proj_x", "in_proj_dt", "conv_bc", "A_log")):
                p.mul_(1.5)
        full = model(ids).logits
    torch.testing.assert_close(decode_logits(model, ids, 6), full, rtol=0, atol=1e-4)


def test_a_model_that_has_decoded_saves_and_copies_whole():
    """`torch.save` of the whole module and `copy.deepcopy` work after decoding; the copy packs its own weights."""
    import copy
    import io

    model = build(tiny_config(layer_pattern="BM"))
    ids = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(11))
    expected = decode_logits(model, ids, 5)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for twin in (torch.load(buffer, weights_only=False), copy.deepcopy(model)):
        torch.testing.assert_close(decode_logits(twin, ids, 5), expected, rtol=0, atol=0)
        assert all(p is not None for p in _packs(twin))


@pytest.fixture
def compiled_decode():
    """Turn the compiled decode step on for one test (backend "eager": the graph capture, without code generation)."""
    from bmojo_neuron.layers import compiled_step, mamba2

    step = compiled_step.CompiledOrEager(mamba2.Mamba2Mixer._step_rows)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(mamba2, "_STEP", step)
        compiled_step.set_compiled_decode(True, backend="eager")
        try:
            yield step
        finally:
            compiled_step.set_compiled_decode(False)


def test_compiled_decode_step_captures_whole_and_equals_eager(compiled_decode):
    """The opt-in compiled step traces as one graph (fullgraph) and decodes what the eager step does."""
    model = build(tiny_config(layer_pattern="BM"))
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(6))
    compiled = decode_logits(model, ids, 5)
    assert compiled_decode.compiled is not None and not compiled_decode.failed
    from bmojo_neuron.layers import compiled_step

    compiled_step.set_compiled_decode(False)
    torch.testing.assert_close(compiled, decode_logits(model, ids, 5), rtol=0, atol=1e-6)


def test_compiled_decode_step_falls_back_to_eager(compiled_decode, monkeypatch):
    """A compiler that fails warns once; the step then runs eagerly and decodes the same tokens."""
    def broken_compile(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(torch, "compile", broken_compile)
    model = build(tiny_config(layer_pattern="BM"))
    ids = torch.randint(0, 64, (1, 10), generator=torch.Generator().manual_seed(7))
    with pytest.warns(RuntimeWarning, match="running it eagerly"):
        got = decode_logits(model, ids, 4)
    assert compiled_decode.failed
    with torch.no_grad():
        torch.testing.assert_close(got, model(ids).logits, rtol=0, atol=1e-4)


def test_memory_changes_the_output():
    """Guard for the tests above: the memory path is live in the tiny config."""
    ids = torch.randint(0, 64, (1, LENGTH), generator=torch.Generator().manual_seed(3))
    model, no_memory = build(tiny_config()), build(tiny_config(memory_size=0))
    missing, unexpected = no_memory.load_state_dict(model.state_dict(), strict=False)
    assert not missing and all("innovation_proj" in name for name in unexpected)
    with torch.no_grad():
        with_memory, without = model(ids).logits, no_memory(ids).logits
    lag_end = tiny_config().memory_lag * 5  # queries before this chunk see an empty memory
    torch.testing.assert_close(with_memory[:, :lag_end], without[:, :lag_end], rtol=0, atol=1e-6)
    assert (with_memory[:, lag_end:] - without[:, lag_end:]).abs().max() > 1e-3


def test_generate_greedy_equals_repeated_full_forward():
    model = build(tiny_config(layer_pattern="BM"))
    prompt = torch.randint(0, 64, (2, 11), generator=torch.Generator().manual_seed(4))
    out = model.generate(prompt, max_new_tokens=25, do_sample=False, pad_token_id=0)
    ids = prompt
    with torch.no_grad():
        for _ in range(25):
            next_id = model(ids).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, next_id], dim=1)
    assert torch.equal(out, ids)


def test_generate_sampling_runs_and_respects_length():
    model = build(tiny_config(layer_pattern="BS"))
    prompt = torch.randint(0, 64, (1, 6))
    torch.manual_seed(0)
    out = model.generate(prompt, max_new_tokens=12, do_sample=True, temperature=0.8, top_k=10, top_p=0.9, pad_token_id=0)
    assert out.shape == (1, 18) and torch.equal(out[:, :6], prompt)


@pytest.mark.parametrize("position", [3, 17, 31])
def test_causality_including_memory_selection(position):
    model = build(tiny_config(layer_pattern="BFMSA", memory_decay=1.0), dtype=torch.float64)
    ids = torch.randint(0, 64, (2, LENGTH), generator=torch.Generator().manual_seed(5))
    changed = ids.clone()
    changed[:, position] = (ids[:, position] + 7) % 64
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    torch.testing.assert_close(a[:, :position], b[:, :position], rtol=0, atol=1e-12)
    assert (a[:, position:] - b[:, position:]).abs().max() > 1e-6


def test_losses_reported_separately_and_summed():
    config = tiny_config(innovation_loss_weight=0.3)
    model = build(config)
    ids = torch.randint(0, 64, (2, 20))
    labels = ids.clone()
    labels[:, :5] = -100
    out = model(ids, labels=labels)
    expected_lm = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 64), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(out.lm_loss, expected_lm)
    torch.testing.assert_close(out.loss, out.lm_loss + out.aux_loss)
    attention = model.model.layers[0].mixer
    s = attention.ssm(model.model.layers[0].mixer_norm(model.model.embed_tokens(ids)))
    k = attention.k_proj(model.model.layers[0].mixer_norm(model.model.embed_tokens(ids)))
    k_hat = attention.innovation_proj(torch.nn.functional.pad(s, (0, 0, 1, 0))[:, :-1])
    torch.testing.assert_close(out.aux_loss, 0.3 * (k - k_hat).pow(2).mean(), rtol=1e-5, atol=1e-7)
    assert build(tiny_config(memory_size=0))(ids, labels=labels).aux_loss is None


def test_loss_reads_the_logits_in_place_unless_the_factory_writes_them():
    """`causal_lm_loss` scores position t against label t + 1 by padding the targets with -100, as transformers'
    loss does: the factory's cross-entropy gets the caller's logits themselves (no (batch, L-1, V) copy), and the
    loss, its gradient and the `num_items_in_batch` sum equal the sliced computation's (float64, written here) to
    float32 round-off (the mean sums in another order: rtol 1e-6). A factory whose cross-entropy writes its input
    (NxD's) gets a copy of the scored positions instead, and the caller's logits stay as they were."""
    from bmojo_neuron.layers.factory import LayerFactory
    from bmojo_neuron.modeling_bmojo import causal_lm_loss

    class Recording(LayerFactory):
        def cross_entropy(self, logits, labels):
            self.seen = logits
            return super().cross_entropy(logits, labels)

    class Writing(Recording):
        cross_entropy_writes_logits = True

        def cross_entropy(self, logits, labels):
            logits = logits.detach()  # as NxD's autograd Function sees it
            logits.sub_(logits.max(dim=-1, keepdim=True).values)
            return super().cross_entropy(logits, labels)

    generator = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(3, 7, 11, generator=generator)).requires_grad_()
    labels = torch.randint(0, 11, (3, 7), generator=generator)
    labels[0, :4] = labels[2, 5] = -100
    scored = labels[:, 1:].reshape(-1)
    wide = logits.detach().double().requires_grad_()
    want = torch.nn.functional.cross_entropy(wide[:, :-1].reshape(-1, 11), scored, ignore_index=-100)
    want.backward()
    factory = Recording()
    got = causal_lm_loss(logits, labels, factory)
    got.backward()
    assert factory.seen.data_ptr() == logits.data_ptr() and factory.seen.shape == (21, 11)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=0)
    torch.testing.assert_close(logits.grad.double(), wide.grad, rtol=1e-6, atol=1e-8)
    summed = causal_lm_loss(logits, labels, factory, num_items_in_batch=torch.tensor(40))
    torch.testing.assert_close(summed.double(), want * (scored != -100).sum() / 40, rtol=1e-6, atol=0)
    aligned = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    assert torch.equal(causal_lm_loss(logits, None, factory, shift_labels=aligned), got)
    before = logits.detach().clone()
    writing = Writing()
    torch.testing.assert_close(causal_lm_loss(logits, labels, writing).double(), want, rtol=1e-6, atol=0)
    assert writing.seen.shape == (18, 11) and torch.equal(logits.detach(), before)


def test_innovation_predictor_learns_only_from_aux_loss():
    model = build(tiny_config(layer_pattern="BB"))
    model.train()
    ids = torch.randint(0, 64, (2, 30))
    predictor_params = {n for n, _ in model.named_parameters() if "innovation_proj" in n}
    assert len(predictor_params) == 2

    out = model(ids, labels=ids)
    out.lm_loss.backward()
    for name, p in model.named_parameters():
        if name in predictor_params:
            assert p.grad is None or p.grad.abs().max() == 0, name
    model.zero_grad(set_to_none=True)

    out = model(ids, labels=ids)
    out.aux_loss.backward()
    for name, p in model.named_parameters():
        if name in predictor_params:
            assert p.grad is not None and p.grad.abs().max() > 0, name
        else:  # the target K and the predictor's input S are detached
            assert p.grad is None or p.grad.abs().max() == 0, name


def test_save_pretrained_round_trip(tmp_path):
    model = build(tiny_config(layer_pattern="BFMSA", ssm_mixer="mamba1", tie_fading_projections=False))
    ids = torch.randint(0, 64, (2, 24))
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert AutoConfig.from_pretrained(tmp_path).model_type == "bmojo"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, BMojoForCausalLM)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    for (name, p), (_, q) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(p, q), name


def test_untied_embeddings_round_trip(tmp_path):
    model = build(tiny_config(layer_pattern="M", tie_word_embeddings=False))
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 64, (1, 10))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_tied_embeddings_share_storage():
    model = build(tiny_config())
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_init_follows_the_design():
    config = tiny_config(layer_pattern="BM", num_hidden_layers=2)
    model = build(config)
    std = config.initializer_range
    q = model.model.layers[0].mixer.q_proj.weight
    o = model.model.layers[0].mixer.o_proj.weight
    assert abs(q.std().item() - std) < 0.2 * std
    assert abs(o.std().item() - std / (2 * config.num_hidden_layers) ** 0.5) < 0.2 * std
    mixer = model.model.layers[1].mixer
    dt = torch.nn.functional.softplus(mixer.dt_bias)
    assert dt.min() >= config.ssm_dt_init_floor * 0.999 and dt.max() <= config.ssm_dt_max * 1.001
    assert torch.equal(mixer.D, torch.ones_like(mixer.D))


def test_beam_search_scores_match_full_forward_log_probs():
    """If `reorder_cache` mixed up beams, the cached states would not match the returned sequences."""
    model = build(tiny_config(layer_pattern="BM"))
    prompt = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(6))
    out = model.generate(
        prompt, max_new_tokens=8, num_beams=3, do_sample=False, length_penalty=0.0,
        return_dict_in_generate=True, output_scores=True, pad_token_id=0, early_stopping=True,
    )
    with torch.no_grad():
        log_probs = torch.log_softmax(model(out.sequences).logits, dim=-1)
    new = out.sequences[:, 7:]
    picked = log_probs[:, 6:-1].gather(-1, new[..., None]).squeeze(-1).sum(-1)
    torch.testing.assert_close(out.sequences_scores, picked, rtol=0, atol=1e-4)


def test_generation_cache_key_follows_the_installed_transformers(monkeypatch):
    """Beam search reorders only the caches under the names in ALL_CACHE_NAMES (5.24: `cache`; < 5.24 only
    `past_key_values`), so the model must keep its cache under one of them."""
    from transformers.generation import utils as generation_utils

    from bmojo_neuron.modeling_bmojo import _generation_cache_name

    assert _generation_cache_name() in generation_utils.ALL_CACHE_NAMES
    before_5_24 = ["past_key_values", "cache_params", "state", "mems", "past_buckets_states"]
    monkeypatch.setattr(generation_utils, "ALL_CACHE_NAMES", before_5_24)
    _generation_cache_name.cache_clear()
    try:
        assert _generation_cache_name() == "past_key_values"
    finally:
        _generation_cache_name.cache_clear()
