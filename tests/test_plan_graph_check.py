"""`bmojo-neuron plan --check-graph`: the training step's graph scanned on CPU for neuronx-cc's refusals.

The scan is `bmojo_neuron.training.step_graph` (the one `tests/test_static_shapes.py`
runs on every trn1 recipe) with the rules of `bmojo_neuron.compiler_rules`; here the
command around it: one line per finding with its code and error-code page, exit
status 1 on findings, the time taken, and bad input refused before anything is traced.
"""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

from typing import NamedTuple

import pytest
import torch
from torch import nn
from torch.fx.experimental import proxy_tensor
from toy_graphs import Scaled

from bmojo_neuron.cli import main
from bmojo_neuron.commands.plan import check_lines
from bmojo_neuron.compiler_rules import Violation
from bmojo_neuron.layers.factory import get_layer_factory
from bmojo_neuron.modeling_bmojo import causal_lm_loss
from bmojo_neuron.parallel.core_tensors import NxDCrossEntropyStep
from bmojo_neuron.parallel.sharding import shard_shapes
from bmojo_neuron.recipes import load_recipe
from bmojo_neuron.training import objective, step_graph

# 512 tokens (a multiple of 128 and of the recipe's memory_chunk 256) and one sequence a NeuronCore (32 over
# 32) trace faster than the recipe's 8 × 2048; the graph has the same ops.
SHORT = ["data.block_size=512", "train.batch_size=32"]
ONE_SLIDING_LAYER = ["model.layer_pattern=S", "model.num_hidden_layers=1"]


