"""MQAR generator against its definition, tokenizers, and the text pipeline (sources, packing, cache, errors)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bmojo_neuron.data import ByteTokenizer, build_datasets, build_eval_dataset, generate_mqar, load_tokenizer
from bmojo_neuron.data import mqar_accuracy, text
from bmojo_neuron.data.mqar import mqar_arrays, mqar_mixed_arrays, mqar_pairs
from bmojo_neuron.data.text import CORPUS_DIR, load_text_dataset, source_kind
from bmojo_neuron.recipes import Recipe

V, L, KV = 64, 48, 6


# ----------------------------------------------------------------------------- MQAR
@pytest.mark.parametrize("random_non_queries", [True, False])
def test_mqar_matches_definition(random_non_queries: bool) -> None:
    inputs, labels = mqar_arrays(V, L, KV, 200, seed=3, random_non_queries=random_non_queries)
    assert inputs.shape == labels.shape == (200, L) and inputs.dtype == labels.dtype == np.int64
    assert inputs.min() >= 0 and inputs.max() < V
    for x, y in zip(inputs, labels):
        keys, values = x[0 : 2 * KV : 2], x[1 : 2 * KV : 2]
        assert len(set(keys)) == KV and all(1 <= k < V // 2 for k in keys)
        assert len(set(values)) == KV and all(V // 2 <= v < V for v in values)
        pairs = dict(zip(keys.tolist(), values.tolist()))
        answers = np.flatnonzero(y != -100)
        assert len(answers) == KV and answers.min() >= 2 * KV + 1
        assert ((answers - 2 * KV) % 2 == 1).all()  # queries sit on even offsets after the pairs, answers right after
        for t in answers:
            assert x[t - 1] in pairs, "every query key appeared in the kv region"
            assert y[t] == x[t] == pairs[x[t - 1]], "label = input = the key's paired value"
        assert sorted(x[answers - 1].tolist()) == sorted(pairs), "each key is queried exactly once"
        if not random_non_queries:
            filler = np.ones(L, bool)
            filler[: 2 * KV] = False
            filler[answers] = filler[answers - 1] = False
            assert (x[filler] == 0).all()


def test_mqar_power_law_gaps_favour_early_queries() -> None:
    _, labels = mqar_arrays(128, 256, 4, 2000, seed=0, power_a=0.01)
    slots = (np.argwhere(labels != -100)[:, 1] - 8 - 1) // 2
    assert np.mean(slots < 60) > 0.6  # uniform would give 60/124 < 0.5


@pytest.mark.parametrize("spacing", [2, 4])
def test_mqar_spacing_stretches_every_distance(spacing: int) -> None:
    base_ids, base_labels = mqar_arrays(V, L, KV, 50, seed=5)
    ids, labels = mqar_arrays(V, L * spacing, KV, 50, seed=5, spacing=spacing)
    assert ids.shape == (50, L * spacing)
    scored, base_scored = np.argwhere(labels != -100), np.argwhere(base_labels != -100)
    # answers move from a to spacing * (a - 1) + 1: the query key is stretched, its value stays next to it
    np.testing.assert_array_equal(scored[:, 1], spacing * (base_scored[:, 1] - 1) + 1)
    np.testing.assert_array_equal(labels[labels != -100], base_labels[base_labels != -100])
    for x, base in zip(ids, base_ids):
        for i in range(KV):
            assert x[spacing * 2 * i] == base[2 * i] and x[spacing * 2 * i + 1] == base[2 * i + 1]
    for x, y, base, base_y in zip(ids, labels, base_ids, base_labels):
        queries = np.flatnonzero(base_y != -100) - 1
        np.testing.assert_array_equal(x[spacing * queries], base[queries])
        np.testing.assert_array_equal(x[spacing * queries + 1], base[queries + 1])
    with pytest.raises(ValueError, match="spacing"):
        mqar_arrays(V, L * 2 + 1, KV, 2, seed=0, spacing=2)


def test_mqar_pairs_finds_each_query_and_its_pair() -> None:
    for spacing in (1, 3):
        ids, labels = mqar_arrays(V, L * spacing, KV, 20, seed=7, spacing=spacing)
        for x, y, pairs in zip(ids, labels, mqar_pairs(ids, labels)):
            assert [q for q, _ in pairs] == (np.flatnonzero(y != -100) - 1).tolist()
            for query, key in pairs:
                assert key % (2 * spacing) == 0 and key < 2 * KV * spacing
                assert x[key] == x[query] and x[key + 1] == y[query + 1]


def test_generate_mqar_dataset_and_determinism() -> None:
    a = generate_mqar(V, L, KV, 20, seed=1)
    b = generate_mqar(V, L, KV, 20, seed=1)
    c = generate_mqar(V, L, KV, 20, seed=2)
    assert a.column_names == ["input_ids", "labels"]
    assert a["input_ids"] == b["input_ids"] and a["labels"] == b["labels"]
    assert a["input_ids"] != c["input_ids"]
    batch = a.with_format("torch")[:4]
    assert batch["input_ids"].shape == (4, L) and batch["input_ids"].dtype == torch.int64


@pytest.mark.parametrize(
    ("args", "match"),
    [((64, 20, 6), "seq_len 20 is too short"), ((8, 64, 6), "too few for 6 distinct pairs"), ((64, 64, 0), ">= 1")],
)
def test_mqar_bad_arguments(args: tuple[int, int, int], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        generate_mqar(*args, num_examples=2, seed=0)


def test_mqar_accuracy_uses_shifted_positions() -> None:
    inputs, labels = mqar_arrays(V, L, KV, 8, seed=0)
    labels_t = torch.from_numpy(labels)
    perfect = torch.nn.functional.one_hot(torch.from_numpy(np.roll(inputs, -1, axis=1)), V).float()
    assert mqar_accuracy(perfect, labels_t) == 1.0  # logits at t-1 predict the token at t
    assert mqar_accuracy(torch.zeros(8, L, V), labels_t) == 0.0  # argmax 0 is never a value
    with pytest.raises(ValueError, match="no scored positions"):
        mqar_accuracy(perfect, torch.full((8, L), -100))


# ----------------------------------------------------------------------------- tokenizer
def test_byte_symbols_are_the_byte_level_convention_and_every_byte_is_its_own_id() -> None:
    """`byte_symbols` is written here, not imported: it must be the mapping byte-level BPE uses (transformers'
    `bytes_to_unicode`), and the byte tokenizer built on it must give every byte its value as its id."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    from bmojo_neuron.data.tokenizer import byte_level_backend, byte_symbols

    assert byte_symbols() == bytes_to_unicode()
    backend = byte_level_backend()
    text = bytes(range(1, 128)).decode("ascii") + "é€😀"
    assert backend.encode(text).ids == list(text.encode("utf-8"))
    assert backend.decode(list(text.encode("utf-8"))) == text


