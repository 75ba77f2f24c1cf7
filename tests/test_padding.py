"""Padded batches: every real token gets what its sequence gives alone, with the masked tokens removed.

Checked against the same model run on each sequence alone (no mask): forward logits
(training path and cached path), training loss and gradients, decode == forward,
`generate` (greedy, sampling, beam search) and the text-generation pipeline. The
model has every layer kind, and the prompts are long enough for the eidetic memory
to be read (tiny config: window 4, fading 3, chunk 5, memory lag 3 chunks, so the
memory is visible from position 15 on).
"""

from __future__ import annotations

import pytest
import torch
from naive import tiny_config

from bmojo_neuron import BMojoCache, BMojoForCausalLM, BMojoModel
from bmojo_neuron.padding import packed_layout, real_token_targets

PAD = 63
LENGTHS = (26, 19, 7)  # prompts of 3 rows; the longest sets the padded length
ATOL = 1e-5  # float32; padded and alone differ only in summation order (more rows, longer blocks)


def build(seed: int = 0, **overrides) -> BMojoForCausalLM:
    fields = dict(num_hidden_layers=5, layer_pattern="BFMSA", pad_token_id=PAD, eos_token_id=None, memory_decay=0.5)
    fields.update(overrides)
    torch.manual_seed(seed)
    return BMojoForCausalLM(tiny_config(**fields)).eval()


def prompts(lengths=LENGTHS, seed: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, PAD, (n,), generator=g) for n in lengths]