def plan(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["plan", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def _no_finding(module, args, progress):
    """The scan's contract without its minute of tracing: the shipped recipes' own scan runs in
    `tests/test_static_shapes.py` (`export_training_step` fails on any finding)."""
    assert isinstance(module, step_graph.TrainingLoss) and args[0].shape == (8, 2048)  # 256 over 32 cores
    progress("forward graph: 1 nodes; deriving the backward")
    progress("forward+backward graph: 1 nodes; scanning")
    return []


def test_the_shipped_recipe_passes(capsys, monkeypatch):
    monkeypatch.setattr(step_graph, "scan_training_step", _no_finding)
    code, out, err = plan(capsys, "trn1/bmojo-130m", "--check-graph")
    assert code == 0, out
    assert "tp 1 × pp 1 × dp 32" in out  # the plan is printed as without the check
    assert re.search(r"\nno finding \(\d+\.\d s\)\n$", out), out
    assert "layers B (one per kind" in out and "8 × 2048 tokens" in out
    assert "graph check: forward graph:" in err and "forward+backward graph:" in err  # progress, on stderr
    assert "Warning" not in err


def _refusing_objective(model, input_ids, labels):
    """The model's loss plus an integer sort (a TopK on integers) and a float64 round trip."""
    loss, metrics = objective.causal_lm_loss(model, input_ids, labels)
    ranks = torch.sort(labels.int(), dim=-1, stable=True).values  # NCC_EVRF013
    return loss.double().float() + ranks.sum().to(loss.dtype) * 0, metrics  # NCC_ESPP004


def test_a_refused_op_fails_the_check_with_its_code_and_line(capsys, monkeypatch):
    monkeypatch.setattr(step_graph, "objective_for", lambda recipe: _refusing_objective)
    # The refusals come from the objective, not the layers: one sliding-window layer traces in a third of a
    # B'MOJO layer's time (the shipped layers' own scan is `tests/test_static_shapes.py`'s).
    code, out, err = plan(capsys, "trn1/bmojo-130m", *SHORT, *ONE_SLIDING_LAYER, "--check-graph")
    assert code == 1
    lines = out[out.index("graph check (") :].splitlines()
    sort = [line for line in lines if line.startswith("  NCC_EVRF013 ")]
    float64 = [line for line in lines if line.startswith("  NCC_ESPP004 ")]
    assert len(sort) == 1 and len(float64) == 1, lines  # once each, though the joint graph repeats the forward
    assert sort[0].startswith("  NCC_EVRF013 compiler/error-codes/EVRF013.rst: aten.sort of a torch.int32 tensor")
    assert 'test_plan_graph_check.py", line' in sort[0] and sort[0].endswith("in _refusing_objective [forward graph]")
    assert float64[0].startswith("  NCC_ESPP004 compiler/error-codes/ESPP004.rst: float64 is not")
    assert re.fullmatch(r"\d+ findings: the compiler would refuse the step, .* \(\d+\.\d s\)", lines[-1])
    assert "layers S (one per kind" in lines[0] and "1 × 512 tokens" in lines[0]


@pytest.mark.parametrize("argv, message", [
    (["trn1/no-such-recipe"], "no-such-recipe"),
    (["trn1/bmojo-130m", "data.block_size=2000"], "data.block_size"),
])
def test_bad_input_is_one_error_line_before_any_trace(capsys, monkeypatch, argv, message):
    monkeypatch.setattr(step_graph, "check_recipe_graph", lambda *a, **k: pytest.fail("traced a bad recipe"))
    code, out, err = plan(capsys, *argv, "--check-graph")
    assert code == 2 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err


def test_json_carries_the_findings(capsys, monkeypatch):
    found = step_graph.Finding("forward", Violation("sort", "EVRF013", "aten.sort of a torch.int64 tensor", "at x"))
    monkeypatch.setattr(step_graph, "check_recipe_graph",
                        lambda *a, **k: step_graph.GraphCheck([found], 1.34, "B", 2048, 8))
    code, out, _ = plan(capsys, "trn1/bmojo-130m", "--check-graph", "--json")
    data = json.loads(out)
    assert code == 1 and data["world"] == 32
    assert data["graph_check"]["findings"] == [{"graph": "forward", "code": "NCC_EVRF013",
                                                "page": "compiler/error-codes/EVRF013.rst",
                                                "problem": "aten.sort of a torch.int64 tensor", "where": "at x",
                                                "node": "sort"}]
    assert isinstance(data["graph_check"]["seconds"], float)  # the command's own time, imports included
    assert [data["graph_check"][key] for key in ("layers", "tokens", "batch", "tp", "sp")] == ["B", 2048, 8, 1, False]


class LossOutput(NamedTuple):
    loss: torch.Tensor
    lm_loss: torch.Tensor
    aux_loss: None = None


class LogitsOnly(nn.Module):
    """The recipe's embedding, tied vocabulary projection and float32 loss without the decoder: the step's
    largest tensors (batch × sequence × vocabulary), traced in a second instead of a minute."""

    def __init__(self, config) -> None:
        super().__init__()
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, use_cache: bool = False) -> LossOutput:
        logits = (self.embed(input_ids) @ self.embed.weight.T).float()
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
        return LossOutput(loss, loss)


@pytest.mark.parametrize("batch_size, refused", [(352, True), (320, False)])
def test_the_4_gb_limit_is_checked_at_the_micro_batch_of_a_neuroncore(capsys, monkeypatch, batch_size, refused):
    """Over 32 NeuronCores, 352 sequences are 11 a core: float32 logits of 11 × 2048 × 50304 are 4.53e9 bytes,
    above 2^32; 320 (10 a core) are 4.12e9, under it. A trace of one sequence sees 0.41e9 either way."""
    monkeypatch.setattr(step_graph, "BMojoForCausalLM", LogitsOnly)
    code, out, _ = plan(capsys, "trn1/bmojo-130m", f"train.batch_size={batch_size}", "--check-graph")
    lines = out[out.index("graph check (") :].splitlines()
    assert f"{batch_size // 32} × 2048 tokens" in lines[0]
    over = [line for line in lines if line.startswith("  NCC_EVRF024 compiler/error-codes/EVRF024.rst: a tensor of ")]
    assert code == int(refused) and bool(over) == refused, lines
    if refused:
        assert all(line.endswith("graph]") for line in over)
        assert any("(11, 2048, 50304) torch.float32 is 4532994048 bytes" in line and
                   'test_plan_graph_check.py", line' in line and "in forward [forward graph]" in line
                   for line in over), over


class ShardedLogits(nn.Module):
    """`LogitsOnly` through the layer factory, as the model builds them: the embedding, the column-parallel
    vocabulary projection, the factory's cross-entropy, the sequence scatter of sequence parallelism and the
    vocabulary gather of the logits the model hands back (dead code in the step: only the loss is kept)."""

    def __init__(self, config) -> None:
        super().__init__()
        self.factory = get_layer_factory()
        self.embed = self.factory.embedding(config.vocab_size, config.hidden_size)
        self.lm_head = self.factory.column_linear(config.hidden_size, config.vocab_size)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, use_cache: bool = False) -> LossOutput:
        hidden = self.factory.scatter_sequence(self.embed(input_ids))
        logits = self.lm_head(hidden).float()
        loss = causal_lm_loss(logits, labels, self.factory)
        self.factory.gather_vocab(logits)
        return LossOutput(loss, loss)


