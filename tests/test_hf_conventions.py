"""The conventions of transformers' common model tests, checked on B'MOJO with our own tests.

transformers' `ModelTesterMixin`, `GenerationTesterMixin` and `ConfigTester` live in
its repository's ``tests/`` and are not in the installed wheel, so they cannot run
in CI. This module checks the same conventions with tests of our own: the config
(serialisation, defaults, common keyword arguments), the model (save/load, bfloat16 and
``dtype="auto"`` loading, meta-device init, batching, positional arguments,
``output_hidden_states`` and ``use_cache`` from argument or config, ``output_attentions``
refused, tuple outputs, ``inputs_embeds``, ``logits_to_keep``, ``position_ids``, tied and resized
embeddings, training with gradient checkpointing, no dropout, the loss conventions
``shift_labels`` and ``num_items_in_batch``), and `generate` (greedy, sampling, beam
search and beam sampling with and without the cache, dict outputs with scores, logits
and hidden states, ``inputs_embeds``, a continued cache under either name, a cache that
has read the whole prompt refused, ``guidance_scale`` against plain forwards, a
transformers cache refused, eos), and the cache's use (eager steps that read no tensor
back, a module pickled before it kept its decode slots, a cache pickled by an earlier version,
`torch.inference_mode()`). Padding has its own module (test_padding.py).
docs/hf.md lists what B'MOJO does not support and why.
"""

from __future__ import annotations

import copy
import json
import pickle

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModel, AutoModelForCausalLM, GenerationConfig

from bmojo_neuron import BMojoCache, BMojoConfig, BMojoForCausalLM, BMojoModel
from bmojo_neuron.cache_bmojo import AttentionLayerCache

VOCAB, BATCH, LENGTH = 99, 3, 13
NEW_TOKENS = 4


def tester_config(**overrides) -> BMojoConfig:
    """A B'MOJO layer and a Mamba layer; chunks, windows and memory all active within LENGTH tokens."""
    fields = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, layer_pattern="BM", num_attention_heads=4,
                  num_key_value_heads=2, ssm_state_size=8, ssm_head_dim=8, ssm_chunk_size=8, window_size=4,
                  fading_window=3, memory_chunk=3, memory_size=3, memory_picks=2, intermediate_size=48,
                  bos_token_id=VOCAB - 2, eos_token_id=None, pad_token_id=VOCAB - 1)
    fields.update(overrides)
    return BMojoConfig(**fields)


