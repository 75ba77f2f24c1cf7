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
innovation and distillation losses). At ``parallel.tp > 1`` the model is tensor-parallel rank 0's
shard (`bmojo_neuron.parallel.core_tensors`), so a sharded tensor is counted at the size one
NeuronCore holds; at ``parallel.pp > 1`` a stage holds no larger tensor than this one-stage step (see
`bmojo_neuron.parallel.core_tensors`). The torch reference ops are traced: the NKI kernels are custom calls
with static shapes of their own.
Used by `bmojo-neuron plan --check-graph` and `tests/test_static_shapes.py`.
"""

from __future__ import annotations

import re
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.export import ExportedProgram
from torch.fx import Graph, GraphModule, Node
from torch.fx import traceback as fx_traceback
from torch.fx.experimental import proxy_tensor
from torch.utils import _pytree as pytree

from bmojo_neuron import ops
from bmojo_neuron.compiler_rules import Violation, compiler_violations, op_name, source_line
from bmojo_neuron.layers.factory import use_layer_factory
from bmojo_neuron.modeling_bmojo import BMojoForCausalLM
from bmojo_neuron.parallel.core_tensors import NxDCrossEntropyStep, trace_factory
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


def dead_nodes(graph: Graph) -> set[str]:
    """Names of the nodes of `graph` no output needs and that change nothing (torch.export keeps them), such as
    the vocabulary gather of the logits the model hands back beside its loss at tp > 1: torch-xla computes only
    the lazy tensors still held when the step's graph is cut (`xm.mark_step`), and the training step holds its
    loss, not the model's output. Inputs count as needed (a parameter is on the device whether used or not)."""
    live: set[Node] = set()
    stack = [node for node in graph.nodes if node.op in ("output", "placeholder") or node.is_impure()]
    while stack:
        node = stack.pop()
        if node not in live:
            live.add(node)
            stack.extend(node.all_input_nodes)
    return {node.name for node in graph.nodes if node not in live}