@pytest.mark.parametrize("batch, shard", [(11, "(11, 2048, 25152)"), (22, "(22, 2048, 25152)")])
def test_the_4_gb_limit_counts_one_tensor_parallel_rank_s_shard(monkeypatch, batch, shard):
    """At tp 2 (sp on), float32 logits of 11 × 2048 × 50304 (4.53e9 bytes, refused at tp 1 above) are a shard of
    11 × 2048 × 25152 on a core, 2.27e9: no finding. At 22 sequences a core the shard is 4.53e9, a finding
    either way. (The plan's micro-batch is the test above's; the plan itself is left out: it takes seconds at tp 2.)"""
    monkeypatch.setattr(step_graph, "BMojoForCausalLM", ShardedLogits)
    check = step_graph.check_recipe_graph("trn1/bmojo-790m", ["data.block_size=2048", "parallel.tp=2",
                                                              "parallel.sp=true"], batch=batch)
    assert (check.tp, check.sp) == (2, True)
    head = check_lines(check)[0]
    assert f"{batch} × 2048 tokens, the shards of tensor-parallel rank 0 of 2 (sequence-parallel)," in head
    over = [str(f) for f in check.findings if f.refusal.code == "EVRF024"]
    assert [str(f) for f in check.findings] == over and bool(over) == (batch == 22), over
    assert not any("50304" in line for line in over), over  # the vocabulary gather is not in the step
    if over:
        assert any(f"{shard} torch.float32 is 4532994048 bytes" in line for line in over), over


def test_the_traced_model_holds_the_shards_of_a_tensor_parallel_rank():
    """The traced weights (so their gradients) have the shapes of rank 0 of the model's tensor-parallel layers
    (`shard_shapes`: `TorchTensorParallelFactory`, NxD's layout), at the shipped recipes' tp 2 and 4."""
    for name, tp in (("trn1/bmojo-790m", 2), ("trn1/bmojo-1.4b", 4)):
        recipe, model, _ = step_graph.fake_training_step(name)
        assert recipe.parallel.tp == tp
        shapes = {key: value.shape for key, value in model.state_dict().items()}
        assert shapes == shard_shapes(recipe.model_config(), tp)
        assert shapes["model.embed_tokens.weight"][0] * tp == recipe.model_config().vocab_size


def test_nxd_s_cross_entropy_ops_compute_torch_s_loss_and_gradient_on_a_shard():
    """`NxDCrossEntropyStep` (NxD's forward and backward ops, all-reduces as identities) on the whole vocabulary
    is torch's cross-entropy and its gradient (softmax less the one-hot target), to float64 rounding; a target
    outside the shard (12, 20 of 10 columns) picks nothing: the log-sum-exp of the row less its maximum, and the
    plain softmax as gradient, what this rank adds before NxD's all-reduce sums the ranks."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 10, dtype=torch.float64, generator=generator) * 3
    targets = torch.tensor([0, 3, 9, 12, 5, 20])
    loss, gradient = NxDCrossEntropyStep()(logits, targets)
    inside = targets < 10
    torch_loss = torch.nn.functional.cross_entropy(logits, targets.clamp(max=9), reduction="none")
    outside_loss = torch.logsumexp(logits, -1) - logits.max(-1).values
    torch.testing.assert_close(loss, torch.where(inside, torch_loss, outside_loss), rtol=0, atol=1e-12)
    one_hot = torch.nn.functional.one_hot(targets.clamp(max=9), 10).to(logits.dtype) * inside[:, None]
    torch.testing.assert_close(gradient, logits.softmax(-1) - one_hot, rtol=0, atol=1e-12)


def test_nxd_s_cross_entropy_is_scanned_at_the_logits_of_a_tensor_parallel_rank():
    """At tp 2 the 790M recipe's 22 × 4096 tokens hand NxD's loss 22 × 4095 rows of 50304 / 2 float32 logits,
    9.06e9 bytes: one EVRF024 finding in the loss's own graph, at its first op over the shard; 4 sequences (the
    recipe's micro-batch) fit; at tp 1 the loss is torch's, in the step's graphs."""
    recipe = load_recipe("trn1/bmojo-790m")
    assert recipe.parallel.tp == 2
    (finding,) = step_graph.nxd_loss_findings(recipe, 22)
    assert str(finding).startswith("NCC_EVRF024 compiler/error-codes/EVRF024.rst: a tensor of (90090, 25152) "
                                   "torch.float32 is 9063774720 bytes, above the 4 GB output-tensor limit")
    assert "core_tensors.py" in finding.refusal.where and str(finding).endswith("[NxD cross-entropy graph]")
    assert step_graph.nxd_loss_findings(recipe, 4) == []
    assert step_graph.nxd_loss_findings(load_recipe("trn1/bmojo-130m"), 22) == []