def build(cls=BMojoForCausalLM, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return cls(tester_config(**overrides)).eval()


def ids(batch: int = BATCH, length: int = LENGTH, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB - 2, (batch, length), generator=torch.Generator().manual_seed(seed))  # no bos, no pad


# ----------------------------------------------------------------------------------------- config
def test_config_serialises_and_round_trips(tmp_path):
    config = tester_config(memory_decay=0.25)
    assert BMojoConfig.from_dict(config.to_dict()).to_dict() == config.to_dict()
    assert json.loads(config.to_json_string())["memory_decay"] == 0.25
    config.to_json_file(tmp_path / "c.json")
    assert BMojoConfig.from_json_file(str(tmp_path / "c.json")).to_dict() == config.to_dict()
    config.save_pretrained(tmp_path / "sub" / "dir")
    assert BMojoConfig.from_pretrained(tmp_path / "sub" / "dir").to_dict() == config.to_dict()


def test_config_defaults_and_common_arguments():
    default = BMojoConfig()  # no arguments needed
    assert default.use_cache is True and default.output_hidden_states is False and default.return_dict is True
    for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        assert hasattr(default, name)
    common = dict(return_dict=False, output_hidden_states=True, use_cache=False, tie_word_embeddings=False,
                  num_labels=5, torch_dtype="float32")
    config = tester_config(**common)
    for name, value in common.items():
        if name != "torch_dtype":
            assert getattr(config, name) == value, name
    assert len(config.id2label) == 5
    config.num_labels = 2
    assert len(config.id2label) == 2


def test_model_runs_without_the_special_token_ids():
    config = tester_config()
    fields = config.to_diff_dict()
    for name in ("pad_token_id", "eos_token_id", "bos_token_id", "tie_word_embeddings"):
        fields.pop(name, None)
    model = BMojoForCausalLM(BMojoConfig(**fields)).eval()
    assert model(ids()).logits.shape == (BATCH, LENGTH, VOCAB)


# ----------------------------------------------------------------------------------------- model
def test_save_load_gives_the_same_outputs(tmp_path):
    for cls in (BMojoModel, BMojoForCausalLM):
        model = build(cls)
        with torch.no_grad():
            before = model(ids())[0]
        model.save_pretrained(tmp_path / cls.__name__)
        assert (tmp_path / cls.__name__ / "generation_config.json").is_file() == model.can_generate()
        loaded = cls.from_pretrained(tmp_path / cls.__name__).eval()
        with torch.no_grad():
            torch.testing.assert_close(loaded(ids())[0], before, rtol=0, atol=1e-6)
        rebuilt = cls.from_pretrained(None, config=model.config, state_dict=model.state_dict())
        assert all(torch.equal(a, b) for a, b in zip(model.parameters(), rebuilt.parameters()))


def test_weights_move_between_the_base_model_and_the_lm_head_model(tmp_path):
    causal = build(BMojoForCausalLM)
    causal.save_pretrained(tmp_path / "causal")
    base = AutoModel.from_pretrained(tmp_path / "causal").eval()
    assert isinstance(base, BMojoModel)
    with torch.no_grad():
        torch.testing.assert_close(base(ids()).last_hidden_state, causal.model(ids()).last_hidden_state, rtol=0, atol=0)
    base.save_pretrained(tmp_path / "base")
    causal_again = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    assert torch.equal(causal_again.model.embed_tokens.weight, base.embed_tokens.weight)
    assert causal_again.lm_head.weight is causal_again.model.embed_tokens.weight  # tied, so nothing is missing


def test_deterministic_and_batch_rows_independent():
    model = build()
    batch = ids(batch=4)
    with torch.no_grad():
        first, second = model(batch).logits, model(batch).logits
        rows = torch.cat([model(batch[i : i + 1]).logits for i in range(4)])
    assert torch.equal(first, second)
    torch.testing.assert_close(first, rows, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cls", [BMojoModel, BMojoForCausalLM])
def test_output_hidden_states_from_argument_and_config(cls):
    model = build(cls)
    with torch.no_grad():
        out = model(ids(), output_hidden_states=True)
        assert model(ids()).hidden_states is None
        model.config.output_hidden_states = True
        from_config = model(ids())
    states = out.hidden_states
    assert len(states) == model.config.num_hidden_layers + 1
    assert all(s.shape == (BATCH, LENGTH, 32) for s in states)
    torch.testing.assert_close(states[0], (model.model if cls is BMojoForCausalLM else model).embed_tokens(ids()))
    if cls is BMojoModel:
        assert torch.equal(states[-1], out.last_hidden_state)  # the last one after the final norm
    assert all(torch.equal(a, b) for a, b in zip(states, from_config.hidden_states))


def test_hidden_states_keep_their_gradients():
    model = build().train()
    out = model(ids(), output_hidden_states=True)
    out.hidden_states[0].retain_grad()
    out.logits.sum().backward()
    assert out.hidden_states[0].grad is not None and out.hidden_states[0].grad.abs().sum() > 0


def test_use_cache_from_argument_config_and_mode():
    model = build()
    with torch.no_grad():
        assert isinstance(model(ids()).cache, BMojoCache)  # config.use_cache, eval mode
        assert model(ids(), use_cache=False).cache is None
        model.config.use_cache = False
        assert model(ids()).cache is None
        assert isinstance(model(ids(), use_cache=True).cache, BMojoCache)
        model.config.use_cache = True
        model.train()
        assert model(ids()).cache is None  # never while training


def test_tuple_outputs_equal_dict_outputs():
    model = build()
    labels = ids(seed=2)
    with torch.no_grad():
        for extra in ({}, {"labels": labels}, {"output_hidden_states": True, "labels": labels}):
            as_dict = model(ids(), return_dict=True, use_cache=False, **extra).to_tuple()
            as_tuple = model(ids(), return_dict=False, use_cache=False, **extra)
            assert len(as_dict) == len(as_tuple)
            for a, b in zip(as_dict, as_tuple):
                for x, y in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
                    assert torch.equal(x, y)
        model.config.return_dict = False
        assert isinstance(model(ids()), tuple)
        if "labels" in extra:
            assert model(ids(), labels=labels, use_cache=False)[0].dim() == 0  # the loss first


def test_inputs_embeds_match_input_ids():
    model = build()
    with torch.no_grad():
        torch.testing.assert_close(model(inputs_embeds=model.get_input_embeddings()(ids())).logits,
                                   model(ids()).logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match="exactly one"):
        model(input_ids=ids(), inputs_embeds=model.get_input_embeddings()(ids()))


def test_base_model_takes_the_mask_second_like_the_causal_lm():
    """transformers' decoder models take ``(input_ids, attention_mask, ...)`` positionally; so do both classes."""
    mask = torch.ones(BATCH, LENGTH, dtype=torch.long)
    mask[0, :4] = 0
    for cls in (BMojoModel, BMojoForCausalLM):
        model = build(cls)
        with torch.no_grad():
            assert torch.equal(model(ids(), mask)[0], model(input_ids=ids(), attention_mask=mask)[0]), cls.__name__


@pytest.mark.parametrize("cls", [BMojoModel, BMojoForCausalLM])
def test_output_attentions_is_refused_with_a_clear_error(cls):
    """No attention weights exist to return: asked for (argument or config), the model says so instead of
    returning outputs without ``attentions`` (on which `generate` would fail with an AttributeError)."""
    model = build(cls)
    with torch.no_grad():
        assert model(ids(), output_attentions=False)[0].shape[:2] == (BATCH, LENGTH)
        with pytest.raises(ValueError, match="output_attentions is not supported"):
            model(ids(), output_attentions=True)
        model.config.output_attentions = True
        with pytest.raises(ValueError, match="output_attentions is not supported"):
            model(ids())
    if cls is BMojoForCausalLM:
        model.config.output_attentions = False
        with pytest.raises(ValueError, match="output_attentions is not supported"):
            model.generate(ids(), max_new_tokens=2, output_attentions=True, return_dict_in_generate=True)


def test_logits_to_keep_gives_the_positions_asked_for():
    """As transformers' causal LMs: an int keeps the last positions (0: all), a 1-D tensor the same positions of
    every row, a 2-D integer tensor positions per row, a 2-D boolean mask its positions, flattened."""
    model = build()
    mask = torch.zeros(BATCH, LENGTH, dtype=torch.bool)
    mask[0, [1, 4]] = mask[2, 12] = True
    per_row = torch.tensor([[0, 12], [5, 5], [3, 1]])
    with torch.no_grad():
        full = model(ids(), use_cache=False).logits
        expected = {1: full[:, -1:], 5: full[:, -5:], 0: full, torch.tensor([2, 0, 7]): full[:, [2, 0, 7]],
                    per_row: torch.stack([full[b, per_row[b]] for b in range(BATCH)]), mask: full[mask]}
        for keep, logits in expected.items():
            torch.testing.assert_close(model(ids(), logits_to_keep=keep, use_cache=False).logits, logits,
                                       rtol=0, atol=1e-6)  # the head over fewer rows: summation order only


def test_position_ids_that_count_up_are_accepted_and_restarting_ones_refused():
    """The model counts positions itself: ids one apart from real token to real token (a plain range, or
    transformers' ids for a left-padded batch, pads set to 1) change nothing; ids that restart inside a row (packed
    documents) are refused before any work, on both classes."""
    model = build()
    mask = torch.ones(BATCH, LENGTH, dtype=torch.long)
    mask[0, :4] = mask[1, :1] = 0
    left_padded = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    packed = torch.cat([torch.arange(5), torch.arange(LENGTH - 5)])[None]
    with torch.no_grad():
        for kwargs in ({}, {"attention_mask": mask}):
            plain = model(ids(), use_cache=False, **kwargs).logits
            given = left_padded if kwargs else torch.arange(LENGTH)[None] + 3
            torch.testing.assert_close(model(ids(), use_cache=False, position_ids=given, **kwargs).logits, plain,
                                       rtol=0, atol=0)
        for cls in (BMojoForCausalLM, BMojoModel):
            with pytest.raises(ValueError, match="position_ids must count up by one.*packed documents"):
                build(cls)(ids(), use_cache=False, position_ids=packed)


def test_no_dropout_so_training_mode_gives_the_eval_outputs():
    """The config has no dropout (docs/hf.md): train() changes what is cached, not the numbers."""
    model = build()
    assert not any(isinstance(m, torch.nn.Dropout) for m in model.modules())
    with torch.no_grad():
        evaluated = model(ids(), labels=ids(seed=2))
        model.train()
        trained = model(ids(), labels=ids(seed=2))
    assert torch.equal(trained.logits, evaluated.logits) and torch.equal(trained.loss, evaluated.loss)


def test_from_pretrained_in_bfloat16_and_auto_dtype(tmp_path):
    model = build()
    model.save_pretrained(tmp_path / "fp32")
    with torch.no_grad():
        reference = model(ids()).logits
    for option in (dict(torch_dtype=torch.bfloat16), dict(dtype=torch.bfloat16)):  # the old name and the new
        half = BMojoForCausalLM.from_pretrained(tmp_path / "fp32", **option)
        assert half.dtype == torch.bfloat16 and all(p.dtype == torch.bfloat16 for p in half.parameters())
        assert half.lm_head.weight is half.model.embed_tokens.weight
        with torch.no_grad():
            logits = half(ids()).logits
        assert logits.dtype == torch.float32  # the head's output is promoted for the loss and sampling
        torch.testing.assert_close(logits, reference, rtol=0, atol=2e-2)  # bf16 weights: ~3e-3 measured here
    assert BMojoForCausalLM.from_pretrained(tmp_path / "fp32", dtype="auto").dtype == torch.float32
    half.save_pretrained(tmp_path / "bf16")
    auto = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype="auto")
    assert auto.dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.equal(auto(ids()).logits, logits)
    generated = auto.generate(ids(batch=2, length=9), max_new_tokens=NEW_TOKENS, do_sample=False)
    assert torch.equal(generated, auto.generate(ids(batch=2, length=9), max_new_tokens=NEW_TOKENS, do_sample=False,
                                                use_cache=False))  # bf16 decode follows the bf16 forward


def test_meta_device_init_and_low_cpu_mem_usage(tmp_path):
    """Built on the meta device, the model initialises on `to_empty` + `init_weights` like a normal build
    (finite weights, the Mamba init, tied head); loading with ``low_cpu_mem_usage`` gives the saved weights."""
    with torch.device("meta"):
        empty = BMojoForCausalLM(tester_config())
    assert all(p.is_meta for p in empty.parameters())
    empty.to_empty(device="cpu")
    empty.init_weights()
    for name, param in empty.named_parameters():
        assert torch.isfinite(param).all(), name
        if name.endswith("mixer.D"):
            assert torch.equal(param, torch.ones_like(param)), name
    assert empty.lm_head.weight is empty.model.embed_tokens.weight
    model = build()
    model.save_pretrained(tmp_path)
    loaded = BMojoForCausalLM.from_pretrained(tmp_path, low_cpu_mem_usage=True)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


def test_tied_embeddings_and_resizing():
    model = build()
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    for size in (VOCAB + 10, VOCAB - 9):
        model.resize_token_embeddings(size)
        assert model.config.vocab_size == size
        assert model.get_input_embeddings().weight.shape[0] == size
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
        assert model(ids() % size).logits.shape == (BATCH, LENGTH, size)
    untied = build(tie_word_embeddings=False)
    untied.resize_token_embeddings(VOCAB + 5)
    assert untied.get_output_embeddings().weight.shape == (VOCAB + 5, 32)
    assert untied.get_output_embeddings().weight is not untied.get_input_embeddings().weight


@pytest.mark.parametrize("tied", [True, False])
def test_resized_embeddings_keep_their_rows_and_save_and_load(tmp_path, tied):
    model = build(tie_word_embeddings=tied)
    old_in = model.get_input_embeddings().weight.detach().clone()
    old_out = model.get_output_embeddings().weight.detach().clone()
    model.resize_token_embeddings(VOCAB + 3, pad_to_multiple_of=16)
    size = 112  # VOCAB + 3 rounded up to a multiple of 16
    assert model.config.vocab_size == size and model.get_input_embeddings().weight.shape == (size, 32)
    assert model.get_output_embeddings().weight.shape == (size, 32)
    assert torch.equal(model.get_input_embeddings().weight[:VOCAB], old_in)
    assert torch.equal(model.get_output_embeddings().weight[:VOCAB], old_out)
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied
    model.save_pretrained(tmp_path)
    loaded = BMojoForCausalLM.from_pretrained(tmp_path)
    assert (loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight) == tied
    big = ids() % (size - VOCAB) + VOCAB  # new token ids only
    with torch.no_grad():
        torch.testing.assert_close(loaded(big).logits, model(big).logits, rtol=0, atol=0)


def test_set_input_embeddings_and_tie_weights():
    model = build()
    new = torch.nn.Embedding(VOCAB, 32)
    model.set_input_embeddings(new)
    assert model.get_input_embeddings() is new and model.model.embed_tokens is new
    model.tie_weights()
    assert model.get_output_embeddings().weight is new.weight
    untied = build(tie_word_embeddings=False)
    head = torch.nn.Linear(32, VOCAB, bias=False)
    untied.set_output_embeddings(head)
    untied.tie_weights()  # untied by the config: tie_weights leaves the head alone
    assert untied.get_output_embeddings() is head and head.weight is not untied.get_input_embeddings().weight


def test_missing_weights_are_initialised_on_load(tmp_path):
    model = build()
    state = {k: v for k, v in model.state_dict().items() if "layers.1." not in k}
    loaded = BMojoForCausalLM.from_pretrained(None, config=model.config, state_dict=state)
    for name, param in loaded.named_parameters():
        assert torch.isfinite(param).all(), name
        if "layers.1.mixer" in name and name.endswith("D"):
            assert torch.equal(param, torch.ones_like(param))  # the Mamba init, not left empty


@pytest.mark.parametrize("kwargs", [None, {"use_reentrant": True}, {"use_reentrant": False}])
def test_training_and_gradient_checkpointing_give_the_same_gradients(kwargs):
    """The same gradients, and the layers really are replayed in the backward pass (each runs twice)."""
    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        model = build().train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
            assert model.is_gradient_checkpointing
        runs = []
        for layer in model.model.layers:
            layer.mixer.register_forward_hook(lambda *_: runs.append(1))
        model(ids(), labels=ids(seed=2)).loss.backward()
        assert len(runs) == model.config.num_hidden_layers * (2 if checkpointing else 1)
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys() and len(plain) > 10
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)