def test_byte_tokenizer_round_trip() -> None:
    tok = load_tokenizer("byte")
    assert isinstance(tok, ByteTokenizer) and tok.vocab_size == len(tok) == 256 and tok.eos_token_id == 0
    sample = "Grüße, B'MOJO ✓"
    assert tok.decode(tok.encode(sample)) == sample
    assert tok.decode([*tok.encode("a"), 0, *tok.encode("b")], skip_special_tokens=True) == "ab"


def test_unknown_tokenizer_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="data.tokenizer"):
        load_tokenizer(str(tmp_path / "no-tokenizer"))


# ----------------------------------------------------------------------------- text
DOCS = ["The red cup is in the kitchen.", "Zwölf Äpfel.\nTwo lines.", "Seven plus five is twelve. " * 3]


def _stream(docs: list[str]) -> str:
    return "".join(d + "\x00" for d in docs)


def _decoded(*datasets) -> str:
    tok = ByteTokenizer()
    return "".join(tok.decode(row["input_ids"]) for ds in datasets for row in ds)


def test_text_file_packing_round_trip(tmp_path: Path) -> None:
    source = tmp_path / "one.txt"
    source.write_text(DOCS[0] * 20, encoding="utf-8")
    train, evaluation = load_text_dataset(source, block_size=32, cache_dir=tmp_path / "cache", eval_fraction=0.2)
    stream = _stream([DOCS[0] * 20])
    blocks = len(stream.encode()) // 32
    assert len(train) + len(evaluation) == blocks and len(evaluation) == round(0.2 * blocks)
    assert all(len(row["input_ids"]) == 32 and row["labels"] == row["input_ids"] for row in train)
    assert _decoded(train, evaluation) == stream[: blocks * 32]  # ASCII: bytes == chars


def test_text_folder_of_files_in_sorted_order(tmp_path: Path) -> None:
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text(DOCS[0], encoding="utf-8")
    (folder / "sub" / "c.md").write_text(DOCS[2], encoding="utf-8")
    lines = [json.dumps({"text": DOCS[1]}), "", json.dumps({"text": ""})]
    (folder / "b.jsonl").write_text("\n".join(lines), encoding="utf-8")
    (folder / "ignored.csv").write_text("x,y", encoding="utf-8")
    train, evaluation = load_text_dataset(folder, block_size=8, cache_dir=tmp_path / "cache")
    stream = _stream(DOCS).encode()
    kept = len(stream) // 8 * 8
    assert _decoded(train, evaluation) == stream[:kept].decode("utf-8", errors="replace")


def test_text_save_to_disk_source_and_torch_format(tmp_path: Path) -> None:
    from datasets import Dataset

    Dataset.from_dict({"body": DOCS * 4}).save_to_disk(str(tmp_path / "saved"))
    train, evaluation = load_text_dataset(
        tmp_path / "saved", block_size=16, cache_dir=tmp_path / "cache", text_column="body"
    )
    assert len(train) > len(evaluation) >= 1
    batch = train.with_format("torch")[:2]
    assert batch["input_ids"].shape == (2, 16) and batch["input_ids"].dtype == torch.int64


def test_text_cache_is_reused_and_packed_cache_is_a_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = tmp_path / "doc.txt"
    source.write_text(DOCS[2] * 5, encoding="utf-8")
    first = load_text_dataset(source, block_size=16, cache_dir=tmp_path / "cache")
    calls = []
    monkeypatch.setattr(text, "_tokenize_documents", lambda *a, **k: calls.append(a))
    second = load_text_dataset(source, block_size=16, cache_dir=tmp_path / "cache")
    assert calls == [] and second[0]["input_ids"] == first[0]["input_ids"]
    (entry,) = [p for p in (tmp_path / "cache").iterdir()]
    assert entry.name.startswith("text-") and (entry / "meta.json").is_file()
    assert json.loads((entry / "meta.json").read_text())["tokens"] == len(DOCS[2] * 5) + 1
    reread = load_text_dataset(entry, block_size=16, cache_dir=tmp_path / "other")
    assert reread[1]["input_ids"] == first[1]["input_ids"] and not (tmp_path / "other").exists()
    with pytest.raises(ValueError, match="blocks of 16 tokens but data.block_size is 8"):
        load_text_dataset(entry, block_size=8)


