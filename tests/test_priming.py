"""Priming: a B'MOJO model initialised from tiny Llama / Mistral / Qwen2 / Qwen3 checkpoints built here.

The sources are Hugging Face models built from configs with random weights (std 0.2,
so attention is far from uniform and a mis-mapped weight shows), saved to a temporary
folder: nothing is downloaded. Logits are compared in float32 as
``max |primed - source| / max |source|``.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import (
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from bmojo_neuron.cli import main
from bmojo_neuron.priming import expand_pattern, prime_model
from bmojo_neuron.priming.compare import relative_difference
from bmojo_neuron.checkpoints.inference import load_trained

VOCAB, LENGTH = 96, 48
TOLERANCE = 1e-5
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
SOURCES = {
    # GQA everywhere; each family adds what is particular to it
    "llama-llama3-rope-bias": (LlamaConfig, LlamaForCausalLM,  # (transformers adds keys to the dict it gets)
                               dict(rope_theta=500000.0, rope_scaling=dict(LLAMA3_ROPE), attention_bias=True)),
    "llama-linear-rope-tied": (LlamaConfig, LlamaForCausalLM,
                               dict(rope_scaling={"rope_type": "linear", "factor": 4.0}, tie_word_embeddings=True)),
    "mistral": (MistralConfig, MistralForCausalLM, dict(sliding_window=None, rope_theta=1e6)),
    "qwen2-qkv-bias": (Qwen2Config, Qwen2ForCausalLM, dict(tie_word_embeddings=True)),
    "qwen3-qk-norm": (Qwen3Config, Qwen3ForCausalLM, dict(head_dim=32)),  # head_dim != hidden / heads
}


def build_source(path, name: str, **overrides):
    """Save a random-weight source model of family `name` to `path`; returns the model (eval, float32)."""
    config_cls, model_cls, extra = SOURCES[name]
    torch.manual_seed(0)
    model = model_cls(config_cls(**{**COMMON, **extra, **overrides})).eval()
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            param.normal_(1.0 if "norm" in param_name else 0.0, 0.2)
    model.save_pretrained(str(path))
    return model


def source_logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def random_ids(length: int = LENGTH, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list(SOURCES))
def test_all_attention_pattern_equals_source(tmp_path, name):
    source = build_source(tmp_path, name)
    ids = random_ids()
    primed = prime_model(tmp_path, "A")
    assert primed.report["initialised"] == 0 and primed.report["seeded_from_source"] == 0
    with torch.no_grad():
        difference = relative_difference(source_logits(source, ids), primed.model(ids).logits)
    assert difference <= TOLERANCE


B_F_OPTIONS = dict(window_size=LENGTH, fading_window=16, memory_chunk=16, memory_size=4, memory_picks=2,
                   ssm_chunk_size=16)


@pytest.mark.parametrize("name", ["llama-llama3-rope-bias", "qwen2-qkv-bias", "qwen3-qk-norm"])
@pytest.mark.parametrize("paths", ["on", "off"])
def test_bmojo_layers_with_window_covering_the_sequence_equal_source(tmp_path, name, paths):
    """A B or F layer whose window holds the whole sequence is full attention: no fading key or memory slot
    is visible, whether those paths exist ("on") or are switched off (fading_window=0, memory_size=0)."""
    source = build_source(tmp_path, name)
    ids = random_ids()
    options = dict(B_F_OPTIONS) if paths == "on" else dict(window_size=LENGTH, fading_window=0, memory_size=0)
    primed = prime_model(tmp_path, "BF", options)
    with torch.no_grad():
        difference = relative_difference(source_logits(source, ids), primed.model(ids).logits)
        shorter = dict(options, window_size=8)
        narrow = prime_model(tmp_path, "BF", shorter).model(ids).logits
    assert difference <= TOLERANCE
    assert relative_difference(source_logits(source, ids), narrow) > 1e-2  # the window does matter


def test_sliding_window_source_equals_swa_layers(tmp_path):
    """Mistral with a 12-token sliding window: 'S' layers (window_size defaults to the source's) reproduce it."""
    source = build_source(tmp_path, "mistral", sliding_window=12)
    ids = random_ids()
    primed = prime_model(tmp_path, "S")
    assert primed.model.config.window_size == 12
    with torch.no_grad():
        assert relative_difference(source_logits(source, ids), primed.model(ids).logits) <= TOLERANCE
    notes = prime_model(tmp_path, "A").report["notes"]
    assert len(notes) == 2 and "sliding window" in notes[0]


@pytest.mark.parametrize("name", ["llama-llama3-rope-bias", "qwen3-qk-norm"])
def test_seeded_ssm_is_linear_attention_over_the_source_projections(tmp_path, name):
    """With decay off (A = 0), dt = 1 and D = 0, the seeded SSM head h computes
    y_t = sum_{s<=t} (silu(q_t^h) . silu(k_s^g)) silu(v_s^g), g = h // (heads / kv_heads),
    from the source's own q/k/v projections (naive sum over s, written here independently)."""
    source = build_source(tmp_path, name)
    primed = prime_model(tmp_path, "M")
    mixer = primed.model.model.layers[0].mixer
    with torch.no_grad():
        mixer.A_log.fill_(-float("inf"))  # A = -exp(A_log) = 0: no decay
        mixer.dt_bias.fill_(float(torch.log(torch.expm1(torch.tensor(1.0)))))  # softplus(dt_bias) = 1
        mixer.in_proj_dt.weight.zero_()
        mixer.D.zero_()
    captured = {}
    mixer.norm.register_forward_hook(lambda module, args, out: captured.update(y=args[0]))
    hidden = torch.randn(1, 10, COMMON["hidden_size"], generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        mixer(hidden)
        attention = source.model.layers[0].self_attn
        heads, kv_heads, head_dim = 4, 2, primed.model.config.head_dim
        q = F.silu(F.linear(hidden[0], attention.q_proj.weight, attention.q_proj.bias)).view(10, heads, head_dim)
        k = F.silu(F.linear(hidden[0], attention.k_proj.weight, attention.k_proj.bias)).view(10, kv_heads, head_dim)
        v = F.silu(F.linear(hidden[0], attention.v_proj.weight, attention.v_proj.bias)).view(10, kv_heads, head_dim)
    expected = torch.zeros(10, heads, head_dim)
    for t in range(10):
        for h in range(heads):
            g = h // (heads // kv_heads)
            for s in range(t + 1):
                expected[t, h] += (q[t, h] @ k[s, g]) * v[s, g]
    torch.testing.assert_close(captured["y"][0].view(10, heads, head_dim), expected, rtol=1e-4, atol=1e-4)


def test_seeded_new_paths(tmp_path):
    """Untied fading projections start as k_proj / v_proj, the innovation predictor at zero, the convs as identity;
    the SSM gate is 0.5 (o_proj^T + v_proj repeated over the query heads of each kv head)."""
    build_source(tmp_path, "llama-llama3-rope-bias")
    primed = prime_model(tmp_path, "BA", dict(B_F_OPTIONS, tie_fading_projections=False))
    mixer = primed.model.model.layers[0].mixer
    torch.testing.assert_close(mixer.k_fading_proj.weight, mixer.k_proj.weight, rtol=0, atol=0)
    torch.testing.assert_close(mixer.v_fading_proj.bias, mixer.v_proj.bias, rtol=0, atol=0)
    assert not mixer.innovation_proj.weight.any()
    conv = mixer.ssm.conv_bc.weight
    assert torch.equal(conv[:, 0, -1], torch.ones(conv.shape[0])) and not conv[:, 0, :-1].any()
    v_repeated = mixer.v_proj.weight.view(2, 1, 16, 64).expand(2, 2, 16, 64).reshape(64, 64)
    torch.testing.assert_close(mixer.ssm.in_proj_z.weight, 0.5 * (mixer.o_proj.weight.t() + v_repeated))
    assert primed.report["ssm_init"] == "attention"
    random = prime_model(tmp_path, "BA", B_F_OPTIONS, ssm_init="random").model.model.layers[0].mixer
    assert not torch.equal(random.ssm.in_proj_x.weight, mixer.ssm.in_proj_x.weight)


def test_ssm_not_shaped_like_attention_keeps_mamba_init_or_is_refused(tmp_path):
    build_source(tmp_path, "mistral")
    primed = prime_model(tmp_path, "AM", {"ssm_mixer": "mamba1"})
    assert primed.report["ssm_init"] == "random" and "cannot be seeded" in primed.report["notes"][0]
    with pytest.raises(ValueError, match="ssm_state_size is 8, not 16"):
        prime_model(tmp_path, "AM", {"ssm_state_size": 8}, ssm_init="attention")


def test_expand_pattern():
    assert expand_pattern("AB", 6) == "ABABAB"
    assert expand_pattern("ABM", 3) == "ABM"
    for bad in ("ABCD", "AX", ""):
        with pytest.raises(ValueError, match="--pattern"):
            expand_pattern(bad, 4 if bad != "ABCD" else 6)


def save_tokenizer(path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(VOCAB - 2)} | {"<unk>": VOCAB - 2, "</s>": VOCAB - 1}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", eos_token="</s>").save_pretrained(str(path))


def test_cli_writes_a_loadable_primed_folder_with_the_tokenizer(tmp_path, capsys):
    source_dir, output = tmp_path / "source", tmp_path / "primed"
    source = build_source(source_dir, "qwen3-qk-norm")
    save_tokenizer(source_dir)
    capsys.readouterr()
    assert main(["prime", str(source_dir), str(output), "--pattern", "A", "--compare-tokens", "32"]) == 0
    *report, difference, next_line = capsys.readouterr().out.splitlines()
    assert any("copied" in line for line in report) and "max relative difference" in difference
    assert float(difference.rsplit("difference", 1)[1]) <= TOLERANCE
    assert next_line.startswith(f"next: bmojo-neuron train RECIPE init.weights={output} model=none "
                                f"data.tokenizer={output}  (RECIPE: ")  # the tokenizer it copied, named
    info = json.loads((output / "bmojo_run.json").read_text())
    assert info["tokenizer"] == str(output.resolve()) and info["priming"]["layer_pattern"] == "AA"
    assert AutoTokenizer.from_pretrained(str(output)).encode("w3 w7") == [3, 7]
    trained = load_trained(output)
    ids = random_ids()
    with torch.no_grad():
        assert relative_difference(source_logits(source, ids), trained.model(ids).logits) <= TOLERANCE


def test_prime_s_next_line_names_the_tokenizer_only_where_the_model_learned_another(tmp_path, monkeypatch):
    """Bytes (or no tokenizer recorded: the source had no files) are what a text recipe reads by default; a
    tokenizer copied into the folder is named by the OUTPUT as given, any other (a hub name) as recorded."""
    from bmojo_neuron.commands.prime import next_line

    monkeypatch.chdir(tmp_path)
    plain = "next: bmojo-neuron train RECIPE init.weights=out model=none  (RECIPE: a text recipe, e.g. cpu-text; "
    assert next_line("out", None).startswith(plain) and next_line("out", "byte").startswith(plain)
    assert " model=none data.tokenizer=out  (" in next_line("out", str(tmp_path / "out"))
    assert " model=none data.tokenizer=Qwen/Qwen3-0.6B  (" in next_line("out", "Qwen/Qwen3-0.6B")
    assert "'init.weights=my primed' model=none" in next_line("my primed", None)  # pasted into a shell whole


@pytest.mark.parametrize(
    "overrides, args, message",
    [
        (dict(hidden_act="gelu"), ["--pattern", "A"], "hidden_act 'gelu' .* not supported"),
        (dict(mlp_bias=True), ["--pattern", "A"], "mlp_bias true"),
        (dict(rope_scaling={"rope_type": "yarn", "factor": 2.0}), ["--pattern", "A"], "RoPE type 'yarn'"),
        (dict(head_dim=256), ["--pattern", "A"], "head_dim 256"),
        ({}, ["--pattern", "ABA"], "has 3 letters; the source has 2 layers"),
        ({}, ["--pattern", "B", "hidden_size=32"], "hidden_size=32: comes from the source"),
        ({}, ["--pattern", "B", "window_size=0"], "window_size must be an integer >= 1"),
        ({}, ["--pattern", "B", "no_such_option=1"], "no_such_option"),
    ],
)
def test_cli_refuses_with_one_error_line(tmp_path, capsys, overrides, args, message):
    build_source(tmp_path / "source", "llama-llama3-rope-bias", **overrides)
    capsys.readouterr()
    code = main(["prime", str(tmp_path / "source"), str(tmp_path / "out"), *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: ")
    assert __import__("re").search(message, err), err
    assert not (tmp_path / "out").exists()


def _edit_config(**changes):
    def edit(folder):
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, **changes}))
    return edit


def _truncate_weights(folder):
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])


