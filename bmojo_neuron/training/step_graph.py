"""The training step as one static graph, and what neuronx-cc would refuse in it, seen on CPU.

On Neuron every distinct graph is compiled ahead of time (minutes each), and a value
read back to the host cuts the lazy XLA graph, so the training step must be one graph
for the whole run: no shape that depends on tensor values (``nonzero``, boolean-mask
indexing, ``unique``, ``masked_select``), no host sync (``.item()``, ``.tolist()``,
``bool(tensor)``) and no Python branch on a tensor value. `torch.export` (strict, i.e.
TorchDynamo) captures the step's loss, the joint forward + backward graph is derived
from it, and both graphs are scanned for those constructs and for what the Neuron
compiler refuses by its error-code pages (`bmojo_neuron.compiler_rules`).

`fake_training_step` builds a recipe's model on fake tensors (no weight is allocated,
nothing is computed) with one decoder layer of each kind in its pattern (the layers
of a kind are the same graph, and every rule is per op), at the recipe's sequence length
and dtype, and a micro-batch of 1 by default; `plan --check-graph` traces the recipe's
own micro-batch per NeuronCore, so the 4 GB tensor limit (NCC_EVRF024) is checked at the
true size of every tensor that grows with the batch (logits, activations). Depth changes
no tensor's size: the only tensors that stack the layers are one scalar per layer (the
innovation and distillation losses). The torch reference
ops are traced: the NKI kernels are custom calls with static shapes of their own.
Used by `bmojo-neuron plan --check-graph` and `tests/test_static_shapes.py`.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.export import ExportedProgram
from torch.fx import Graph, Node
from torch.utils import _pytree as pytree

from bmojo_neuron import ops
from bmojo_neuron.compiler_rules import Violation, compiler_violations, op_name, source_line
from bmojo_neuron.modeling_bmojo import BMojoForCausalLM
from bmojo_neuron.ops.reference.eager_cpu import fused_kernels_disabled
from bmojo_neuron.priming.distill import freeze_shared
from bmojo_neuron.recipes import load_recipe
from bmojo_neuron.training.objective import objective_for

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# aten ops whose output shape or value must be read back from the device.
BANNED_OPS = frozenset({
    "nonzero", "nonzero_numpy", "argwhere", "masked_select", "unique", "_unique", "_unique2",
    "unique_dim", "unique_consecutive", "item", "_local_scalar_dense",
})
INDEX_OPS = frozenset({"index", "_unsafe_index", "index_put", "index_put_", "_unsafe_index_put", "_index_put_impl_"})
STATIC_SHAPES_DOC = "docs/design.md#static-shapes"


class StaticShapeViolation(AssertionError):
    """The traced training step has a data-dependent shape, a host sync or a value branch."""


class CompilerRuleViolation(AssertionError):
    """The traced training step has an op, dtype or constant that neuronx-cc refuses (`compiler_rules`)."""


class StaticProblem(NamedTuple):
    """A node of the graph that is not static: a banned op, a boolean-mask index or a symbolic value."""

    node: str
    problem: str
    where: str

    def __str__(self) -> str:
        return f"{self.node}: {self.problem} {self.where}".rstrip()


# ----------------------------------------------------------------------------- the static-shape scan
def _bool_index(node: Node) -> bool:
    """An index/index_put whose indices include a boolean mask (a hidden nonzero)."""
    indices = node.args[1] if len(node.args) > 1 else ()
    return any(
        isinstance(i, Node) and isinstance(i.meta.get("val"), torch.Tensor) and i.meta["val"].dtype == torch.bool
        for i in indices or ()
    )


def _symbolic(value: Any) -> bool:
    """A SymInt/SymFloat/SymBool, or a tensor with a symbolic size: something read from data."""
    for leaf in pytree.tree_leaves(value):
        if isinstance(leaf, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            return True
        if isinstance(leaf, torch.Tensor) and not all(type(size) is int for size in leaf.shape):
            return True
    return False


def static_problems(graph: Graph) -> list[StaticProblem]:
    """Every node of `graph` that is a banned op, a boolean-mask index, or has a non-static value."""
    problems = []
    for node in graph.nodes:
        if node.op not in ("call_function", "placeholder"):
            continue
        name = op_name(node.target)
        where = source_line(node)
        if name in BANNED_OPS:
            problems.append(StaticProblem(node.name, f"aten.{name} (data-dependent result or host sync)", where))
        elif name in INDEX_OPS and _bool_index(node):
            problems.append(StaticProblem(node.name, f"aten.{name} with a boolean mask (data-dependent shape)", where))
        elif _symbolic(node.meta.get("val")):
            problems.append(StaticProblem(
                node.name, f"{node.target} has a data-dependent (symbolic) value {node.meta['val']}", ""))
    return problems


def graph_violations(graph: Graph) -> list[str]:
    """`static_problems` as lines."""
    return [str(problem) for problem in static_problems(graph)]


# ----------------------------------------------------------------------------- export
def joint_program(forward: ExportedProgram) -> ExportedProgram:
    """Forward + backward graph of `forward` (output 0 is the loss), as autograd emits it.

    No decomposition table: the ops stay those torch-xla lowers (and tracing is faster
    than `torch.export.experimental._export_forward_backward`'s core-ATen pass).
    """
    from torch.export.exported_program import _decompose_exported_program

    with fused_kernels_disabled():  # traced as on the Neuron device (see `export_forward`)
        return _decompose_exported_program(
            forward, cia_to_decomp={}, python_decomp_table={}, joint_loss_index=0, decompose_custom_triton_ops=False
        )


def export_forward(module: nn.Module, args: tuple) -> ExportedProgram:
    """Strict `torch.export` of `module(*args)`; `StaticShapeViolation` when Dynamo refuses the code.

    The fake tensors are CPU tensors; `fused_kernels_disabled` makes the ops take the code an XLA device
    traces (no CPU-only paths, such as cache-sized slicing), as the Neuron backend's CPU stand-in does.
    """
    try:
        with fused_kernels_disabled():
            return torch.export.export(module, args, strict=True)
    except Exception as err:  # Dynamo's refusals have many types; all mean "not one static graph"
        raise StaticShapeViolation(f"torch.export (strict) failed: {type(err).__name__}: {err}") from err


def _fail_on(graph: Graph, what: str) -> None:
    problems = graph_violations(graph)
    if problems:
        raise StaticShapeViolation(f"{what} graph is not static:\n  " + "\n  ".join(problems[:20]))
    refused = [str(v) for v in compiler_violations(graph)]
    if refused:
        raise CompilerRuleViolation(f"neuronx-cc would refuse the {what} graph:\n  " + "\n  ".join(refused[:20]))


def export_training_step(module: nn.Module, args: tuple) -> tuple[ExportedProgram, ExportedProgram]:
    """Strict `torch.export` of `module(*args)` (a scalar loss) and its joint forward+backward.

    Raises `StaticShapeViolation` when Dynamo refuses the code (a branch on a tensor
    value, an unsupported host sync) or when either graph has a banned op or a
    symbolic shape, and `CompilerRuleViolation` when either graph breaks a rule of
    neuronx-cc's error-code pages. Returns (forward program, joint program).
    """
    forward = export_forward(module, args)
    _fail_on(forward.graph, "forward")
    joint = joint_program(forward)
    _fail_on(joint.graph, "forward+backward")
    return forward, joint


# ----------------------------------------------------------------------------- a recipe's step
class TrainingLoss(nn.Module):
    """What the training step differentiates: the recipe's objective (default: the model's own loss, lm +
    innovation aux; a distill recipe: the layer-by-layer distillation against the model's own attention)."""

    def __init__(self, model: nn.Module, objective: Callable | None = None) -> None:
        super().__init__()
        self.model = model
        self.objective = objective

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.objective is not None:
            return self.objective(self.model, input_ids, labels)[0]
        return self.model(input_ids, labels=labels).loss  # the training loop passes no attention_mask


def one_layer_per_kind(pattern: str) -> str:
    """The layer pattern with each kind of layer once, in first-seen order ("SSBSSB" -> "SB")."""
    return "".join(dict.fromkeys(pattern))


def fake_training_step(name: str, overrides: list[str] | None = None, batch: int = 1
                       ) -> tuple[Any, nn.Module, tuple]:
    """(recipe, fake-tensor model with one layer per kind, (input_ids, labels) of `batch` sequences of its length).

    The recipe is loaded with `overrides`, then its depth is reduced (`one_layer_per_kind`); the model is
    built in the recipe's training dtype (`.to(dtype)` cannot swap tied fake weights).
    """
    overrides = list(overrides or [])
    pattern = one_layer_per_kind(load_recipe(name, overrides).model_config().layer_pattern)
    recipe = load_recipe(name, [*overrides, f"model.num_hidden_layers={len(pattern)}",
                                f"model.layer_pattern={pattern}"])
    length = recipe.data.block_size
    default = torch.get_default_dtype()
    torch.set_default_dtype(DTYPES[recipe.train.precision])
    try:
        with FakeTensorMode():
            model = BMojoForCausalLM(recipe.model_config())
            input_ids = torch.zeros(batch, length, dtype=torch.long)
            labels = torch.zeros(batch, length, dtype=torch.long)
    finally:
        torch.set_default_dtype(default)
    return recipe, model, (input_ids, labels)


def training_loss(recipe: Any, model: nn.Module) -> TrainingLoss:
    """The module whose export is the recipe's training step: its objective, with a distill recipe's frozen
    source weights marked as such (they get no gradient)."""
    if recipe.distill is not None:
        freeze_shared(model, recipe.model_config())
    return TrainingLoss(model, objective_for(recipe))


# ----------------------------------------------------------------------------- the check of a recipe
class Finding(NamedTuple):
    """One thing that would stop the step compiling as one graph, in the graph where it was first seen."""

    graph: str  # "forward" or "forward+backward"
    refusal: Violation | StaticProblem | str  # a compiler rule, a static-shape problem, or export's refusal

    def __str__(self) -> str:
        """`CODE PAGE: what where [graph]`, e.g. ``NCC_EVRF013 compiler/error-codes/EVRF013.rst: aten.sort of a
        torch.int64 tensor ... at File "...", line 9, in f [forward graph]``."""
        d = self.to_dict()
        where = d["where"] or (f"at node {d['node']}" if d["node"] else "")
        return f"{d['code']} {d['page']}: {d['problem']} {where}".rstrip() + f" [{self.graph} graph]"

    def to_dict(self) -> dict[str, str]:
        """{graph, code, page, problem, where, node}; code "static-shape" for a problem that is not the
        compiler's. `where` is empty for a node of the backward (the joint graph records no source line)."""
        refusal = self.refusal
        if isinstance(refusal, Violation):
            code, page = f"NCC_{refusal.code}", f"compiler/error-codes/{refusal.code}.rst"
        else:
            code, page = "static-shape", STATIC_SHAPES_DOC
        if isinstance(refusal, str):
            return {"graph": self.graph, "code": code, "page": page, "problem": refusal, "where": "", "node": ""}
        return {"graph": self.graph, "code": code, "page": page, "problem": refusal.problem,
                "where": refusal.where, "node": refusal.node}


def _graph_findings(graph: Graph, what: str) -> list[Finding]:
    return ([Finding(what, p) for p in static_problems(graph)]
            + [Finding(what, v) for v in compiler_violations(graph)])


def _once(findings: list[Finding], known: Sequence[Finding] = (), by_line: bool = True) -> list[Finding]:
    """`findings` less repeats and those in `known`: one per code, problem and source line (`by_line`), or
    per code and problem (the joint graph holds the forward's nodes again, without their source lines)."""
    def key(finding: Finding) -> tuple:
        d = finding.to_dict()
        return (d["code"], d["problem"], d["where"]) if by_line else (d["code"], d["problem"])

    first: dict[tuple, Finding] = {}
    for finding in findings:
        first.setdefault(key(finding), finding)
    seen = {key(f) for f in known}
    return [f for k, f in first.items() if k not in seen]


def scan_training_step(module: nn.Module, args: tuple, progress: Callable[[str], None] = lambda _: None
                       ) -> list[Finding]:
    """Every finding of `module(*args)`'s forward graph, then those its backward adds."""
    try:
        forward = export_forward(module, args)
    except StaticShapeViolation as err:
        return [Finding("forward", str(err).splitlines()[0])]
    progress(f"forward graph: {len(forward.graph.nodes)} nodes; deriving the backward")
    findings = _once(_graph_findings(forward.graph, "forward"))
    joint = joint_program(forward)
    progress(f"forward+backward graph: {len(joint.graph.nodes)} nodes; scanning")
    return findings + _once(_graph_findings(joint.graph, "forward+backward"), findings, by_line=False)


class GraphCheck(NamedTuple):
    findings: list[Finding]
    seconds: float
    pattern: str  # the layer pattern traced (one layer per kind)
    length: int  # the sequence length traced
    batch: int = 1  # the micro-batch traced (sequences)


def check_recipe_graph(name: str, overrides: list[str] | None = None,
                       progress: Callable[[str], None] = lambda _: None, batch: int = 1) -> GraphCheck:
    """Trace the recipe's training step on fake tensors (one layer per kind, `batch` sequences: the micro-batch
    of one NeuronCore, for the tensor-size limit) and scan both graphs."""
    start = time.monotonic()
    recipe, model, args = fake_training_step(name, overrides, batch)
    pattern, length = recipe.model_config().layer_pattern, recipe.data.block_size
    progress(f"tracing the training step on fake tensors: layers {pattern} (one per kind), {batch} × {length} "
             f"tokens, {recipe.train.precision}")
    with ops.use_backend("torch"), warnings.catch_warnings():  # the backend is resolved before tracing
        # torch.export's own pytree code warns of its deprecated LeafSpec check (torch 2.13); not the user's to fix
        warnings.filterwarnings("ignore", message=r".*LeafSpec.*", category=FutureWarning)
        findings = scan_training_step(training_loss(recipe, model), args, progress)
    return GraphCheck(findings, time.monotonic() - start, pattern, length, batch)