def _fail_on(graph: Graph, what: str) -> None:
    problems = graph_violations(graph)
    if problems:
        raise StaticShapeViolation(f"{what} graph is not static:\n  " + "\n  ".join(problems[:20]))
    dead = dead_nodes(graph)
    refused = [str(v) for v in compiler_violations(graph) if v.node not in dead]
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
    built in the recipe's training dtype (`.to(dtype)` cannot swap tied fake weights), as one tensor-parallel
    rank's shard at ``parallel.tp > 1`` (`bmojo_neuron.parallel.core_tensors`).
    """
    overrides = list(overrides or [])
    pattern = one_layer_per_kind(load_recipe(name, overrides).model_config().layer_pattern)
    recipe = load_recipe(name, [*overrides, f"model.num_hidden_layers={len(pattern)}",
                                f"model.layer_pattern={pattern}"])
    length = recipe.data.block_size
    default = torch.get_default_dtype()
    torch.set_default_dtype(DTYPES[recipe.train.precision])
    try:
        with FakeTensorMode(), use_layer_factory(trace_factory(recipe.parallel.tp, recipe.parallel.sp)):
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
GRAPHS = ("forward", "forward+backward")
NXD_LOSS = "NxD cross-entropy"  # the graph of `nxd_loss_findings`


class Finding(NamedTuple):
    """One thing that would stop the step compiling as one graph, in the graph where it was first seen."""

    graph: str  # "forward" or "forward+backward" (`GRAPHS`), or NXD_LOSS
    refusal: Violation | StaticProblem | str  # a compiler rule, a static-shape problem, or export's refusal

    def __str__(self) -> str:
        """`CODE PAGE: what where [graph]`, e.g. ``NCC_EVRF013 compiler/error-codes/EVRF013.rst: aten.sort of a
        torch.int64 tensor ... at File "...", line 9, in f [forward graph]``."""
        d = self.to_dict()
        where = d["where"] or (f"at node {d['node']}" if d["node"] else "")
        return f"{d['code']} {d['page']}: {d['problem']} {where}".rstrip() + f" [{self.graph} graph]"

    def to_dict(self) -> dict[str, str]:
        """{graph, code, page, problem, where, node}; code "static-shape" for a problem that is not the
        compiler's. `where` of a node of the backward is the line of the forward op it differentiates, with
        "(backward of aten.op)"; empty where neither is known."""
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
    """The static-shape problems of `graph` and the compiler refusals of the nodes the step computes (a host
    sync cuts the lazy graph even when its value goes unused, so those are kept)."""
    dead = dead_nodes(graph)
    return ([Finding(what, p) for p in static_problems(graph)]
            + [Finding(what, v) for v in compiler_violations(graph) if v.node not in dead])


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


# ----------------------------------------------------------------------------- a backward node's source line
_GENERATED_FRAME = re.compile(r'File "(<eval_with_key>[^"]*)", line (\d+)')


class TracedGraphs:
    """The graph modules traced while deriving the joint graph, to give a backward node its forward's source line.

    torch's `aot_export_module` (torch/_functorch/aot_autograd.py, the `make_fx(flattened_joint, ...)` at the end)
    traces the joint graph once, then traces that graph module again, flat; only the first trace runs autograd.
    Under `torch.fx.traceback.preserve_node_meta`, autograd's hooks (`setup_stacktrace_preservation_hooks`,
    torch/_functorch/_aot_autograd/logging_utils.py) give each node of a backward function the stack trace and
    ``seq_nr`` of the forward op it differentiates, and mark it ``autograd_backward``. The second trace records
    only the line of the first one's generated code (``File "<eval_with_key>.N", line L``), which the first's
    ``_lineno_map`` maps back to its node, as torch's own profiler does (torch/fx/graph_module.py, `recompile`).
    """

    def __init__(self) -> None:
        self.modules: list[GraphModule] = []

    @contextmanager
    def recording(self) -> Iterator[TracedGraphs]:
        """Keep every graph module `make_fx` returns, with node metadata preserved, while the block runs
        (nothing is kept where torch has no `_MakefxTracer.trace`: backward nodes then have no source line)."""
        tracer = getattr(proxy_tensor, "_MakefxTracer", None)
        original = getattr(tracer, "trace", None)
        if original is None:
            yield self
            return

        def trace(tracer_self: Any, f: Callable, *args: Any) -> GraphModule:
            module = original(tracer_self, f, *args)
            self.modules.append(module)
            return module

        tracer.trace = trace
        try:
            with fx_traceback.preserve_node_meta():
                yield self
        finally:
            tracer.trace = original

    def _traced_node(self, node: Node) -> Node | None:
        """The node of the first trace that `node` (of the joint graph) was made from, if recorded."""
        # by the code's file name now: aot_autograd recompiles a module after tracing it (a new name)
        by_file = {module.forward.__code__.co_filename: module for module in self.modules}
        for filename, line in reversed(_GENERATED_FRAME.findall(node.meta.get("stack_trace") or "")):
            module = by_file.get(filename)
            lines = getattr(module, "_lineno_map", None) or {}
            index = lines.get(int(line) - getattr(module, "_prologue_start", 0))
            if index is not None:
                return list(module.graph.nodes)[index]
        return None

    def backward_source(self, node: Node) -> str:
        """'at File ..., line N, in f (backward of aten.op)' for a node of autograd's backward; '' if unknown."""
        traced = self._traced_node(node)
        if traced is None or not traced.meta.get("autograd_backward"):
            return ""
        where = source_line(traced)
        forward = next((n for n in traced.graph.nodes if n.op == "call_function" and not n.meta.get("autograd_backward")
                        and n.meta.get("seq_nr") == traced.meta.get("seq_nr")), None)
        name = op_name(forward.target) if forward is not None else None
        return f"{where} (backward of aten.{name})" if where and name else where


def _with_backward_sources(findings: list[Finding], graph: Graph, traced: TracedGraphs) -> list[Finding]:
    """`findings` of the joint graph, each node without a source line given its forward op's."""
    nodes = {node.name: node for node in graph.nodes}
    sourced = []
    for finding in findings:
        refusal = finding.refusal
        if not isinstance(refusal, str) and not refusal.where and refusal.node in nodes:
            refusal = refusal._replace(where=traced.backward_source(nodes[refusal.node]))
        sourced.append(finding._replace(refusal=refusal))
    return sourced


