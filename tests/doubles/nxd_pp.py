"""A double of NxD 0.17's ``NxDPPModel`` (pipeline parallelism), one stage per process over gloo.

It does what NxD's source does at the SDK 2.28 release (``aws-neuron/neuronx-distributed``
tag ``v2.28.0``: ``pipeline/model.py``, ``trace.py``, ``partition.py``) wherever our
wiring depends on it, and fails where NxD would fail:

- construction: NxD's exact signature (a misspelt key is a TypeError);
  ``auto_partition`` with ``pipeline_cuts`` is refused; ``input_names`` are
  required; the model is traced with ``torch.fx`` (``param_shapes_constant=True``), the
  transformer layer class, ``leaf_module_cls`` and NxD's parallel layers as leaves,
  ``math``, NxD's packages and ``autowrap_modules`` searched for leaf functions (the
  doubles' NxD mapping and loss functions refuse an FX proxy, as NxD's autograd
  Functions cannot take one); cuts mark the named layer calls (``auto_partition``:
  NxD's ``create_partitions``, remainder on the last stages) and FX's
  ``split_module(keep_original_order=True)`` makes the stages; a stage input that no
  earlier stage produces (a parameter read outside a leaf module) is refused;
- a Parameter used by two stages is shared: ``shared`` set on its later uses (the
  gradient norm skips them), values synchronised from the first stage, gradients
  all-reduced over the stages at the end of every ``run_train``; parameters of other
  stages stop requiring grad; names map back to the original module's;
- ``run_train(**inputs)`` / ``run_eval(**inputs)``: host tensors named as
  ``input_names`` (a batch from ``MpDeviceLoader`` is refused), split into
  ``num_microbatches`` along dim 0 and uploaded (device tensors in the step, as NxD's ``MpDeviceLoader`` over
  the micro-batches makes them); the first call runs one shape-inference forward
  per stage (``tracing`` set meanwhile, grad enabled, the stage in the mode it was
  left in, even in ``run_eval``, as NxD), and later calls must keep the shapes
  passed between stages; every
  micro-batch runs forward on each stage with point-to-point transfers (a 0-dim tensor
  cannot cross: NxD's XLA ``send`` reads ``tensor.size(0)``), the last stage's output
  is read with ``output_loss_value_spec`` (``find_loss_from_output_and_spec``) and
  ``loss / num_microbatches`` is back-propagated, gradients flowing back stage by
  stage; without ``use_optimizer_wrapper`` / ``use_zero1_optimizer`` gradients would
  also be averaged over data ranks (recorded at dp = 1, refused above). ``mark_step`` runs before and after a
  run and after every task (source ``"pipeline"`` in the log); the mean loss returns
  on the last stage, moved to the host when ``return_loss_on_cpu`` (a host sync inside
  the step, recorded as a violation);
- ``train()``, ``forward()`` and ``state_dict()`` raise, as NxD's do; ``local_named_parameters``,
  ``local_state_dict`` (with NxD's handling of a keyword ``prefix``), ``load_state_dict`` speak original
  names; ``parameters`` / ``buffers`` and their named forms are the wrapped module's, and any other attribute
  ``nn.Module`` does not find is looked up on the wrapped module (NxD's ``__getattr__``).

Micro-batches run one after the other (forward then backward), not in NxD's 1F1B
order: the same gradients, not the same timeline. Transfers go straight from the
producing stage to the consuming one in this rank's pipeline group, the stage being the rank's index in it
(tested with two stages, at dp = 1 and 2); a shared Parameter's group is made for every pipeline group.
"""

from __future__ import annotations

import inspect
import math
import operator
from typing import Any, Iterator

import torch
import torch.distributed as dist
import torch.fx
from torch import Tensor, nn
from torch.fx.passes.split_module import split_module
from torch.utils._pytree import tree_flatten, tree_unflatten, treespec_dumps, treespec_loads

from .env import ON_DEVICE
from .nxd_move import move_model_to_device
from .xla_host import enter_step

CHECKPOINT_PREFIX = "_checkpoint_wrapped_module."
PARALLEL_MODULE_NAMES = ["ColumnParallelLinear", "RowParallelLinear", "ParallelEmbedding"]