def _strided_dilated_conv(y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.conv1d(y.unsqueeze(0), torch.ones(4, 4, 2), stride=2, dilation=2).sum()


def test_a_refusal_of_the_backward_alone_names_the_forward_line_it_differentiates():
    """The strided, dilated conv1d compiles; its input gradient (convolution_backward) dilates input and kernel,
    a node only the joint graph has, which torch's retrace records without the model's line."""
    (finding,) = step_graph.scan_training_step(Scaled(_strided_dilated_conv), (torch.randn(4, 8),))
    d = finding.to_dict()
    assert (d["graph"], d["code"], d["node"]) == ("forward+backward", "NCC_EVRF010", "convolution_backward")
    line = _strided_dilated_conv.__code__.co_firstlineno + 1
    assert d["where"] == (f'at File "{__file__}", line {line}, in _strided_dilated_conv '
                          "(backward of aten.convolution)"), d["where"]
    assert str(finding).endswith("(backward of aten.convolution) [forward+backward graph]")


def test_the_scan_lists_each_problem_once_in_the_graph_it_first_appears():
    """A boolean-mask gather is a static-shape finding in the forward graph (the joint graph repeats it) and
    its backward, a boolean-mask index_put, one of the joint graph, at the gather's line; a refusal of export
    itself is one finding."""
    findings = step_graph.scan_training_step(Scaled(lambda y: y[y > 0].sum()), (torch.randn(4, 8),))
    lines = [str(f) for f in findings]
    index = [line for line in lines if "aten.index with a boolean mask" in line]
    index_put = [line for line in lines if "aten.index_put with a boolean mask" in line]
    assert len(index) == 1 and index[0].endswith("[forward graph]")
    assert len(index_put) == 1 and index_put[0].endswith(
        "in <lambda> (backward of aten.index) [forward+backward graph]"), index_put
    gather_line = index[0].split(" at ")[1].split(" [")[0]
    assert 'test_plan_graph_check.py", line' in gather_line and gather_line in index_put[0]
    assert all(line.startswith("static-shape docs/design.md#static-shapes: ") for line in index + index_put)

    def branch(y):
        return y.sum() * 2 if y.sum() > 0 else y.sum()

    (refused,) = step_graph.scan_training_step(Scaled(branch), (torch.randn(4, 8),))
    assert str(refused).startswith("static-shape docs/design.md#static-shapes: torch.export (strict) failed")


def test_the_backward_line_rests_on_a_private_hook_of_torch_and_falls_back_without_it(monkeypatch):
    """torch (2.9 to 2.13) has no public way to give a node of the derived backward its forward line:
    `preserve_node_meta` alone leaves it the retrace's generated line, and the derivation calls `make_fx` itself
    (no `record_stack_traces` to pass). So `TracedGraphs` wraps `proxy_tensor._MakefxTracer.trace`; this fails
    by name when torch drops it. Without it a finding keeps its node name instead of a line."""
    tracer = getattr(proxy_tensor, "_MakefxTracer", None)
    assert callable(getattr(tracer, "trace", None)), (
        "torch.fx.experimental.proxy_tensor._MakefxTracer.trace is gone: step_graph.TracedGraphs can no longer "
        "give backward findings their forward source line; find its replacement in this torch")
    monkeypatch.setattr(step_graph, "proxy_tensor", SimpleNamespace())  # what TracedGraphs sees of a torch without it
    (finding,) = step_graph.scan_training_step(Scaled(_strided_dilated_conv), (torch.randn(4, 8),))
    assert finding.to_dict()["where"] == "" and str(finding).endswith(
        "at node convolution_backward [forward+backward graph]"), str(finding)