def padded(rows: list[torch.Tensor], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention_mask) padded with PAD on the `side` ("left", "right", or "both": pads at each end)."""
    width = max(len(r) for r in rows) + (2 if side == "both" else 0)
    ids = torch.full((len(rows), width), PAD)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, row in enumerate(rows):
        start = {"left": width - len(row), "right": 0, "both": 1 + b % 2}[side]
        ids[b, start:start + len(row)] = row
        mask[b, start:start + len(row)] = 1
    return ids, mask


def real_positions(mask: torch.Tensor, b: int) -> torch.Tensor:
    return mask[b].nonzero().flatten()


# ----------------------------------------------------------------------------------------- layout
def test_packing_moves_real_tokens_first_and_reads_outputs_back():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 0, 1, 0, 1], [1, 1, 1, 0, 0]])
    layout = packed_layout(mask)
    assert layout.order.tolist() == [[2, 3, 4, 0, 1], [0, 2, 4, 1, 3], [0, 1, 2, 3, 4]]
    assert layout.real.long().sum(1).tolist() == [3, 3, 3]
    # every position reads the packed slot of the last real token at or before it
    assert layout.source.tolist() == [[0, 0, 0, 1, 2], [0, 0, 1, 1, 2], [0, 1, 2, 2, 2]]
    assert layout.has_source.tolist()[0] == [False, False, True, True, True]


def test_targets_skip_masked_tokens():
    labels = torch.tensor([[9, 9, 1, 2, 3], [1, 9, 2, 9, 3]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 0, 1, 0, 1]])
    assert real_token_targets(labels, mask).tolist() == [[-100, -100, 2, 3, -100], [2, -100, 3, -100, -100]]
    unmasked = torch.ones_like(mask)
    assert real_token_targets(labels, unmasked)[:, :-1].tolist() == labels[:, 1:].tolist()


# ----------------------------------------------------------------------------------------- forward
@pytest.mark.parametrize("side", ["left", "right", "both"])
@pytest.mark.parametrize("path", ["train", "cache"])
def test_padded_logits_equal_each_sequence_alone(side, path):
    model = build()
    rows = prompts()
    ids, mask = padded(rows, side)
    with torch.no_grad():
        if path == "train":  # no cache: the packed batch
            out = model(ids, attention_mask=mask, use_cache=False, output_hidden_states=True)
        else:  # a cache: rows in groups of equal length
            out = model(ids, attention_mask=mask, cache=BMojoCache(5), use_cache=True, output_hidden_states=True)
        for b, row in enumerate(rows):
            alone = model(row[None], use_cache=False, output_hidden_states=True)
            where = real_positions(mask, b)
            torch.testing.assert_close(out.logits[b, where], alone.logits[0], rtol=0, atol=ATOL)
            for mine, theirs in zip(out.hidden_states, alone.hidden_states):
                torch.testing.assert_close(mine[b, where], theirs[0], rtol=0, atol=ATOL)
            # a masked position reads the last real token before it; before the first, zeros
            last_real = where[-1]
            if last_real + 1 < ids.shape[1]:
                torch.testing.assert_close(out.logits[b, last_real + 1:], out.logits[b, last_real].expand_as(
                    out.logits[b, last_real + 1:]), rtol=0, atol=0)
            assert not out.logits[b, : where[0]].any()


@pytest.mark.parametrize("options", [dict(ssm_mixer="mamba1"), dict(ssm_residual=True, fading_norm=True, fading_overlap=True)],
                         ids=["mamba1", "ssm-path-options"])
def test_padded_logits_equal_alone_with_other_mixers_and_options(options):
    model = build(**options)
    rows = prompts()
    ids, mask = padded(rows, "left")
    with torch.no_grad():
        packed = model(ids, attention_mask=mask, use_cache=False).logits
        cached = model(ids, attention_mask=mask, cache=BMojoCache(5), use_cache=True).logits
        for b, row in enumerate(rows):
            alone = model(row[None], use_cache=False).logits[0]
            torch.testing.assert_close(packed[b, real_positions(mask, b)], alone, rtol=0, atol=ATOL)
            torch.testing.assert_close(cached[b, real_positions(mask, b)], alone, rtol=0, atol=ATOL)


def test_pad_tokens_do_not_change_real_outputs():
    """Guard: the pad token id itself is irrelevant, and the memory is live (the test above can fail)."""
    model = build()
    ids, mask = padded(prompts(), "left")
    other = ids.masked_fill(mask == 0, 5)
    with torch.no_grad():
        a = model(ids, attention_mask=mask, use_cache=False).logits
        b = model(other, attention_mask=mask, use_cache=False).logits
        unmasked = model(ids, use_cache=False).logits  # the pads read as tokens
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (a[1:][mask[1:] == 1] - unmasked[1:][mask[1:] == 1]).abs().max() > 1e-3


def test_base_model_takes_the_mask_and_a_mask_over_the_cache():
    model = build()
    base: BMojoModel = model.model
    rows = prompts()
    ids, mask = padded(rows, "left")
    with torch.no_grad():
        hidden = base(ids, attention_mask=mask, use_cache=False).last_hidden_state
        alone = base(rows[2][None], use_cache=False).last_hidden_state
    torch.testing.assert_close(hidden[2, real_positions(mask, 2)], alone[0], rtol=0, atol=ATOL)
    with pytest.raises(ValueError, match="attention_mask must be"):
        base(ids, attention_mask=mask[:, 1:], use_cache=False)


# ----------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_training_loss_and_gradients_equal_the_unpadded_sequences(side):
    model = build(seed=1).train()
    rows = prompts(seed=7)
    ids, mask = padded(rows, side)
    targets = sum(len(r) - 1 for r in rows)

    # labels = input_ids, pads included, as a plain collator gives them: the mask keeps pads out
    out = model(ids, attention_mask=mask, labels=ids, num_items_in_batch=targets)
    out.lm_loss.backward()
    padded_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    lm_sum, aux_weighted = 0.0, 0.0
    for row in rows:
        alone = model(row[None], labels=row[None], num_items_in_batch=targets)
        alone.lm_loss.backward()  # gradients add up over the rows
        lm_sum = lm_sum + alone.lm_loss.detach()
        plain = model(row[None], labels=row[None])  # aux loss = weight * mean innovation of this row
        aux_weighted = aux_weighted + plain.aux_loss.detach() * len(row)
    torch.testing.assert_close(out.lm_loss.detach(), lm_sum, rtol=1e-5, atol=1e-6)
    # the innovation loss averages over real tokens only
    plain_padded = model(ids, attention_mask=mask, labels=ids)
    torch.testing.assert_close(plain_padded.aux_loss.detach(), aux_weighted / sum(LENGTHS), rtol=1e-5, atol=1e-7)
    for name, param in model.named_parameters():
        if param.grad is not None:
            torch.testing.assert_close(padded_grads[name], param.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert len(padded_grads) == sum(1 for p in model.parameters() if p.grad is not None) > 0


def test_masked_shift_labels_are_not_scored():
    model = build(seed=2)
    ids, mask = padded(prompts(), "right")
    shift = real_token_targets(ids, mask)
    noisy = torch.where(mask == 0, torch.zeros_like(shift), shift)  # targets at pads must be ignored
    with torch.no_grad():
        a = model(ids, attention_mask=mask, shift_labels=shift, use_cache=False).lm_loss
        b = model(ids, attention_mask=mask, shift_labels=noisy, use_cache=False).lm_loss
    torch.testing.assert_close(a, b, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------- decoding
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_decode_equals_padded_forward(side):
    """Prefill a padded batch, then one token per step: the logits of the packed forward over it all."""
    model = build()
    ids, mask = padded(prompts(), side)
    extra = torch.randint(0, PAD, (ids.shape[0], 12), generator=torch.Generator().manual_seed(9))
    full_ids = torch.cat([ids, extra], dim=1)
    full_mask = torch.cat([mask, torch.ones_like(extra)], dim=1)
    cache = BMojoCache(5)
    with torch.no_grad():
        full = model(full_ids, attention_mask=full_mask, use_cache=False).logits
        steps = [model(ids, attention_mask=mask, cache=cache, use_cache=True).logits]
        for t in range(extra.shape[1]):
            width = ids.shape[1] + t + 1
            steps.append(model(full_ids[:, width - 1:width], attention_mask=full_mask[:, :width], cache=cache).logits)
    real = full_mask == 1
    torch.testing.assert_close(torch.cat(steps, dim=1)[real], full[real], rtol=0, atol=1e-4)
    assert cache.get_seq_length() == full_ids.shape[1]


def test_rows_of_equal_length_share_a_batched_cache_and_reorder_like_beams():
    model = build()
    rows = prompts((19, 7, 19))
    ids, mask = padded(rows, "left")
    cache = BMojoCache(5)
    with torch.no_grad():
        model(ids, attention_mask=mask, cache=cache)
        assert sorted(g.rows for g in cache.groups) == [[0, 2], [1]]
        sources = [2, 2, 1]  # new rows 0 and 1 both continue old row 2: they must not share state
        cache.reorder_cache(torch.tensor(sources))
        assert sorted(g.rows for g in cache.groups) == [[0, 1], [2]]
        new = torch.tensor([[5, 8], [6, 9], [7, 10]])
        step_mask = torch.cat([mask[sources], torch.ones(3, 1, dtype=torch.long)], dim=1)
        first = model(new[:, :1], attention_mask=step_mask, cache=cache).logits[:, -1]
        second = model(new[:, 1:], attention_mask=torch.cat([step_mask, step_mask[:, -1:]], 1), cache=cache).logits
        for i, src in enumerate(sources):
            alone = model(torch.cat([rows[src], new[i]])[None], use_cache=False).logits[0]
            torch.testing.assert_close(first[i], alone[-2], rtol=0, atol=1e-4)
            torch.testing.assert_close(second[i, -1], alone[-1], rtol=0, atol=1e-4)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_greedy_generate_equals_each_prompt_alone(side):
    model = build()
    rows = prompts()
    ids, mask = padded(rows, side)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    for b, row in enumerate(rows):
        alone = model.generate(row[None], max_new_tokens=8, do_sample=False)
        assert out[b, ids.shape[1]:].tolist() == alone[0, len(row):].tolist()


def test_padded_generate_stops_each_row_at_eos_as_alone():
    """A row that emits eos stops there and gets pad ids after it, while its neighbours (in other row
    groups of the cache) go on: each row's tokens are those it generates alone."""
    model = build()
    rows = prompts()
    eos = int(model.generate(rows[1][None], max_new_tokens=2, do_sample=False)[0, -1])  # row 1's second token
    options = dict(max_new_tokens=8, do_sample=False, eos_token_id=eos, pad_token_id=PAD)
    ids, mask = padded(rows, "left")
    out = model.generate(ids, attention_mask=mask, **options)[:, ids.shape[1]:]
    lengths = []
    for b, row in enumerate(rows):
        alone = model.generate(row[None], **options)[0, len(row):].tolist()
        lengths.append(len(alone))
        assert out[b].tolist() == alone + [PAD] * (out.shape[1] - len(alone))
    assert min(lengths) == 2 and max(lengths) == 8  # one row stopped early, another ran to max_new_tokens


