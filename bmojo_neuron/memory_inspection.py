"""What each `B` layer's eidetic memory holds: per chunk, per sequence, and (MQAR) at query time.

`trace_memory` runs the model once and asks every `B` layer (`BMojoAttention.memory_trace`)
for the innovation of each token and the memory after each complete chunk. On MQAR,
`kv_coverage` then answers the question that decides recall: when a query arrives,
where is its pair — in the window, in the fading window, in the memory that query's
chunk reads, dropped by that memory, or too recent to be in it yet? Given the
model's predictions it also counts the queries answered wrong per place, which says
which path the misses come from. `answer_breakdown` asks the question that follows when
the pairs are in memory and the answers still wrong: how recall falls with the distance
back to the pair, and whether a wrong answer is the value of another pair of the same
sequence (the model found a value, not the right one) or something else.
`format_memory_table` and `format_answers` print them; `plot_memory` draws positions
held against chunks with the kv tokens marked.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from bmojo_neuron.data.mqar import mqar_pairs

# Where a query can read an earlier token: in its window, in its fading window, in the memory its chunk
# reads; or nowhere: "dropped" (old enough for that memory, not kept) or "unreachable" (past both windows
# but too recent for that memory, which lags `memory_lag` chunks behind: no selection could hold it).
PLACES = ("window", "fading", "memory", "dropped", "unreachable")


@dataclass
class LayerMemory:
    """One `B` layer's memory over a batch of sequences (numpy, on the host).

    ``positions[b, j]`` are the token positions held after chunk ``j`` (-1: empty
    slot), ``scores[b, j]`` their innovations when picked; chunk ``j`` reads the
    memory after chunk ``j - lag``.
    """

    layer: int
    window: int
    fading_window: int
    chunk: int
    lag: int
    innovation: np.ndarray  # (batch, L)
    positions: np.ndarray  # (batch, n_complete_chunks, M) int
    scores: np.ndarray  # (batch, n_complete_chunks, M)
    fading_overlap: bool = False  # fading keys over the window: both windows reach back max(w, w_f)

    def visible(self, row: int, query: int) -> np.ndarray:
        """Positions in the memory that the query at `query` reads (possibly empty)."""
        source = query // self.chunk - self.lag
        if source < 0 or source >= self.positions.shape[1]:
            return np.empty(0, dtype=np.int64)
        held = self.positions[row, source]
        return held[held >= 0]

    def place(self, row: int, query: int, token: int) -> str:
        """Where the query at `query` can read the token at `token`: one of `PLACES`."""
        distance = query - token
        if distance < self.window:
            return "window"
        if distance < (max(self.window, self.fading_window) if self.fading_overlap else self.window + self.fading_window):
            return "fading"
        if token // self.chunk > query // self.chunk - self.lag:
            return "unreachable"
        return "memory" if token in self.visible(row, query) else "dropped"


@dataclass
class Coverage:
    """Where the key and value tokens of every MQAR query are when the query arrives, for one layer.

    ``value_misses`` (when predictions were given): per place of the value token, the
    queries answered wrong.
    """

    layer: int
    queries: int = 0
    keys: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PLACES, 0))
    values: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PLACES, 0))
    value_misses: dict[str, int] | None = None

    def memory_share(self, which: str = "values") -> float | None:
        """Of the tokens outside both windows, the share the query's memory holds (None if none were outside)."""
        counts = self.values if which == "values" else self.keys
        outside = counts["memory"] + counts["dropped"] + counts["unreachable"]
        return counts["memory"] / outside if outside else None


@dataclass
class Answers:
    """Every MQAR query's answer, by the distance back from the query to its key.

    Bucket ``i`` holds the queries whose key is ``[2**i, 2**(i+1))`` tokens back.
    ``wrong_other_value``: wrong answers that are the value of another pair in the same
    sequence (a model that retrieves a value but matches the wrong key), as against a
    token that is no value there at all.
    """

    queries: list[int] = field(default_factory=list)
    correct: list[int] = field(default_factory=list)
    wrong_other_value: int = 0

    @property
    def wrong(self) -> int:
        return sum(self.queries) - sum(self.correct)

    def add(self, distance: int, right: bool) -> None:
        bucket = max(distance, 1).bit_length() - 1
        while len(self.queries) <= bucket:
            self.queries.append(0)
            self.correct.append(0)
        self.queries[bucket] += 1
        self.correct[bucket] += int(right)

    def buckets(self) -> list[tuple[int, int, int, int]]:
        """``(first distance, last distance, queries, correct)`` of each non-empty bucket."""
        return [(2**i, 2 ** (i + 1) - 1, n, c) for i, (n, c) in enumerate(zip(self.queries, self.correct)) if n]


