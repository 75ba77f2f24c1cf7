"""The Trainium training step has static shapes and no host syncs.

On Neuron every distinct graph is compiled ahead of time (minutes each), and a
value read back to the host cuts the lazy XLA graph, so the training step must be
one graph for the whole run: no shape that depends on tensor
values (``nonzero``, boolean-mask indexing, ``unique``, ``masked_select``), no host
sync (``.item()``, ``.tolist()``, ``bool(tensor)``) and no Python branch on a tensor
value. We prove it on CPU: `torch.export` (strict, i.e. TorchDynamo) captures the
loss ``model(input_ids, labels=labels).loss`` of every recipes/trn1 recipe at its
sequence length, then the joint forward + backward graph is derived from it, and
both graphs are scanned for data-dependent ops and symbolic shapes, and for what the
Neuron compiler refuses by its error-code pages (`bmojo_neuron.compiler_rules`).

Everything runs on fake tensors (no weight is allocated, nothing is computed), with
the torch reference ops (the NKI kernels are custom calls with static shapes of their
own). What is kept from each recipe (`_kept_settings`): the sequence length
(data.block_size), head_dim, GQA ratio, window, fading window, memory chunk / size /
picks / lag, the SSM mixer, state size, head dim, groups, conv and chunk, the
vocabulary, the tying and the training dtype. What is shrunk: depth (one layer of
each kind in the pattern; the layers of a kind are the same graph), the micro-batch
(1: no rule but the 4 GB tensor limit depends on it, and `plan --check-graph` checks that one at
the recipe's micro-batch, tests/test_plan_graph_check.py) and, where recipes differ only in width
(hidden size, head counts: 130m and 370m), the wider one is represented by the
narrower. The negative tests show that the same check rejects each banned construct.
The export and the scans are `bmojo_neuron.training.step_graph`, which `bmojo-neuron plan
--check-graph` runs for one recipe (tests/test_plan_graph_check.py).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.export.graph_signature import InputKind, OutputKind
from torch.fx import Graph
from toy_graphs import Scaled

from bmojo_neuron import ops
from bmojo_neuron.compiler_rules import compiler_violations
from bmojo_neuron.recipes import load_recipe, repository_root
from bmojo_neuron.training.step_graph import (
    CompilerRuleViolation,
    StaticShapeViolation,
    TrainingLoss,
    export_training_step,
    fake_training_step,
    graph_violations,
    joint_program,
    one_layer_per_kind,
    training_loss,
)

TRN1_RECIPES = sorted(f"trn1/{p.stem}" for p in (repository_root() / "recipes" / "trn1").glob("*.yaml"))
# How Dynamo words its refusal of `if tensor...:` / `bool(tensor)` (the wording varies by version).
DATA_DEPENDENT_BRANCH = r"(?i)data-dependent (branching|expression)"


def _kept_settings(name: str) -> tuple:
    """Everything the traced graph's structure and sequence shapes depend on (width excluded)."""
    recipe = load_recipe(name)
    c = recipe.model_config()
    return (
        recipe.data.block_size, recipe.train.precision, one_layer_per_kind(c.layer_pattern), c.vocab_size,
        c.head_dim, c.num_attention_heads // c.num_key_value_heads, c.window_size, c.fading_window,
        c.memory_chunk, c.memory_size, c.memory_picks, c.memory_lag, c.ssm_mixer, c.ssm_state_size,
        c.ssm_head_dim, c.ssm_n_groups, c.ssm_chunk_size, c.ssm_conv_kernel, c.tie_word_embeddings,
        c.tie_fading_projections, c.intermediate_size > 0, recipe.distill is not None,
    )


def _recipe_groups() -> list[list[str]]:
    """Recipes that differ only in width (hidden size, head counts) trace the same graph: trace one of each."""
    groups: dict[tuple, list[str]] = {}
    for name in TRN1_RECIPES:
        groups.setdefault(_kept_settings(name), []).append(name)
    return list(groups.values())


RECIPE_GROUPS = _recipe_groups()


def _shapes(graph: Graph) -> set[tuple[int, ...]]:
    return {tuple(n.meta["val"].shape) for n in graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)}


@pytest.mark.parametrize("names", RECIPE_GROUPS, ids=["+".join(n.removeprefix("trn1/") for n in g)
                                                     for g in RECIPE_GROUPS])