# ----------------------------------------------------------------------------------------- losses
def test_loss_uses_shift_labels_when_given():
    model = build()
    labels = ids(seed=2)
    with torch.no_grad():
        logits = model(ids()).logits
        aligned = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
        plain = model(ids(), labels=labels)
        shifted = model(ids(), shift_labels=aligned)
        torch.testing.assert_close(shifted.lm_loss, plain.lm_loss)  # fp32 defaults: the sums run over different shapes
        other = logits.argmin(-1)  # the least likely tokens: a loss that must be higher
        moved = model(ids(), labels=labels, shift_labels=other)
        assert moved.lm_loss > plain.lm_loss
        torch.testing.assert_close(model(ids(), labels=labels.flip(0), shift_labels=other).lm_loss, moved.lm_loss)
        expected = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), other.reshape(-1))
        torch.testing.assert_close(moved.lm_loss, expected)


def test_num_items_in_batch_makes_accumulated_micro_batches_equal_the_batch():
    """`Trainer` under gradient accumulation passes the batch's target count and does not average
    the micro-batch losses: their LM losses must sum to the whole batch's, and each innovation loss
    is its micro-batch's mean weighted by its share of the targets (docs/hf.md)."""
    model = build().train()
    batch, labels = ids(batch=4), ids(batch=4, seed=2)
    labels[0, :9] = -100  # unequal target counts per micro-batch
    whole = model(batch, labels=labels)
    count = (labels[:, 1:] != -100).sum()
    parts = [model(batch[s], labels=labels[s], num_items_in_batch=count) for s in (slice(0, 2), slice(2, 4))]
    torch.testing.assert_close(sum(p.lm_loss for p in parts), whole.lm_loss, rtol=1e-6, atol=1e-6)
    for p in parts:
        torch.testing.assert_close(p.loss, p.lm_loss + p.aux_loss)
    # each micro-batch's innovation term is weighted by its share of the targets
    n0 = (labels[:2, 1:] != -100).sum()
    torch.testing.assert_close(parts[0].aux_loss, model(batch[:2], labels=labels[:2]).aux_loss * n0 / count)