def answer_breakdown(input_ids: np.ndarray, labels: np.ndarray, predictions: np.ndarray) -> Answers:
    """Recall of the MQAR queries by distance back to their key, and what their wrong answers were.

    `predictions` (batch, L): the model's next-token argmax, read as for `kv_coverage`.
    """
    answers = Answers()
    for row, pairs in enumerate(mqar_pairs(input_ids, labels)):
        values = {int(input_ids[row, key + 1]) for _, key in pairs}
        for query, key in pairs:
            answer, predicted = int(labels[row, query + 1]), int(predictions[row, query])
            answers.add(query - key, predicted == answer)
            if predicted != answer and predicted in values:
                answers.wrong_other_value += 1
    return answers


def format_answers(answers: Answers) -> str:
    """Recall per distance bucket, then the wrong answers that were another pair's value."""
    lines = ["MQAR answers by distance from the query back to its key (all sequences inspected)",
             f"{'distance':>11} {'queries':>7} {'recall':>6}"]
    for first, last, queries, correct in answers.buckets():
        lines.append(f"{f'{first}-{last}':>11} {queries:>7} {correct / queries:>6.3f}")
    if answers.wrong:
        lines.append(f"wrong answers: {answers.wrong}, of which {answers.wrong_other_value} "
                     f"({answers.wrong_other_value / answers.wrong:.0%}) the value of another pair in the sequence")
    return "\n".join(lines)


@torch.no_grad()
def trace_memory(model: nn.Module, input_ids: torch.Tensor) -> list[LayerMemory]:
    """Run `model` (a `BMojoForCausalLM`) on `input_ids` (batch, L) and trace every `B` layer's memory."""
    layers = [(i, layer.mixer) for i, layer in enumerate(model.model.layers)
              if layer.kind == "B" and layer.mixer.memory_size > 0]
    if not layers:
        raise ValueError(f"layer pattern {model.config.layer_pattern!r} has no B layer with memory: nothing to inspect")
    inputs: dict[int, torch.Tensor] = {}
    hooks = [mixer.register_forward_pre_hook(_keep_input(inputs, i)) for i, mixer in layers]
    was_training = model.training
    model.eval()
    try:
        model(input_ids)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    traces = []
    for i, mixer in layers:
        innovation, selection = mixer.memory_trace(inputs[i])
        positions, scores = selection.position, selection.innovation
        traces.append(LayerMemory(
            layer=i, window=mixer.window, fading_window=mixer.fading_window, chunk=mixer.chunk, lag=mixer.lag,
            innovation=innovation.float().cpu().numpy(), positions=positions.cpu().numpy(),
            scores=scores.float().cpu().numpy(), fading_overlap=mixer.fading_overlap,
        ))
    return traces


def _keep_input(store: dict[int, torch.Tensor], index: int):
    def hook(module: nn.Module, args: tuple) -> None:
        store[index] = args[0]
    return hook


def kv_coverage(
    trace: LayerMemory, input_ids: np.ndarray, labels: np.ndarray, predictions: np.ndarray | None = None
) -> Coverage:
    """Where each MQAR query's key token and value token are for `trace`'s layer when the query arrives.

    `predictions` (batch, L): the model's next-token argmax; a query at ``q`` is answered
    wrong when ``predictions[q] != labels[q + 1]``, counted under its value's place.
    """
    coverage = Coverage(trace.layer)
    if predictions is not None:
        coverage.value_misses = dict.fromkeys(PLACES, 0)
    for row, pairs in enumerate(mqar_pairs(input_ids, labels)):
        for query, key in pairs:
            coverage.queries += 1
            coverage.keys[trace.place(row, query, key)] += 1
            value_place = trace.place(row, query, key + 1)
            coverage.values[value_place] += 1
            if predictions is not None and predictions[row, query] != labels[row, query + 1]:
                coverage.value_misses[value_place] += 1
    return coverage


