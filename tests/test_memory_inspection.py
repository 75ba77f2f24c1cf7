"""Memory inspection against a hand-built case, and the MQAR coverage count."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from naive import tiny_config

from bmojo_neuron import BMojoForCausalLM
from bmojo_neuron.memory_inspection import (
    LayerMemory,
    answer_breakdown,
    format_answers,
    format_memory_table,
    kv_coverage,
    kv_positions,
    plot_memory,
    trace_memory,
)

HIDDEN = 32


def hand_built_model() -> BMojoForCausalLM:
    """One B layer whose innovation of token n is exactly n**2.

    Token n (< HIDDEN) embeds as the unit vector e_n, so the mixer's RMSNorm feeds it
    sqrt(d) * e_n; k_proj maps that to the all-n key; the predictor is zero, so the
    innovation is mean(K^2) = n^2. Chunk 5, 2 picks, 8 slots, decay 1: the memory
    after chunk j holds the two largest tokens of every chunk up to j.
    """
    config = tiny_config(vocab_size=HIDDEN, hidden_size=HIDDEN, memory_size=8, memory_decay=1.0, memory_picks=2,
                         memory_chunk=5, window_size=4, fading_window=3)
    torch.manual_seed(0)
    model = BMojoForCausalLM(config).eval()
    mixer = model.model.layers[0].mixer
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(torch.eye(HIDDEN))
        mixer.k_proj.weight.zero_()
        mixer.k_proj.weight.copy_(torch.arange(HIDDEN, dtype=torch.float32).expand_as(mixer.k_proj.weight) / HIDDEN**0.5)
        mixer.innovation_proj.weight.zero_()
    return model


SEQUENCE = [1, 9, 2, 8, 3,  4, 5, 30, 6, 7,  20, 20, 1, 1, 1,  0, 2, 0, 3, 0,  11, 12]  # 4 chunks + 2 tokens
# Per chunk, the two largest (ties: lower position first): (1, 3), (7, 9), (10, 11), (16, 18).
EXPECTED = [[1, 3], [1, 3, 7, 9], [1, 3, 7, 9, 10, 11], [1, 3, 7, 9, 10, 11, 16, 18]]


def test_trace_matches_the_hand_built_memory():
    traces = trace_memory(hand_built_model(), torch.tensor([SEQUENCE]))
    assert len(traces) == 1
    trace = traces[0]
    assert trace.positions.shape == (1, 4, 8) and trace.lag == 1 + -(-(4 + 3) // 5)
    for j, expected in enumerate(EXPECTED):
        held = trace.positions[0, j]
        assert sorted(held[held >= 0].tolist()) == expected
        scores = {int(p): s for p, s in zip(held, trace.scores[0, j]) if p >= 0}
        for p in expected:
            assert scores[p] == pytest.approx(SEQUENCE[p] ** 2, rel=1e-3)
    np.testing.assert_allclose(trace.innovation[0], np.array(SEQUENCE, dtype=float) ** 2, rtol=1e-3)


def test_table_stars_kv_tokens_and_plot_is_written(tmp_path):
    traces = trace_memory(hand_built_model(), torch.tensor([SEQUENCE]))
    table = format_memory_table(traces, kv={7, 16})
    lines = table.splitlines()
    row = next(line for line in lines if line.strip().startswith("3 "))
    assert "7*(900)" in row and "16*(4)" in row and "9(49)" in row and " 8/8 " in row
    assert plot_memory(traces, tmp_path / "memory.png", kv={7, 16}).stat().st_size > 0


def hand_memory(positions: list[list[int]], window: int = 2, fading: int = 2, chunk: int = 4, lag: int = 2):
    size = max(len(p) for p in positions)
    held = np.full((1, len(positions), size), -1)
    for j, p in enumerate(positions):
        held[0, j, : len(p)] = p
    return LayerMemory(0, window, fading, chunk, lag, np.zeros((1, 4 * len(positions))), held, np.ones(held.shape))


def test_kv_coverage_places_each_pair():
    # Pairs (10, 40) at 0-1 and (11, 41) at 2-3; queries: key 10 at 6, key 11 at 12.
    # w = 2, w_f = 2, chunk 4, lag 2: query 6 (chunk 1) reads no memory; query 12 (chunk 3) reads
    # the memory after chunk 1, which holds 1, 3 and 5.
    ids = np.zeros((1, 16), dtype=np.int64)
    ids[0, [0, 1, 2, 3, 6, 7, 12, 13]] = [10, 40, 11, 41, 10, 40, 11, 41]
    labels = np.full((1, 16), -100)
    labels[0, [7, 13]] = [40, 41]
    memory = hand_memory([[0, 1, 3], [1, 3, 5]])
    assert kv_positions(ids, labels) == [{0, 1, 2, 3}]
    coverage = kv_coverage(memory, ids, labels)
    assert coverage.queries == 2 and coverage.value_misses is None
    # query 6: its key (6 back) and value (5 back) are past both windows (w + w_f = 4), but in chunk 0,
    # which only chunk 2 onwards reads: unreachable.
    # query 12: its key at 2 is old enough for chunk 1's memory but not in it (dropped); its value at 3 is (memory).
    assert coverage.keys == {"window": 0, "fading": 0, "memory": 0, "dropped": 1, "unreachable": 1}
    assert coverage.values == {"window": 0, "fading": 0, "memory": 1, "dropped": 0, "unreachable": 1}
    assert coverage.memory_share("values") == 0.5 and coverage.memory_share("keys") == 0.0

    predictions = np.zeros((1, 16), dtype=np.int64)
    predictions[0, [6, 12]] = [40, 7]  # query 6 answered right, query 12 wrong
    coverage = kv_coverage(memory, ids, labels, predictions)
    assert coverage.value_misses == {"window": 0, "fading": 0, "memory": 1, "dropped": 0, "unreachable": 0}
    table = format_memory_table([memory], kv={0, 1, 2, 3}, coverage=[coverage])
    assert "n answered wrong" in table and "1 (1)" in table and "1 (0)" in table


def test_kv_coverage_counts_windows():
    ids = np.zeros((1, 8), dtype=np.int64)
    ids[0, [0, 1, 3, 4]] = [10, 40, 10, 40]  # query at 3: value 2 back (fading, w = 2), key 3 back (fading)
    labels = np.full((1, 8), -100)
    labels[0, 4] = 40
    coverage = kv_coverage(hand_memory([[], []]), ids, labels)
    assert coverage.keys["fading"] == 1 and coverage.values["fading"] == 1
    assert coverage.memory_share("values") is None


def test_answers_by_distance_and_kind():
    # Pairs (10, 40) at 0-1, (11, 41) at 2-3, (12, 42) at 4-5; queries: key 12 at 6 (2 back, bucket 2-3),
    # key 10 at 9 (9 back, bucket 8-15), key 11 at 14 (12 back, bucket 8-15).
    ids = np.zeros((1, 16), dtype=np.int64)
    ids[0, [0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 14, 15]] = [10, 40, 11, 41, 12, 42, 12, 42, 10, 40, 11, 41]
    labels = np.full((1, 16), -100)
    labels[0, [7, 10, 15]] = [42, 40, 41]
    predictions = np.zeros((1, 16), dtype=np.int64)
    predictions[0, [6, 9, 14]] = [42, 41, 5]  # right; another pair's value; no value at all
    answers = answer_breakdown(ids, labels, predictions)
    assert answers.buckets() == [(2, 3, 1, 1), (8, 15, 2, 0)]
    assert (answers.wrong, answers.wrong_other_value) == (2, 1)
    text = format_answers(answers)
    assert "2-3       1  1.000" in text and "8-15       2  0.000" in text
    assert "wrong answers: 2, of which 1 (50%) the value of another pair" in text


@pytest.mark.parametrize("length", [1, 2])
def test_inspect_reads_the_eval_data_stretched_by_length(length, tmp_path):
    """`inspect --length 2` traces the stretched eval layout: with innovation n**2, the memory after chunk 0
    (positions 0-4) holds its two largest tokens, the values 1 and 3 at 1x (k v k v k), and at 2x
    (k v 0 0 k) the value at 1 and the larger of the keys at 0 and 4."""
    from bmojo_neuron import cli
    from bmojo_neuron.data import build_eval_dataset
    from bmojo_neuron.recipes import load_recipe

    hand_built_model().save_pretrained(tmp_path / "model")
    data = ["cpu-tiny", f"vocab_size={HIDDEN}", "seq_len=16", "num_kv_pairs=3", "eval_examples=4"]
    args = ["inspect", str(tmp_path / "model"), "--data", *data, "--sequences", "2", "--length", str(length),
            "--device", "cpu", "--output-dir", str(tmp_path / "out")]
    assert cli.main(args) == 0
    report = json.loads((tmp_path / "out" / "memory.json").read_text())
    assert report["length_multiplier"] == length
    positions = np.array(report["layers"][0]["positions"])
    assert positions.shape == (2, 16 * length // 5, 8)
    recipe = load_recipe("cpu-tiny", [f"data.vocab_size={HIDDEN}", "data.seq_len=16", "data.num_kv_pairs=3",
                                      "data.eval_examples=4"])
    ids = build_eval_dataset(recipe, length)[:2]["input_ids"].numpy()
    assert (ids[:, 1] >= HIDDEN // 2).all() and (ids[:, 3 if length == 1 else 2] > 0).all() == (length == 1)
    for row in range(2):
        held = positions[row, 0][positions[row, 0] >= 0]
        want = {1, 3} if length == 1 else {1, 0 if ids[row, 0] > ids[row, 4] else 4}
        assert set(held.tolist()) == want
    assert sum(report["coverage"][0]["values"].values()) == 2 * 3  # every query of both sequences placed
    assert sum(b["queries"] for b in report["answers_by_distance"]) == 2 * 3
    assert report["wrong_answers"]["total"] == 2 * 3 - sum(b["correct"] for b in report["answers_by_distance"])
    assert cli.main([*args[:-2], "--length", "0"]) == 2  # a clear error


def test_models_without_memory_are_refused():
    model = BMojoForCausalLM(tiny_config(layer_pattern="F"))
    with pytest.raises(ValueError, match="no B layer"):
        trace_memory(model, torch.zeros(1, 8, dtype=torch.long))