def test_trn1_training_step_is_static(names):
    recipe, model, args = fake_training_step(names[0])
    with ops.use_backend("torch"):  # resolved before tracing: no dispatch-table writes inside the graph
        forward, joint = export_training_step(training_loss(recipe, model), args)  # distill: frozen source

    # The graph runs the recipe's sequence shapes: memory per query chunk, SSD chunks, attention heads.
    c, length = recipe.model_config(), recipe.data.block_size
    shapes = _shapes(forward.graph)
    assert (1, length // c.memory_chunk, c.memory_size) in shapes  # which memory slots each chunk reads
    assert any(s[:3] == (1, length // c.ssm_chunk_size, c.ssm_chunk_size) for s in shapes)
    assert (1, c.num_attention_heads // recipe.parallel.tp, length, c.head_dim) in shapes  # one rank's heads
    (loss,) = [s for s in forward.graph_signature.output_specs if s.kind == OutputKind.USER_OUTPUT]
    assert next(n for n in forward.graph.nodes if n.name == loss.arg.name).meta["val"].shape == ()
    # The joint graph holds the whole backward: one gradient output per parameter.
    params = {s.target for s in forward.graph_signature.input_specs if s.kind == InputKind.PARAMETER}
    grads = {s.target for s in joint.graph_signature.output_specs if s.kind == OutputKind.GRADIENT_TO_PARAMETER}
    unused = {name for name, _ in model.named_parameters()} - {p.removeprefix("model.") for p in params}
    distill_without_logits = recipe.distill is not None and not recipe.distill.kl_weight
    assert unused == ({"model.norm.weight"} if distill_without_logits else set())  # the teacher needs no logits
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert {g.removeprefix("model.") for g in grads} == trainable


class PaddedTrainingLoss(TrainingLoss):
    """The loss of a padded batch: packing the real tokens first is a sort and gathers, no host sync."""

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, labels=labels, attention_mask=attention_mask).loss


def test_padded_training_step_is_static():
    # Packing is model-level code whose graph does not change with the sequence length, so the shortest
    # B'MOJO recipe (2K tokens) proves it; the 8K recipe's export takes three times as long.
    recipe, model, (input_ids, labels) = fake_training_step("trn1/bmojo-130m")
    mask = torch.ones_like(input_ids)  # a fake tensor too; its values never matter to the graph
    with ops.use_backend("torch"):
        forward, joint = export_training_step(PaddedTrainingLoss(model), (input_ids, labels, mask))
    assert graph_violations(forward.graph) == [] and graph_violations(joint.graph) == []
    user_inputs = [s.arg.name for s in forward.graph_signature.input_specs if s.kind == InputKind.USER_INPUT]
    mask_node = next(n for n in forward.graph.nodes if n.name == user_inputs[-1])
    assert mask_node.users, "the mask must reach the graph (packing and the loss read it)"


def test_every_trn1_recipe_is_traced():
    assert len(TRN1_RECIPES) >= 4 and "trn1/bmojo-1.4b" in TRN1_RECIPES
    assert sorted(name for group in RECIPE_GROUPS for name in group) == TRN1_RECIPES


# ----------------------------------------------------------------------------- the check can fail
def _python_branch(y: torch.Tensor) -> torch.Tensor:
    if y.sum() > 0:
        return y.sum() * 2
    return y.sum()


def _padding_check(y: torch.Tensor) -> torch.Tensor:
    from bmojo_neuron.padding import has_padding

    if has_padding(torch.ones_like(y, dtype=torch.bool)):  # what a cached (generation) forward asks
        return y.sum() * 2
    return y.sum()


@pytest.mark.parametrize("reduce, reason", [
    (lambda y: y * y.sum().item(), r"aten\.item"),
    (lambda y: y.nonzero().sum() * y.sum(), r"aten\.nonzero"),
    (lambda y: y[y > 0].sum(), r"aten\.index with a boolean mask"),
    (lambda y: torch.masked_select(y, y > 0).sum(), r"aten\.masked_select"),
    (lambda y: y.unique().sum(), r"unique"),
    (lambda y: y * int(y.sum()), r"aten\.item"),
    (lambda y: y * sum((y > 0).long().sum(0).tolist()), r"aten\.item|tolist"),
    (_python_branch, DATA_DEPENDENT_BRANCH),
    (_padding_check, DATA_DEPENDENT_BRANCH),
], ids=["item", "nonzero", "bool-mask", "masked_select", "unique", "int", "tolist", "python-branch", "padding-check"])
def test_the_check_rejects_data_dependent_code(reduce, reason):
    with pytest.raises(StaticShapeViolation, match=reason):
        export_training_step(Scaled(reduce), (torch.randn(4, 8),))


def test_the_check_passes_a_static_module():
    forward, joint = export_training_step(Scaled(lambda y: (y * (y > 0)).sum()), (torch.randn(4, 8),))
    assert graph_violations(forward.graph) == [] and graph_violations(joint.graph) == []


def test_the_backward_scan_sees_backward_ops():
    """A boolean-mask gather's backward is a boolean-mask index_put: the joint scan flags it too."""
    module = Scaled(lambda y: y[y > 0].sum())
    joint = joint_program(torch.export.export(module, (torch.randn(4, 8),), strict=True))
    flagged = " ".join(graph_violations(joint.graph))
    assert "aten.index_put with a boolean mask" in flagged and "aten.index with a boolean mask" in flagged


# ----------------------------------------------------------------------------- the compiler's refusals
def _index(y: torch.Tensor) -> torch.Tensor:
    return torch.arange(y.shape[-1]).remainder(2).expand(y.shape)


def _triangular_solve(y: torch.Tensor) -> torch.Tensor:
    square = y[:, :4] + torch.eye(4)
    return torch.linalg.solve_triangular(square, y, upper=True).sum()


# One small module per rule of `bmojo_neuron.compiler_rules`; the joint graph is built too.
@pytest.mark.parametrize("reduce, code", [
    (lambda y: y.double().sum().float(), "ESPP004"),
    (lambda y: torch.view_as_real(y.to(torch.complex64) * 1j).sum(), "EVRF004"),
    (lambda y: y.to(torch.float8_e4m3fnuz).float().sum(), "EVRF005"),
    (lambda y: y.to(torch.float8_e4m3fn).float().sum(), "ESPP047"),
    (lambda y: y * torch.topk(y.long(), 2).values.sum(), "EVRF013"),
    (lambda y: y * torch.sort(y.int(), stable=True).values.sum(), "EVRF013"),
    (lambda y: y.gather(-1, torch.argsort((y > 0).long(), stable=True)).sum(), "EVRF013"),
    (lambda y: y * torch.zeros(4, 2, dtype=torch.long).scatter_add(-1, _index(y), (y > 0).long()).sum(), "EVRF016"),
    (lambda y: y * torch.zeros(4, 8, dtype=torch.int32).index_put((_index(y),), torch.ones(4, 8, dtype=torch.int32),
                                                                 accumulate=True).sum(), "EVRF016"),
    (lambda y: y * (y.long() + 5_000_000_000).sum(), "ESFH002"),
    (lambda y: y * (y.to(torch.int16) >> 1).sum(), "EVRF022"),
    (_triangular_solve, "EUOC002"),
    (lambda y: torch.nn.functional.max_pool1d(y.unsqueeze(0), 2, dilation=2).sum(), "EVRF018"),
    (lambda y: torch.cummax(y, dim=-1).values.sum(), "EVRF019"),
    (lambda y: torch.nn.functional.conv_transpose1d(y.unsqueeze(0), torch.ones(4, 4, 2), stride=2, dilation=2).sum(),
     "EVRF010"),
], ids=["float64", "complex", "fp8-fnuz", "fp8-e4m3fn", "topk-int", "sort-int", "argsort-bool", "scatter-add-int",
        "index-put-accumulate-int", "int64-constant", "shift-int16", "triangular-solve", "pool-dilation",
        "cummax", "conv-transpose-dilation"])
def test_the_check_rejects_what_neuronx_cc_refuses(reduce, code):
    with pytest.raises(CompilerRuleViolation, match=rf"NCC_{code} \(compiler/error-codes/{code}\.rst, "
                                                   rf"aws-neuron-sdk 3c46990d\).* at File .*test_static_shapes\.py"):
        export_training_step(Scaled(reduce), (torch.randn(4, 8),))


def test_the_backward_of_a_strided_dilated_convolution_is_refused():
    """The forward conv (stride 2, dilation 2) compiles; its input gradient dilates input and kernel."""
    conv = lambda y: torch.nn.functional.conv1d(y.unsqueeze(0), torch.ones(4, 4, 2), stride=2, dilation=2).sum()
    forward = torch.export.export(Scaled(conv), (torch.randn(4, 8),), strict=True)
    assert compiler_violations(forward.graph) == []
    (refused,) = compiler_violations(joint_program(forward).graph)
    assert refused.code == "EVRF010" and "convolution_backward" in refused.problem


def test_an_output_above_4_gb_is_refused():
    class Broadcast(nn.Module):  # a view: export allocates nothing
        def forward(self, x):
            return x.expand(2**20 + 1, 1024)

    graph = torch.export.export(Broadcast(), (torch.randn(1, 1024),), strict=True).graph
    (refused,) = compiler_violations(graph)
    assert refused.code == "EVRF024" and "(1048577, 1024) torch.float32" in refused.problem
    small = torch.export.export(Broadcast(), (torch.randn(1, 1024, dtype=torch.bfloat16),), strict=True).graph
    assert compiler_violations(small) == []  # 2 GiB in bf16


@pytest.mark.parametrize("reduce", [
    lambda y: torch.topk(y, 2).values.sum() + torch.sort(y, stable=True).values.sum(),
    lambda y: y.gather(-1, torch.argsort((y > 0).float(), stable=True)).sum(),
    lambda y: (y * torch.zeros(4, 2).scatter_add(-1, _index(y), y).sum()).sum(),
    lambda y: (y * (y.long() + (2**31 - 1)).sum() * (y.int() >> 1).sum()).sum() + y.long()[:, 1:].sum(),
    lambda y: torch.nn.functional.conv1d(y.unsqueeze(0), torch.ones(4, 4, 2), stride=2).sum()
              + torch.nn.functional.max_pool1d(y.unsqueeze(0), 2).sum() + y.cumsum(-1).sum(),
    lambda y: y.to(torch.float8_e5m2).float().sum(),
], ids=["float-topk-sort", "float-argsort", "float-scatter-add", "int32-constant-and-shift", "strided-conv-pool-cumsum",
        "fp8-e5m2"])
def test_the_compiler_rules_pass_what_neuronx_cc_takes(reduce):
    """The allowed side of each rule: floating-point TopK and scatter-reduce, constants within 32 bits (a
    slice's open end, sys.maxsize, is a shape, not a constant), an int32 shift, stride without dilation, a
    cumsum (a one-operand reduce-window), the FP8 type the device lists."""
    export_training_step(Scaled(reduce), (torch.randn(4, 8),))


# ----------------------------------------------------------------------------- the static losses
def _ignored_labels(rows: int, vocab: int) -> torch.Tensor:
    labels = torch.randint(0, vocab, (rows,), generator=torch.Generator().manual_seed(3))
    labels[::3] = -100
    return labels


def test_tensor_parallel_cross_entropy_is_a_static_masked_mean(monkeypatch, tmp_path):
    """The vocab-parallel loss sees every row (no `logits[keep]`) and equals cross_entropy(ignore_index=-100)."""
    import torch.distributed as dist

    from bmojo_neuron.parallel import tensor_parallel as tp

    seen = []
    original = tp._VocabParallelCrossEntropy.apply

    def recording_apply(logits, labels, *rest):
        seen.append((logits.shape, labels.shape))
        return original(logits, labels, *rest)

    monkeypatch.setattr(tp._VocabParallelCrossEntropy, "apply", recording_apply)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        factory = tp.TorchTensorParallelFactory()
        logits = torch.randn(12, 16, dtype=torch.float64, requires_grad=True)
        labels = _ignored_labels(12, 16)
        loss = factory.cross_entropy(logits, labels)
        (grad,) = torch.autograd.grad(loss, logits)
    finally:
        dist.destroy_process_group()
    assert seen == [(torch.Size([12, 16]), torch.Size([12]))]
    reference = logits.detach().requires_grad_()
    expected = torch.nn.functional.cross_entropy(reference, labels, ignore_index=-100)
    (expected_grad,) = torch.autograd.grad(expected, reference)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-12)
    assert torch.all(grad[::3] == 0)  # ignored rows get no gradient


def _assert_static_function(fn, *args) -> None:
    class Wrap(nn.Module):
        def forward(self, *a):
            return fn(*a)

    graph = torch.export.export(Wrap(), args, strict=True).graph
    assert graph_violations(graph) == [] and [str(v) for v in compiler_violations(graph)] == []


def test_causal_lm_loss_is_static_and_matches_ignore_index():
    from bmojo_neuron.layers.factory import LayerFactory
    from bmojo_neuron.modeling_bmojo import causal_lm_loss

    logits = torch.randn(2, 9, 16, dtype=torch.float64)
    labels = _ignored_labels(18, 16).view(2, 9)
    got = causal_lm_loss(logits, labels, LayerFactory())
    want = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, 16), labels[:, 1:].reshape(-1), ignore_index=-100
    )
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    _assert_static_function(lambda x, y: causal_lm_loss(x, y, LayerFactory()), logits.float(), labels)