def test_padded_generate_from_inputs_embeds_equals_from_ids():
    model = build()
    ids, mask = padded(prompts(), "left")
    from_ids = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    embeds = model.get_input_embeddings()(ids)
    from_embeds = model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=5, do_sample=False)
    assert torch.equal(from_embeds, from_ids[:, ids.shape[1]:])


def test_padded_generate_without_cache_equals_with_cache():
    model = build()
    ids, mask = padded(prompts(), "left")
    with_cache = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    without = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, use_cache=False)
    assert torch.equal(with_cache, without)


def test_padded_beam_search_equals_each_prompt_alone():
    model = build()
    rows = prompts()
    ids, mask = padded(rows, "left")
    options = dict(max_new_tokens=6, num_beams=3, num_return_sequences=2, do_sample=False)
    out = model.generate(ids, attention_mask=mask, **options)
    for b, row in enumerate(rows):
        alone = model.generate(row[None], **options)
        assert out[2 * b: 2 * b + 2, ids.shape[1]:].tolist() == alone[:, len(row):].tolist()


def test_padded_sampling_scores_equal_each_sequence_alone():
    """Sampling draws differ with the batch, so check each step's logits against the drawn sequence alone."""
    model = build()
    rows = prompts()
    ids, mask = padded(rows, "left")
    torch.manual_seed(0)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=True, top_k=0,
                         return_dict_in_generate=True, output_logits=True)
    logits = torch.stack(out.logits, dim=1)  # (batch, new tokens, vocab)
    with torch.no_grad():
        for b, row in enumerate(rows):
            sequence = torch.cat([row, out.sequences[b, ids.shape[1]:]])[None]
            alone = model(sequence, use_cache=False).logits[0, len(row) - 1:-1]
            torch.testing.assert_close(logits[b], alone, rtol=0, atol=1e-4)