class _Tracer(torch.fx.Tracer):
    """NxD's ``TorchTracerWrapper``: leaf modules by class-name substring or qualified name."""

    def __init__(self, leaf_names: list[str], autowrap_modules: list[Any], autowrap_functions: list[Any]) -> None:
        super().__init__(autowrap_modules=tuple(autowrap_modules), autowrap_functions=tuple(autowrap_functions),
                         param_shapes_constant=True)
        self.leaf_names = leaf_names

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if any(t in type(m).__name__ or t == module_qualified_name for t in self.leaf_names):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def create_partitions(stages: int, layer_names: list[str]) -> list[str]:
    """NxD's ``create_partitions``: even blocks, the remainder on the last stages; the cut layer names."""
    per, extra = divmod(len(layer_names), stages)
    sizes = [per + (s >= stages - extra) for s in range(stages)]
    cuts, end = [], 0
    for size in sizes[:-1]:
        end += size
        cuts.append(layer_names[end - 1])
    return cuts


def trace(module: nn.Module, input_names: list[str], leaves: list[str], autowrap_modules: list,
          autowrap_functions: list, env: Any) -> torch.fx.GraphModule:
    """NxD's ``trace_model`` with its torch tracer: `module`'s forward over `input_names` (the other
    arguments fixed at their defaults), NxD's own leaves and autowrap lists added."""
    params = inspect.signature(module.forward).parameters
    if not set(input_names) <= set(params):
        raise ValueError(f"The model does not have input(s) named: {input_names}")
    concrete = {name: p.default for name, p in params.items() if name not in input_names}
    tracer = _Tracer(leaves + PARALLEL_MODULE_NAMES, [math, *env.nxd_packages, *autowrap_modules],
                     [*env.parallel_functions, *autowrap_functions])
    traced = torch.fx.GraphModule(module, tracer.trace(module, concrete_args=concrete))
    traced.graph.eliminate_dead_code()
    traced.delete_all_unused_submodules()
    traced.recompile()
    return traced


def split(traced: torch.fx.GraphModule, cuts: list[str]) -> tuple[torch.fx.GraphModule, dict[str, str]]:
    """NxD's ``cut_pipeline_stage`` + ``partition_traced_model``: a stage ends with each cut layer call."""
    for cut in cuts:
        nodes = [n for n in traced.graph.nodes if n.op == "call_module" and n.target == cut]
        if not nodes:
            raise RuntimeError(f"cut_point {cut} does not exist in the graph")
        nodes[0].meta["partition"] = True
    stage = 0
    for node in traced.graph.nodes:
        marked = "partition" in node.meta
        node.meta["partition"] = stage
        stage += marked
    qualnames: dict[str, str] = {}
    top = split_module(traced, None, lambda n: n.meta["partition"], qualname_map=qualnames, keep_original_order=True)
    return top, qualnames


def stage_io(top: torch.fx.GraphModule) -> tuple[dict[torch.fx.Node, int], list[list[torch.fx.Node]]]:
    """(the stage owning each value of the split graph, every stage's inputs); like NxD's
    ``analyze_pipeline_module``, refuses a stage input that no earlier stage produces."""
    owner: dict[torch.fx.Node, int] = {}
    inputs: list[list[torch.fx.Node]] = [[] for _ in top.children()]
    for node in top.graph.nodes:
        if node.op == "call_module":
            k = int(node.target.split("_")[-1])
            owner[node] = k
            for arg in node.all_input_nodes:
                if arg.op != "placeholder" and arg not in owner:
                    raise RuntimeError(f"stage {k} input {arg.name} comes from no earlier stage ({arg.op} "
                                       f"{arg.target}): is a parameter read outside a leaf module?")
                inputs[k].append(arg)
        elif node.op == "call_function" and node.target is operator.getitem:
            owner[node] = owner[node.args[0]]
    return owner, inputs