def scan_training_step(module: nn.Module, args: tuple, progress: Callable[[str], None] = lambda _: None
                       ) -> list[Finding]:
    """Every finding of `module(*args)`'s forward graph, then those its backward adds (a node of the backward
    with the source line of the forward op it differentiates)."""
    try:
        forward = export_forward(module, args)
    except StaticShapeViolation as err:
        return [Finding("forward", str(err).splitlines()[0])]
    progress(f"forward graph: {len(forward.graph.nodes)} nodes; deriving the backward")
    findings = _once(_graph_findings(forward.graph, "forward"))
    joint = joint_program(forward)
    progress(f"forward+backward graph: {len(joint.graph.nodes)} nodes; scanning")
    added = _once(_graph_findings(joint.graph, "forward+backward"), findings, by_line=False)
    if not any(isinstance(f.refusal, (Violation, StaticProblem)) and not f.refusal.where for f in added):
        return findings + added
    # Recording the traces with their node metadata makes the derivation about a third slower, so it is
    # done again only when the backward has a finding to place.
    progress("the backward has findings: deriving it again with node metadata, for their forward lines")
    with TracedGraphs().recording() as traced:
        joint = joint_program(forward)
    added = _once(_graph_findings(joint.graph, "forward+backward"), findings, by_line=False)
    return findings + _with_backward_sources(added, joint.graph, traced)


def nxd_loss_findings(recipe: Any, batch: int, known: Sequence[Finding] = ()) -> list[Finding]:
    """At ``parallel.tp > 1``, the findings (less those in `known`) of NxD's vocabulary-parallel cross-entropy, whose
    forward and backward are NxD's own code (`bmojo_neuron.parallel.core_tensors.NxDCrossEntropyStep`), on the
    logits tensor-parallel rank 0 hands it: `batch` × (length − 1) rows (the last position has no target,
    `causal_lm_loss`) of its vocabulary shard, in float32 or wider (the model casts its logits up). None at tp 1,
    where the loss is torch's and the step's graphs hold its ops."""
    tp = recipe.parallel.tp
    if tp == 1:
        return []
    rows = batch * (recipe.data.block_size - 1)
    dtype = torch.promote_types(DTYPES[recipe.train.precision], torch.float32)
    with FakeTensorMode():  # `make_fx`, not torch.export: the code is ours and has no Python branch for Dynamo
        logits = torch.zeros(rows, recipe.model_config().vocab_size // tp, dtype=dtype)
        graph = proxy_tensor.make_fx(NxDCrossEntropyStep(), record_stack_traces=True)(
            logits, torch.zeros(rows, dtype=torch.long)).graph
    inputs = {node.name for node in graph.nodes if node.op == "placeholder"}  # the step's logits: checked there
    ops = [f for f in _graph_findings(graph, NXD_LOSS) if f.refusal.node not in inputs]
    return _once(ops, known, by_line=False)


class GraphCheck(NamedTuple):
    findings: list[Finding]
    seconds: float
    pattern: str  # the layer pattern traced (one layer per kind)
    length: int  # the sequence length traced
    batch: int = 1  # the micro-batch traced (sequences)
    tp: int = 1  # the tensor-parallel degree whose rank-0 shards were traced
    sp: bool = False  # whether that rank held a slice of the sequence between layers


def check_recipe_graph(name: str, overrides: list[str] | None = None,
                       progress: Callable[[str], None] = lambda _: None, batch: int = 1) -> GraphCheck:
    """Trace the recipe's training step on fake tensors (one layer per kind, `batch` sequences: the micro-batch
    of one NeuronCore, for the tensor-size limit; one tensor-parallel rank's shards) and scan both graphs, and
    at tp > 1 the ops of NxD's cross-entropy (`nxd_loss_findings`)."""
    start = time.monotonic()
    recipe, model, args = fake_training_step(name, overrides, batch)
    pattern, length = recipe.model_config().layer_pattern, recipe.data.block_size
    progress(f"tracing the training step on fake tensors: layers {pattern} (one per kind), {batch} × {length} "
             f"tokens, {recipe.train.precision}")
    with ops.use_backend("torch"), warnings.catch_warnings():  # the backend is resolved before tracing
        # torch.export's own pytree code warns of its deprecated LeafSpec check (torch 2.13); not the user's to fix
        warnings.filterwarnings("ignore", message=r".*LeafSpec.*", category=FutureWarning)
        findings = scan_training_step(training_loss(recipe, model), args, progress)
        if recipe.parallel.tp > 1:
            progress("NxD's cross-entropy on rank 0's vocabulary shard, forward and its own backward")
            findings += nxd_loss_findings(recipe, batch, findings)
    return GraphCheck(findings, time.monotonic() - start, pattern, length, batch, recipe.parallel.tp,
                      recipe.parallel.sp)