def test_memory_selection_and_packing_sort_floating_point_keys():
    """The recency order of memory candidates and the packing of a mask are sorts, which torch-xla lowers
    to the compiler's TopK: their keys are float32 (NCC_EVRF013), with the integer keys' order."""
    from bmojo_neuron.layers.eidetic_memory import _keep_best
    from bmojo_neuron.padding import packed_layout

    # Equal scores go to the more recent entry; positions up to 2**24 are exact in float32.
    position = torch.tensor([[2**24 - 2, -1, 2**24 - 1, 5]])
    score = torch.tensor([[1.0, 1.0, 1.0, 0.5]])
    assert _keep_best(position, score, 3).tolist() == [[2, 0, 1]]
    mask = torch.tensor([[0, 1, 1, 0, 1], [1, 1, 1, 1, 0]])
    assert packed_layout(mask).order.tolist() == [[1, 2, 4, 0, 3], [0, 1, 2, 3, 4]]
    _assert_static_function(lambda p, s: _keep_best(p, s, 3), position, score)
    _assert_static_function(lambda m: packed_layout(m).order, mask)


# ----------------------------------------------------------------------------- recipe validation
@pytest.mark.parametrize("overrides, key", [
    (["data.block_size=2000"], r"data\.block_size.*multiple of 128"),
    (["data.block_size=2176"], r"data\.block_size.*multiple of model\.memory_chunk"),  # 17 x 128, not x 256
    (["model.head_dim=256"], r"model\.head_dim.*at most 128"),
    (["model.ssm_state_size=256"], r"model\.ssm_state_size.*at most 128"),
    (["model.ssm_mixer=mamba1", "model.ssm_state_size=192"], r"model\.ssm_state_size.*at most 128"),
    (["model.ssm_head_dim=256"], r"model\.ssm_head_dim.*at most 128"),
    (["model.ssm_head_dim=8"], r"model\.ssm_num_heads.*192, 192 per tensor-parallel rank.*at most 128"),
])
def test_validation_rejects_shapes_that_do_not_tile(overrides, key):
    from bmojo_neuron.launch import validate_for_trainium

    validate_for_trainium(load_recipe("trn1/bmojo-130m"), 32)  # the recipe itself tiles
    with pytest.raises(ValueError, match=key):  # head_dim > 128 is refused as soon as the recipe loads
        validate_for_trainium(load_recipe("trn1/bmojo-130m", overrides), 32)


def test_ssm_tile_rules_apply_only_where_a_scan_runs():
    from bmojo_neuron.launch import validate_for_trainium

    # Sliding-window-only layers run no scan: an SSM size the kernels cannot tile is irrelevant.
    swa_only = ["model.layer_pattern=SSSSSSSSSSSS", "model.ssm_state_size=256"]
    validate_for_trainium(load_recipe("trn1/bmojo-130m", swa_only), 32)
    # Mamba-2 heads are checked per tensor-parallel rank: 192 heads over tp 2 is 96 per rank.
    narrow_heads = ["model.ssm_head_dim=8", "model.ssm_n_groups=2", "parallel.tp=2"]
    validate_for_trainium(load_recipe("trn1/bmojo-130m", narrow_heads), 32)