def test_a_pad_id_inside_a_prompt_is_removed_like_hf_attention_models():
    """generate builds the mask from the pad id (pad != eos): the prompt behaves as without that token."""
    model = build()
    row = prompts()[1]
    with_pad = torch.cat([row[:6], torch.tensor([PAD]), row[6:]])[None]
    out = model.generate(with_pad, max_new_tokens=6, do_sample=False)
    alone = model.generate(row[None], max_new_tokens=6, do_sample=False)
    assert out[0, with_pad.shape[1]:].tolist() == alone[0, len(row):].tolist()


def test_pipeline_batch_of_unequal_prompts_equals_one_at_a_time(tmp_path):
    from transformers import pipeline

    from bmojo_neuron.checkpoints.export import export_final

    torch.manual_seed(0)
    model = BMojoForCausalLM(tiny_config(vocab_size=256, num_hidden_layers=2, layer_pattern="BM")).eval()
    final = export_final(tmp_path / "run", model, {"model": {}}, "byte", {})
    generator = pipeline("text-generation", model=str(final))
    texts = ["a short one", "a prompt that is three times as long as that", "mid-sized prompt"]
    options = dict(max_new_tokens=6, do_sample=False, return_full_text=False)
    batched = [r[0]["generated_text"] for r in generator(texts, batch_size=3, **options)]
    alone = [generator(t, **options)[0]["generated_text"] for t in texts]
    assert batched == alone