def test_trainer_gradient_accumulation_equals_one_big_batch(tmp_path):
    """`Trainer` hands `num_items_in_batch` to models that take ``**kwargs``: two accumulated
    micro-batches of 2 give the gradient of one batch of 4 (target counts differ per row)."""
    from datasets import Dataset
    from transformers import Trainer, TrainerCallback, TrainingArguments

    labels = ids(batch=8, seed=2)
    labels[::3, : LENGTH // 2] = -100  # rows 0 and 3 of the batch of 4: each micro-batch has one, so equal
    # real tokens per target and the innovation loss's gradient matches too (docs/hf.md)
    data = Dataset.from_dict({"input_ids": ids(batch=8).tolist(), "labels": labels.tolist()})

    class FirstGradients(TrainerCallback):
        grads: dict[str, torch.Tensor] = {}

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            if not self.grads:
                self.grads.update({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})

    def first_gradients(batch_size: int, accumulation: int) -> dict[str, torch.Tensor]:
        args = TrainingArguments(output_dir=str(tmp_path / f"run{accumulation}"), per_device_train_batch_size=batch_size,
                                 gradient_accumulation_steps=accumulation, max_steps=1, max_grad_norm=0.0,
                                 report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, seed=3)
        callback = FirstGradients()
        callback.grads = {}
        trainer = Trainer(model=build().train(), args=args, train_dataset=data, callbacks=[callback])
        assert trainer.model_accepts_loss_kwargs
        trainer.train()
        return callback.grads

    whole, accumulated = first_gradients(4, 1), first_gradients(2, 2)
    assert whole.keys() == accumulated.keys() and len(whole) > 10
    for name in whole:
        torch.testing.assert_close(accumulated[name], whole[name], rtol=1e-4, atol=1e-6, msg=name)


def test_trainer_evaluate_reports_the_loss_and_predict_gives_the_logits(tmp_path):
    """`Trainer` takes every forward argument with "label" in its name for a label it needs in each
    evaluation batch, and returns every output but the ignored keys as predictions."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments
    from transformers.utils import find_labels

    assert find_labels(BMojoForCausalLM) == ["labels"]
    batch, labels = ids(batch=4), ids(batch=4, seed=2)
    data = Dataset.from_dict({"input_ids": batch.tolist(), "labels": labels.tolist()})
    model = build()
    args = TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=4, report_to=[], use_cpu=True,
                             disable_tqdm=True)
    trainer = Trainer(model=model, args=args, eval_dataset=data)
    with torch.no_grad():
        expected = model(batch, labels=labels)
    metrics = trainer.evaluate()
    assert metrics["eval_loss"] == pytest.approx(expected.loss.item(), rel=1e-5)
    predicted = trainer.predict(data)
    assert predicted.label_ids is not None
    torch.testing.assert_close(torch.as_tensor(predicted.predictions), expected.logits, rtol=1e-5, atol=1e-5)


def test_gradient_checkpointing_in_training_keeps_no_cache():
    """The backward pass replays each checkpointed layer; a recurrent cache advanced in the
    forward would be advanced again, so none is kept and a given one is refused."""
    model = build().train()
    model.gradient_checkpointing_enable()
    out = model(ids(), labels=ids(seed=2), use_cache=True)
    assert out.cache is None
    out.loss.backward()
    prefix = build()(ids()[:, :8], use_cache=True).cache
    with pytest.raises(ValueError, match="gradient checkpointing"):
        model(ids()[:, 8:], cache=prefix, labels=ids(seed=2)[:, 8:])
    with torch.no_grad():  # no backward, nothing replayed: the cache continues as in eval mode
        continued = model(ids()[:, 8:], cache=prefix).logits
        torch.testing.assert_close(continued, build()(ids()).logits[:, 8:], rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------- generate
MODES = {
    "greedy": dict(do_sample=False, num_beams=1),
    "sample": dict(do_sample=True, num_beams=1, top_k=10, top_p=0.7, temperature=0.7),
    "beam": dict(do_sample=False, num_beams=2, length_penalty=2.0, early_stopping=False),
    "beam_sample": dict(do_sample=True, num_beams=2, length_penalty=2.0, early_stopping=False),
}


def _generate(model, mode: str, use_cache: bool, **kwargs):
    torch.manual_seed(0)
    return model.generate(ids(batch=2, length=9), max_new_tokens=NEW_TOKENS, use_cache=use_cache,
                          return_dict_in_generate=True, output_scores=True, output_logits=True,
                          output_hidden_states=True, repetition_penalty=1.2, **MODES[mode], **kwargs)


@pytest.mark.parametrize("mode", list(MODES))
def test_generate_dict_outputs_with_and_without_cache(mode):
    model = build()
    with_cache, without = _generate(model, mode, True), _generate(model, mode, False)
    for out in (with_cache, without):
        beams = MODES[mode]["num_beams"]
        assert out.sequences.shape == (2, 9 + NEW_TOKENS)
        assert len(out.scores) == len(out.logits) == len(out.hidden_states) == NEW_TOKENS
        assert all(s.shape == (2 * beams, VOCAB) for s in out.scores)
        for step, per_layer in enumerate(out.hidden_states):
            assert len(per_layer) == model.config.num_hidden_layers + 1
            # with the cache each step sees only its new token; without it, the whole sequence so far
            fed = (9 if step == 0 else 1) if out is with_cache else 9 + step
            assert all(h.shape == (2 * beams, fed, 32) for h in per_layer)
    assert torch.equal(with_cache.sequences, without.sequences)
    for a, b in zip(with_cache.scores, without.scores):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_generate_stops_at_eos():
    """A row stops at eos and is filled with the pad id; greedy and beam search (tokens after eos are pads)."""
    model = build()
    prompt = ids(batch=3, length=5)
    free = model.generate(prompt, max_new_tokens=6, do_sample=False)[:, 5:]
    eos = int(free[0, 1])  # row 0's second token
    stopped = model.generate(prompt, max_new_tokens=6, do_sample=False, eos_token_id=eos)[:, 5:]
    for row, full in zip(stopped.tolist(), free.tolist()):
        end = full.index(eos) + 1 if eos in full else len(full)
        assert row[:end] == full[:end] and all(t == VOCAB - 1 for t in row[end:])
    assert len(stopped[0]) > 2 and (stopped[0, 2:] == VOCAB - 1).all()
    beams = model.generate(prompt, max_new_tokens=6, num_beams=3, num_return_sequences=3, do_sample=False,
                           eos_token_id=eos)[:, 5:]
    for row in beams.tolist():
        if eos in row:
            assert all(t == VOCAB - 1 for t in row[row.index(eos) + 1:])


@pytest.mark.parametrize("cls", [BMojoModel, BMojoForCausalLM])
def test_a_cache_continues_under_either_name(cls):
    """``cache`` (transformers >= 5.24's name) or ``past_key_values`` (the older one), on both classes."""
    model = build(cls)
    with torch.no_grad():
        whole = model(ids())[0]
        for name in ("cache", "past_key_values"):
            prefix = model(ids()[:, :8], use_cache=True).cache
            rest = model(ids()[:, 8:], **{name: prefix})[0]
            torch.testing.assert_close(rest, whole[:, 8:], rtol=1e-4, atol=1e-5, msg=name)  # decode == forward


def test_a_transformers_cache_is_refused_with_a_clear_error():
    """transformers' `DynamicCache` has no room for windows and eidetic memory: refused, not half-used."""
    from transformers import DynamicCache

    model = build()
    with pytest.raises(TypeError, match="must be a BMojoCache"):
        model(ids(), cache=DynamicCache())
    with pytest.raises(TypeError, match="must be a BMojoCache"):
        model.model(ids(), past_key_values=DynamicCache())
    with pytest.raises(TypeError, match="must be a BMojoCache"):
        model.generate(ids(), cache=DynamicCache(), max_new_tokens=2)
    assert model.generate(ids(), cache=BMojoCache(2), max_new_tokens=2).shape == (BATCH, LENGTH + 2)


class ScalarReads(TorchDispatchMode):
    """Counts reads of a tensor's value back to the host (`.item()`, `int()`, `bool()`: aten's _local_scalar_dense;
    on CUDA each waits for the device)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


def test_eager_decoding_reads_nothing_back_and_the_host_position_follows_the_cache():
    """Eager steps take the position from the cache's host int, never from its tensor; every cache operation keeps
    the two equal (after static, i.e. compiled-form, steps the int is read back once)."""
    model = build(layer_pattern="BMA", num_hidden_layers=3)
    prompt = ids()
    cache = BMojoCache(3)

    def agree(c: BMojoCache) -> bool:
        return c._host_position == int(c.position)

    with torch.no_grad():
        whole = model(prompt).logits
        model(prompt[:, :6], cache=cache)
        assert agree(cache)
        with ScalarReads() as reads:
            steps = [model(prompt[:, t : t + 1], cache=cache).logits for t in range(6, 10)]
        assert reads.count == 0 and agree(cache)
        torch.testing.assert_close(torch.cat(steps, dim=1), whole[:, 6:10], rtol=1e-4, atol=1e-4)
        cache.reorder_cache(torch.tensor([2, 1, 0]))
        twin = cache.select_rows(torch.tensor([0, 0])).copy()
        assert agree(cache) and agree(twin)
        model.model._decode_token(model.model.embed_tokens(prompt[:2, 10:11]), twin, static=True)
        assert twin._host_position is None and twin.seen_tokens == int(twin.position) == 11 and agree(twin)
        padded = torch.ones(3, 2, dtype=torch.long)
        padded[0, 0] = 0
        model(prompt[:, 10:12], attention_mask=torch.cat([torch.ones(3, 10, dtype=torch.long), padded], 1),
              cache=cache)
        assert agree(cache) and cache.seen_tokens == 12 and all(agree(g.cache) for g in cache.groups)


def test_a_module_pickled_without_its_decode_slots_still_decodes(tmp_path):
    """`torch.save` of a whole model pickles its attention modules' attributes; one saved before they kept
    `decode_slots` gets them on loading, from the sizes it kept, and decodes what the forward gives."""
    model = build()
    del model.model.layers[0].mixer.decode_slots
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    with torch.no_grad():
        whole = loaded(ids()).logits
        cache = loaded(ids()[:, :8], use_cache=True).cache
        steps = [loaded(ids()[:, t : t + 1], cache=cache).logits for t in range(8, LENGTH)]
    torch.testing.assert_close(torch.cat(steps, dim=1), whole[:, 8:], rtol=1e-4, atol=1e-4)


def test_a_cache_pickled_by_an_earlier_version_decodes_or_names_its_layout():
    """A cache pickled before the class kept its host position, inference flag and max_length gets them on loading
    and decodes what the forward gives; so does one pickled now: unpickled inference tensors are ordinary ones, so
    either continues outside inference mode, with its tensors marked static. An older layout (an int position,
    A layers' growing keys) raises one error naming what it holds."""
    model = build(num_hidden_layers=3, layer_pattern="BMA")
    with torch.no_grad():
        whole = model(ids()).logits
    with torch.inference_mode():
        cache = model(ids()[:, :8], use_cache=True).cache
    earlier = object.__new__(BMojoCache)  # the state an earlier version of the class pickled
    new_attributes = ("_host_position", "holds_inference_tensors", "max_length")
    earlier.__dict__.update({k: v for k, v in vars(cache).items() if k not in new_attributes})
    for pickled in (earlier, cache):
        loaded = pickle.loads(pickle.dumps(pickled))
        assert loaded.seen_tokens == 8 and not loaded.holds_inference_tensors and loaded.max_length is None
        assert {getattr(t, "_dynamo_static_input_type", None) for t in loaded.tensors()} == {"unguarded"}
        with torch.no_grad():
            steps = [model(ids()[:, t : t + 1], cache=loaded).logits for t in range(8, LENGTH)]
        torch.testing.assert_close(torch.cat(steps, dim=1), whole[:, 8:], rtol=1e-4, atol=1e-4)
        assert loaded.seen_tokens == LENGTH
    int_position = object.__new__(BMojoCache)
    int_position.__dict__.update(layers=[None] * 3, seen_tokens=8, groups=None)
    with pytest.raises(ValueError, match=r"older bmojo-neuron \(its position an int.*run the prompt"):
        pickle.loads(pickle.dumps(int_position))
    growing_keys = AttentionLayerCache()
    growing_keys.__dict__.update(ctx_k=torch.zeros(1), ctx_v=torch.zeros(1))
    with pytest.raises(ValueError, match=r"older bmojo-neuron \(its layers hold ctx_k, ctx_v\)"):
        pickle.loads(pickle.dumps(growing_keys))


def test_a_cache_filled_under_inference_mode_continues_only_under_it():
    """Inference tensors cannot be written in place outside inference mode: one clear error before any work, and
    under inference mode the cache decodes what the forward gives. transformers' StaticCache fails there too."""
    model = build()
    with torch.no_grad():
        whole = model(ids()).logits
    with torch.inference_mode():
        cache = model(ids()[:, :8], use_cache=True).cache
    with torch.no_grad(), pytest.raises(RuntimeError, match=r"filled under torch.inference_mode\(\).*continue it"):
        model(ids()[:, 8:9], cache=cache)
    twin = cache.copy()  # made outside inference mode: ordinary tensors, which continue there
    with torch.no_grad():
        twin_steps = [model(ids()[:, t : t + 1], cache=twin).logits for t in range(8, LENGTH)]
    with torch.inference_mode():
        steps = [model(ids()[:, t : t + 1], cache=cache).logits for t in range(8, LENGTH)]
    for decoded in (steps, twin_steps):
        torch.testing.assert_close(torch.cat(decoded, dim=1), whole[:, 8:], rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        normal = model(ids()[:, :8], use_cache=True).cache
    with torch.inference_mode():
        model(ids()[:, 8:9], cache=normal)  # a cache filled outside continues inside (an in-place write is allowed)


def test_generate_returns_several_sequences_per_prompt():
    model = build()
    torch.manual_seed(0)
    sampled = model.generate(ids(batch=2, length=5), max_new_tokens=3, do_sample=True, num_return_sequences=3)
    beams = model.generate(ids(batch=2, length=5), max_new_tokens=3, num_beams=3, num_return_sequences=2)
    assert sampled.shape == (6, 8) and beams.shape == (4, 8)


def test_generate_from_inputs_embeds_matches_input_ids():
    model = build()
    prompt = ids(batch=2, length=7)
    from_ids = model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False)
    from_embeds = model.generate(inputs_embeds=model.get_input_embeddings()(prompt), max_new_tokens=NEW_TOKENS,
                                 do_sample=False)
    assert torch.equal(from_embeds, from_ids[:, 7:])  # only the new tokens, as transformers returns them
    with pytest.raises(ValueError, match="use_cache=True"):  # transformers 5.24 turns the cache on itself
        model.prepare_inputs_for_generation(prompt[:, :0], inputs_embeds=model.get_input_embeddings()(prompt),
                                            use_cache=False)


def test_generate_continues_a_cache():
    """A cache filled by a forward, or returned by an earlier `generate` (its `cache`: the prompt and every new
    token but the last read), continues as one longer generation would."""
    model = build()
    prompt = ids(batch=2, length=10)
    full = model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False)
    with torch.no_grad():
        cache = model(prompt[:, :7], use_cache=True).cache
    continued = model.generate(prompt, cache=cache, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert torch.equal(continued, full)
    first = model.generate(prompt, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
    assert first.cache.seen_tokens == 11
    second = model.generate(first.sequences, cache=first.cache, max_new_tokens=NEW_TOKENS - 2, do_sample=False)
    assert torch.equal(second, full)


def _last_logits(model, sequence: torch.Tensor) -> torch.Tensor:
    """Logits of the last position of one row, by a plain forward without a cache."""
    with torch.no_grad():
        return model(sequence[None], use_cache=False).logits[0, -1]


def test_generate_from_a_cache_that_holds_the_whole_prompt_is_refused():
    """A cache that has read the whole prompt (or more) has nothing left to read for the first new token, whose
    logits are the prompt's last token's: `generate` refuses before any work (transformers 5.25 would read the
    prompt a second time on top of the cache). The way that works, the cache filled with all but the last prompt
    token, gives at every step the logits of a plain forward over the sequence so far."""
    model = build()
    prompt = ids(batch=2, length=10)
    with torch.no_grad():
        whole = model(prompt, use_cache=True).cache
    for kwargs in ({"input_ids": prompt}, {"input_ids": prompt, "attention_mask": torch.ones_like(prompt)},
                   {"inputs_embeds": model.get_input_embeddings()(prompt).detach()}, {"input_ids": prompt[:, 7:]}):
        with pytest.raises(ValueError, match="no prompt token is left to read.*all but the prompt's last token"):
            model.generate(**kwargs, cache=whole, max_new_tokens=2, do_sample=False)
        assert whole.seen_tokens == 10
    with torch.no_grad():
        cache = model(prompt[:, :-1], use_cache=True).cache
    out = model.generate(prompt, cache=cache, max_new_tokens=3, do_sample=False, output_scores=True,
                         return_dict_in_generate=True)
    for step, scores in enumerate(out.scores):
        for row in range(2):
            torch.testing.assert_close(scores[row], _last_logits(model, out.sequences[row, :10 + step]),
                                       rtol=1e-5, atol=1e-5)


def test_guidance_scale_gives_the_scores_of_two_plain_forwards():
    """`guidance_scale` g (transformers 5.25: `UnbatchedClassifierFreeGuidanceLogitsProcessor`,
    src/transformers/generation/logits_process.py) scores g * (c - u) + u, with c and u the log-softmax of the
    conditional logits and of an unconditional pass over the negative prompt (default: the prompt's last token)
    followed by the generated tokens, run on a second cache of the processor's own (or without one). Checked
    greedy against two plain forwards per step, a left-padded negative prompt included."""
    model = build()
    prompt, negative = ids(batch=2, length=9), ids(batch=2, length=5, seed=3)
    negative_mask = torch.ones_like(negative)
    negative_mask[0, :2] = 0
    padded_negative = {"negative_prompt_ids": negative, "negative_prompt_attention_mask": negative_mask}
    scale = 1.7
    cases = [({}, [prompt[0, -1:], prompt[1, -1:]]), (padded_negative, [negative[0, 2:], negative[1]]),
             ({**padded_negative, "use_cache": False}, [negative[0, 2:], negative[1]])]
    for kwargs, unconditional in cases:
        out = model.generate(prompt, max_new_tokens=3, do_sample=False, guidance_scale=scale, output_scores=True,
                             return_dict_in_generate=True, **kwargs)
        for step, scores in enumerate(out.scores):
            for row in range(2):
                new = out.sequences[row, 9:9 + step]
                c = _last_logits(model, torch.cat([prompt[row], new])).log_softmax(-1)
                u = _last_logits(model, torch.cat([unconditional[row], new])).log_softmax(-1)
                expected = scale * (c - u) + u
                torch.testing.assert_close(scores[row], expected, rtol=1e-5, atol=1e-5)
                assert out.sequences[row, 9 + step] == expected.argmax()


def test_generate_prefills_in_chunks_as_in_one_piece():
    """`prefill_chunk_size`: transformers feeds the prompt chunk by chunk into the cache; the tokens equal a
    one-piece prefill's, left-padded rows included. A cache that already holds tokens is refused (its first chunk
    would be taken for the whole sequence)."""
    model = build()
    prompt = ids(batch=2, length=11)
    mask = torch.ones_like(prompt)
    mask[0, :3] = 0
    for kwargs in ({}, {"attention_mask": mask}):
        whole = model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, **kwargs)
        chunked = model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, prefill_chunk_size=4, **kwargs)
        assert torch.equal(chunked, whole)
    with torch.no_grad():
        cache = model(prompt[:, :2], use_cache=True).cache
    with pytest.raises(ValueError, match="prefill_chunk_size starts from an empty cache"):
        model.generate(prompt, cache=cache, max_new_tokens=1, prefill_chunk_size=4)


def test_generate_without_a_prompt_starts_from_bos():
    model = build()
    out = model.generate(max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 4) and out[0, 0] == VOCAB - 2


def test_generation_config_comes_from_the_model_config():
    model = build(eos_token_id=5)
    assert model.generation_config.eos_token_id == 5 and model.generation_config.pad_token_id == VOCAB - 1
    assert isinstance(model.generation_config, GenerationConfig)


def test_declarations_for_generate():
    """Stateful: transformers keeps assisted decoding away; compilable: the decode step is one static graph
    (tests/test_compiled_decode.py), compiled by `generate` only with a compile_config (docs/hf.md)."""
    assert BMojoForCausalLM._is_stateful and BMojoForCausalLM._can_compile_fullgraph
    assert BMojoCache.is_compileable is True
    with pytest.raises(ValueError, match="max_length"):
        BMojoCache(2, max_length=0)
    model = build()
    with pytest.raises(ValueError):
        model.generate(ids(batch=1, length=5), max_new_tokens=2, assistant_model=copy.deepcopy(model))
    with pytest.raises(ValueError):
        model.generate(ids(batch=1, length=5), max_new_tokens=2, prompt_lookup_num_tokens=2)