def find_loss(output: Any, spec: Any) -> Tensor | None:
    """NxD's ``find_loss_from_output_and_spec``."""
    if spec is False or spec is None:
        return None
    if spec is True:
        if not isinstance(output, Tensor):
            raise RuntimeError(f"Loss spec must specify a tensor value but got {output}")
        return output
    if isinstance(spec, (tuple, list)):
        if not isinstance(output, (tuple, list)) or len(output) != len(spec):
            raise RuntimeError(f"Output value {type(output).__name__} must match the loss specification {spec}")
        found = [find_loss(o, s) for o, s in zip(output, spec)]
    elif isinstance(spec, dict):
        if not isinstance(output, dict) or set(output) != set(spec):
            raise RuntimeError(f"Output value {type(output).__name__} must match the loss specification {spec}")
        found = [find_loss(output[k], s) for k, s in spec.items()]
    else:
        raise RuntimeError(f"Unsupported type {type(spec)} in loss specification")
    for loss in found:
        if loss is not None:
            return loss
    raise RuntimeError(f"Did not find loss value in specification {spec}")


class NxDPPModel(nn.Module):
    """One pipeline stage of `module` on this process; see the module docstring."""

    env: Any  # the doubles' `Env`, set on the class `doubles.nxd_runtime` binds

    def __init__(self, module, transformer_layer_cls=None, num_microbatches=1, virtual_pipeline_size=1,
                 output_loss_value_spec=None, return_mb_loss=False, broadcast_and_average_loss=False,
                 use_zero1_optimizer=False, use_model_wrapper=False, use_optimizer_wrapper=False, pipeline_cuts=None,
                 input_names=None, leaf_module_cls=None, autowrap_functions=None, autowrap_modules=None,
                 autowrap_obj_methods=None, tracer_cls=None, param_init_fn=None, trace_file_path=None,
                 return_loss_on_cpu=True, deallocate_pipeline_outputs=False, auto_partition=False,
                 fuse_microbatches=False, manual_pp_partition=False, manual_pp_stage_partition_fn=None,
                 manual_pp_loss_fn=None, _delay_tracing=False, _turn_off_odd_even_scheduler=False,
                 _all_reduce_send_recv=False, _fused_send_recv=False, _fused_fwd_bwd=False,
                 _mark_step_before_pp_runtime=True, _mark_step_after_pp_runtime=True, _deallocate_send_tensors=True,
                 _use_gloo_for_metadata_comm=False, _debug_mode=False, _debug_pp_size=8, _debug_pp_rank=0):
        given = {k: v for k, v in locals().items() if k not in ("self", "module", "__class__")}
        super().__init__()
        env = self.env
        if not env.grid and not _debug_mode:  # NxD reads the stage from its parallel state
            raise RuntimeError("Model parallelism needs to be initialzed before applying NxDPPModel wrapper. Please "
                               "call neuronx_distributed.parallel_layers.initialize_model_parallel("
                               "pipeline_model_parallel_size, tensor_model_parallel_size)")
        if transformer_layer_cls is None:
            raise ValueError("NxDPPModel requires transformer_layer_cls as input")
        assert virtual_pipeline_size == 1 and not manual_pp_partition, "the double runs one chunk per stage"
        self.original_torch_module = module
        self.env, self.log = env, env.log
        self.transformer_layer_cls, self.num_microbatches = transformer_layer_cls, num_microbatches
        self.output_loss_value_spec, self.return_loss_on_cpu = output_loss_value_spec, return_loss_on_cpu
        self.use_zero1_optimizer, self.use_optimizer_wrapper = use_zero1_optimizer, use_optimizer_wrapper
        self.input_names = input_names
        self.pp, self.stage = env.grid["pp"], env.pp_rank()
        self.io_shapes: dict[str, list] | None = None
        self.tracing = False
        env.log.calls["pipeline"] = given
        if auto_partition and pipeline_cuts:
            raise RuntimeError("auto_partition is True and pipeline_cuts are provided")
        if auto_partition:
            layers = self._layer_names(module)
            if not layers:
                raise ValueError(f"No modules of type {transformer_layer_cls} found in the model.")
            pipeline_cuts = create_partitions(self.pp, layers)
        if not pipeline_cuts:
            raise NotImplementedError("the double traces and partitions when built (NxD delays both to the first "
                                      "run_train): it needs pipeline_cuts or auto_partition")
        if input_names is None:
            raise ValueError("Input names are required for tracing when the NxD optimizer and model wrapper are "
                             "not used")
        for i, cut in enumerate(pipeline_cuts):  # NxD's cut_pipeline_stage
            assert cut not in pipeline_cuts[:i], f"each cutpoint can be only marked once, but {cut} is marked twice"
        if len(pipeline_cuts) + 1 != self.pp:  # NxD's partition
            raise ValueError(f"User cut stages {len(pipeline_cuts) + 1} mismatch the initialized pipeline parallel "
                             f"size {self.pp}")
        if tracer_cls not in (None, "torch"):
            raise ValueError(f"the double traces with NxD's torch tracer only, got tracer_cls={tracer_cls!r}")
        traced = trace(module, input_names, [*(leaf_module_cls or []), transformer_layer_cls.__name__],
                       list(autowrap_modules or []), list(autowrap_functions or []), env)
        self._partition(traced, list(pipeline_cuts))

    # ------------------------------------------------------------------ trace and partition

    def _layer_names(self, module: nn.Module, prefix: str = "") -> list[str]:
        names = []
        for name, child in module.named_children():
            path = f"{prefix}{name}"
            names += [path] if isinstance(child, self.transformer_layer_cls) else self._layer_names(child, path + ".")
        return names

    def _partition(self, traced: torch.fx.GraphModule, cuts: list[str]) -> None:
        self.split, qualnames = split(traced, cuts)
        self.partitions = [m for _, m in self.split.named_children()]
        self.owner, self.stage_args = stage_io(self.split)
        self.local_stage_modules = [self.partitions[self.stage]]
        self._map_names(qualnames)
        self._register_shared_weights()
        local = set(map(id, self.local_stage_modules[0].parameters()))
        for p in self.original_torch_module.parameters():
            if id(p) not in local:
                p.requires_grad_(False)
                p.grad = None
        self._sync_shared_weights()

    def _map_names(self, qualnames: dict[str, str]) -> None:
        prefix = f"submod_{self.stage}."
        mapping = {k[len(prefix):]: v for k, v in qualnames.items() if k.startswith(prefix)}
        self.local_to_original: dict[str, str] = {}
        for local in self.local_stage_modules[0].state_dict(keep_vars=True):
            original = local
            for short, full in mapping.items():
                if local.startswith(short + "."):
                    original = full + local[len(short):]
            self.local_to_original[local] = original
        self.original_to_local = {v: k for k, v in self.local_to_original.items()}

    def _register_shared_weights(self) -> None:
        """NxD's ``analyze_shared_weights_across_stages`` + ``register_shared_weights``."""
        seen: dict[int, list[tuple[str, int]]] = {}
        for stage, partition in enumerate(self.partitions):
            for name, p in partition.named_parameters():
                uses = seen.setdefault(id(p), [])
                if stage == self.stage:
                    p.shared = bool(uses) and all(s != stage for _, s in uses)
                if not any(s == stage for _, s in uses):
                    uses.append((name, stage))
        self.shared: dict[str, Any] = {}
        pipelines, here = self.env.pp_groups(), self.env.group_index("pp")[0]
        for uses in (u for u in seen.values() if len(u) > 1):
            for pipeline in pipelines:  # each data rank's copy of the stages: every rank asks, in the same order
                group = self.env.group_of([pipeline[s] for _, s in uses])
                mine = [name for name, s in uses if s == self.stage]
                if mine and pipeline == here:
                    self.shared[mine[0]] = group
        self.log.calls["shared_weights"] = sorted(self.shared)

    def move_model_to_device(self) -> None:
        """NxD (pipeline/model.py 1963-1972): each local stage module moved as ``move_model_to_device`` moves a
        module (its parameters new objects, see `nxd_move`), then the shared weights synced again."""
        for local in self.local_stage_modules:
            move_model_to_device(local)
            self._sync_shared_weights()

    def _sync_shared_weights(self) -> None:
        params = dict(self.local_stage_modules[0].named_parameters())
        for name, group in self.shared.items():
            with torch.no_grad():
                if dist.get_rank(group) != 0:
                    params[name].data.zero_()
                dist.all_reduce(params[name].data, group=group)

    # ------------------------------------------------------------------ NxD's module API

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("model.forward() is not supported in pipeline model. Use model.run_train() and "
                           "model.run_eval() instead.")

    def train(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("model.train() is not supported in pipeline mode. Use model.run_train() and "
                           "model.run_eval() instead.")

    def state_dict(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("model.state_dict() is not supported in pipeline mode. Use model.local_state_dict() "
                           "instead.")

    def __getattr__(self, name: str) -> Any:
        """NxD (pipeline/model.py 385-390): what ``nn.Module`` does not find comes from the wrapped module, whose
        own AttributeError (naming the wrapped class) reaches the caller."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.original_torch_module, name)

    def named_parameters(self, *args: Any, **kwargs: Any) -> Iterator[tuple[str, nn.Parameter]]:
        return self.original_torch_module.named_parameters(*args, **kwargs)

    def parameters(self, *args: Any, **kwargs: Any) -> Iterator[nn.Parameter]:
        return self.original_torch_module.parameters(*args, **kwargs)

    def named_buffers(self, *args: Any, **kwargs: Any) -> Iterator[tuple[str, Tensor]]:
        return self.original_torch_module.named_buffers(*args, **kwargs)

    def buffers(self, *args: Any, **kwargs: Any) -> Iterator[Tensor]:
        return self.original_torch_module.buffers(*args, **kwargs)

    def local_parameters(self, recurse=True):
        for _, p in self.local_named_parameters(recurse=recurse):
            yield p

    def local_buffers(self, recurse=True):
        for _, b in self.local_named_buffers(recurse=recurse):
            yield b

    def local_modules(self):
        for _, m in self.local_named_modules():
            yield m

    def local_children(self):
        for _, c in self.local_named_children():
            yield c

    def local_named_parameters(self, recurse=True):
        for name, p in self.local_stage_modules[0].named_parameters(recurse=recurse):
            yield self.local_to_original[name.replace(CHECKPOINT_PREFIX, "")], p

    def local_named_buffers(self, prefix="", recurse=True):
        # as NxD: names looked up as the stage module gives them (no checkpoint-wrapper prefix removed)
        for name, b in self.local_stage_modules[0].named_buffers(prefix=prefix, recurse=recurse):
            yield self.local_to_original[name], b

    def local_named_children(self) -> Iterator[tuple[str, nn.Module]]:
        yield from self.local_stage_modules[0].named_children()

    def local_named_modules(self, memo=None, prefix="", remove_duplicate=True):
        yield from self.local_stage_modules[0].named_modules(memo=memo, prefix=prefix,
                                                             remove_duplicate=remove_duplicate)

    def local_state_dict(self, *args, **kwargs):
        """NxD's ``local_state_dict`` + ``translate_local_state_dict_to_origin_state_dict`` (pipeline/model.py
        1893-1926): the stage's state_dict with `args` / `kwargs`; only a keyword ``prefix`` is taken off each name
        (its first occurrence, wherever it is) and put back before the original name, so a prefix given by
        position reaches the names and fails the lookup."""
        prefix = kwargs.get("prefix", "")
        out = {}
        for name, t in self.local_stage_modules[0].state_dict(*args, **kwargs).items():
            name = name.replace(prefix, "", 1)
            if name not in self.local_to_original:
                raise ValueError(f"parameter {name} in local_state_dict does not exist in local module")
            out[f"{prefix}{self.local_to_original[name]}"] = t
        return out

    def load_state_dict(self, state_dict, strict=True):
        local = {self.original_to_local[k]: v for k, v in state_dict.items() if k in self.original_to_local}
        return self.local_stage_modules[0].load_state_dict(local, strict=strict)

    # ------------------------------------------------------------------ runtime

    def run_train(self, *args, **kwargs):  # positional arguments are ignored once partitioned, as NxD
        inputs = kwargs
        self._mark_step()
        self.log.step_work = self.log.in_step = True  # a step graph is pending until the caller's mark_step
        enter_step(self.log)  # host tensors made until then are followed (`xla_host`)
        loss = self._run(inputs, train=True)
        self._mark_step()
        return loss

    def run_eval(self, *args, **kwargs):
        inputs = kwargs
        if self.log.step_work:
            self.log.violations.append("run_eval while a step graph was pending")
        self._mark_step()
        loss = self._run(inputs, train=False)
        self._mark_step()
        return loss

    def _mark_step(self) -> None:
        self.log.sync("pipeline")

    def _run(self, inputs: dict[str, Tensor], train: bool) -> Tensor | None:
        self._check_inputs(inputs)
        sizes = [t.shape[0] for t in inputs.values()]
        for size in sizes[1:]:  # NxD's get_batch_iterator
            assert size == sizes[0], f"batch dimension does not match, {sizes[0]} and {size}"
        pieces = {k: self._split(v) for k, v in inputs.items()}
        if self.io_shapes is None:  # NxD's shape inference: one forward per stage, results dropped
            # grad enabled, the stage in the mode it was left in (pipeline/model.py 894-931, 1009-1027: before
            # _run_train / _run_eval set the mode and run_eval's no_grad)
            self.io_shapes, self.tracing = {}, True
            with torch.enable_grad():
                self._forward({k: v[0] for k, v in pieces.items()}, train=False)
            self.tracing = False
            self._mark_step()
        self.local_stage_modules[0].train(train)
        losses = []
        for mb in range(self.num_microbatches):
            with torch.set_grad_enabled(train):
                output, received, sent = self._forward({k: v[mb] for k, v in pieces.items()}, train)
            self._mark_step()
            loss = None
            if self.stage == self.pp - 1:
                loss = find_loss(output, self.output_loss_value_spec)
                losses.append(loss.detach().clone())
            if train:
                self._backward(loss, received, sent)
                self._mark_step()
        if train:
            self._reduce_grads()
            self._mark_step()
        return self._process_loss(losses)

    def _check_inputs(self, inputs: dict[str, Tensor]) -> None:
        if set(inputs) != set(self.input_names):
            raise RuntimeError(f"train/eval inputs ({set(inputs)}) must be same as the tracing input names "
                               f"{set(self.input_names)}")
        for name, t in inputs.items():
            if not isinstance(t, Tensor):
                raise ValueError(f"batch input must be a torch tensor, but getting {type(t)}")
            if getattr(t, ON_DEVICE, False):
                raise ValueError(f"model inputs should be all on cpu device, but getting {name} on the XLA device")

    def _split(self, t: Tensor) -> list[Tensor]:
        assert t.shape[0]
        if t.shape[0] % self.num_microbatches:
            raise RuntimeError(f"Input batch size {t.shape[0]} must be divisible with the num_microbatches "
                               f"{self.num_microbatches}")
        # NxD hands the micro-batches to an ``MpDeviceLoader`` (pipeline/model.py 1946-1951), which uploads each one
        # before the graph that reads it: device tensors in the step (on the double a copy, not a host tensor)
        with torch._C.DisableTorchFunction():
            return [piece.clone() for piece in t.chunk(self.num_microbatches)]

    def _forward(self, inputs: dict[str, Tensor], train: bool) -> tuple[Any, list[tuple[int, Tensor]], list]:
        """This stage's part of one micro-batch: receive, run, send. Returns (last stage's output or None,
        received tensors that need gradients (producer, tensor), sent tensors that need them (consumer, tensor))."""
        values: dict[torch.fx.Node, Any] = {}
        received: list[tuple[int, Tensor]] = []
        sent: list[tuple[int, Tensor]] = []
        output = None
        for node in self.split.graph.nodes:
            if node.op == "placeholder":
                values[node] = inputs[node.target]
            elif node.op == "call_module" and self.owner[node] == self.stage:
                for arg in dict.fromkeys(self.stage_args[self.stage]):
                    if arg.op != "placeholder":
                        values[arg] = self._recv(arg, received)
                args = [values[a] if isinstance(a, torch.fx.Node) else a for a in node.args]
                output = values[node] = self.local_stage_modules[0](*args)
                self._count_forward(train)
                for consumer in range(self.stage + 1, self.pp):
                    for arg in dict.fromkeys(self.stage_args[consumer]):
                        if self.owner.get(arg) == self.stage:
                            self._send(arg, self._own_value(arg, values), consumer, sent)
        return (output if self.stage == self.pp - 1 else None), received, sent

    def _own_value(self, node: torch.fx.Node, values: dict) -> Any:
        """A value this stage computed: a stage output or an item of one (``getitem`` in the split graph)."""
        if node not in values:
            values[node] = operator.getitem(self._own_value(node.args[0], values), node.args[1])
        return values[node]

    def _count_forward(self, train: bool) -> None:
        if self.tracing:
            return
        self.log.trace("stage_forward", self.stage, "train" if train else "eval")
        if train:
            self.log.train_forwards += 1
        else:
            self.log.eval_forwards += 1

    def _send(self, node: torch.fx.Node, value: Any, consumer: int, sent: list) -> None:
        leaves, spec = tree_flatten(value)
        meta = []
        for leaf in leaves:
            if isinstance(leaf, Tensor):
                if leaf.dim() == 0:
                    raise RuntimeError(f"{node.name}: a 0-dim tensor cannot cross a pipeline cut (NxD's XLA send "
                                       "reads tensor.size(0))")
                meta.append(("tensor", tuple(leaf.shape), leaf.dtype, leaf.requires_grad))
            else:
                meta.append(("object", leaf))
        self._check_shapes(node, meta)
        dist.send_object_list([treespec_dumps(spec), meta], dst=self.env.global_rank(consumer))
        for leaf in leaves:
            if isinstance(leaf, Tensor):
                dist.send(leaf.detach().contiguous(), dst=self.env.global_rank(consumer))
                if leaf.requires_grad:
                    sent.append((consumer, leaf))

    def _recv(self, node: torch.fx.Node, received: list) -> Any:
        producer = self.owner[node]
        box: list[Any] = [None, None]
        dist.recv_object_list(box, src=self.env.global_rank(producer))
        spec, meta = treespec_loads(box[0]), box[1]
        self._check_shapes(node, meta)
        leaves = []
        for item in meta:
            if item[0] == "object":
                leaves.append(item[1])
                continue
            _, shape, dtype, needs_grad = item
            t = torch.empty(shape, dtype=dtype)
            dist.recv(t, src=self.env.global_rank(producer))
            t.requires_grad_(needs_grad and torch.is_grad_enabled())
            if t.requires_grad:
                received.append((producer, t))
            leaves.append(t)
        return tree_unflatten(leaves, spec)

    def _check_shapes(self, node: torch.fx.Node, meta: list) -> None:
        """NxD sends the stage IO metadata once, at the shape inference: later transfers must match it."""
        shapes = [m[1:3] if m[0] == "tensor" else None for m in meta]
        if node.name not in self.io_shapes:
            self.io_shapes[node.name] = shapes
        elif self.io_shapes[node.name] != shapes:
            raise RuntimeError(f"{node.name}: shapes {shapes} differ from the first step's "
                               f"{self.io_shapes[node.name]} (NxD fixes the stage IO at its shape inference)")

    def _backward(self, loss: Tensor | None, received: list[tuple[int, Tensor]], sent: list) -> None:
        if loss is not None:
            (loss / self.num_microbatches).backward()
        elif sent:
            grads = []
            for consumer, t in sent:
                g = torch.empty_like(t)
                dist.recv(g, src=self.env.global_rank(consumer))
                grads.append(g)
            torch.autograd.backward([t for _, t in sent], grads)
        for producer, t in received:
            if t.grad is None:
                raise RuntimeError("Backward sending grads, but get None")
            dist.send(t.grad.contiguous(), dst=self.env.global_rank(producer))

    def _reduce_grads(self) -> None:
        if not self.use_zero1_optimizer and not self.use_optimizer_wrapper:
            if self.env.grid.get("dp", 1) > 1:
                raise NotImplementedError("the pipeline double does not model NxD's own data-parallel gradient "
                                          "average (without use_optimizer_wrapper or use_zero1_optimizer)")
            self.log.calls["pipeline_dp_grad_average"] = True  # dp = 1: nothing to average
        params = dict(self.local_stage_modules[0].named_parameters())
        for name, group in self.shared.items():
            p = params[name]
            if p.requires_grad:  # NxD: the gradient, or the ZeRO-1 hooks' main_grad when they took it
                assert p.grad is not None or hasattr(p, "main_grad"), f"Found shared weight {name} has None grad"
                dist.all_reduce(p.grad if p.grad is not None else p.main_grad, group=group)

    def _process_loss(self, losses: list[Tensor]) -> Tensor | None:
        if self.stage != self.pp - 1 or self.output_loss_value_spec is None:
            return None
        loss = torch.stack(losses).sum(0) / len(losses)
        if self.return_loss_on_cpu:
            self.log.violations.append("run_* moved the loss to the host (return_loss_on_cpu=True): a host sync "
                                       "inside the step")
            return loss.detach().cpu()
        return loss.detach()