def kv_positions(input_ids: np.ndarray, labels: np.ndarray) -> list[set[int]]:
    """Per row, the positions of the kv-pair tokens (keys and values) that queries ask for."""
    return [{p for _, key in pairs for p in (key, key + 1)} for pairs in mqar_pairs(input_ids, labels)]


def format_memory_table(
    traces: Sequence[LayerMemory], row: int = 0, kv: set[int] | None = None, coverage: Sequence[Coverage] = ()
) -> str:
    """Per `B` layer: the memory after each chunk of sequence `row` (kv tokens starred), then the MQAR coverage."""
    lines = []
    for trace in traces:
        lines.append(f"layer {trace.layer} (B): memory after each chunk of sequence {row} "
                     f"(chunk {trace.chunk}, read by chunk j + {trace.lag}; position(innovation), * = kv token)")
        lines.append(f"{'chunk':>5} {'tokens':>11} {'held':>6} {'kv':>4}  positions")
        for j in range(trace.positions.shape[1]):
            held = trace.positions[row, j] >= 0
            order = np.argsort(trace.positions[row, j][held], kind="stable")
            pos, score = trace.positions[row, j][held][order], trace.scores[row, j][held][order]
            kv_held = sum(int(p) in kv for p in pos) if kv is not None else 0
            cells = " ".join(f"{p}{'*' if kv is not None and int(p) in kv else ''}({s:.3g})" for p, s in zip(pos, score))
            span = f"{j * trace.chunk}-{(j + 1) * trace.chunk - 1}"
            lines.append(f"{j:>5} {span:>11} {int(held.sum()):>3}/{held.size:<2} {kv_held:>4}  {cells}")
        lines.append("")
    if coverage:
        missed = coverage[0].value_misses is not None
        lines.append("MQAR: where each query's pair is when the query arrives (all sequences inspected"
                     + ("; (n): of those queries, n answered wrong)" if missed else ")"))
        header = (f"{'layer':>5} {'queries':>7}  " + " ".join(f"{'value ' + p:>17}" for p in PLACES)
                  + f"  {'values in memory':>16} {'keys in memory':>14}")
        lines += [header, "-" * len(header)]
        for c in coverage:
            shares = [c.memory_share("values"), c.memory_share("keys")]
            text = [f"{s:.3f}" if s is not None else "-" for s in shares]
            cells = [f"{c.values[p]}" + (f" ({c.value_misses[p]})" if missed else "") for p in PLACES]
            lines.append(f"{c.layer:>5} {c.queries:>7}  " + " ".join(f"{cell:>17}" for cell in cells)
                         + f"  {text[0]:>16} {text[1]:>14}")
        lines.append("values/keys in memory: of the pair tokens outside both windows when their query arrives, "
                     "the share the query's memory holds; dropped: old enough for that memory but not kept; "
                     "unreachable: too recent for it (memory_lag), whatever the selection")
    return "\n".join(lines)


def plot_memory(
    traces: Sequence[LayerMemory], path: str | Path, row: int = 0, kv: set[int] | None = None, title: str = ""
) -> Path:
    """PNG: for each `B` layer, the positions held after each chunk (colour: innovation), kv tokens ringed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(traces), figsize=(5 * len(traces), 4), squeeze=False)
    for ax, trace in zip(axes[0], traces):
        chunks, slots = trace.positions.shape[1:]
        x = np.repeat(np.arange(chunks), slots)
        pos, score = trace.positions[row].reshape(-1), trace.scores[row].reshape(-1)
        held = pos >= 0
        points = ax.scatter(x[held], pos[held], c=score[held], s=14, cmap="viridis")
        if kv is not None:
            marked = held & np.isin(pos, sorted(kv))
            ax.scatter(x[marked], pos[marked], s=60, facecolors="none", edgecolors="red", label="kv token")
            if marked.any():
                ax.legend(loc="upper left", fontsize=8)
        fig.colorbar(points, ax=ax, label="innovation at pick")
        ax.set_xlabel("after chunk")
        ax.set_ylabel("token position held")
        ax.set_title(f"layer {trace.layer}")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