@pytest.mark.parametrize("damage, message", [
    (_edit_config(hidden_size=128), r"model\.embed_tokens\.weight has shape \(96, 64\) in the weights, but "
                                    r"config\.json implies \(96, 128\)"),
    (_edit_config(vocab_size=200), r"model\.embed_tokens\.weight has shape \(96, 64\) in the weights, but "
                                   r"config\.json implies \(200, 64\)"),
    (_edit_config(intermediate_size=80), r"layers\.0\.mlp\.gate_proj\.weight has shape \(96, 64\) .* \(80, 64\)"),
    (_edit_config(head_dim=15), r"head_dim 15 is not supported"),
    (_edit_config(head_dim=None, hidden_size=60, num_attention_heads=8),
     r"could not be read as a llama config: .*hidden size \(60\) is not a multiple"),
    (_truncate_weights, r"model\.safetensors is not a readable weight file \(.*\); is it complete\?"),
    (_edit_config(num_hidden_layers=3), r"the weights hold 2 layers, but config\.json says num_hidden_layers 3"),
], ids=["hidden_size", "vocab_size", "intermediate_size", "odd_head_dim", "heads_do_not_divide", "truncated",
        "layers"])
def test_cli_refuses_a_damaged_source_with_one_error_line(tmp_path, capsys, damage, message):
    """A config.json that does not describe the weights (edited sizes), one transformers refuses, or a truncated
    weight file: one error line naming it, no traceback, nothing written."""
    build_source(tmp_path / "source", "llama-llama3-rope-bias")
    damage(tmp_path / "source")
    capsys.readouterr()
    code = main(["prime", str(tmp_path / "source"), str(tmp_path / "out"), "--pattern", "A"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith(f"error: source {tmp_path / 'source'}")
    assert __import__("re").search(message, err), err
    assert not (tmp_path / "out").exists()


def test_the_header_gives_the_shapes_torch_reads_and_a_bad_one_is_refused(tmp_path):
    """`safetensors_shapes` reads a file's header without torch: the names and shapes of a checkpoint
    transformers wrote are those safetensors loads; a header without a tensor's extent, or a file too short for
    a header, is the one-line refusal of a weight file that cannot be read."""
    from bmojo_neuron.priming.source_files import safetensors_shapes

    build_source(tmp_path / "source", "qwen3-qk-norm")
    weights = tmp_path / "source" / "model.safetensors"
    assert safetensors_shapes(weights) == {name: tuple(t.shape) for name, t in load_file(str(weights)).items()}
    header = json.dumps({"w": {"dtype": "F32", "shape": [2]}}).encode()
    weights.write_bytes(len(header).to_bytes(8, "little") + header + bytes(8))
    with pytest.raises(ValueError, match=r"model\.safetensors is not a readable weight file \(its safetensors "
                                         r"header lacks a tensor's shape or data_offsets\); is it complete\?"):
        safetensors_shapes(weights)
    weights.write_bytes(b"abc")
    with pytest.raises(ValueError, match=r"not a readable weight file \(no safetensors header\)"):
        safetensors_shapes(weights)


@pytest.mark.parametrize("layers, message", [
    (1, "the weights hold 2 layers, but config.json says num_hidden_layers 1"),
    (3, "the weights hold 2 layers, but config.json says num_hidden_layers 3"),
])
def test_prime_model_refuses_weights_of_another_layer_count(tmp_path, layers, message):
    """`prime_model` (no CLI, so no quick look at the files first) checks the tensors it loaded against the config:
    a layer more or fewer in config.json than in the weights is refused, not primed from part of them."""
    build_source(tmp_path / "source", "mistral")
    _edit_config(num_hidden_layers=layers)(tmp_path / "source")
    with pytest.raises(ValueError, match=f"source {tmp_path / 'source'}: {message}"):
        prime_model(tmp_path / "source", "A")


@pytest.mark.parametrize("tied, seeded", [
    (True, "(SSM as linear attention; zero innovation predictor)"),
    (False, "(SSM as linear attention; untied fading projections; zero innovation predictor)"),
])
def test_cli_summary_names_what_was_seeded(tmp_path, capsys, tied, seeded):
    build_source(tmp_path / "source", "llama-llama3-rope-bias")
    capsys.readouterr()
    options = [f"{k}={v}" for k, v in B_F_OPTIONS.items()] + [f"tie_fading_projections={str(tied).lower()}"]
    assert main(["prime", str(tmp_path / "source"), str(tmp_path / "out"), "--pattern", "AB", *options,
                 "--compare-tokens", "0"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.lstrip().startswith("seeded"))
    assert line.endswith("new paths from the attention weights " + seeded), line


def test_cli_refuses_other_sources_and_an_existing_output(tmp_path, capsys):
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    build_source(tmp_path / "llama", "mistral")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    capsys.readouterr()
    cases = [
        ([str(tmp_path / "gpt2"), str(tmp_path / "o1")], "model_type 'gpt2' is not supported"),
        ([str(tmp_path / "missing"), str(tmp_path / "o2")], "not a local directory"),
        ([str(tmp_path / "llama"), str(tmp_path / "taken")], "exists and is not empty"),
    ]
    for paths, message in cases:
        assert main(["prime", *paths, "--pattern", "A"]) == 2
        assert message in capsys.readouterr().err
    (tmp_path / "llama" / "model.safetensors").unlink()
    assert main(["prime", str(tmp_path / "llama"), str(tmp_path / "o3"), "--pattern", "A"]) == 2
    assert "no weights" in capsys.readouterr().err


@pytest.mark.parametrize("options, family", [
    (dict(rope_scaling_params=dict(LLAMA3_ROPE), tie_word_embeddings=False), "llama"),
    (dict(attention_bias=True, attention_output_bias=False), "qwen2"),
    (dict(qk_norm=True, head_dim=32), "qwen3"),
])
def test_export_transformer_round_trip(tmp_path, capsys, options, family):
    """An all-A B'MOJO model written as a transformer loads in transformers with the same logits, and priming it
    back gives the same logits again."""
    from transformers import AutoModelForCausalLM

    from bmojo_neuron import BMojoConfig, BMojoForCausalLM

    config = BMojoConfig(**{**COMMON, "layer_pattern": "AA", "rope_theta": 20000.0, **options})
    torch.manual_seed(0)
    model = BMojoForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.normal_(1.0 if "norm" in name else 0.0, 0.2)
    model.save_pretrained(str(tmp_path / "bmojo"))
    assert main(["export-transformer", str(tmp_path / "bmojo"), str(tmp_path / "hf")]) == 0
    assert f"wrote {family} checkpoint" in capsys.readouterr().out
    exported = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    ids = random_ids()
    with torch.no_grad():
        reference = model(ids).logits
        assert relative_difference(reference, exported(ids).logits) <= TOLERANCE
        assert relative_difference(reference, prime_model(tmp_path / "hf", "A").model(ids).logits) <= TOLERANCE


def test_export_transformer_refuses_hybrids(tmp_path, capsys):
    build_source(tmp_path / "source", "mistral")
    prime_model(tmp_path / "source", "AB", B_F_OPTIONS).model.save_pretrained(str(tmp_path / "hybrid"))
    capsys.readouterr()
    assert main(["export-transformer", str(tmp_path / "hybrid"), str(tmp_path / "out")]) == 2
    assert "only an all-attention" in capsys.readouterr().err


def test_export_transformer_refuses_a_transformer(tmp_path, capsys):
    build_source(tmp_path / "source", "llama-llama3-rope-bias")
    capsys.readouterr()
    assert main(["export-transformer", str(tmp_path / "source"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: {tmp_path / 'source'} is not a B'MOJO model (its config.json has model_type 'llama'); "
                   "export-transformer writes an all-attention B'MOJO model as a transformer")
    assert not (tmp_path / "out").exists()


def test_export_of_a_primed_folder_names_its_own_tokenizer(tmp_path, capsys):
    """The export carries the tokenizer files and names itself, so it keeps working once the primed folder moves."""
    source, primed, exported = tmp_path / "source", tmp_path / "primed", tmp_path / "exported"
    build_source(source, "qwen3-qk-norm")
    save_tokenizer(source)
    assert main(["prime", str(source), str(primed), "--pattern", "A", "--compare-tokens", "0"]) == 0
    assert main(["export-transformer", str(primed), str(exported)]) == 0
    primed.rename(tmp_path / "moved")
    info = json.loads((exported / "bmojo_run.json").read_text())
    assert info["tokenizer"] == str(exported.resolve())
    assert AutoTokenizer.from_pretrained(info["tokenizer"]).encode("w3 w7") == [3, 7]
    assert load_trained(exported).tokenizer == str(exported.resolve())


def _all_attention_bmojo(path, tokenizer: str) -> None:
    """A saved all-A B'MOJO model whose bmojo_run.json names `tokenizer` (vocabulary 256: the byte ids)."""
    from bmojo_neuron import BMojoConfig, BMojoForCausalLM

    torch.manual_seed(0)
    BMojoForCausalLM(BMojoConfig(**{**COMMON, "vocab_size": 256, "layer_pattern": "AA"})).save_pretrained(str(path))
    (path / "bmojo_run.json").write_text(json.dumps({"tokenizer": tokenizer, "recipe": {}}))


def test_export_of_a_byte_tokenizer_model_writes_its_tokenizer_files(tmp_path, capsys):
    """The byte tokenizer is written as the equivalent Hugging Face tokenizer, so pipeline() loads the export."""
    from transformers import pipeline

    _all_attention_bmojo(tmp_path / "bmojo", "byte")
    capsys.readouterr()
    assert main(["export-transformer", str(tmp_path / "bmojo"), str(tmp_path / "hf")]) == 0
    assert "warning" not in capsys.readouterr().err
    assert json.loads((tmp_path / "hf" / "bmojo_run.json").read_text())["tokenizer"] == "byte"
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert tokenizer.encode("hi é") == [104, 105, 32, 0xC3, 0xA9]  # the UTF-8 bytes
    generate = pipeline("text-generation", model=str(tmp_path / "hf"))
    out = generate("hi", max_new_tokens=3, do_sample=False)[0]["generated_text"]
    assert out.startswith("hi")


def test_export_with_a_tokenizer_it_cannot_load_warns_and_writes_the_model(tmp_path, capsys):
    no_tokenizer = tmp_path / "not-a-tokenizer"
    no_tokenizer.mkdir()
    _all_attention_bmojo(tmp_path / "bmojo", str(no_tokenizer))
    capsys.readouterr()
    assert main(["export-transformer", str(tmp_path / "bmojo"), str(tmp_path / "hf")]) == 0
    err = capsys.readouterr().err
    assert err.startswith("warning: the export has no tokenizer files (") and err.count("\n") == 1
    assert "pass the tokenizer to pipeline() (and a text model's eos_token_id to generate()) yourself" in err
    assert (tmp_path / "hf" / "model.safetensors").is_file() and not (tmp_path / "hf" / "tokenizer.json").exists()
    assert json.loads((tmp_path / "hf" / "bmojo_run.json").read_text())["tokenizer"] == str(no_tokenizer)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_prime_then_export_keeps_the_dtype_and_max_positions(tmp_path, capsys, dtype):
    """The export is written in the primed model's dtype, with the source's max_position_embeddings (which
    BMojoConfig does not hold; the priming report carries it)."""
    from safetensors.torch import load_file

    build_source(tmp_path / "source", "llama-linear-rope-tied", max_position_embeddings=256)
    assert main(["prime", str(tmp_path / "source"), str(tmp_path / "primed"), "--pattern", "A", "--dtype", dtype,
                 "--compare-tokens", "0"]) == 0
    assert main(["export-transformer", str(tmp_path / "primed"), str(tmp_path / "hf")]) == 0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["dtype"] == dtype and config["max_position_embeddings"] == 256
    primed = load_file(str(tmp_path / "primed" / "model.safetensors"))
    exported = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert {t.dtype for t in exported.values()} == {getattr(torch, dtype)}
    assert torch.equal(exported["model.layers.1.self_attn.q_proj.weight"], primed["model.layers.1.mixer.q_proj.weight"])


# The published configs of the Trn1 recipes' sources (config.json of meta-llama/Llama-3.2-1B and Qwen/Qwen3-0.6B).
PUBLISHED = {
    "prime-llama-3.2-1b-distill": {
        "model_type": "llama", "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192,
        "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
        "hidden_act": "silu", "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": True,
        "rope_scaling": {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "bos_token_id": 128000, "eos_token_id": 128001, "attention_bias": False, "mlp_bias": False},
    "prime-qwen3-0.6b-distill": {
        "model_type": "qwen3", "vocab_size": 151936, "hidden_size": 1024, "intermediate_size": 3072,
        "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
        "hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 1000000, "tie_word_embeddings": True,
        "rope_scaling": None, "sliding_window": None, "use_sliding_window": False, "max_window_layers": 28,
        "bos_token_id": 151643, "eos_token_id": 151645, "attention_bias": False},
}
TRN1_OPTIONS = dict(window_size=512, fading_window=512, memory_chunk=512, memory_size=128, memory_picks=16)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_trn1_recipes_hold_the_config_prime_writes(tmp_path, name):
    """The model section of each Trn1 priming recipe is what `prime --pattern AB` (with the options in its header)
    derives from the source's published config.json (read alone: no weights needed, nothing downloaded)."""
    from bmojo_neuron.priming import primed_config, read_source
    from bmojo_neuron.recipes import load_recipe

    (tmp_path / "config.json").write_text(json.dumps(PUBLISHED[name]))
    primed = primed_config(read_source(tmp_path), "AB", TRN1_OPTIONS).to_dict()
    recipe = load_recipe(f"trn1/{name}").model_config().to_dict()
    for key in ("transformers_version", "architectures", "dtype", "torch_dtype"):
        primed.pop(key, None), recipe.pop(key, None)
    assert recipe == primed


DEMO = {  # finetune/distill recipe -> (source recipe, prime --pattern, the options in the recipe's header)
    "cpu-text": ("B", dict(window_size=32, fading_window=32, memory_chunk=32, memory_size=32, memory_picks=4,
                           ssm_chunk_size=64)),
    "cpu-mqar": ("B", dict(window_size=8, fading_window=8, memory_chunk=1, memory_size=32, memory_picks=1,
                           memory_decay=1.0, ssm_chunk_size=32)),
}


@pytest.mark.parametrize("demo", sorted(DEMO))
def test_cpu_demo_recipes_hold_the_config_prime_writes(tmp_path, demo):
    """The demo's distill and finetune recipes restate the config `prime` writes from the exported source."""
    from bmojo_neuron.priming import primed_config, read_source
    from bmojo_neuron.priming.export import transformer_config
    from bmojo_neuron.recipes import load_recipe

    pattern, options = DEMO[demo]
    transformer_config(load_recipe(f"priming/{demo}-source").model_config()).save_pretrained(str(tmp_path))
    primed = primed_config(read_source(tmp_path), pattern, options).to_dict()
    for stage in ("distill", "finetune"):
        recipe = load_recipe(f"priming/{demo}-{stage}").model_config().to_dict()
        for key in ("transformers_version", "architectures", "dtype", "torch_dtype"):
            primed.pop(key, None), recipe.pop(key, None)
        assert recipe == primed, stage


def _values_out_of_reach(config, input_ids, labels) -> tuple[int, int]:
    """(queries, queries whose value token is past both windows but too recent for the memory they read),
    for one B layer of `config`: what no selection can recover."""
    import numpy as np

    from bmojo_neuron.memory_inspection import LayerMemory, kv_coverage

    rows, length = input_ids.shape
    empty = np.full((rows, length // config.memory_chunk, 1), -1)
    trace = LayerMemory(layer=0, window=config.window_size, fading_window=config.fading_window,
                        chunk=config.memory_chunk, lag=config.memory_lag, innovation=np.zeros((rows, length)),
                        positions=empty, scores=np.zeros(empty.shape))
    coverage = kv_coverage(trace, input_ids, labels)
    return coverage.queries, coverage.values["unreachable"]


def test_cpu_mqar_demo_memory_can_reach_every_pair():
    """In the MQAR demo every pair lies outside the 8-token window of most queries. A token enters the memory a
    query reads only `memory_lag` chunks after its own chunk, so with chunks of 8 the values at distances
    16 .. 16 + (query position mod 8) are in neither window nor memory: no training can recall them. With the
    recipe's chunks of 1 every value a query asks for is within reach (the memory must still keep it)."""
    from bmojo_neuron.data.mqar import mqar_arrays
    from bmojo_neuron.recipes import load_recipe

    recipe = load_recipe("priming/cpu-mqar-finetune")
    data = recipe.data
    input_ids, labels = mqar_arrays(data.vocab_size, data.seq_len, data.num_kv_pairs, 256, seed=1)
    config = recipe.model_config()
    assert (config.memory_chunk, config.memory_picks) == (1, 1)
    queries, lost = _values_out_of_reach(config, input_ids, labels)
    assert (queries, lost) == (1024, 0)

    config.memory_chunk, config.memory_picks = 8, 4  # the chunking the demo used before
    queries, lost = _values_out_of_reach(config, input_ids, labels)
    assert 0.03 * queries < lost < 0.08 * queries


def test_a_primed_folder_shards_and_consolidates_back_bit_identically(tmp_path, capsys):
    """`prime` writes no recipe (its bmojo_run.json says ``"recipe": {}``): `checkpoint shard` takes that one and
    starts at step 0, and consolidating the shards gives back the primed weights bit for bit."""
    source_dir, primed, run_dir, full = (tmp_path / n for n in ("source", "primed", "run", "full"))
    build_source(source_dir, "llama-linear-rope-tied")
    assert main(["prime", str(source_dir), str(primed), "--pattern", "A"]) == 0
    assert main(["checkpoint", "shard", str(primed), "--tp", "2", "--pp", "2", "--output-dir", str(run_dir)]) == 0
    assert json.loads((run_dir / "step-0000000" / "recipe.json").read_text()) == {"parallel": {"tp": 2, "pp": 2}}
    assert main(["checkpoint", "consolidate", str(run_dir), str(full)]) == 0
    want, got = load_file(str(primed / "model.safetensors")), load_file(str(full / "model.safetensors"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_resuming_a_sharded_primed_folder_points_at_init_weights(tmp_path, capsys):
    """A sharded `prime` output has no run to continue (its recipe holds only the degrees): `--resume` on it is
    one error line that names the primed folder for `init.weights`, not a list of every recipe key as changed."""
    source_dir, primed, run_dir = (tmp_path / n for n in ("source", "primed", "run"))
    build_source(source_dir, "llama-linear-rope-tied")
    assert main(["prime", str(source_dir), str(primed), "--pattern", "A"]) == 0
    assert main(["checkpoint", "shard", str(primed), "--tp", "1", "--output-dir", str(run_dir)]) == 0
    capsys.readouterr()
    assert main(["train", "cpu-tiny", "suite=none", "--resume", "--no-progress", "--output-dir", str(run_dir)]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    assert f"init.weights={primed.resolve()} instead of --resume" in lines[0]
    assert "the recipe changed" not in lines[0]