def test_text_cache_key_changes_with_source_and_failed_build_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "doc.txt"
    source.write_text(DOCS[0] * 4, encoding="utf-8")
    load_text_dataset(source, block_size=16, cache_dir=tmp_path / "cache")
    source.write_text(DOCS[1] * 4, encoding="utf-8")
    train, _ = load_text_dataset(source, block_size=16, cache_dir=tmp_path / "cache")
    assert _decoded(train).startswith(DOCS[1][:10])
    assert len(list((tmp_path / "cache").iterdir())) == 2

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(text, "pack_blocks", killed)
    source.write_text(DOCS[2] * 4, encoding="utf-8")
    with pytest.raises(KeyboardInterrupt):
        load_text_dataset(source, block_size=16, cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").iterdir())) == 2  # no half cache, no temp folder


def test_text_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_text_dataset(tmp_path / "missing.txt", cache_dir=tmp_path / "cache")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "e.txt").write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match="no text"):
        load_text_dataset(tmp_path / "empty", cache_dir=tmp_path / "cache")
    (tmp_path / "nothing").mkdir()
    with pytest.raises(ValueError, match="no .txt/.md/.jsonl files"):
        load_text_dataset(tmp_path / "nothing", cache_dir=tmp_path / "cache")
    (tmp_path / "short.txt").write_text("only a few words", encoding="utf-8")
    with pytest.raises(ValueError, match="17 tokens make 0 block"):
        load_text_dataset(tmp_path / "short.txt", block_size=64, cache_dir=tmp_path / "cache")
    (tmp_path / "bad.jsonl").write_text(json.dumps({"body": "x"}), encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.jsonl: line 1 has no key 'text' \(data.text_column; its keys: body\)"):
        load_text_dataset(tmp_path / "bad.jsonl", cache_dir=tmp_path / "cache")
    (tmp_path / "x.pdf").write_bytes(b"%PDF")
    with pytest.raises(ValueError, match="unsupported file type"):
        load_text_dataset(tmp_path / "x.pdf", cache_dir=tmp_path / "cache")
    assert not any(p.name.startswith(".tmp") for p in (tmp_path / "cache").iterdir())


def test_shipped_corpus_is_deterministic_english(tmp_path: Path) -> None:
    from bmojo_neuron.data import make_corpus

    files = sorted(CORPUS_DIR.glob("*.txt"))
    assert [f.name for f in files] == sorted(make_corpus.FILES)
    assert 300_000 <= sum(f.stat().st_size for f in files) <= 500_000
    name = "counting.txt"
    assert make_corpus.make_file(name, make_corpus.FILES[name], 0) == (CORPUS_DIR / name).read_text(encoding="utf-8")


@pytest.mark.parametrize("spacing", [2, 4])
def test_mqar_stretch_pairs_off_stretches_only_the_query_region(spacing: int) -> None:
    base_ids, base_labels = mqar_arrays(V, L, KV, 50, seed=5, random_non_queries=False)
    ids, labels = mqar_arrays(V, L * spacing, KV, 50, seed=5, random_non_queries=False, spacing=spacing,
                              stretch_pairs=False)
    context = 2 * KV
    np.testing.assert_array_equal(ids[:, :context], base_ids[:, :context])  # the kv region as at 1x
    scored, base_scored = np.argwhere(labels != -100), np.argwhere(base_labels != -100)
    # an answer at a = context + 2g + 1 moves to context + spacing * 2g + 1
    np.testing.assert_array_equal(scored[:, 1], context + spacing * (base_scored[:, 1] - 1 - context) + 1)
    np.testing.assert_array_equal(labels[labels != -100], base_labels[base_labels != -100])
    np.testing.assert_array_equal(ids[labels != -100], base_ids[base_labels != -100])
    assert (ids[:, L * spacing - (spacing - 1) * context:] == 0).all()  # the tail is filler
    rows = mqar_mixed_arrays(V, L * spacing, KV, 50, seed=5, random_non_queries=False, spacings=[spacing],
                             stretch_pairs=False)
    np.testing.assert_array_equal(rows[0], ids)


def test_mixed_spacings_take_rows_in_turn() -> None:
    one = mqar_arrays(V, L, KV, 7, seed=4, spacing=2)
    for got, want in zip(mqar_mixed_arrays(V, L, KV, 7, seed=4, spacings=[2]), one):
        np.testing.assert_array_equal(got, want)  # one spacing: exactly mqar_arrays
    ids, labels = mqar_mixed_arrays(V, L, KV, 7, seed=4, spacings=[1, 2])
    dense, spaced = mqar_arrays(V, L, KV, 4, seed=4), mqar_arrays(V, L, KV, 3, seed=5, spacing=2)
    np.testing.assert_array_equal(ids[0::2], dense[0])  # rows 0, 2, 4, 6: spacing 1 from the seed
    np.testing.assert_array_equal(labels[0::2], dense[1])
    np.testing.assert_array_equal(ids[1::2], spaced[0])  # rows 1, 3, 5: spacing 2 from seed + 1
    np.testing.assert_array_equal(labels[1::2], spaced[1])
    # by hand: spacing 2 puts pair i's key at 4i and its value at 4i + 1, so no key sits at 2 or 6
    assert (ids[1::2, 0 : 4 * KV : 4] >= 1).all() and (ids[1::2, 0 : 4 * KV : 4] < V // 2).all()
    assert (ids[1::2, 1 : 4 * KV : 4] >= V // 2).all()
    assert (ids[0::2, 2 : 2 * KV : 2] < V // 2).all() and (ids[0::2, 2 : 2 * KV : 2] >= 1).all()
    with pytest.raises(ValueError, match="spacings is empty"):
        mqar_mixed_arrays(V, L, KV, 2, seed=0, spacings=[])


def test_train_spacings_mix_the_training_set_only() -> None:
    raw = {"data": {"kind": "mqar", "vocab_size": 32, "seq_len": 32, "num_kv_pairs": 4, "random_non_queries": False,
                    "train_examples": 6, "eval_examples": 3}}
    plain = Recipe.from_dict(raw)
    assert plain.data.train_spacings == [1]
    mixed = Recipe.from_dict({"data": {**raw["data"], "train_spacings": [1, 2]}})
    (train, evaluation), (plain_train, plain_eval) = build_datasets(mixed), build_datasets(plain)
    assert len(train) == 6
    assert torch.equal(evaluation[:]["input_ids"], plain_eval[:]["input_ids"])
    dense = mqar_arrays(32, 32, 4, 3, seed=0, random_non_queries=False)[0]  # 3 rows at spacing 1 from data.seed
    np.testing.assert_array_equal(train[0::2]["input_ids"].numpy(), dense)
    assert len(plain_train) == 6
    spaced = train[1::2]["input_ids"]  # filler 0 between the stretched pairs
    assert (spaced[:, 2:16:4] == 0).all() and (spaced[:, 3:16:4] == 0).all() and (spaced[:, 0:16:4] > 0).all()
    queries_only = Recipe.from_dict({"data": {**raw["data"], "train_spacings": [1, 2], "stretch_pairs": False}})
    spaced = build_datasets(queries_only)[0][1::2]["input_ids"]
    assert (spaced[:, 0:8] > 0).all() and (spaced[:, 24:] == 0).all()  # pairs contiguous, a filler tail of 8
    assert torch.equal(build_eval_dataset(queries_only, 2)[:]["input_ids"][:, :8], evaluation[:]["input_ids"][:, :8])
    for spacings, match in [([3], "dividing data.seq_len 32"), ([4], "spacing 4 stretches a 8-token layout"),
                            ([], "must not be empty")]:
        with pytest.raises(ValueError, match=match):
            Recipe.from_dict({"data": {**raw["data"], "train_spacings": spacings}})


# ----------------------------------------------------------------------------- build_datasets
def test_build_datasets_mqar_and_text(tmp_path: Path) -> None:
    mqar = Recipe.from_dict({"data": {"kind": "mqar", "vocab_size": 32, "seq_len": 32, "num_kv_pairs": 4,
                                      "train_examples": 10, "eval_examples": 3}})
    train, evaluation = build_datasets(mqar)
    assert len(train) == 10 and len(evaluation) == 3
    assert train[:2]["input_ids"].shape == (2, 32)
    assert not torch.equal(train[:3]["input_ids"], evaluation[:3]["input_ids"])
    longer = build_eval_dataset(mqar, 2)[:3]
    assert longer["labels"].shape == (3, 64)
    base = evaluation[:3]  # the same eval examples, every distance doubled (spacing 2)
    assert torch.equal(longer["labels"][longer["labels"] != -100], base["labels"][base["labels"] != -100])
    assert torch.equal(longer["input_ids"][:, 0:16:4], base["input_ids"][:, 0:8:2])

    source = tmp_path / "doc.txt"
    source.write_text(DOCS[2] * 10, encoding="utf-8")
    text_recipe = Recipe.from_dict({"run": {"output_dir": str(tmp_path / "runs" / "x")},
                                    "data": {"kind": "text", "path": str(source), "block_size": 16}})
    assert text_recipe.data.cache_dir == str(tmp_path / "runs" / "data-cache")
    train, evaluation = build_datasets(text_recipe)
    assert train[:1]["input_ids"].shape == (1, 16) and len(evaluation) >= 1
    assert build_eval_dataset(text_recipe, 2)[:1]["input_ids"].shape == (1, 32)


def test_text_that_is_not_utf8_names_the_file_and_byte_offset(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_bytes("naïve café\n".encode("utf-8") + "second line: café\n".encode("latin-1"))
    offset = len("naïve café\n".encode("utf-8")) + len("second line: caf")
    with pytest.raises(ValueError, match=rf"notes.txt: not UTF-8 text: byte 0xe9 at offset {offset} \(line 2\)"):
        load_text_dataset(tmp_path / "notes.txt", cache_dir=tmp_path / "cache")
    spaced = tmp_path / "my notes.txt"  # the suggested iconv command is quoted for the shell
    spaced.write_bytes("café".encode("latin-1"))
    with pytest.raises(ValueError) as error:
        load_text_dataset(spaced, cache_dir=tmp_path / "cache")
    assert str(error.value).endswith(f"convert it, e.g. iconv -f latin1 -t utf-8 '{spaced}' > 'my notes.utf8.txt'")
    (tmp_path / "docs.jsonl").write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"docs.jsonl: not UTF-8 text: byte 0xe9 at offset 30 \(line 2\)"):
        load_text_dataset(tmp_path / "docs.jsonl", cache_dir=tmp_path / "cache")
    (tmp_path / "broken.jsonl").write_text('{"text": "fine"}\n\n{"text": "cut\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"broken.jsonl: line 3 is not JSON"):
        load_text_dataset(tmp_path / "broken.jsonl", cache_dir=tmp_path / "cache")
    (tmp_path / "numbers.jsonl").write_text('{"text": 12}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"numbers.jsonl: line 1: 'text' \(data.text_column\) holds int 12, not a "
                                         "string"):
        load_text_dataset(tmp_path / "numbers.jsonl", cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()  # every file is read before anything is written


def test_local_paths_are_never_looked_up_on_the_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets
    import transformers

    def no_network(*args, **kwargs):
        raise AssertionError("looked up on the hub")

    monkeypatch.setattr(datasets, "load_dataset", no_network)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", no_network)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "corpora").mkdir()
    for local in ("mycorpus", "corpora/missing", "a/b/c", "./x", "~/nothing-here", "data.txt", "owner//name"):
        with pytest.raises(FileNotFoundError, match=rf"data.path {local}: no such file or folder"):
            source_kind(local)
    assert source_kind("roneneldan/TinyStories") == "hub"  # owner/name, and no folder "roneneldan" here
    for local in ("./tok", "/no/such/tokenizer", "corpora/tok"):
        with pytest.raises(ValueError, match=rf"data.tokenizer '{local}': no such folder"):
            load_tokenizer(local)
    with pytest.raises(AssertionError, match="hub"):  # bare and owner/name tokenizers may be hub names
        load_tokenizer("gpt2")


# The hub client's download retries of a missing repository wait about a minute in all; one look-up that
# fails takes a second on a quiet machine. The bound sits between the two, far enough from both that a
# busy CI machine cannot cross it.
NO_RETRIES_S = 30


def test_a_missing_hub_tokenizer_fails_fast_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture) -> None:
    """With HF_HUB_OFFLINE a bare name that is not cached is refused by `train` at once, in one error line."""
    import time

    from huggingface_hub import constants

    from bmojo_neuron import cli

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # read once at import: the running process's switch
    Recipe.from_dict({"data": {"kind": "text"}}).model_config()  # imports done before the clock starts
    expected = ("data.tokenizer 'nosuchtok': not 'byte', not a local folder and not in the local Hugging Face "
                "cache, and the hub cannot be reached (offline mode is on: HF_HUB_OFFLINE is set); download it")
    start = time.monotonic()
    with pytest.raises(ValueError) as error:
        load_tokenizer("nosuchtok")
    assert time.monotonic() - start < NO_RETRIES_S and str(error.value).startswith(expected)
    monkeypatch.chdir(tmp_path)
    start = time.monotonic()
    tiny = ["model.hidden_size=32", "model.intermediate_size=32", "model.num_hidden_layers=2", "model.layer_pattern=BM"]
    assert cli.main(["train", "cpu-text", "data.tokenizer=nosuchtok", *tiny, "--no-progress"]) == 2
    assert time.monotonic() - start < NO_RETRIES_S and capsys.readouterr().err.startswith(f"error: {expected}")


def test_tokenizer_and_dataset_look_ups_share_one_helper_and_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    """`data.hub.look_up_on_hub` asks the hub for both, with one timeout; each caller keeps its own words for a
    name the hub lacks and for a hub that does not answer (a stand-in for `huggingface_hub.repo_info`)."""
    import httpx2
    import huggingface_hub
    from huggingface_hub.errors import RepositoryNotFoundError

    from bmojo_neuron.data import hub
    from bmojo_neuron.data.tokenizer import _check_on_hub

    asked, answer = [], {}

    def repo_info(name: str, *, repo_type: str, timeout: float) -> None:
        asked.append((name, repo_type, timeout))
        raise answer["error"]

    monkeypatch.setattr(huggingface_hub, "repo_info", repo_info)
    monkeypatch.setattr(hub, "datasets_offline", lambda: False)
    missing = RepositoryNotFoundError("404", response=httpx2.Response(404, request=httpx2.Request("GET", "http://hub")))
    tok = "data.tokenizer 'someone/tok': not 'byte', not a local folder and not in the local Hugging Face cache, and "
    for error, tok_end, data_error in [
            (missing, "the hub has no such repository (or it is private: log in with `hf auth login`)",
             (FileNotFoundError, "data.path someone/data: not a local path, and the hub has no such dataset (or it "
                                 "is private: log in with `hf auth login`)")),
            (TimeoutError("timed out"), "the hub cannot be reached (TimeoutError: timed out); download it where "
                                        "online, or point data.tokenizer at a folder with its files",
             (ValueError, "data.path someone/data: a hub dataset, and the hub cannot be reached (TimeoutError: "
                          f"timed out); {hub.FETCH_ADVICE.format(name='someone/data')}, or set HF_HUB_OFFLINE=1 "
                          "to read a copy already in the Hugging Face cache"))]:
        answer["error"] = error
        with pytest.raises(ValueError) as tokenizer:
            _check_on_hub("someone/tok")
        with pytest.raises(data_error[0]) as dataset:
            hub.check_hub_dataset("someone/data")
        assert (str(tokenizer.value), str(dataset.value)) == (tok + tok_end, data_error[1])
    timeout = hub.HUB_LOOKUP_TIMEOUT
    assert asked == [("someone/tok", "model", timeout), ("someone/data", "dataset", timeout)] * 2 and timeout == 5


def _run_with_hub(code: str, **env: str) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter whose huggingface_hub reads `env` (its settings are read once, at import);
    offline only when `env` says so."""
    environ = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    return subprocess.run([sys.executable, "-c", code], env={**environ, **env}, capture_output=True, text=True,
                          timeout=120)


def test_a_missing_hub_tokenizer_fails_fast_when_the_hub_cannot_be_reached(tmp_path: Path) -> None:
    """No route to the hub and no HF_HUB_OFFLINE: one look-up fails, instead of a minute of download retries.

    The hub is a local port nobody listens on, so the test needs no network and every connection is refused.
    """
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    code = ("import time; import transformers.utils.hub; from bmojo_neuron.data.tokenizer import load_tokenizer\n"
            "start = time.monotonic()\ntry: load_tokenizer('nosuchtok')\n"
            "except ValueError as error: print(round(time.monotonic() - start, 1), error)")
    done = _run_with_hub(code, HF_ENDPOINT=f"http://127.0.0.1:{port}", HF_HUB_CACHE=str(tmp_path))
    lines = done.stdout.splitlines()
    assert len(lines) == 1, done.stderr[-2000:]
    for line in lines:
        seconds, message = line.split(" ", 1)
        assert float(seconds) < NO_RETRIES_S and message.startswith(
            "data.tokenizer 'nosuchtok': not 'byte', not a local folder and not in the local Hugging Face cache, "
            "and the hub cannot be reached (ConnectError: "), line


def test_a_cached_hub_tokenizer_loads_offline(tmp_path: Path) -> None:
    """A hub tokenizer in the local Hugging Face cache loads with HF_HUB_OFFLINE=1 (no look-up at all)."""
    from bmojo_neuron.data.tokenizer import hf_tokenizer

    snapshot = tmp_path / "hub" / "models--someone--tok" / "snapshots" / ("0" * 40)
    hf_tokenizer("byte").save_pretrained(str(snapshot))
    (snapshot / "config.json").write_text("{}")  # AutoTokenizer fetches the repo's config.json too
    (tmp_path / "hub" / "models--someone--tok" / "refs").mkdir()
    (tmp_path / "hub" / "models--someone--tok" / "refs" / "main").write_text("0" * 40)
    code = ("from bmojo_neuron.data.tokenizer import load_tokenizer; "
            "print(load_tokenizer('someone/tok').encode('hi', add_special_tokens=False))")
    done = _run_with_hub(code, HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_OFFLINE="1")
    assert done.returncode == 0 and done.stdout.strip() == "[104, 105]", done.stderr[-2000:]


def _word_level_tokenizer(folder: Path) -> None:
    """A 40-token WordLevel tokenizer with one added token beyond the vocabulary and one inside it, plus an eos
    (a special token transformers adds) and a pad token that only tokenizer_config.json names."""
    from tokenizers import Tokenizer, models
    from transformers import AddedToken, PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(vocab={f"w{i}": i for i in range(40)}, unk_token="w0"))
    backend.add_tokens(["<extra>", "w3"])
    hf = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>")
    hf.add_special_tokens({"pad_token": AddedToken("<pad>", special=True)})
    hf.save_pretrained(str(folder))


def _unigram_tokenizer(folder: Path) -> None:
    """A Unigram tokenizer (its vocabulary a list of [piece, score]) of 30 pieces, eos among them."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.Unigram([(f"p{i}", -float(i)) for i in range(29)] + [("</s>", 0.0)], unk_id=0))
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>").save_pretrained(str(folder))


@pytest.mark.parametrize("build", [_word_level_tokenizer, _unigram_tokenizer], ids=["word-level", "unigram"])
def test_a_local_tokenizer_folder_is_counted_from_its_files_as_transformers_counts_it(tmp_path, build):
    """`vocabulary_in_files` reads tokenizer.json (and tokenizer_config.json's added tokens) without transformers
    and gives the number of ids `len()` of the loaded tokenizer gives; a folder without tokenizer.json, or a hub
    name, is left to the load (None)."""
    from transformers import AutoTokenizer

    from bmojo_neuron.data.tokenizer import vocabulary_in_files

    build(tmp_path / "tok")
    assert vocabulary_in_files(str(tmp_path / "tok")) == len(AutoTokenizer.from_pretrained(str(tmp_path / "tok")))
    (tmp_path / "empty").mkdir()
    assert vocabulary_in_files(str(tmp_path / "empty")) is None
    assert vocabulary_in_files("someone/tokenizer") is None


def _generic_tokenizer(folder: Path, config: dict | None, special_tokens_map: dict | None = None) -> None:
    """A 40-token WordLevel tokenizer.json with `config` as its tokenizer_config.json (none for None) and
    `special_tokens_map` as its special_tokens_map.json (none for None)."""
    folder.mkdir()
    (folder / "tokenizer.json").write_text(json.dumps({
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
        "pre_tokenizer": {"type": "WhitespaceSplit"}, "post_processor": None, "decoder": None,
        "model": {"type": "WordLevel", "unk_token": "w0", "vocab": {f"w{i}": i for i in range(40)}}}))
    for name, document in (("tokenizer_config.json", config), ("special_tokens_map.json", special_tokens_map)):
        if document is not None:
            (folder / name).write_text(json.dumps(document))


GENERIC = {"tokenizer_class": "TokenizersBackend"}


@pytest.mark.parametrize("config, special_tokens_map, decided", [
    (GENERIC, None, False),
    ({"tokenizer_class": "PreTrainedTokenizerFast"}, {"pad_token": "w1"}, False),
    ({**GENERIC, "eos_token": "w5"}, None, True),
    ({**GENERIC, "eos_token": "</s>"}, None, True),  # not in the vocabulary: the load adds it
    (GENERIC, {"eos_token": "w5"}, True),
    ({**GENERIC, "added_tokens_decoder": {}}, {"eos_token": "w5"}, False),  # the map is not read then
    ({"tokenizer_class": "LlamaTokenizer"}, None, None),  # the class's own default eos
    (None, None, None),
], ids=["none", "pad-only", "config", "config-new-token", "special-map", "map-ignored", "model-class", "no-config"])
def test_whether_a_tokenizer_has_an_eos_is_read_from_its_files_as_transformers_reads_them(
        tmp_path, config, special_tokens_map, decided):
    """`eos_named_in_files` says whether the loaded tokenizer will have an eos id, without transformers, wherever
    the files decide it (a generic tokenizer class); where they do not (a model's own class, which may default
    one, or no tokenizer_config.json) it says None and the load decides."""
    from transformers import AutoTokenizer

    from bmojo_neuron.data.tokenizer import eos_named_in_files

    _generic_tokenizer(tmp_path / "tok", config, special_tokens_map)
    assert eos_named_in_files(str(tmp_path / "tok")) is decided
    if decided is not None:
        assert (AutoTokenizer.from_pretrained(str(tmp_path / "tok")).eos_token_id is not None) is decided


def test_a_hub_tokenizer_in_the_local_cache_is_read_from_its_files(tmp_path, monkeypatch):
    """A hub name whose tokenizer is in the local Hugging Face cache is counted (`vocabulary_in_files`) and its eos
    read (`eos_named_in_files`) from the cached files, as a local folder's are; a file the cache never fetched
    leaves the answer to the load (None)."""
    from huggingface_hub import constants
    from transformers import AutoTokenizer

    from bmojo_neuron.data.tokenizer import eos_named_in_files, vocabulary_in_files

    repo = tmp_path / "hub" / "models--someone--tok"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.parent.mkdir(parents=True)
    _word_level_tokenizer(snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert vocabulary_in_files("someone/tok") == len(AutoTokenizer.from_pretrained(str(snapshot))) == 43
    assert eos_named_in_files("someone/tok") is True
    _generic_tokenizer(tmp_path / "noeos", GENERIC)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (snapshot / name).write_text((tmp_path / "noeos" / name).read_text())
    assert eos_named_in_files("someone/tok") is None  # special_tokens_map.json is not in the cache
    (repo / ".no_exist" / ("0" * 40)).mkdir(parents=True)
    (repo / ".no_exist" / ("0" * 40) / "special_tokens_map.json").write_text("")  # the hub said it has none
    assert eos_named_in_files("someone/tok") is False
    assert vocabulary_in_files("someone/other") is None and eos_named_in_files("someone/other") is None


def test_a_malformed_tokenizer_json_is_one_error_naming_the_tokenizer(tmp_path):
    """The tokenizers library refuses a tokenizer.json with a field missing by raising a bare Exception: it is the
    ``data.tokenizer`` error all the same, not a traceback."""
    folder = tmp_path / "tok"
    folder.mkdir()
    (folder / "tokenizer.json").write_text(json.dumps({"model": {"type": "WordLevel", "unk_token": "w0", "vocab": {
        "w0": 0}}, "added_tokens": [{"id": 1, "content": "</s>"}]}))
    with pytest.raises(ValueError, match=f"data.tokenizer '{folder}': not 'byte' and not loadable as a Hugging Face "
                                         "tokenizer .*: missing field `"):
        load_tokenizer(str(folder))


@pytest.mark.parametrize("content, says", [
    ('{"model": ', ": Expecting value: line 1 column 11"),
    ("[]", r"\): tokenizer.json: invalid type: sequence, expected struct Tokenizer at line 1 column 2$"),
], ids=["not-json", "a-json-list"])
def test_a_tokenizer_json_that_is_no_tokenizer_is_one_error_naming_the_tokenizer(tmp_path: Path, content: str,
                                                                                says: str) -> None:
    """A tokenizer.json that is not JSON (a ValueError), or JSON of another type: transformers fails on a list with a
    TypeError of its own, and the tokenizers library refuses the file, so it is the ``data.tokenizer`` error too,
    with the library's reason (the TypeError names nothing in the file)."""
    folder = tmp_path / "tok"
    folder.mkdir()
    (folder / "tokenizer.json").write_text(content)
    with pytest.raises(ValueError, match=f"data.tokenizer '{folder}': not 'byte' and not loadable as a Hugging Face "
                                         f"tokenizer .*{says}"):
        load_tokenizer(str(folder))


@pytest.mark.parametrize("failure", [RuntimeError("a bug inside the load"), Exception("a bare one, not the file's")])
def test_an_error_inside_the_tokenizer_load_is_not_called_a_bad_tokenizer(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch,
                                                                         failure: Exception) -> None:
    """Only the file's refusal becomes the ``data.tokenizer`` error: another error raised while transformers loads a
    good tokenizer folder (here the byte tokenizer's, saved) propagates as it is, a bare Exception included (the
    tokenizers library reads the file without one)."""
    import transformers

    from bmojo_neuron.data.tokenizer import hf_byte_tokenizer

    folder = tmp_path / "tok"
    hf_byte_tokenizer().save_pretrained(str(folder))
    assert load_tokenizer(str(folder)).encode("hi", add_special_tokens=False) == [104, 105]

    def fail(*args, **kwargs):
        raise failure

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fail)
    with pytest.raises(Exception) as error:
        load_tokenizer(str(folder))
    assert error.value is failure


def test_a_cache_build_says_its_stages_and_counts_at_most_every_interval(tmp_path: Path) -> None:
    """`BuildProgress`: one line as each stage starts (the first names the cache folder), and within tokenize and
    pack a count line only once the interval has passed (here a clock that moves 6 s per reading against a 10 s
    interval: batches of 1000 documents are counted at 6 s, 12 s and 18 s after the stage's line, and the second is
    the one said); none when the cache is there already. The final count (every document) is left to the next
    stage's line."""
    import re

    from bmojo_neuron.data.build_progress import BuildProgress

    source = tmp_path / "docs.jsonl"
    source.write_text("".join(json.dumps({"text": f"document {i} " * 3}) + "\n" for i in range(2500)))
    ticks = iter(range(0, 10_000, 6))
    lines: list[str] = []
    progress = BuildProgress(lines.append, every=10, clock=lambda: float(next(ticks)))
    train, evaluation = load_text_dataset(source, block_size=64, cache_dir=tmp_path / "cache", progress=progress)
    tokens = sum(len(f"document {i} " * 3) + 1 for i in range(2500))  # bytes and one eos per document
    blocks = len(train) + len(evaluation)
    assert blocks == tokens // 64
    final = next((tmp_path / "cache").glob("text-*"))
    stages = [line for line in lines if not line.startswith("  ")]
    assert stages[:4] == [f"building the data cache {final}: reading {source}",
                          f"tokenizing 2,500 documents of {source} (tokenizer byte)",
                          f"packing {tokens:,} tokens into blocks of 64", f"saving {blocks:,} blocks into {final}"]
    assert len(stages) == 5 and re.fullmatch(r"built in \d+\.\ds", stages[4]), stages
    assert lines[1] == stages[1]  # reading the source counts nothing
    packing, saving = lines.index(stages[2]), lines.index(stages[3])
    for stage_counts in (lines[2:packing], lines[packing + 1:saving]):  # tokenize's, pack's
        assert len(stage_counts) == 1, lines
        assert re.fullmatch(r"  2,000 of 2,500 documents \(80%\), \d+s in", stage_counts[0]), lines
    assert saving + 2 == len(lines)  # saving, built: nothing counted
    lines.clear()
    load_text_dataset(source, block_size=64, cache_dir=tmp_path / "cache", progress=progress)
    assert lines == []


def test_the_early_tokenizer_check_asks_only_when_the_cache_must_be_built(tmp_path, monkeypatch):
    """`train` and `data prepare` check a text run's tokenizer before torch loads only when its data cache is not
    built yet: a node with the cache (built elsewhere by `data prepare`) never loads the tokenizer, so an
    unreachable hub there must not stop it. The hub look-up is replaced by one that fails as offline mode does."""
    from types import SimpleNamespace

    from bmojo_neuron.data import tokenizer as tokenizers
    from bmojo_neuron.data.hub import HubUnreachable

    asked: list[str] = []

    def offline(name, repo_type):
        asked.append(name)
        raise HubUnreachable("OfflineModeIsEnabled: offline")

    monkeypatch.setattr(tokenizers, "look_up_on_hub", offline)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("some text\n" * 20)
    data = SimpleNamespace(kind="text", path=str(corpus), tokenizer="no-such/tokenizer", block_size=8,
                           cache_dir=str(tmp_path), eval_fraction=0.25, text_column="text")
    with pytest.raises(ValueError, match="data.tokenizer 'no-such/tokenizer': not 'byte', not a local folder"):
        text.check_build_tokenizer(data)
    assert asked == ["no-such/tokenizer"]
    text.check_build_tokenizer(SimpleNamespace(**{**vars(data), "kind": "mqar"}))  # no tokenizer to check
    assert asked == ["no-such/tokenizer"]
    with pytest.raises(ValueError, match="no such folder"):  # a local path is never looked up
        text.check_build_tokenizer(SimpleNamespace(**{**vars(data), "tokenizer": str(tmp_path / "tok")}))
    folder = text._cache_folder(text._cache_settings(str(corpus), "text-file", data.tokenizer, 8, 0.25, "text"),
                                tmp_path)
    folder.mkdir()
    (folder / "meta.json").write_text("{}")  # the cache `data prepare` would have built
    text.check_build_tokenizer(data)
    text.check_build_tokenizer(SimpleNamespace(**{**vars(data), "tokenizer": "byte"}))
    assert asked == ["no-such/tokenizer"]
