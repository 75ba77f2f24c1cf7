"""The test doubles of torch-xla 2.9 and NxD 0.17 against the real libraries (tests/doubles).

`REAL_SIGNATURES` is data taken from the sources at the pinned versions
(``aws-neuron/neuronx-distributed`` tag ``v2.28.0``, ``_version.py`` 0.17.0;
``pytorch/xla`` tag ``v2.9.0``): every callable a double plays must have exactly that
signature, so a keyword the real library does not take fails here as it would there,
and a drift of the pins shows up as a diff. With ``BMOJO_REAL_SOURCES`` naming source
checkouts (``nxd=<neuronx-distributed checkout>,xla=<xla checkout>``) the data itself
is checked against them.

Then what the doubles model where the real code is less kind than a plain stand-in:
NxD's in-place loss, torch-xla's reentrant checkpoint, ZeRO-1's gradient hooks,
``num_partitions``, the graph-extraction run, graphs that differ between ranks, and
torch-xla 2.9's deprecated and removed ``xla_model`` functions, ``rendezvous``'s
payload and ``all_reduce`` with one replica.
"""

from __future__ import annotations

import ast
import inspect
import os
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
import torch.nn.init as init
from doubles import mpmd, neuron_sdk, nxd_api
from doubles.env import XLA_DEFAULT_SEED, Env, XlaLog, fake_module
from doubles.nxd_runtime import nxd_modules, on_device
from doubles.xla import xla_modules
from doubles.xla_lowerings import LOWERED, parse_native_functions

PARALLEL_STATE = "neuronx_distributed.parallel_layers.parallel_state"

# (import name our code uses, qualified name there, source file, name in that file, signature in the source)
REAL_SIGNATURES = [
    ("torch_xla", "sync", "xla:torch_xla/torch_xla.py", "sync",
     "(wait=False, reset_scope=True)"),
    ("torch_xla", "device", "xla:torch_xla/torch_xla.py", "device",
     "(index=None)"),
    ("torch_xla.core.xla_model", "xla_device", "xla:torch_xla/core/xla_model.py", "xla_device",
     "(n=None, devkind=None)"),
    ("torch_xla.core.xla_model", "mark_step", "xla:torch_xla/core/xla_model.py", "mark_step",
     "(wait=False, reset_scope=True)"),
    ("torch_xla.core.xla_model", "add_step_closure", "xla:torch_xla/core/xla_model.py", "add_step_closure",
     "(closure, args=(), run_async=False)"),
    ("torch_xla.core.xla_model", "all_reduce", "xla:torch_xla/core/xla_model.py", "all_reduce",
     "(reduce_type, inputs, scale=1.0, groups=None, pin_layout=True)"),
    ("torch_xla.core.xla_model", "all_gather", "xla:torch_xla/core/xla_model.py", "all_gather",
     "(value, dim=0, groups=None, output=None, pin_layout=True, channel_id=None, use_global_device_ids=None)"),
    ("torch_xla.core.xla_model", "rendezvous", "xla:torch_xla/core/xla_model.py", "rendezvous",
     "(tag, payload=b'', replicas=[])"),
    ("torch_xla.core.xla_model", "get_rng_state", "xla:torch_xla/core/xla_model.py", "get_rng_state",
     "(device=None)"),
    ("torch_xla.core.xla_model", "set_rng_state", "xla:torch_xla/core/xla_model.py", "set_rng_state",
     "(seed, device=None)"),
    ("torch_xla.core.xla_model", "is_master_ordinal", "xla:torch_xla/core/xla_model.py", "is_master_ordinal",
     "(local=True)"),
    ("torch_xla.core.xla_model", "get_local_ordinal", "xla:torch_xla/core/xla_model.py", "get_local_ordinal",
     "()"),
    ("torch_xla.runtime", "world_size", "xla:torch_xla/runtime.py", "world_size",
     "()"),
    ("torch_xla.runtime", "global_ordinal", "xla:torch_xla/runtime.py", "global_ordinal",
     "()"),
    ("torch_xla.runtime", "local_ordinal", "xla:torch_xla/runtime.py", "local_ordinal",
     "()"),
    ("torch_xla.distributed.parallel_loader", "MpDeviceLoader.__init__", "xla:torch_xla/distributed/parallel_loader.py", "MpDeviceLoader.__init__",
     "(loader, device, **kwargs)"),
    ("torch_xla.distributed.parallel_loader", "ParallelLoader.__init__", "xla:torch_xla/distributed/parallel_loader.py", "ParallelLoader.__init__",
     "(cpu_loader, devices, batchdim=0, batches_per_execution=1, loader_prefetch_size=16, device_prefetch_size=8, host_to_device_transfer_threads=1, input_sharding=None)"),
    ("torch_xla.utils.checkpoint", "checkpoint", "xla:torch_xla/utils/checkpoint.py", "checkpoint",
     "(function, *args, use_reentrant=True, **kwargs)"),
    ("neuronx_distributed.optimizer", "NeuronZero1Optimizer.__init__", "xla:torch_xla/distributed/zero_redundancy_optimizer.py", "ZeroRedundancyOptimizer.__init__",
     "(params, optimizer_class, optimizer_dtype=None, grad_clipping=True, max_norm=None, pin_layout=True, sharding_groups=None, grad_norm_groups=None, lazy_init=False, bucket_cap_mb_all_gather=0, bucket_cap_mb_reduce_scatter=0, use_grad_acc_hook=False, save_master_weights=False, higher_cc_precision=False, **defaults)"),
    ("neuronx_distributed.optimizer", "NeuronZero1Optimizer.step", "xla:torch_xla/distributed/zero_redundancy_optimizer.py", "ZeroRedundancyOptimizer.step",
     "(closure=None, **kwargs)"),
    ("neuronx_distributed.optimizer", "NeuronZero1Optimizer.zero_grad", "xla:torch_xla/distributed/zero_redundancy_optimizer.py", "ZeroRedundancyOptimizer.zero_grad",
     "(set_to_none=False)"),
    ("neuronx_distributed.parallel_layers.layers", "ParallelEmbedding.__init__", "nxd:src/neuronx_distributed/parallel_layers/layers.py", "ParallelEmbedding.__init__",
     "(num_embeddings, embedding_dim, padding_idx=None, max_norm=None, norm_type=2.0, scale_grad_by_freq=False, sparse=False, init_method=init.normal_, device=None, dtype=torch.float32, shard_across_embedding=False, pad=False, sequence_parallel_enabled=False, tensor_model_parallel_group=None, use_spmd_rank=False, sequence_dimension=None, tile_cc=False, rank_ordering=None, collect_output=True)"),
    ("neuronx_distributed.parallel_layers.layers", "ParallelEmbedding.forward", "nxd:src/neuronx_distributed/parallel_layers/layers.py", "ParallelEmbedding.forward",
     "(input_)"),
    ("neuronx_distributed.parallel_layers.layers", "ColumnParallelLinear.__init__", "nxd:src/neuronx_distributed/parallel_layers/layers.py", "ColumnParallelLinear.__init__",
     "(input_size, output_size, bias=True, gather_output=True, dtype=torch.float32, device=None, stride=1, init_method=None, sequence_parallel_enabled=False, sequence_dimension=None, keep_master_weight=False, skip_bias_add=False, pad=False, pad_alignment_size_per_rank=1, keep_padded_output=False, tensor_model_parallel_group=None, reduce_dtype=torch.float32, rank_ordering=None)"),
    ("neuronx_distributed.parallel_layers.layers", "ColumnParallelLinear.forward", "nxd:src/neuronx_distributed/parallel_layers/layers.py", "ColumnParallelLinear.forward",
     "(input, slice_indices=None)"),
    ("neuronx_distributed.parallel_layers.layers", "RowParallelLinear.__init__", "nxd:src/neuronx_distributed/parallel_layers/layers.py", "RowParallelLinear.__init__",
     "(input_size, output_size, bias=True, input_is_parallel=False, dtype=torch.float32, device=None, stride=1, init_method=None, sequence_parallel_enabled=False, sequence_dimension=None, keep_master_weight=False, skip_bias_add=False, pad=False, reduce_output=True, tensor_model_parallel_group=None, reduce_dtype=torch.float32, tile_cc=False, rank_ordering=None)"),
    ("neuronx_distributed.parallel_layers.layers", "RowParallelLinear.forward", "nxd:src/neuronx_distributed/parallel_layers/layers.py", "RowParallelLinear.forward",
     "(input_, slice_indices=None)"),
    ("neuronx_distributed.parallel_layers.mappings", "copy_to_tensor_model_parallel_region", "nxd:src/neuronx_distributed/parallel_layers/mappings.py", "copy_to_tensor_model_parallel_region",
     "(input_, process_group=None)"),
    ("neuronx_distributed.parallel_layers.mappings", "reduce_from_tensor_model_parallel_region", "nxd:src/neuronx_distributed/parallel_layers/mappings.py", "reduce_from_tensor_model_parallel_region",
     "(input_, process_group=None)"),
    ("neuronx_distributed.parallel_layers.mappings", "gather_from_tensor_model_parallel_region", "nxd:src/neuronx_distributed/parallel_layers/mappings.py", "gather_from_tensor_model_parallel_region",
     "(input_, process_group=None)"),
    ("neuronx_distributed.parallel_layers.mappings", "scatter_to_sequence_parallel_region", "nxd:src/neuronx_distributed/parallel_layers/mappings.py", "scatter_to_sequence_parallel_region",
     "(input_, sequence_dimension=0, process_group=None)"),
    ("neuronx_distributed.parallel_layers.mappings", "scatter_to_tensor_model_parallel_region", "nxd:src/neuronx_distributed/parallel_layers/mappings.py", "scatter_to_tensor_model_parallel_region",
     "(input_, process_group=None)"),
    ("neuronx_distributed.parallel_layers.loss_functions", "parallel_cross_entropy", "nxd:src/neuronx_distributed/parallel_layers/loss_functions.py", "parallel_cross_entropy",
     "(vocab_parallel_logits, target, label_smoothing=0.0)"),
    ("neuronx_distributed.parallel_layers.parallel_state", "initialize_model_parallel", "nxd:src/neuronx_distributed/parallel_layers/parallel_state.py", "initialize_model_parallel",
     "(tensor_model_parallel_size=1, pipeline_model_parallel_size=1, context_parallel_size=1, expert_model_parallel_size=1, skip_collective_init=False, lnc_size=1, mesh_only=False)"),
    ("neuronx_distributed.parallel_layers.parallel_state", "model_parallel_is_initialized", "nxd:src/neuronx_distributed/parallel_layers/parallel_state.py", "model_parallel_is_initialized",
     "()"),
    ("neuronx_distributed.parallel_layers.parallel_state", "destroy_model_parallel", "nxd:src/neuronx_distributed/parallel_layers/parallel_state.py", "destroy_model_parallel",
     "()"),
    ("neuronx_distributed.parallel_layers.parallel_state", "get_tensor_model_parallel_size", "nxd:src/neuronx_distributed/parallel_layers/parallel_state.py", "get_tensor_model_parallel_size",
     "()"),
    ("neuronx_distributed.parallel_layers.parallel_state", "get_tensor_model_parallel_rank", "nxd:src/neuronx_distributed/parallel_layers/parallel_state.py", "get_tensor_model_parallel_rank",
     "()"),
    ("neuronx_distributed.parallel_layers.parallel_state", "get_pipeline_model_parallel_size", "nxd:src/neuronx_distributed/parallel_layers/parallel_state.py", "get_pipeline_model_parallel_size",
     "()"),
    ("neuronx_distributed.parallel_layers.parallel_state", "get_pipeline_model_parallel_rank", "nxd:src/neuronx_distributed/parallel_layers/parallel_state.py", "get_pipeline_model_parallel_rank",
     "()"),
    ("neuronx_distributed.parallel_layers.parallel_state", "get_data_parallel_size", "nxd:src/neuronx_distributed/parallel_layers/parallel_state.py", "get_data_parallel_size",
     "()"),
    ("neuronx_distributed.parallel_layers.parallel_state", "get_data_parallel_rank", "nxd:src/neuronx_distributed/parallel_layers/parallel_state.py", "get_data_parallel_rank",
     "()"),
    ("neuronx_distributed.parallel_layers.parallel_state", "get_data_parallel_replica_groups", "nxd:src/neuronx_distributed/parallel_layers/parallel_state.py", "get_data_parallel_replica_groups",
     "()"),
    ("neuronx_distributed.parallel_layers.parallel_state", "get_pipeline_model_parallel_replica_groups", "nxd:src/neuronx_distributed/parallel_layers/parallel_state.py", "get_pipeline_model_parallel_replica_groups",
     "()"),
    ("neuronx_distributed.parallel_layers.parallel_state", "get_tensor_model_parallel_replica_groups", "nxd:src/neuronx_distributed/parallel_layers/parallel_state.py", "get_tensor_model_parallel_replica_groups",
     "()"),
    ("neuronx_distributed.parallel_layers.parallel_state", "is_global_rank_zero", "nxd:src/neuronx_distributed/parallel_layers/parallel_state.py", "is_global_rank_zero",
     "()"),
    ("neuronx_distributed.parallel_layers.utils", "move_all_tensor_to_cpu", "nxd:src/neuronx_distributed/parallel_layers/utils.py", "move_all_tensor_to_cpu",
     "(data, convert=True)"),
    ("neuronx_distributed.parallel_layers.utils", "set_tensor_model_parallel_attributes", "nxd:src/neuronx_distributed/parallel_layers/utils.py", "set_tensor_model_parallel_attributes",
     "(tensor, is_parallel, dim, stride, num_partitions=-1, rank_ordering=None)"),
    ("neuronx_distributed.parallel_layers.grads", "allreduce_sequence_parallel_gradients", "nxd:src/neuronx_distributed/parallel_layers/grads.py", "allreduce_sequence_parallel_gradients",
     "(optimizer)"),
    ("neuronx_distributed.trainer", "neuronx_distributed_config", "nxd:src/neuronx_distributed/trainer/trainer.py", "neuronx_distributed_config",
     "(tensor_parallel_size=1, pipeline_parallel_size=1, expert_parallel_size=1, context_parallel_size=1, pipeline_config=None, optimizer_config=None, activation_checkpoint_config=None, pad_model=False, sequence_parallel=False, model_init_config=None, lora_config=None, mixed_precision_config=None, sequential_move_factor=11, lnc_size=1)"),
    ("neuronx_distributed.trainer", "initialize_parallel_model", "nxd:src/neuronx_distributed/trainer/trainer.py", "initialize_parallel_model",
     "(nxd_config, model_fn, include_buffers=False, *model_args, **model_kwargs)"),
    ("neuronx_distributed.trainer", "initialize_parallel_optimizer", "nxd:src/neuronx_distributed/trainer/trainer.py", "initialize_parallel_optimizer",
     "(nxd_config, optimizer_class, parameters, **defaults)"),
    ("neuronx_distributed.trainer.model", "NxDModel.__init__", "nxd:src/neuronx_distributed/trainer/model.py", "NxDModel.__init__",
     "(module, nxd_config)"),
    ("neuronx_distributed.trainer.model", "NxDModel.run_train", "nxd:src/neuronx_distributed/trainer/model.py", "NxDModel.run_train",
     "(*args, **kwargs)"),
    ("neuronx_distributed.trainer.model", "NxDModel.run_eval", "nxd:src/neuronx_distributed/trainer/model.py", "NxDModel.run_eval",
     "(*args, **kwargs)"),
    ("neuronx_distributed.trainer.model", "NxDModel.local_modules", "nxd:src/neuronx_distributed/trainer/model.py", "NxDModel.local_modules",
     "()"),
    ("neuronx_distributed.trainer.optimizer", "NxDOptimizer.__init__", "nxd:src/neuronx_distributed/trainer/optimizer.py", "NxDOptimizer.__init__",
     "(optimizer, nxd_config)"),
    ("neuronx_distributed.trainer.optimizer", "NxDOptimizer.step", "nxd:src/neuronx_distributed/trainer/optimizer.py", "NxDOptimizer.step",
     "(closure=None)"),
    ("neuronx_distributed.trainer.optimizer", "NxDOptimizer.zero_grad", "nxd:src/neuronx_distributed/trainer/optimizer.py", "NxDOptimizer.zero_grad",
     "(set_to_none=False)"),
    ("neuronx_distributed.pipeline", "NxDPPModel.__init__", "nxd:src/neuronx_distributed/pipeline/model.py", "NxDPPModel.__init__",
     "(module, transformer_layer_cls=None, num_microbatches=1, virtual_pipeline_size=1, output_loss_value_spec=None, return_mb_loss=False, broadcast_and_average_loss=False, use_zero1_optimizer=False, use_model_wrapper=False, use_optimizer_wrapper=False, pipeline_cuts=None, input_names=None, leaf_module_cls=None, autowrap_functions=None, autowrap_modules=None, autowrap_obj_methods=None, tracer_cls=None, param_init_fn=None, trace_file_path=None, return_loss_on_cpu=True, deallocate_pipeline_outputs=False, auto_partition=False, fuse_microbatches=False, manual_pp_partition=False, manual_pp_stage_partition_fn=None, manual_pp_loss_fn=None, _delay_tracing=False, _turn_off_odd_even_scheduler=False, _all_reduce_send_recv=False, _fused_send_recv=False, _fused_fwd_bwd=False, _mark_step_before_pp_runtime=True, _mark_step_after_pp_runtime=True, _deallocate_send_tensors=True, _use_gloo_for_metadata_comm=False, _debug_mode=False, _debug_pp_size=8, _debug_pp_rank=0)"),
    ("neuronx_distributed.pipeline", "NxDPPModel.run_train", "nxd:src/neuronx_distributed/pipeline/model.py", "NxDPPModel.run_train",
     "(*args, **kwargs)"),
    ("neuronx_distributed.pipeline", "NxDPPModel.run_eval", "nxd:src/neuronx_distributed/pipeline/model.py", "NxDPPModel.run_eval",
     "(*args, **kwargs)"),
    ("neuronx_distributed.pipeline", "NxDPPModel.local_named_parameters", "nxd:src/neuronx_distributed/pipeline/model.py", "NxDPPModel.local_named_parameters",
     "(recurse=True)"),
    ("neuronx_distributed.pipeline", "NxDPPModel.local_state_dict", "nxd:src/neuronx_distributed/pipeline/model.py", "NxDPPModel.local_state_dict",
     "(*args, **kwargs)"),
    ("neuronx_distributed.pipeline", "NxDPPModel.load_state_dict", "nxd:src/neuronx_distributed/pipeline/model.py", "NxDPPModel.load_state_dict",
     "(state_dict, strict=True)"),
    ("neuronx_distributed.pipeline", "NxDPPModel.local_named_buffers", "nxd:src/neuronx_distributed/pipeline/model.py", "NxDPPModel.local_named_buffers",
     "(prefix='', recurse=True)"),
    ("neuronx_distributed.pipeline", "NxDPPModel.local_named_modules", "nxd:src/neuronx_distributed/pipeline/model.py", "NxDPPModel.local_named_modules",
     "(memo=None, prefix='', remove_duplicate=True)"),
    ("neuronx_distributed.pipeline", "NxDPPModel.local_named_children", "nxd:src/neuronx_distributed/pipeline/model.py", "NxDPPModel.local_named_children",
     "()"),
    ("neuronx_distributed.pipeline", "NxDPPModel.forward", "nxd:src/neuronx_distributed/pipeline/model.py", "NxDPPModel.forward",
     "(*args, **kwargs)"),
    ("neuronx_distributed.pipeline", "NxDPPModel.train", "nxd:src/neuronx_distributed/pipeline/model.py", "NxDPPModel.train",
     "(*args, **kwargs)"),
    ("neuronx_distributed.pipeline", "NxDPPModel.state_dict", "nxd:src/neuronx_distributed/pipeline/model.py", "NxDPPModel.state_dict",
     "(*args, **kwargs)"),
    ("neuronx_distributed.pipeline", "NxDPPModel.named_parameters", "nxd:src/neuronx_distributed/pipeline/model.py", "NxDPPModel.named_parameters",
     "(*args, **kwargs)"),
    ("neuronx_distributed.pipeline", "NxDPPModel.parameters", "nxd:src/neuronx_distributed/pipeline/model.py", "NxDPPModel.parameters",
     "(*args, **kwargs)"),
    ("neuronx_distributed.pipeline", "NxDPPModel.__getattr__", "nxd:src/neuronx_distributed/pipeline/model.py", "NxDPPModel.__getattr__",
     "(name)"),
    ("neuronx_distributed.pipeline", "NxDPPModel.named_buffers", "nxd:src/neuronx_distributed/pipeline/model.py", "NxDPPModel.named_buffers",
     "(*args, **kwargs)"),
    ("neuronx_distributed.pipeline", "NxDPPModel.buffers", "nxd:src/neuronx_distributed/pipeline/model.py", "NxDPPModel.buffers",
     "(*args, **kwargs)"),
    ("neuronx_distributed.pipeline", "NxDPPModel.local_parameters", "nxd:src/neuronx_distributed/pipeline/model.py", "NxDPPModel.local_parameters",
     "(recurse=True)"),
    ("neuronx_distributed.pipeline", "NxDPPModel.local_buffers", "nxd:src/neuronx_distributed/pipeline/model.py", "NxDPPModel.local_buffers",
     "(recurse=True)"),
    ("neuronx_distributed.pipeline", "NxDPPModel.local_modules", "nxd:src/neuronx_distributed/pipeline/model.py", "NxDPPModel.local_modules",
     "()"),
    ("neuronx_distributed.pipeline", "NxDPPModel.local_children", "nxd:src/neuronx_distributed/pipeline/model.py", "NxDPPModel.local_children",
     "()"),
    ("neuronx_distributed.trainer.model", "NxDModel.original_module", "nxd:src/neuronx_distributed/trainer/model.py", "NxDModel.original_module",
     "()"),
    ("neuronx_distributed.trainer.model", "NxDModel.forward", "nxd:src/neuronx_distributed/trainer/model.py", "NxDModel.forward",
     "(*args, **kwargs)"),
    ("neuronx_distributed.trainer.model", "NxDModel.named_parameters", "nxd:src/neuronx_distributed/trainer/model.py", "NxDModel.named_parameters",
     "(*args, **kwargs)"),
    ("neuronx_distributed.trainer.model", "NxDModel.named_buffers", "nxd:src/neuronx_distributed/trainer/model.py", "NxDModel.named_buffers",
     "(*args, **kwargs)"),
    ("neuronx_distributed.trainer.model", "NxDModel.named_children", "nxd:src/neuronx_distributed/trainer/model.py", "NxDModel.named_children",
     "()"),
    ("neuronx_distributed.trainer.model", "NxDModel.named_modules", "nxd:src/neuronx_distributed/trainer/model.py", "NxDModel.named_modules",
     "(*args, **kwargs)"),
    ("neuronx_distributed.trainer.model", "NxDModel.state_dict", "nxd:src/neuronx_distributed/trainer/model.py", "NxDModel.state_dict",
     "(*args, **kwargs)"),
    ("neuronx_distributed.trainer.model", "NxDModel.load_state_dict", "nxd:src/neuronx_distributed/trainer/model.py", "NxDModel.load_state_dict",
     "(state_dict, strict=True)"),
    ("neuronx_distributed.trainer.optimizer", "NxDOptimizer.state_dict", "nxd:src/neuronx_distributed/trainer/optimizer.py", "NxDOptimizer.state_dict",
     "()"),
    ("neuronx_distributed.trainer.optimizer", "NxDOptimizer.load_state_dict", "nxd:src/neuronx_distributed/trainer/optimizer.py", "NxDOptimizer.load_state_dict",
     "(state_dict)"),
]
# What ``neuronx_distributed.parallel_layers`` holds (src/neuronx_distributed/parallel_layers/__init__.py, tag
# v2.28.0): its imports, its own lists and the submodules a training run imports.
NXD_PARALLEL_LAYERS_NAMES = {
    "parallel_state", "load", "save", "clip_grad_norm", "ColumnParallelLinear", "ParallelEmbedding",
    "RowParallelLinear", "parallel_cross_entropy", "copy_to_tensor_model_parallel_region",
    "gather_from_tensor_model_parallel_region", "reduce_from_tensor_model_parallel_region",
    "scatter_to_tensor_model_parallel_region", "initialize_model_parallel", "get_xla_rng_tracker",
    "model_parallel_xla_manual_seed", "copy_tensor_model_parallel_attributes", "move_model_to_device",
    "set_defaults_if_not_set_tensor_model_parallel_attributes", "set_tensor_model_parallel_attributes",
    "split_tensor_along_last_dim", "PARALLEL_MODULES", "PARALLEL_FUNCTIONS",
    "layers", "mappings", "loss_functions", "utils", "grads",
}
PLAIN_DOUBLES = {"neuronx_distributed.trainer"}  # also played by `nxd_api.spy_trainer`


def _doubles() -> dict:
    env = Env(XlaLog())
    env.log.env = env
    return {**xla_modules(env), **nxd_modules(env)}


def _lookup(modules: dict, module: str, qualname: str):
    obj = modules[module]
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _parameters(text: str) -> list[tuple[str, object, str | None]]:
    """(name, kind, default source) of each parameter of a signature written as in the source."""
    args = ast.parse(f"def f{text}: pass").body[0].args
    out = []
    positional = args.posonlyargs + args.args
    defaults = [None] * (len(positional) - len(args.defaults)) + list(args.defaults)
    for arg, default in zip(positional, defaults):
        out.append((arg.arg, inspect.Parameter.POSITIONAL_OR_KEYWORD, default and ast.unparse(default)))
    if args.vararg:
        out.append((args.vararg.arg, inspect.Parameter.VAR_POSITIONAL, None))
    for arg, default in zip(args.kwonlyargs, args.kw_defaults):
        out.append((arg.arg, inspect.Parameter.KEYWORD_ONLY, default and ast.unparse(default)))
    if args.kwarg:
        out.append((args.kwarg.arg, inspect.Parameter.VAR_KEYWORD, None))
    return out


def _default_value(source: str):
    return eval(source, {"torch": torch, "init": init})  # the defaults the sources use: literals, torch.*, init.*


def _check_signature(double, real: str, what: str) -> None:
    params = list(inspect.signature(double).parameters.values())
    if params and params[0].name == "self":
        params = params[1:]
    want = _parameters(real)
    assert [(p.name, p.kind) for p in params] == [(n, k) for n, k, _ in want], f"{what}: {inspect.signature(double)} != {real}"
    for p, (name, _, default) in zip(params, want):
        if default is None:
            assert p.default is inspect.Parameter.empty, f"{what}: {name} has a default the real one lacks"
        else:
            value = _default_value(default)
            assert p.default == value and type(p.default) is type(value), f"{what}: {name}={p.default!r}, real {default}"


@pytest.mark.parametrize("module, qualname, source, real_name, signature", REAL_SIGNATURES,
                         ids=[f"{m}.{q}" for m, q, *_ in REAL_SIGNATURES])
def test_every_double_has_the_real_signature(module, qualname, source, real_name, signature):
    _check_signature(_lookup(_doubles(), module, qualname), signature, f"{module}.{qualname}")
    if module in PLAIN_DOUBLES:
        spy = {nxd_api.TRAINER: nxd_api.spy_trainer({})}
        _check_signature(_lookup(spy, module, qualname), signature, f"spy {module}.{qualname}")
    tp1 = nxd_api.parallel_layers([])  # the tp = 1 modules of the wiring tests
    if module in tp1 and hasattr(tp1[module], qualname.split(".")[0]):
        _check_signature(_lookup(tp1, module, qualname), signature, f"tp=1 {module}.{qualname}")


def _source_signature(path: Path, qualname: str) -> str:
    node = ast.parse(path.read_text())
    for part in qualname.split("."):
        node = next(n for n in node.body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name == part)
    args = node.args
    text = []
    positional = args.posonlyargs + args.args
    defaults = [None] * (len(positional) - len(args.defaults)) + list(args.defaults)
    for i, (arg, default) in enumerate(zip(positional, defaults)):
        if i == 0 and "." in qualname and arg.arg in ("self", "cls"):
            continue
        text.append(arg.arg if default is None else f"{arg.arg}={ast.unparse(default)}")
    if args.vararg:
        text.append("*" + args.vararg.arg)
    elif args.kwonlyargs:
        text.append("*")
    for arg, default in zip(args.kwonlyargs, args.kw_defaults):
        text.append(arg.arg if default is None else f"{arg.arg}={ast.unparse(default)}")
    if args.kwarg:
        text.append("**" + args.kwarg.arg)
    return "(" + ", ".join(text) + ")"


@pytest.mark.skipif(not os.environ.get("BMOJO_REAL_SOURCES"), reason="set BMOJO_REAL_SOURCES=nxd=DIR,xla=DIR")
def test_the_recorded_signatures_are_the_sources():
    roots = dict(item.split("=", 1) for item in os.environ["BMOJO_REAL_SOURCES"].split(","))
    for module, qualname, source, real_name, signature in REAL_SIGNATURES:
        repo, path = source.split(":", 1)
        assert _source_signature(Path(roots[repo]) / path, real_name) == signature, f"{module}.{qualname}"


def test_a_keyword_the_real_library_does_not_take_fails():
    modules = _doubles()
    with pytest.raises(TypeError):
        modules["torch_xla.core.xla_model"].mark_step(block=True)
    with pytest.raises(TypeError):
        modules["neuronx_distributed.parallel_layers.layers"].ColumnParallelLinear(4, 4, sequence_dim=1)
    loader = modules["torch_xla.distributed.parallel_loader"].MpDeviceLoader([], torch.device("cpu"), prefetch=2)
    with pytest.raises(TypeError, match=r"^ParallelLoader\.__init__\(\) got an unexpected keyword argument "
                                        r"'prefetch'$"):
        iter(loader)  # torch-xla hands the keywords to ParallelLoader only here (parallel_loader.py 272-284)
    with pytest.raises(TypeError):
        trainer = modules["neuronx_distributed.trainer"]  # NxD hands unknown keywords to the optimizer class
        trainer.initialize_parallel_optimizer(trainer.neuronx_distributed_config(), torch.optim.AdamW,
                                              torch.nn.Linear(2, 2).parameters(), foo=1)


# ---------------------------------------------------------------------------------------- behaviour


def test_deprecated_xla_model_functions_warn_and_record_bmojo_callers():
    """torch-xla 2.9 wraps ``xm.mark_step`` / ``xm.xla_device`` in ``@deprecated("Use torch_xla.sync instead")``
    / ``("Use torch_xla.device instead")`` (torch_xla/core/xla_model.py); the Neuron 2.9 guide calls them
    end-of-support warnings. Calls from tests are not recorded, only bmojo_neuron's."""
    env = Env(XlaLog())
    modules = xla_modules(env)
    xm, torch_xla = modules["torch_xla.core.xla_model"], modules["torch_xla"]
    with pytest.warns(DeprecationWarning, match="^Use torch_xla.sync instead$") as caught:
        xm.mark_step()
    assert caught[0].filename == __file__  # attributed to the caller, as typing_extensions.deprecated does
    with pytest.warns(DeprecationWarning, match="^Use torch_xla.device instead$"):
        assert xm.xla_device() == torch_xla.device()
    assert env.log.deprecated == [] and len(env.log.syncs) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch_xla.sync()  # the replacements do not warn
    assert len(env.log.syncs) == 2


def test_functions_torch_xla_removed_are_absent():
    """``xm.xrt_world_size`` / ``xm.get_ordinal`` are gone since torch-xla 2.7 (AttributeError; the Neuron
    2.9 guide's known issues): ``torch_xla.runtime.world_size`` / ``global_ordinal`` replace them."""
    modules = _doubles()
    xm, runtime = modules["torch_xla.core.xla_model"], modules["torch_xla.runtime"]
    for name in ("xrt_world_size", "get_ordinal"):
        with pytest.raises(AttributeError):
            getattr(xm, name)
    assert (runtime.world_size(), runtime.global_ordinal()) == (1, 0)


def test_rendezvous_takes_bytes_and_all_replicas_only():
    """torch-xla 2.9's ``xla_rendezvous``: a non-bytes payload is a TypeError, a replica list that is not the
    whole world a ValueError; it syncs first and returns every rank's payload."""
    env = Env(XlaLog())
    xm = xla_modules(env)["torch_xla.core.xla_model"]
    with pytest.raises(TypeError, match="`payload` must be bytes, not <class 'str'>"):
        xm.rendezvous("tag", "text")
    with pytest.raises(ValueError, match="Only global rendezvous is supported"):
        xm.rendezvous("tag", b"", [0, 1])
    assert env.log.syncs == [] and env.log.rendezvous == []
    assert xm.rendezvous("tag", b"x", [0]) == [b"x"]
    assert env.log.rendezvous == ["tag"]


def test_rendezvous_syncs_twice_and_once_more_for_a_payload():
    """``xla_rendezvous`` (xla_model.py 1306-1358) syncs, all-gathers the payload sizes in a graph of its own and
    syncs again; a non-empty payload takes one more all-gather and sync. Each sync runs the step closures."""
    env = Env(XlaLog())
    xm = xla_modules(env)["torch_xla.core.xla_model"]
    ran: list[int] = []
    xm.add_step_closure(lambda: ran.append(len(env.log.syncs)))
    assert xm.rendezvous("tag") == [b""]
    assert len(env.log.syncs) == 2 and ran == [1]  # the closure ran after the first sync, before the gather
    assert [e[0] for e in env.log.graphs[1][1:]] == ["all_gather"]
    assert xm.rendezvous("tag", b"abc") == [b"abc"]
    assert len(env.log.syncs) == 5
    assert [g[1:] for g in env.log.graphs[3:5]] == [[("all_gather", "None", "0", "(1,)", "torch.int32")],
                                                    [("all_gather", "None", "0", "(3,)", "torch.uint8")]]


def test_pipeline_mark_step_runs_the_step_closures():
    """NxD's pipeline cuts its graphs with ``xm.mark_step()`` (pipeline/model.py 1934-1936), which is
    ``torch_xla.sync()`` and runs the queued step closures (torch_xla.py 78-96, xla_model.py 1011-1028): a
    closure queued before ``run_train`` runs at its first cut, while the step's graph stays pending."""
    from types import SimpleNamespace

    modules, env = _doubles_and_env()
    xm, pipeline = modules["torch_xla.core.xla_model"], modules["neuronx_distributed.pipeline"]
    ran: list[int] = []
    xm.add_step_closure(ran.append, (7,))
    xm.add_step_closure(ran.append, (8,))
    env.log.step_work = True
    pipeline.NxDPPModel._mark_step(SimpleNamespace(log=env.log))
    assert ran == [7, 8] and env.log.closures_run == 2 and env.log.closures == []
    assert env.log.step_work  # a pipeline cut leaves the step pending for the caller's own sync
    assert [s["source"] for s in env.log.syncs] == ["pipeline"]


def test_xla_seed_steps_at_every_sync_and_random_op():
    """torch's lazy-tensor generator, which torch-xla 2.9 uses (torch/csrc/lazy/core/lazy_graph_executor.cpp
    ``DeviceContextArena::SetRngSeed`` / ``MarkStep`` / ``GetRngSeed``; torch-xla's xla_graph_executor.cpp 147-181
    and 439-446): a sync steps the base seed (x 7012063 + 1012031), a traced random op the running seed
    (x 214013 + 2531011), both mod 2**64; ``get_rng_state`` is the running seed, 101 before any is set."""
    modules, env = _doubles_and_env()
    xla, xm = modules["torch_xla"], modules["torch_xla.core.xla_model"]
    assert xm.get_rng_state() == 101
    xm.set_rng_state(5)
    xla.sync()
    after_sync = (1012031 + 7012063 * 5) % 2**64
    assert xm.get_rng_state() == after_sync
    nxd_model = modules["neuronx_distributed.trainer.model"].NxDModel
    model = nxd_model(torch.nn.Dropout(0.5), {"pipeline_parallel_size": 1})
    model(torch.ones(4))  # a training forward with dropout: one random op on the device
    assert env.log.random_ops == ["bernoulli"]  # dropout's mask (one seed, whatever aten op draws it)
    assert xm.get_rng_state() == (2531011 + 214013 * after_sync) % 2**64
    xla.sync()  # the next base seed comes from the base seed, not the running one
    assert xm.get_rng_state() == (1012031 + 7012063 * after_sync) % 2**64
    xm.set_rng_state(2**64 - 1)
    xla.sync()
    assert xm.get_rng_state() == (1012031 + 7012063 * (2**64 - 1)) % 2**64


def test_set_rng_state_takes_an_unsigned_64_bit_seed():
    """torch-xla 2.9's ``xm.set_rng_state`` passes the seed to a pybind11 binding taking ``uint64_t``
    (torch_xla/csrc/init_python_bindings.cpp ``_xla_set_rng_seed``): a negative, too large or float seed is a
    TypeError there."""
    xm = _doubles()["torch_xla.core.xla_model"]
    for bad in (-1, 2**64, 1.5):
        with pytest.raises(TypeError, match="incompatible function arguments"):
            xm.set_rng_state(bad)
    for good in (0, 2**64 - 1):
        xm.set_rng_state(good)
        assert xm.get_rng_state() == good


def test_host_copies_inside_a_step_are_host_reads():
    """On XLA ``.cpu()`` and ``.numpy()`` of a device tensor run the pending graph and copy its value to the
    host, as ``.item()`` does: inside a step, each is a graph cut the step did not plan."""
    from bmojo_neuron.ops.nki_backend import _np_in  # bmojo_neuron code that copies a tensor to the host

    log = XlaLog()
    with neuron_sdk.host_reads_in_steps(log) as reads:
        _np_in(torch.ones(2))
        assert reads == []  # outside a step: allowed
        log.in_step = True
        _np_in(torch.ones(2))
    assert [r.split(" at ")[0] for r in reads] == ["Tensor.cpu", "Tensor.numpy"]
    assert all(r.split(" at ")[1].startswith("nki_backend.py:") for r in reads)


def test_all_reduce_with_one_replica_is_a_clone_without_scale():
    """torch-xla 2.9's ``all_reduce``: with a world of one it returns ``inputs.clone()`` (a list as it is) and
    never applies `scale`."""
    xm = _doubles()["torch_xla.core.xla_model"]
    x = torch.tensor([2.0, 4.0])
    out = xm.all_reduce(xm.REDUCE_SUM, x, scale=0.5)
    assert torch.equal(out, torch.tensor([2.0, 4.0])) and out is not x
    tensors = [torch.tensor([1.0])]
    assert xm.all_reduce(xm.REDUCE_SUM, tensors, scale=0.5) is tensors and tensors[0].item() == 1.0


def test_all_reduce_without_groups_sums_over_every_rank(monkeypatch):
    """torch-xla 2.9's ``all_reduce(..., groups=None)``: one group of all the replicas (rank 1 of a world of 3
    here; gloo's all-reduce stands in, each rank holding the same value)."""
    env = Env(XlaLog())
    xm = xla_modules(env)["torch_xla.core.xla_model"]
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 3)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 1)
    groups_asked: list[list[int]] = []
    monkeypatch.setattr(env, "group_of", lambda ranks: groups_asked.append(ranks) or "the group")
    monkeypatch.setattr(dist, "all_reduce", lambda tensor, group=None: tensor.mul_(3))
    assert torch.equal(xm.all_reduce(xm.REDUCE_SUM, torch.tensor([1.0, 2.0])), torch.tensor([3.0, 6.0]))
    assert groups_asked == [[0, 1, 2]]
    assert torch.equal(xm.all_reduce(xm.REDUCE_SUM, torch.tensor([1.0]), groups=[[0], [1, 2]]), torch.tensor([3.0]))
    assert groups_asked == [[0, 1, 2], [1, 2]]


def test_all_gather_concatenates_the_shards_of_the_group(monkeypatch):
    """torch-xla 2.9's ``all_gather`` (xla_model.py 456-561): one shard per replica of this rank's group (every
    replica without ``groups``); without ``pin_layout``, groups of one size only; rank 1 of a world of 4 here, gloo
    standing in."""
    env = Env(XlaLog())
    xm = xla_modules(env)["torch_xla.core.xla_model"]
    x = torch.tensor([[1.0, 2.0]])
    assert torch.equal(xm.all_gather(x, dim=0, groups=[[0], [1]], pin_layout=False), x)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 4)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 1)
    monkeypatch.setattr(env, "group_of", lambda ranks: tuple(ranks))

    def gather(parts, tensor, group=None):
        for i, part in enumerate(parts):
            part.copy_(tensor + 10 * group[i])
    monkeypatch.setattr(dist, "all_gather", gather)
    assert torch.equal(xm.all_gather(x, dim=1, groups=[[0, 1], [2, 3]], pin_layout=False),
                       torch.tensor([[1.0, 2.0, 11.0, 12.0]]))
    assert xm.all_gather(x, dim=0).shape == (4, 2)
    with pytest.raises(AssertionError, match="Replica groups must have the same number of replicas/shards"):
        xm.all_gather(x, groups=[[0], [1, 2, 3]], pin_layout=False)


def test_mp_device_loader_syncs_before_each_batch_and_once_more_at_the_end():
    """``PerDeviceLoader.next()`` (parallel_loader.py 39-56): ``torch_xla.sync()`` before each batch, and again
    before ``StopIteration`` when the host loader is done."""
    env = Env(XlaLog())
    loader = xla_modules(env)["torch_xla.distributed.parallel_loader"].MpDeviceLoader(
        [{"x": torch.zeros(2)}, {"x": torch.ones(2)}], torch.device("cpu"))
    assert len(loader) == len(iter(loader)) == 2  # the per-device iterator's: the host loader's, one device
    batches = list(loader)
    assert [b["x"].tolist() for b in batches] == [[0.0, 0.0], [1.0, 1.0]]
    # one sync per batch, then the third next(): one before asking for a batch, one on finding none
    assert [s["source"] for s in env.log.syncs] == ["loader"] * 4 and env.log.fetches == 2
    with pytest.raises(NotImplementedError):  # the double's limit, met when iterated, as torch-xla's checks are
        iter(xla_modules(env)["torch_xla.distributed.parallel_loader"].MpDeviceLoader([], "cpu",
                                                                                     batches_per_execution=2))


def test_local_ordinal_is_the_local_rank(monkeypatch):
    """torch-xla 2.9 keeps ``xm.get_local_ordinal`` (xla_model.py 86-94, undeprecated; its own
    test/pjrt/test_runtime.py calls it), although the Neuron 2.9 guide (introducing-pytorch-2-9.rst 138-141) says
    it was removed in 2.7. It is ``runtime.local_ordinal()`` (runtime.py 143-149): ``PJRT_LOCAL_PROCESS_RANK``
    x devices per process (1) + device index (0), that variable being LOCAL_RANK under torchrun
    (_internal/neuron.py 89). ``is_master_ordinal()`` asks the local ordinal, ``local=False`` the global one."""
    modules = _doubles()
    xm, xr = modules["torch_xla.core.xla_model"], modules["torch_xla.runtime"]
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    monkeypatch.delenv("PJRT_LOCAL_PROCESS_RANK", raising=False)
    assert xm.get_local_ordinal() == xr.local_ordinal() == 0 and xm.is_master_ordinal()
    monkeypatch.setenv("PJRT_LOCAL_PROCESS_RANK", "2")
    assert xm.get_local_ordinal() == 2
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "run")  # torchrun: LOCAL_RANK wins
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert xm.get_local_ordinal() == xr.local_ordinal() == 3
    assert not xm.is_master_ordinal() and xm.is_master_ordinal(local=False)  # global rank 0: no process group


def test_parallel_cross_entropy_shifts_its_input_in_place():
    """NxD subtracts each row's max from the logits it is given; loss and gradient are the cross-entropy's."""
    loss_fn = nxd_api.parallel_layers([])[nxd_api.LOSS_FUNCTIONS].parallel_cross_entropy
    torch.manual_seed(0)
    logits = torch.randn(5, 7, dtype=torch.float64)
    labels = torch.randint(0, 7, (5,))
    given = logits.clone().requires_grad_()
    passed = given * 1.0  # a non-leaf the loss may modify
    loss = loss_fn(passed, labels)
    torch.testing.assert_close(passed.detach(), (logits - logits.max(-1, keepdim=True).values))
    reference = logits.clone().requires_grad_()
    want = F.cross_entropy(reference, labels, reduction="none")
    torch.testing.assert_close(loss, want)
    loss.sum().backward()
    want.sum().backward()
    torch.testing.assert_close(given.grad, reference.grad)


def test_reentrant_checkpoint_refuses_what_torch_xla_refuses():
    checkpoint = _doubles()["torch_xla.utils.checkpoint"].checkpoint
    layer = torch.nn.Linear(3, 3)
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="Unexpected keyword"):
        checkpoint(layer, x, scale=2)
    with pytest.raises(ValueError, match="use_reentrant==False"):
        checkpoint(layer, x, use_reentrant=False)
    with warnings.catch_warnings():  # reentrant: without an input that requires grad, no parameter gets one
        warnings.simplefilter("ignore")
        out = checkpoint(layer, x)
    assert not out.requires_grad and layer.weight.grad is None
    checkpoint(layer, x.requires_grad_()).sum().backward()
    assert layer.weight.grad is not None


@pytest.fixture
def one_rank(tmp_path):
    """A one-process gloo group (NxD's parallel state needs a process group)."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _initialized() -> dict:
    """The doubles with NxD's parallel state initialised (tp = pp = dp = 1)."""
    modules = _doubles()
    modules[PARALLEL_STATE].initialize_model_parallel()
    return modules


def test_zero1_grad_hooks_move_gradients_into_fp32_main_grad(one_rank):
    """torch-xla's ZeRO-1 with use_grad_acc_hook (NxD: bf16 + ZeRO-1): param.grad is freed as backward
    produces it, the fp32 main_grad of the parameter's full shape accumulates, zero_grad zeroes it."""
    modules = _initialized()
    zero1 = modules["neuronx_distributed.optimizer"].NeuronZero1Optimizer
    layer = torch.nn.Linear(4, 3).to(torch.bfloat16)
    optimizer = zero1(on_device(layer.parameters()), torch.optim.AdamW, use_grad_acc_hook=True,
                      higher_cc_precision=True,
                      lr=0.1)
    x = torch.randn(2, 4, dtype=torch.bfloat16)
    layer(x).float().sum().backward()
    layer(x).float().sum().backward()
    assert layer.weight.grad is None and layer.weight.main_grad.dtype == torch.float32
    assert layer.weight.main_grad.shape == layer.weight.shape
    expected = 2 * torch.ones(3, 2) @ x.float()  # d sum(x W^T) / dW = 1^T x, twice
    torch.testing.assert_close(layer.weight.main_grad, expected, rtol=1e-2, atol=1e-2)
    before = layer.weight.detach().clone()
    optimizer.step()
    assert not torch.equal(layer.weight.detach(), before) and optimizer.grad_norm is not None
    optimizer.zero_grad(set_to_none=True)
    assert layer.weight.grad is None and torch.count_nonzero(layer.weight.main_grad) == 0


def test_gradient_clipping_sums_squares_in_the_first_parameters_dtype():
    """NxD's ``clip_grad_norm`` (parallel_layers/grads.py 41-256 at v2.28.0) adds each gradient's squared norm into a
    one-element tensor of the first parameter's dtype: for a bf16 model, 256 + 64 x 0.25 stays 256 in bf16 (its
    spacing there is 2), so the norm is 16, not sqrt(272) = 16.49; the gradients are scaled by 1 / 16."""
    trainer = _doubles()[nxd_api.TRAINER]
    big = torch.nn.Parameter(torch.zeros(256, dtype=torch.bfloat16))
    small = [torch.nn.Parameter(torch.zeros(1, dtype=torch.bfloat16)) for _ in range(64)]
    big.grad = torch.ones(256, dtype=torch.bfloat16)
    for p in small:
        p.grad = torch.full((1,), 0.5, dtype=torch.bfloat16)
    optimizer = trainer.initialize_parallel_optimizer(trainer.neuronx_distributed_config(), torch.optim.SGD,
                                                      [big, *small], lr=0.0)
    optimizer.step()
    norm = optimizer.grad_norm
    assert norm.shape == (1,) and norm.dtype == torch.bfloat16 and norm.item() == 16.0
    assert torch.all(big.grad == 1 / 16) and all(p.grad.item() == 0.5 / 16 for p in small)


def test_set_tensor_model_parallel_attributes_warns_without_num_partitions():
    utils = _doubles()["neuronx_distributed.parallel_layers.utils"]
    with pytest.warns(UserWarning, match="num_partitions"):
        utils.set_tensor_model_parallel_attributes(torch.nn.Parameter(torch.zeros(2)), True, 0, 1)
    p = torch.nn.Parameter(torch.zeros(2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        utils.set_tensor_model_parallel_attributes(p, True, 0, 1, num_partitions=2)
    assert (p.tensor_model_parallel, p.partition_dim, p.num_partitions) == (True, 0, 2)
    with pytest.raises(AssertionError):  # NxD: never twice
        utils.set_tensor_model_parallel_attributes(p, True, 0, 1, num_partitions=2)


def test_move_all_tensor_to_cpu_rebuilds_containers_as_torch_xla_does():
    """NxD's ``move_all_tensor_to_cpu`` rewrites its input with torch-xla's ``for_each_instance_rewrite``
    (torch_xla/utils/utils.py 165-211): tuples come back as lists, dict subclasses as dicts, and a tensor met twice
    becomes one host tensor."""
    from collections import OrderedDict

    utils = _doubles()["neuronx_distributed.parallel_layers.utils"]
    t = torch.ones(2)
    out = utils.move_all_tensor_to_cpu({"pair": (t, t), "state": OrderedDict(w=t), "n": 3})
    assert type(out["pair"]) is list and type(out["state"]) is dict and out["n"] == 3
    assert out["pair"][0] is out["pair"][1] is out["state"]["w"] and out["pair"][0] is not t
    assert torch.equal(out["pair"][0], t)


def test_move_all_tensor_to_cpu_hands_host_tensors_back_as_aliases(monkeypatch):
    """torch-xla's rewrite selects only XLA tensors (NxD utils.py 231-241) and shallow-copies every other object
    with a ``__dict__`` (torch_xla/utils/utils.py 198-204): a host tensor, such as AdamW's ``step``, comes back as
    a new tensor over the same storage, so it follows the optimizer's later steps. Without an XLA tensor in the
    input nothing is synced (nor when nothing is pending); an extraction run zeroes the device values only."""
    from doubles.xla_host import LoadedOnHost, mark_steps_on_host

    env = Env(XlaLog())
    utils = nxd_modules(env)["neuronx_distributed.parallel_layers.utils"]
    state = {"step": torch.tensor(1.0), "exp_avg": torch.ones(2)}  # AdamW's, after one step
    mark_steps_on_host(SimpleNamespace(state={"param": state}, param_groups=[{"params": ["param"]}]))
    env.log.trace("all_gather", "[[0]]", 0, "(2,)", torch.float32)  # pending work the copy runs
    out = utils.move_all_tensor_to_cpu({"step": state["step"], "exp_avg": state["exp_avg"]})
    assert out["step"] is not state["step"] and out["step"].data_ptr() == state["step"].data_ptr()
    assert out["exp_avg"].data_ptr() != state["exp_avg"].data_ptr() and len(env.log.graphs) == 1
    state["step"] += 1  # AdamW's next step (``step_t += 1``)
    state["exp_avg"].mul_(0.9)
    assert out["step"].item() == 2.0 and torch.equal(out["exp_avg"], torch.ones(2))  # the live counter
    loaded = torch.arange(3.0).as_subclass(LoadedOnHost)
    alone = utils.move_all_tensor_to_cpu([loaded])[0]
    assert type(alone) is torch.Tensor and alone.data_ptr() == loaded.data_ptr() and len(env.log.graphs) == 1
    monkeypatch.setenv("NEURON_EXTRACT_GRAPHS_ONLY", "1")
    read = utils.move_all_tensor_to_cpu([loaded, state["exp_avg"]])
    assert torch.equal(read[0], torch.arange(3.0)) and not read[1].any() and len(env.log.graphs) == 1


def test_extraction_run_hands_back_zeros_and_records_the_read(monkeypatch):
    """neuron_parallel_compile's trial run executes empty stubs with zero outputs: every device value read
    there is invalid (torch-neuronx's NEURON_EXTRACT_GRAPHS_ONLY)."""
    env = Env(XlaLog())
    utils = nxd_modules(env)["neuronx_distributed.parallel_layers.utils"]
    value = {"loss": torch.tensor([2.5, 1.0])}
    assert torch.equal(utils.move_all_tensor_to_cpu(value)["loss"], value["loss"]) and not env.log.extraction_reads
    monkeypatch.setenv("NEURON_EXTRACT_GRAPHS_ONLY", "1")
    assert torch.equal(utils.move_all_tensor_to_cpu(value)["loss"], torch.zeros(2))
    assert len(env.log.extraction_reads) == 1


def _one_rank_program(rank: int, read_on_main: bool) -> list:
    """Two steps of a toy loop on rank `rank`'s own doubles; rank 0 may read the loss inside the step."""
    env = Env(XlaLog())
    env.log.env = env
    modules = {**xla_modules(env), **nxd_modules(env)}
    xm, utils = modules["torch_xla.core.xla_model"], modules["neuronx_distributed.parallel_layers.utils"]
    model = torch.nn.Linear(4, 1)
    for step in range(2):
        env.log.trace("forward", "train", (2, 4))
        loss = model(torch.ones(2, 4)).sum()
        loss = xm.all_reduce(xm.REDUCE_SUM, loss, groups=[[0], [1]])  # every rank passes all the groups
        if read_on_main and rank == 0:  # a host-side decision only rank 0 makes
            utils.move_all_tensor_to_cpu(loss)
        modules["torch_xla"].sync()
    return env.log.graphs


def test_ranks_whose_host_decisions_differ_build_different_graphs():
    same = {rank: _one_rank_program(rank, read_on_main=False) for rank in (0, 1)}
    assert mpmd.mismatches(same) == []
    differ = {rank: _one_rank_program(rank, read_on_main=True) for rank in (0, 1)}
    found = mpmd.mismatches(differ)
    assert found and "rank 1 cut 2 graphs, rank 0 4" in found[0]
    # ranks of different pipeline stages may trace different work and cut different graphs, but the collectives
    # that span the stages must meet
    stages = {0: [[("code",), ("all_reduce", "[[0, 1]]", "()", "torch.float32"), ("stage_forward", "0")]],
              1: [[("code",), ("all_reduce", "[[0, 1]]", "()", "torch.float32"), ("stage_forward", "1")],
                  [("to_cpu",)]]}
    assert mpmd.mismatches(stages, {0: 0, 1: 1}) == []
    assert mpmd.mismatches(stages, {0: 0, 1: 0})
    stages[1][0][1] = ("all_reduce", "[[0, 1]]", "(2,)", "torch.float32")
    assert mpmd.mismatches(stages, {0: 0, 1: 1})


# ---------------------------------------------------------------------------------------- NxD's refusals


def _doubles_and_env() -> tuple[dict, Env]:
    env = Env(XlaLog())
    env.log.env = env
    return {**xla_modules(env), **nxd_modules(env)}, env


def test_initialize_model_parallel_checks_as_nxd(one_rank, monkeypatch):
    """NxD clips each degree to the world size, then needs the world divisible by their product."""
    state = _doubles()[PARALLEL_STATE]
    state.initialize_model_parallel(tensor_model_parallel_size=2)  # clipped to the one rank
    assert state.get_tensor_model_parallel_size() == 1
    state.destroy_model_parallel()
    monkeypatch.setattr(dist, "get_world_size", lambda *args, **kwargs: 3)
    with pytest.raises(RuntimeError, match=r"invalid implied data parallel degree: `world_size` \(3\) is not "
                                           r"divisible by tensor_model_parallel_size \(1\) x "
                                           r"pipeline_model_parallel_size \(2\)"):
        state.initialize_model_parallel(pipeline_model_parallel_size=2)
    assert not state.model_parallel_is_initialized()


def test_initialize_model_parallel_needs_a_process_group():
    with pytest.raises(AssertionError):
        _doubles()[PARALLEL_STATE].initialize_model_parallel()


def test_parallel_state_getters_need_initialize(one_rank):
    state = _doubles()[PARALLEL_STATE]
    for getter in ("get_tensor_model_parallel_size", "get_data_parallel_size", "get_pipeline_model_parallel_rank",
                   "get_data_parallel_replica_groups"):
        with pytest.raises(AssertionError, match="group is not initialized"):
            getattr(state, getter)()
    state.initialize_model_parallel()
    assert (state.get_tensor_model_parallel_size(), state.get_data_parallel_size(),
            state.get_pipeline_model_parallel_rank(), state.get_data_parallel_replica_groups()) == (1, 1, 0, [[0]])
    state.destroy_model_parallel()
    with pytest.raises(AssertionError, match="intra_layer_model parallel group is not initialized"):
        state.get_tensor_model_parallel_size()


def test_tensor_parallel_replica_groups_list_every_rank(one_rank, monkeypatch):
    """NxD's ``get_tensor_model_parallel_replica_groups`` (parallel_state.py 847-850) gives every tensor-parallel
    group of the world, not only the caller's: at tp = 1, one group per rank (ZeRO-1's ``grad_norm_groups``)."""
    modules, env = _doubles_and_env()
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(env, "group_of", lambda ranks: None)
    state = modules[PARALLEL_STATE]
    state.initialize_model_parallel(pipeline_model_parallel_size=2)
    assert state.get_tensor_model_parallel_replica_groups() == [[0], [1]]

def test_nxd_groups_are_our_layouts_and_nxd_refuses_what_we_refuse(one_rank, monkeypatch):
    """The double builds NxD v2.28.0's replica groups (parallel_state.py 594-636: the ``[pp, dp, cp, tp]`` grid and
    trn1's strided tp = 4), which are the groups our ``ParallelLayout`` / ``trainium_groups`` give; a tp = 4 layout
    NxD cannot reshape fails in both, one it can (a node of 6 or 12 ranks too: n = LOCAL_WORLD_SIZE // 4) passes
    both, and a double initialised for the training loop hands out those groups."""
    from bmojo_neuron.parallel.layout import ParallelLayout, check_trainium_layout, trainium_groups

    state = _doubles()[PARALLEL_STATE]
    world_size = {"n": 1}
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: world_size["n"])
    for world, tp, pp, local in [(32, 8, 4, 32), (64, 4, 1, 32), (64, 4, 2, 32), (128, 4, 4, 32), (16, 2, 2, 16),
                                 (8, 1, 8, 8), (8, 4, 1, 8), (12, 4, 1, 6), (48, 4, 2, 12)]:  # 6, 12: not x4 per node
        world_size["n"] = world
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local))
        mesh = state.initialize_model_parallel(tp, pp, mesh_only=True)
        ours = trainium_groups(world, tp, pp, local)
        assert (mesh.tp_groups, mesh.pp_groups, mesh.dp_groups) == (ours["tp"], ours["pp"], ours["dp"]), (world, tp, pp)
        check_trainium_layout(world, tp, pp, local)  # NxD builds it: so do we
        if tp != 4:
            layout = ParallelLayout.from_world(world, tp, pp)
            assert (layout.tp_groups(), layout.pp_groups(), layout.dp_groups()) == (ours["tp"], ours["pp"], ours["dp"])
    assert not state.model_parallel_is_initialized()  # mesh_only builds nothing
    for world, pp, local, error, why in [(32, 2, 32, RuntimeError, "multiple of 8"),
                                         (60, 1, 10, RuntimeError, "multiple of 2"),
                                         (8, 1, 2, ZeroDivisionError, "at least 4")]:
        world_size["n"] = world
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local))
        with pytest.raises(error):
            state.initialize_model_parallel(4, pp)
        with pytest.raises(ValueError, match=why):
            check_trainium_layout(world, 4, pp, local)
    world_size["n"] = 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    modules, env = _doubles_and_env()
    monkeypatch.setattr(env, "group_of", lambda ranks: None)
    state = modules[PARALLEL_STATE]
    state.initialize_model_parallel(pipeline_model_parallel_size=2)
    assert (state.get_tensor_model_parallel_replica_groups(), state.get_pipeline_model_parallel_replica_groups(),
            state.get_data_parallel_replica_groups()) == ([[0], [1]], [[0, 1]], [[0], [1]])


def test_model_moves_to_the_device_in_waves_of_local_ordinals(one_rank, monkeypatch):
    """NxD's ``get_model_sequential`` (utils/model_utils.py 335-356) counts its waves over the node's processes
    (torch-xla's ``local_process_count()``: ``LOCAL_WORLD_SIZE`` under torchrun) and places a rank by its local
    ordinal (``LOCAL_RANK``), so on the second node of a run rank 45 (local rank 13) moves in the second wave."""
    modules, env = _doubles_and_env()
    monkeypatch.setenv("PJRT_DEVICE", "NEURON")  # NxD's Neuron branch (``is_pjrt_device``)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "run")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "32")
    monkeypatch.setenv("LOCAL_RANK", "13")
    monkeypatch.setattr(env, "rank", lambda: 45)
    trainer = modules["neuronx_distributed.trainer"]
    config = trainer.neuronx_distributed_config()
    trainer.initialize_parallel_model(config, lambda: torch.nn.Linear(2, 2))
    assert env.log.rendezvous == [f"get_model_sequential{w}" for w in range(3)]  # ceil(32 / 11)
    assert env.log.calls["moved_in_wave"] == 1


def test_zero1_needs_the_parallel_state(one_rank):
    modules = _doubles()
    zero1 = modules["neuronx_distributed.optimizer"].NeuronZero1Optimizer
    with pytest.raises(RuntimeError, match="initialize_model_parallel need to be called before creating "
                                           "NeuronZero1Optimizer"):
        zero1(torch.nn.Linear(2, 2).parameters(), torch.optim.AdamW, lr=0.1)
    modules[PARALLEL_STATE].initialize_model_parallel()
    assert zero1(on_device(torch.nn.Linear(2, 2).parameters()), torch.optim.AdamW, lr=0.1).optimizer_dtype == \
        torch.float32


def test_zero1_shards_dim_0_as_torch_xla(one_rank):
    """torch-xla's ZeRO-1 (zero_redundancy_optimizer.py 121-134, 183-197) finds this rank in its sharding groups
    (a ValueError when no group holds it) and shards each parameter's dim 0: a 0-dim parameter has none, an
    IndexError when the optimizer is built."""
    zero1 = _initialized()["neuronx_distributed.optimizer"].NeuronZero1Optimizer
    (scalar,) = on_device([torch.nn.Parameter(torch.tensor(1.0))])
    with pytest.raises(IndexError, match="dimension"):
        zero1([scalar], torch.optim.AdamW, lr=0.1)
    with pytest.raises(ValueError, match=r"Current rank 0 is missing from the sharding_groups \[\[1\]\]"):
        zero1(on_device([torch.nn.Parameter(torch.ones(3))]), torch.optim.AdamW, sharding_groups=[[1]], lr=0.1)
    (weight,) = on_device([torch.nn.Parameter(torch.arange(6.0).view(3, 2))])
    optimizer = zero1([weight], torch.optim.AdamW, sharding_groups=[[0]], lr=0.1)
    (shard,) = optimizer.base_optimizer.param_groups[0]["params"]
    assert (optimizer.local_world_size, optimizer.local_rank) == (1, 0)
    assert torch.equal(shard, weight.detach()) and shard.data_ptr() != weight.data_ptr()


@pytest.mark.parametrize("environ, master, caps, dtype", [
    ({}, True, (130, 130), torch.float32),
    ({"XLA_DOWNCAST_BF16": "0"}, True, (65, 65), torch.float32),
    ({"XLA_DOWNCAST_BF16": "0"}, False, (130, 130), torch.float32),
    ({"XLA_DOWNCAST_BF16": "1"}, True, (130, 130), torch.float64),
    ({"XLA_DOWNCAST_BF16": "1"}, False, (130, 130), torch.float32),
    ({"XLA_DOWNCAST_BF16": "0", "ALL_GATHER_REDUCE_SCATTER_BUCKET_CAP_MB": "40"}, True, (40, 40), torch.float32),
])
def test_zero1_set_up_reads_nxd_environment_switches(one_rank, monkeypatch, environ, master, caps, dtype):
    """NxD's ``initialize_optimizer_from_class`` (trainer/trainer.py 258-283 at v2.28.0): bucket caps 130 MB,
    65 with ``XLA_DOWNCAST_BF16=0`` and master weights, ``ALL_GATHER_REDUCE_SCATTER_BUCKET_CAP_MB`` over both
    (all-gather: cap // dp); ``XLA_DOWNCAST_BF16=1`` with master weights makes the optimizer float64."""
    for key in ("XLA_DOWNCAST_BF16", "ALL_GATHER_REDUCE_SCATTER_BUCKET_CAP_MB"):
        monkeypatch.delenv(key, raising=False)
    for key, value in environ.items():
        monkeypatch.setenv(key, value)
    trainer = _doubles()[nxd_api.TRAINER]
    config = trainer.neuronx_distributed_config(
        optimizer_config={"zero_one_enabled": True},
        mixed_precision_config={"use_master_weights": master, "use_fp32_grad_acc": False})
    layer = torch.nn.Linear(2, 2)
    zero1 = trainer.initialize_parallel_optimizer(config, torch.optim.AdamW, on_device(layer.parameters()),
                                                  lr=0.1).optimizer
    assert (zero1.bucket_cap_mb_all_gather, zero1.bucket_cap_mb_reduce_scatter) == caps
    assert zero1.optimizer_dtype == dtype
    assert {p.dtype for g in zero1.base_optimizer.param_groups for p in g["params"]} == {dtype}


def test_nxd_optimizer_speaks_for_the_wrapped_optimizer_and_sums_sequence_parallel_gradients(one_rank, monkeypatch):
    """NxD's ``NxDOptimizer`` (trainer/optimizer.py at v2.28.0): ``state``, ``param_groups`` and ``defaults`` are
    read and set through (30-52), ``add_param_group`` and ``__getstate__`` are the wrapped optimizer's (54-72), and
    ``step`` sums the sequence-parallel gradients through ``grads.allreduce_sequence_parallel_gradients`` when the
    config says ``sequence_parallel`` (126-128), before the step."""
    modules = _doubles()
    trainer, grads = modules[nxd_api.TRAINER], modules[nxd_api.GRADS]
    layer = torch.nn.Linear(2, 2)
    config = trainer.neuronx_distributed_config(sequence_parallel=True)
    optimizer = trainer.initialize_parallel_optimizer(config, torch.optim.SGD, layer.parameters(), lr=0.1)
    inner = optimizer.optimizer
    groups, state, defaults = [dict(inner.param_groups[0])], {}, dict(inner.defaults)
    optimizer.param_groups, optimizer.state, optimizer.defaults = groups, state, defaults
    assert (inner.param_groups, inner.state, inner.defaults) == (groups, state, defaults)
    assert inner.param_groups is groups and inner.state is state
    extra = torch.nn.Parameter(torch.ones(1))
    optimizer.add_param_group({"params": [extra]})
    assert inner.param_groups[-1]["params"] == [extra] and len(optimizer.params) == 2  # NxD's list stays as built
    assert optimizer.__getstate__()["param_groups"] is inner.param_groups
    assert repr(optimizer).startswith("NxDOptimizer(SGD (")
    seen = []
    monkeypatch.setattr(grads, "allreduce_sequence_parallel_gradients",
                        lambda opt: seen.append([p.grad.clone() for p in layer.parameters()]))
    layer(torch.ones(2)).sum().backward()
    before = [p.detach().clone() for p in layer.parameters()]
    optimizer.step()
    assert len(seen) == 1 and torch.equal(seen[0][0], torch.ones(2, 2))  # before the clipping (norm 6 ** 0.5)
    assert all(not torch.equal(b, p) for b, p in zip(before, layer.parameters()))  # then the step ran


def test_bucket_caps_must_be_integers(one_rank, monkeypatch):
    """NxD reads ``ALL_GATHER_REDUCE_SCATTER_BUCKET_CAP_MB`` when it builds ZeRO-1 (trainer/trainer.py 274-276) and,
    without ZeRO-1, ``ALLREDUCE_BUCKET_CAP_MB`` at every optimizer step (parallel_layers/grads.py 264), both
    through ``int()``."""
    trainer = _doubles()[nxd_api.TRAINER]
    monkeypatch.setenv("ALL_GATHER_REDUCE_SCATTER_BUCKET_CAP_MB", "40MB")
    config = trainer.neuronx_distributed_config(optimizer_config={"zero_one_enabled": True})
    with pytest.raises(ValueError, match="invalid literal for int"):
        trainer.initialize_parallel_optimizer(config, torch.optim.AdamW, torch.nn.Linear(2, 2).parameters(), lr=0.1)
    monkeypatch.setenv("ALLREDUCE_BUCKET_CAP_MB", "512MB")
    layer = torch.nn.Linear(2, 2)
    optimizer = trainer.initialize_parallel_optimizer(trainer.neuronx_distributed_config(), torch.optim.AdamW,
                                                      layer.parameters(), lr=0.1)
    layer(torch.ones(1, 2)).sum().backward()
    with pytest.raises(ValueError, match="invalid literal for int"):
        optimizer.step()


@pytest.mark.parametrize("key", ["optimizer_config", "mixed_precision_config", "model_init_config"])
def test_config_sections_must_be_dicts(key):
    for trainer in (_doubles()[nxd_api.TRAINER], nxd_api.spy_trainer({})):
        with pytest.raises(AssertionError, match=f"{key} must be a dict"):
            trainer.neuronx_distributed_config(**{key: [("zero_one_enabled", False)]})
        assert isinstance(trainer.neuronx_distributed_config(**{key: {}})[key], dict)


def test_sequence_parallel_gradients_include_zero1_main_grad():
    """NxD all-reduces a marked parameter's gradient, or its main_grad when ZeRO-1's hooks took the gradient."""
    from doubles import nxd_layers

    reduced = []

    class Recording(nxd_layers.SingleRank):
        def all_reduce(self, x, op="sum"):
            reduced.append(x)
            return x

    grads = nxd_layers.make(Recording(), [], fake_module)["neuronx_distributed.parallel_layers.grads"]
    with_grad, with_main, unmarked = (torch.nn.Parameter(torch.zeros(2)) for _ in range(3))
    with_grad.grad, with_main.main_grad, unmarked.grad = torch.ones(2), torch.full((2,), 2.0), torch.ones(2)
    with_grad.sequence_parallel_enabled = with_main.sequence_parallel_enabled = True
    grads.allreduce_sequence_parallel_gradients(torch.optim.SGD([with_grad, with_main, unmarked], lr=0.1))
    assert [t is want for t, want in zip(reduced, (with_grad.grad, with_main.main_grad))] == [True, True]
    assert len(reduced) == 2


def test_column_parallel_gather_output_with_sequence_parallel_fails_in_forward():
    """NxD builds the layer and asserts in its forward (layers.py ``_cpl_maybe_gather_output``)."""
    layers = nxd_api.parallel_layers([])[nxd_api.LAYERS]
    layer = layers.ColumnParallelLinear(4, 4, gather_output=True, sequence_parallel_enabled=True)
    with pytest.raises(AssertionError):
        layer(torch.randn(2, 3, 4))
    out = layers.ColumnParallelLinear(4, 4, gather_output=False, sequence_parallel_enabled=True,
                                      sequence_dimension=1)(torch.randn(2, 3, 4))
    assert out.shape == (2, 3, 4)


def test_sequence_parallel_layers_warn_as_nxd():
    """NxD's constructors warn when sequence parallelism runs over one rank (``ColumnParallelLinear`` only,
    layers.py 641-643) and when it has no sequence dimension (then 0; 645-649 and 894-898)."""
    layers = nxd_api.parallel_layers([])[nxd_api.LAYERS]  # one tensor-parallel rank
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layers.ColumnParallelLinear(4, 4, gather_output=False, sequence_parallel_enabled=True, sequence_dimension=1)
        row = layers.RowParallelLinear(4, 4, input_is_parallel=True, sequence_parallel_enabled=True)
        layers.ColumnParallelLinear(4, 4, gather_output=False)
    assert [str(w.message) for w in caught] == [
        "`sequence_parallel_enabled` is set to `True`, but got world_size of 1",
        "`sequence_parallel_enabled` is set to `True`, but got `sequence_dimension` as `None`. Defaulting "
        "`sequence_dimension` to 0."]
    assert row.sequence_dimension == 0


class _Layer(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(3, 3)

    def forward(self, x):
        return self.linear(x)


class _Stack(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList([_Layer(), _Layer()])

    def forward(self, x, y):
        return ((self.layers[1](self.layers[0](x)) - y) ** 2).mean()


def _pipeline(env: Env, modules: dict, cuts: list[str], pp: int = 2):
    env.grid.update(tp=1, pp=pp, dp=1)
    return modules["neuronx_distributed.pipeline"].NxDPPModel(
        _Stack(), transformer_layer_cls=_Layer, pipeline_cuts=cuts, input_names=["x", "y"],
        output_loss_value_spec=True, return_loss_on_cpu=False)


def test_pipeline_model_needs_the_parallel_state():
    modules = _doubles()
    with pytest.raises(RuntimeError, match="Model parallelism needs to be initialzed before applying NxDPPModel"):
        modules["neuronx_distributed.pipeline"].NxDPPModel(_Stack(), transformer_layer_cls=_Layer,
                                                           pipeline_cuts=["layers.0"], input_names=["x", "y"])


def test_pipeline_cuts_are_marked_once_and_make_pp_stages(one_rank):
    modules, env = _doubles_and_env()
    with pytest.raises(AssertionError, match="each cutpoint can be only marked once, but layers.0 is marked twice"):
        _pipeline(env, modules, ["layers.0", "layers.0"], pp=3)
    with pytest.raises(ValueError, match="User cut stages 2 mismatch the initialized pipeline parallel size 3"):
        _pipeline(env, modules, ["layers.0"], pp=3)
    assert len(_pipeline(env, modules, ["layers.0"]).partitions) == 2


def test_pipeline_inputs_share_their_batch_dimension(one_rank):
    modules, env = _doubles_and_env()
    model = _pipeline(env, modules, ["layers.0"])
    with pytest.raises(AssertionError, match="batch dimension does not match, 2 and 4"):
        model.run_train(x=torch.randn(2, 3), y=torch.randn(4, 3))


def test_pipeline_model_wrapper_hands_buffer_arguments_to_the_stage(one_rank):
    """NxD's ``NxDModel.named_buffers(*args, **kwargs)`` passes its arguments to ``NxDPPModel.local_named_buffers
    (prefix, recurse)`` (trainer/model.py, pipeline/model.py at v2.28.0): the stage's own buffers only with
    ``recurse=False``, named as in the original module."""
    modules, env = _doubles_and_env()
    env.grid.update(tp=1, pp=2, dp=1)
    stack = _Stack()
    stack.layers[0].register_buffer("scale", torch.ones(3))
    pipeline = modules["neuronx_distributed.pipeline"].NxDPPModel(
        stack, transformer_layer_cls=_Layer, pipeline_cuts=["layers.0"], input_names=["x", "y"],
        output_loss_value_spec=True, return_loss_on_cpu=False)
    model = modules["neuronx_distributed.trainer.model"].NxDModel(pipeline, {"pipeline_parallel_size": 2})
    assert [name for name, _ in model.named_buffers()] == ["layers.0.scale"]
    assert list(model.named_buffers(recurse=False)) == []
    assert [name for name, _ in model.named_modules(prefix="stage")][0] == "stage"


def test_pipeline_local_state_dict_takes_a_keyword_prefix(one_rank):
    """NxD's ``local_state_dict`` (pipeline/model.py 1893-1926) reads ``prefix`` from the keywords, takes it off
    each stage name and puts it before the original name; a prefix given by position stays on the stage names,
    which then are not found (ValueError)."""
    modules, env = _doubles_and_env()
    pipeline = _pipeline(env, modules, ["layers.0"])
    weight = pipeline.original_torch_module.layers[0].linear.weight
    assert sorted(pipeline.local_state_dict()) == ["layers.0.linear.bias", "layers.0.linear.weight"]
    found = pipeline.local_state_dict(prefix="model.")
    assert sorted(found) == ["model.layers.0.linear.bias", "model.layers.0.linear.weight"]
    assert torch.equal(found["model.layers.0.linear.weight"], weight)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns about positional state_dict arguments
        with pytest.raises(ValueError, match=r"parameter model\.layers_0\.linear\.(weight|bias) in "
                                             r"local_state_dict does not exist in local module"):
            pipeline.local_state_dict(None, "model.")


def test_pipeline_model_forwards_unknown_attributes_to_the_wrapped_module(one_rank):
    """NxD's ``NxDPPModel.__getattr__`` (pipeline/model.py 385-390): what ``nn.Module`` does not find is looked
    up on the wrapped module, whose AttributeError names the wrapped class."""
    modules, env = _doubles_and_env()
    pipeline = _pipeline(env, modules, ["layers.0"])
    pipeline.original_torch_module.config = {"vocab_size": 7}
    assert pipeline.config == {"vocab_size": 7}
    assert pipeline.layers is pipeline.original_torch_module.layers
    assert [n for n, _ in pipeline.named_buffers()] == [] and list(pipeline.local_parameters())
    with pytest.raises(AttributeError, match="^'_Stack' object has no attribute 'vocab'$"):
        pipeline.vocab


def test_pipeline_shape_inference_runs_with_grad_enabled(one_rank):
    """NxD's first run_train / run_eval infers the stage shapes with one forward "with grads set to true"
    (pipeline/model.py 916-921), before ``_run_eval`` sets eval mode and ``no_grad`` (1021-1027): a stage built in
    train mode runs it in train mode; the micro-batches of run_eval then run in eval mode without grad.
    Stage 0 of 2 on one process here, its sends dropped."""
    modules, env = _doubles_and_env()
    pipeline = _pipeline(env, modules, ["layers.0"])
    pipeline._send = lambda *args: None
    seen = []
    pipeline.local_stage_modules[0].register_forward_hook(
        lambda module, *args: seen.append((pipeline.tracing, torch.is_grad_enabled(), module.training)))
    assert pipeline.run_eval(x=torch.randn(2, 3), y=torch.randn(2, 3)) is None  # not the last stage
    assert seen == [(True, True, True), (False, False, False)]

def test_torch_distributed_collectives_called_by_our_code_are_recorded(one_rank, monkeypatch):
    """On torch-xla's "xla" process group ``dist.barrier`` meets no one (xla_backend.py 230-231) and the other
    collectives want XLA tensors; the doubles' group is gloo, so a call from bmojo_neuron is recorded instead
    (the doubles' and the tests' own calls are not)."""
    from bmojo_neuron.parallel.collectives import _all_reduce

    log = neuron_sdk.install(monkeypatch)
    dist.barrier()
    assert log.dist_calls == []
    assert torch.equal(_all_reduce(torch.ones(2), None), torch.ones(2))
    assert [c.split(" at ")[0] for c in log.dist_calls] == ["dist.all_reduce"]
    assert log.dist_calls[0].split(" at ")[1].startswith("collectives.py:")


def test_nxd_parallel_layers_package_holds_only_nxd_names(monkeypatch):
    """NxD's ``parallel_layers/__init__.py`` (v2.28.0) imports four of the mapping functions into the package;
    ``scatter_to_sequence_parallel_region`` is only in ``parallel_layers.mappings``, so importing it from the
    package is an ImportError there and must be one here."""
    neuron_sdk.install(monkeypatch)
    with pytest.raises(ImportError):
        from neuronx_distributed.parallel_layers import scatter_to_sequence_parallel_region  # noqa: F401
    from neuronx_distributed.parallel_layers.mappings import scatter_to_sequence_parallel_region  # noqa: F401
    package = _doubles()["neuronx_distributed.parallel_layers"]
    assert {n for n in vars(package) if not n.startswith("_")} <= NXD_PARALLEL_LAYERS_NAMES


def _real_module_file(roots: dict[str, str], module: str) -> Path | None:
    repo = "xla" if module.startswith("torch_xla") else "nxd"
    base = Path(roots[repo]) / ("" if repo == "xla" else "src") / module.replace(".", "/")
    return next((f for f in (base.with_suffix(".py"), base / "__init__.py") if f.exists()), None)


def _real_module_has(roots: dict[str, str], module: str, name: str, depth: int = 0) -> bool:
    """Whether the real `module` defines `name`, imports it (``*`` imports followed), or has it as a submodule."""
    path = _real_module_file(roots, module)
    if path is None or depth > 6:
        return False
    if _real_module_file(roots, f"{module}.{name}"):
        return True
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node in tree.body and node.name == name:
            return True
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        if any(isinstance(t, ast.Name) and t.id == name for t in targets):
            return True
        if isinstance(node, ast.Import) and any((a.asname or a.name.split(".")[0]) == name for a in node.names):
            return True
        if isinstance(node, ast.ImportFrom):
            parts = module.split(".")[: len(module.split(".")) - (path.name != "__init__.py") - max(node.level - 1, 0)]
            source = ".".join(parts + [node.module or ""]).strip(".") if node.level else node.module or ""
            for alias in node.names:
                if alias.name == "*" and source.startswith(("torch_xla", "neuronx_distributed")):
                    if _real_module_has(roots, source, name, depth + 1):
                        return True
                elif (alias.asname or alias.name) == name:
                    return True
    return False


@pytest.mark.skipif(not os.environ.get("BMOJO_REAL_SOURCES"), reason="set BMOJO_REAL_SOURCES=nxd=DIR,xla=DIR")
def test_every_name_a_double_module_holds_is_in_the_real_module():
    roots = dict(item.split("=", 1) for item in os.environ["BMOJO_REAL_SOURCES"].split(","))
    for module, double in _doubles().items():
        extra = [n for n in vars(double) if not n.startswith("_") and not _real_module_has(roots, module, n)]
        assert extra == [], f"{module} holds {extra}, the real module does not"
    missing = [n for n in NXD_PARALLEL_LAYERS_NAMES
               if not _real_module_has(roots, "neuronx_distributed.parallel_layers", n)]
    assert missing == [], f"NXD_PARALLEL_LAYERS_NAMES holds {missing}, NxD's parallel_layers does not"


# ------------------------------------------------------------------ host tensors inside a step (doubles.xla_host)


class _HostCausalMask(torch.nn.Module):
    """Attention scores masked with a causal mask built on the host: ``torch.arange`` without ``device=``."""

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        n = scores.shape[-1]
        return scores.masked_fill(torch.arange(n)[None, :] > torch.arange(n)[:, None], float("-inf"))


class _DeviceCausalMask(torch.nn.Module):
    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        n, device = scores.shape[-1], scores.device
        return scores.masked_fill(torch.arange(n, device=device)[None, :] > torch.arange(n, device=device)[:, None],
                                  float("-inf"))


def _in_a_step(work, x: torch.Tensor, log: XlaLog | None = None) -> tuple[object, XlaLog]:
    """`work` of the batch ``{"x": x}`` handed out by the MpDeviceLoader double, before the step's sync."""
    log = log or XlaLog()
    loader = xla_modules(Env(log))["torch_xla.distributed.parallel_loader"].MpDeviceLoader([{"x": x}], "cpu")
    batches = iter(loader)
    try:
        return work(next(batches)["x"]), log
    finally:
        log.sync("code")  # the step's sync: the double leaves the step even when `work` raised


def test_a_host_tensor_in_a_step_op_fails_with_torch_xla_message():
    """torch-xla 2.9 lowers ``masked_fill`` through its code generator, which takes a host operand only as a
    wrapped number (one element, no dimension: aten_xla_bridge.cpp 169-179) and otherwise asks
    ``bridge::GetXlaTensor``: ``Expected XLA tensor. Got: CPUBoolType`` (101-111). The mask made with
    ``device=`` gives the numbers the host mask gives outside a step (where the double checks nothing); a
    wrapped number is copied over."""
    scores = torch.randn(2, 4, 4)
    with pytest.raises(RuntimeError, match=r"^Expected XLA tensor\. Got: CPUBoolType$"):
        _in_a_step(_HostCausalMask(), scores)
    got, log = _in_a_step(_DeviceCausalMask(), scores)
    assert torch.equal(got, _HostCausalMask()(scores)) and log.host_transfers == []
    masked, log = _in_a_step(lambda x: x.masked_fill(torch.tensor(True), 0.0), scores)  # a wrapped number
    assert torch.equal(masked, torch.zeros_like(scores))
    assert [t.split(" at ")[0] for t in log.host_transfers] == ["masked_fill with a host wrapped number"]


@pytest.mark.parametrize("work, message", [
    (lambda x: torch.where(torch.ones(4, dtype=torch.bool), x, x), "Expected XLA tensor. Got: CPUBoolType"),
    (lambda x: torch.where(x > 0, x, torch.tensor(0.0)), "Expected XLA tensor. Got: CPUFloatType"),  # 0-dim too
    (lambda x: x @ torch.ones(4, 4), "Expected XLA tensor. Got: CPUFloatType"),
    (lambda x: torch.cat([x, torch.zeros(4)]), "Expected all tensors in the given list to be XLA tensors. "
                                               "Element at index 1 is not an XLA tensor. Got: CPUFloatType"),
    (lambda x: torch.zeros(4).add_(x), "Expected XLA tensor. Got: CPUFloatType"),
    (lambda x: torch.zeros(4)[x.long()], "indices should be either on cpu or on the same device as the indexed "
                                         "tensor (XLA). When using XLA, the indexed tensor must be an XLA tensor."),
])
def test_ops_mixing_a_host_tensor_fail_as_in_torch_xla(work, message):
    """``where`` and ``mm`` take their operands with ``bridge::GetXlaTensor`` (aten_xla_type.cpp), ``cat`` with
    ``GetXlaTensors`` and its list message, an in-place op on a host tensor reaches the XLA kernel (torchgen's
    functionalization lets XLA operands through), ``index`` needs the indexed tensor on the device."""
    with pytest.raises(RuntimeError) as raised:
        _in_a_step(work, torch.ones(4))
    assert str(raised.value) == message


def test_host_operands_torch_xla_copies_over_are_recorded_transfers():
    """``add`` / ``mul`` ... take a host operand with ``GetOrCreateXlaTensor`` (aten_xla_type.cpp 345-359): it
    works, as a host-to-device copy at every step, recorded; so are host indices, an explicit ``.to(device)``
    (which leaves the host tensor on the host) and ``torch.tensor(<list>, device=...)``."""
    x = torch.arange(4.0)
    got, log = _in_a_step(lambda x: x + torch.arange(4), x)
    assert torch.equal(got, 2 * x) and [t.split(" at ")[0] for t in log.host_transfers] == ["add with a host tensor"]
    got, log = _in_a_step(lambda x: x[torch.tensor([3, 0])], x)
    assert got.tolist() == [3.0, 0.0] and [t.split(" at ")[0] for t in log.host_transfers] == [
        "__getitem__ with host indices"]

    def moved(x):
        host = torch.arange(4)
        on_device = host.to(x.device)
        assert on_device is not host and on_device.dtype == host.dtype
        torch.where(x > 0, x, on_device)  # the copy is a device tensor
        with pytest.raises(RuntimeError, match="CPULongType"):
            torch.where(x > 0, x, host)  # the original stays on the host
        return torch.tensor([1.0], device=x.device) + on_device.to(torch.float32)

    got, log = _in_a_step(moved, x)
    assert got.tolist() == [1.0, 2.0, 3.0, 4.0]
    assert [t.split(" at ")[0] for t in log.host_transfers] == ["to(<device>) of a host tensor",
                                                                 "tensor(<host data>, device=)"]


def test_a_state_torch_load_read_in_a_neuron_run_is_on_the_host_until_moved(one_rank, tmp_path, monkeypatch):
    """In a Neuron run a checkpoint's tensors come back on the host: an AdamW state left there fails torch-xla's
    update (``exp_avg.lerp_(grad)``, in place on a host tensor with a device operand: ``Expected XLA tensor``);
    ``.to(<device>)`` gives a device tensor with which the step gives plain AdamW's numbers. Outside a run (no
    NxD state) ``torch.load`` is untouched, and NxD's host copy gives plain tensors back."""
    from doubles.xla_host import XLA_DEVICE, is_host

    neuron_sdk.install(monkeypatch)
    torch.save({"exp_avg": torch.full((4,), 0.5), "exp_avg_sq": torch.full((4,), 0.25), "step": torch.tensor(3.0)},
               tmp_path / "state.pt")
    assert not is_host(torch.load(tmp_path / "state.pt")["exp_avg"])
    sys.modules[PARALLEL_STATE].initialize_model_parallel()
    loaded = torch.load(tmp_path / "state.pt")
    assert is_host(loaded["exp_avg"]) and is_host(loaded["exp_avg"][:2] * 2)  # what ops on it make too

    def adamw(state: dict) -> torch.Tensor:
        param = torch.nn.Parameter(torch.ones(4))
        optimizer = torch.optim.AdamW([param], lr=0.1)
        optimizer.state[param] = state
        _in_a_step(lambda x: (setattr(param, "grad", x), optimizer.step()), torch.arange(4.0))
        return param.detach()

    with pytest.raises(RuntimeError, match=r"^Expected XLA tensor\. Got: CPUFloatType$"):
        adamw(dict(loaded))
    moved = {k: v.to(XLA_DEVICE) if v.dim() else v for k, v in loaded.items()}
    assert not is_host(moved["exp_avg"]) and is_host(loaded["exp_avg"])  # the host tensor stays one
    plain = {k: v.as_subclass(torch.Tensor).clone() for k, v in loaded.items()}
    assert torch.equal(adamw(moved), adamw(plain))
    copy = sys.modules["neuronx_distributed.parallel_layers.utils"].move_all_tensor_to_cpu(loaded)
    assert type(copy["exp_avg"]) is torch.Tensor


def test_host_tensors_are_followed_only_inside_a_step():
    """Outside a step (before the loader's first batch, after the step's sync) nothing is checked."""
    log = XlaLog()
    loader = iter(xla_modules(Env(log))["torch_xla.distributed.parallel_loader"].MpDeviceLoader(
        [{"x": torch.ones(4)}], "cpu"))
    assert _HostCausalMask()(torch.zeros(4, 4)).isinf().sum() == 6
    next(loader)
    with pytest.raises(StopIteration):
        next(loader)  # its sync ends the step
    assert _HostCausalMask()(torch.zeros(4, 4)).isinf().sum() == 6 and log.host_transfers == []
    assert torch._C._len_torch_function_stack() == 0


def test_printing_a_device_value_in_a_step_is_a_host_read_and_a_host_tensor_read_is_not():
    """Formatting a tensor reads its value (``Tensor.__format__``: ``item()`` for a 0-dim tensor): on XLA a run
    of the pending graph, as ``.item()`` is; reading a tensor made on the host runs nothing."""
    from doubles.env import PACKAGE_ROOT

    code = compile("def report(loss, host):\n    return f'{loss:.3f}', host.item()\n",
                   str(Path(PACKAGE_ROOT) / "report.py"), "exec")  # code that counts as bmojo_neuron's
    space: dict = {}
    exec(code, space)
    log = XlaLog()
    with neuron_sdk.host_reads_in_steps(log) as reads:
        got = _in_a_step(lambda x: space["report"](x.sum(), torch.tensor(2.0)), torch.ones(2), log)[0]
    assert got == ("2.000", 2.0)
    assert [r.split(" at ")[0] for r in reads] == ["Tensor.__format__"]


XLA_MIRROR = Path("/work/.mirror/pytorch+xla/repo")


def test_ops_torch_xla_has_no_kernel_for_are_recorded_as_cpu_fallbacks():
    """A step's aten ops, forward and backward, that torch-xla 2.9 runs on its CPU fallback: ``_fft_r2c`` and
    its backward's ``_fft_c2c`` (no FFT lowering) and ``unfold_backward`` (``unfold`` reaches XLA as
    ``unfold_copy``, torch's composite kernel; its backward has CPU and CUDA kernels only). In-place ops count as
    their functional variant (``mul_.Scalar`` as ``mul.Scalar``), and torch's composite ops as what they
    decompose into. The stored op list is what the parser reads from torch-xla v2.9.0 (checked where the mirror
    of torch-xla is at hand)."""
    from toy_graphs import Scaled

    def fallbacks(reduce) -> list[str]:
        def step(x):
            Scaled(reduce)(x).backward()
        return [f.split(" at ")[0] for f in _in_a_step(step, torch.randn(4, 8))[1].cpu_fallbacks]

    assert fallbacks(lambda y: torch.fft.rfft(y).abs().sum()) == ["_fft_r2c", "_fft_c2c"]  # forward, backward
    assert fallbacks(lambda y: y.unfold(1, 4, 2).sum()) == ["unfold_backward"]
    assert fallbacks(lambda y: F.softplus(y).mul_(2.0).logsumexp(-1).mean()) == []
    text = "backend: XLA\nfull_codegen:\n  - abs\n  # a comment\nir_gen:\n  - atan2\nsupported:\n  - add.Tensor\n" \
           "symint:\n  - view\nautograd:\n  - einsum\n"
    assert parse_native_functions(text) == {"abs", "add.Tensor", "einsum"}  # ir_gen, symint: no kernel of their own
    if XLA_MIRROR.exists():
        import subprocess

        yaml = subprocess.run(["git", f"--git-dir={XLA_MIRROR}", "show", "v2.9.0:codegen/xla_native_functions.yaml"],
                              capture_output=True, text=True, check=True).stdout
        assert parse_native_functions(yaml) == LOWERED


def test_value_dependent_shapes_run_on_the_cpu_fallback_unless_the_experiment_is_on(monkeypatch):
    """torch-xla v2.9.0 lists ``nonzero`` and ``masked_select`` but its kernels call the CPU fallback unless
    ``XLA_EXPERIMENTAL`` names them (aten_xla_type.cpp 2269-2283, 2805-2814; debug_util.cpp 44-54), and ``index`` /
    ``index_put`` take a bool or byte mask as ``mask.nonzero()`` (ops/index_ops.cpp 49-76): a boolean-mask read or
    write falls back too. Integer indices do not, nor ``where`` (its shape does not depend on the values)."""
    def fallbacks(work) -> list[str]:
        return [f.split(" at ")[0] for f in _in_a_step(work, torch.randn(4, 8))[1].cpu_fallbacks]

    def masked_write(x):
        x[x > 0] = 0.0

    assert fallbacks(lambda x: x.nonzero()) == ["nonzero"]
    assert fallbacks(lambda x: x.masked_select(x > 0)) == ["masked_select"]
    assert fallbacks(lambda x: x[x > 0]) == ["nonzero (a boolean mask in index.Tensor)"]
    assert fallbacks(masked_write) == ["nonzero (a boolean mask in index_put_)"]
    assert fallbacks(lambda x: x[torch.tensor([0, 2], device=x.device)]) == []
    assert fallbacks(lambda x: torch.where(x > 0, x, 0.0)) == []
    monkeypatch.setenv("XLA_EXPERIMENTAL", "nonzero:masked_select")
    assert fallbacks(lambda x: (x.nonzero(), x.masked_select(x > 0), x[x > 0])) == []


def test_random_ops_given_a_generator_scaled_addmm_and_int64_cumprod_run_on_the_cpu_fallback():
    """Every torch-xla v2.9.0 kernel that takes a ``generator`` falls back when one is given (its numbers come from
    that CPU generator, not the XLA seed: aten_xla_type.cpp 1267, 1810, 2562 ...), ``addmm`` when ``beta`` or
    ``alpha`` is not 1 (898-901), ``cumprod`` in int64, where integer inputs are promoted (1498-1512); otherwise
    they run on the device (``cumsum`` of int64 too, 1514-1520)."""
    def fallbacks(work) -> list[str]:
        return [f.split(" at ")[0] for f in _in_a_step(work, torch.rand(4, 4))[1].cpu_fallbacks]

    generator = torch.Generator().manual_seed(0)
    assert fallbacks(lambda x: torch.bernoulli(x, generator=generator)) == ["bernoulli (given a generator)"]
    assert fallbacks(lambda x: x.clone().uniform_(generator=generator)) == ["uniform_ (given a generator)"]
    assert fallbacks(lambda x: (torch.bernoulli(x), x.clone().uniform_())) == []
    assert fallbacks(lambda x: torch.addmm(x, x, x, beta=0.5)) == ["addmm (beta or alpha not 1)"]
    assert fallbacks(lambda x: (torch.addmm(x, x, x), F.linear(x, x, x[0]))) == []
    assert fallbacks(lambda x: (x > 0).int().cumprod(1)) == ["cumprod (in int64)"]  # promoted to int64
    assert fallbacks(lambda x: x.cumprod(1, dtype=torch.int64)) == ["cumprod (in int64)"]
    assert fallbacks(lambda x: (x.cumprod(1), (x > 0).int().cumprod(1, dtype=torch.float32), x.long().cumsum(1))) == []


def test_dilated_max_pooling_mean_embedding_bags_and_scatter_reductions_run_on_the_cpu_fallback():
    """torch-xla v2.9.0 falls back for some arguments of kernels it has: max pooling with a dilation other than 1,
    forward and backward (aten_xla_type.cpp 2325, 2348; aten_autograd_ops.cpp 17-21, 81-83),
    ``_embedding_bag_forward_only`` in mode mean or with a ``padding_idx`` (1681-1689), ``scatter`` with a
    reduction other than "add" (3395-3406, 3410-3427) and ``scatter_reduce`` but for sum / prod / amin / amax with
    ``include_self`` (3470-3486); the lowered variants run on the device."""
    def fallbacks(work) -> list[str]:
        return [f.split(" at ")[0] for f in _in_a_step(work, torch.rand(2, 3, 8, 8))[1].cpu_fallbacks]

    def pooled(dilation: int):
        def step(x):
            F.max_pool2d(x.clone().requires_grad_(), 2, dilation=dilation).sum().backward()
        return step

    assert fallbacks(pooled(2)) == ["max_pool2d_with_indices (dilation not 1)",
                                    "max_pool2d_with_indices_backward (dilation not 1)"]
    assert fallbacks(pooled(1)) == []
    weight, ids, offsets = torch.rand(10, 4), torch.tensor([1, 2, 4, 5, 4, 3]), torch.tensor([0, 3])
    bag = "_embedding_bag_forward_only (mode mean, scale_grad_by_freq, sparse or a padding_idx)"
    assert fallbacks(lambda x: F.embedding_bag(ids, weight, offsets, mode="mean")) == [bag]
    assert fallbacks(lambda x: F.embedding_bag(ids, weight, offsets, mode="sum", padding_idx=0)) == [bag]
    assert fallbacks(lambda x: (F.embedding_bag(ids, weight, offsets, mode="sum"),
                                F.embedding_bag(ids, weight, offsets, mode="max"))) == []

    def scatters(x, reduce: str, include_self: bool = True):
        flat, index = x.flatten(), torch.tensor([0, 1], device=x.device)
        return flat.scatter_reduce(0, index, flat[:2], reduce, include_self=include_self)

    assert fallbacks(lambda x: x.flatten().scatter(0, torch.tensor([0, 1], device=x.device), 2.0,
                                                   reduce="multiply")) == ["scatter.value_reduce (reduce 'multiply')"]
    assert fallbacks(lambda x: scatters(x, "mean")) == ["scatter_reduce.two (reduce 'mean', include_self True)"]
    assert fallbacks(lambda x: scatters(x, "amax", False)) == ["scatter_reduce.two (reduce 'amax', include_self False)"]
    assert fallbacks(lambda x: (scatters(x, "amax"), scatters(x, "sum"), x.flatten().scatter(
        0, torch.tensor([0, 1], device=x.device), 2.0, reduce="add"))) == []


class _FftSgd(torch.optim.Optimizer):
    """SGD along the real part of each gradient's FFT: an update with an op torch-xla 2.9 has no kernel for."""

    def __init__(self, params, lr: float) -> None:
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                p.sub_(group["lr"] * torch.fft.fft(p.grad).real)


def test_the_update_after_accumulated_micro_batches_is_checked_for_cpu_fallbacks(one_rank, monkeypatch):
    """Under gradient accumulation our step cuts the last micro-batch's graph itself (``torch_xla.sync``) and the
    optimizer update traces into a graph of its own: that graph is the step's, so the fallback check covers it
    (``fft`` of a real tensor reaches torch-xla as ``_fft_r2c``, which has no kernel). The check ends with the
    first step's last sync: the second step is not checked (its ops are the first's)."""
    from toy_graphs import Scaled

    monkeypatch.setenv("PJRT_DEVICE", "NEURON")
    modules, env = _doubles_and_env()
    trainer, xla = modules[nxd_api.TRAINER], modules["torch_xla"]
    config = trainer.neuronx_distributed_config()
    model = trainer.initialize_parallel_model(config, lambda: Scaled(lambda y: y.sum()))
    optimizer = trainer.initialize_parallel_optimizer(config, _FftSgd, model.parameters(), lr=0.1)
    loader = modules["torch_xla.distributed.parallel_loader"].MpDeviceLoader([{"x": torch.ones(4, 8)}] * 4, "cpu")
    micro_batches = iter(loader)
    for _ in range(2):  # two steps of two micro-batches, as `NeuronBackend.accumulated_losses` cuts them
        for _ in range(2):
            model(next(micro_batches)["x"]).backward()
        xla.sync()
        optimizer.step()
        xla.sync()
    assert [f.split(" at ")[0] for f in env.log.cpu_fallbacks] == ["_fft_r2c"]
    assert env.log.fallback_steps_left == 0 and not env.log.in_step


def _after_the_move(reduce_with, monkeypatch, **attributes: torch.Tensor) -> tuple[object, XlaLog]:
    """A ``Scaled`` holding `attributes` as plain tensor attributes, moved to the device by NxD's model
    initialisation; ``reduce_with(module, y)`` ends its forward on the loader double's first batch, then the
    step's sync."""
    from toy_graphs import Scaled

    monkeypatch.setenv("PJRT_DEVICE", "NEURON")
    modules, env = _doubles_and_env()
    trainer = modules[nxd_api.TRAINER]

    def model_fn():
        module = Scaled(lambda y: reduce_with(module, y))
        for name, value in attributes.items():
            setattr(module, name, value)  # not a buffer: ``Module.to`` leaves it where it is
        return module

    model = trainer.initialize_parallel_model(trainer.neuronx_distributed_config(), model_fn)
    loader = modules["torch_xla.distributed.parallel_loader"].MpDeviceLoader([{"x": torch.ones(4, 8)}], "cpu")
    try:
        return model(next(iter(loader))["x"]), env.log
    finally:
        modules["torch_xla"].sync()


def test_tensor_attributes_nxd_does_not_move_meet_torch_xla_rules_in_the_step(one_rank, monkeypatch):
    """``Module._apply`` moves parameters and buffers only: a plain tensor attribute made before NxD's move stays
    on the host, and in the step meets the rules of a host tensor made inside it
    (`test_ops_mixing_a_host_tensor_fail_as_in_torch_xla`): ``mm`` and ``where`` refuse it, even 0-dim (no wrapped
    number for ``where``); a 0-dim one is a wrapped number for ``masked_fill`` and copied over by ``mul``, both
    recorded. Moved with ``.to(device)`` in the step, it is a device tensor."""
    with pytest.raises(RuntimeError, match=r"^Expected XLA tensor\. Got: CPUFloatType$"):
        _after_the_move(lambda m, y: (y @ m.offset).sum(), monkeypatch, offset=torch.ones(8, 8))
    with pytest.raises(RuntimeError, match=r"^Expected XLA tensor\. Got: CPUFloatType$"):
        _after_the_move(lambda m, y: torch.where(y > 0, y, m.zero).sum(), monkeypatch, zero=torch.tensor(0.0))
    got, log = _after_the_move(lambda m, y: (y * m.scale).masked_fill(m.flag, 0.0).sum(), monkeypatch,
                               scale=torch.tensor(2.0), flag=torch.tensor(False))
    assert got.item() == 64.0
    assert [t.split(" at ")[0] for t in log.host_transfers] == ["mul with a host tensor",
                                                                "masked_fill with a host wrapped number"]
    got, log = _after_the_move(lambda m, y: (y @ m.offset.to(y.device)).sum(), monkeypatch, offset=torch.ones(8, 8))
    assert got.item() == 256.0 and [t.split(" at ")[0] for t in log.host_transfers] == [
        "to(<device>) of a host tensor"]


def test_a_parallel_layer_built_before_nxd_state_fails_as_nxd_fallback_does(one_rank):
    """NxD's ``BaseParallelLayer`` (layers.py 174-183 at v2.28.0) built before ``initialize_model_parallel`` warns
    and starts a one-rank fallback state with ``init_process_group``, which torch refuses when a process group
    exists (every Neuron run of ours has one): the layer is never built. After the initialisation it is."""
    modules = _doubles()
    layers = modules["neuronx_distributed.parallel_layers.layers"]
    with pytest.warns(UserWarning, match="Parallel state is not initialized"), \
            pytest.raises(ValueError, match="default process group twice"):
        layers.ColumnParallelLinear(4, 4)
    modules[PARALLEL_STATE].initialize_model_parallel()
    assert layers.RowParallelLinear(4, 4).weight.shape == (4, 4)


def test_nxd_move_gives_new_parameters_with_only_nxd_attributes_and_reties(one_rank, monkeypatch):
    """On XLA ``Module.to`` makes every parameter a new ``Parameter`` (no shallow copy between a CPU and an XLA
    tensor, torch's ``Module._apply``): NxD's ``move_model_to_device`` (utils/model_utils.py 148-235 at v2.28.0)
    puts back its parallel attributes by name (``rank_ordering`` as None) and ``sequence_parallel_enabled``, drops
    every other attribute, and re-ties a shared Parameter: a transformers model through its ``tie_weights``,
    another module by the names found before the move. The objects held before the move are not the model's."""
    from bmojo_neuron.modeling_bmojo import BMojoForCausalLM
    from naive import tiny_config

    monkeypatch.setenv("PJRT_DEVICE", "NEURON")
    modules, _ = _doubles_and_env()
    trainer, utils = modules[nxd_api.TRAINER], modules["neuronx_distributed.parallel_layers.utils"]
    config = trainer.neuronx_distributed_config()
    before: dict = {}

    def plain():
        module = torch.nn.Sequential(torch.nn.Linear(4, 4, bias=False), torch.nn.Linear(4, 4, bias=False))
        module[1].weight = module[0].weight  # shared: one Parameter in two modules
        module[0].weight.sequence_parallel_enabled = True
        module[0].weight.no_decay = True  # not an attribute NxD keeps
        utils.set_tensor_model_parallel_attributes(module[0].weight, True, 0, 1, num_partitions=1, rank_ordering=[0])
        before["weight"] = module[0].weight
        return module

    moved = trainer.initialize_parallel_model(config, plain).module
    weight = moved[0].weight
    assert weight is not before["weight"] and torch.equal(weight, before["weight"])
    assert moved[1].weight is weight  # re-tied
    assert (weight.sequence_parallel_enabled, weight.tensor_model_parallel, weight.partition_dim,
            weight.num_partitions, weight.rank_ordering) == (True, True, 0, 1, None)
    assert not hasattr(weight, "no_decay")

    def causal_lm():
        lm = BMojoForCausalLM(tiny_config(tie_word_embeddings=True))
        before["lm"] = dict(lm.named_parameters())
        return lm

    lm = trainer.initialize_parallel_model(config, causal_lm).module
    assert lm.lm_head.weight is lm.model.embed_tokens.weight  # transformers' tie_weights re-tied it
    assert not any(p is before["lm"][name] for name, p in lm.named_parameters())


def test_a_buffer_registered_after_the_move_is_on_the_host(one_rank, monkeypatch):
    """NxD moves the model's buffers with it; one registered afterwards from a tensor made without ``device=``
    stays on the host, and in the step ``mm`` refuses it (``bridge::GetXlaTensor``) as it refuses a plain tensor
    attribute. One made on the device, or moved there, is a device tensor."""
    from doubles.xla_host import XLA_DEVICE

    def step_with_buffer(make) -> float:
        log = neuron_sdk.install(monkeypatch)
        trainer = sys.modules[nxd_api.TRAINER]
        from toy_graphs import Scaled

        model = trainer.initialize_parallel_model(trainer.neuronx_distributed_config(),
                                                  lambda: Scaled(lambda y: (y @ model.module.offset).sum()))
        model.module.register_buffer("offset", make())
        loader = sys.modules["torch_xla.distributed.parallel_loader"].MpDeviceLoader([{"x": torch.ones(4, 8)}], "cpu")
        try:
            return model(next(iter(loader))["x"]).item()
        finally:
            sys.modules["torch_xla"].sync()
            sys.modules[PARALLEL_STATE].destroy_model_parallel()
            assert log.moved_modules

    monkeypatch.setenv("PJRT_DEVICE", "NEURON")
    with pytest.raises(RuntimeError, match=r"^Expected XLA tensor\. Got: CPUFloatType$"):
        step_with_buffer(lambda: torch.ones(8, 8))
    assert step_with_buffer(lambda: torch.ones(8, 8, device=XLA_DEVICE)) == 256.0
    assert step_with_buffer(lambda: torch.ones(8, 8).to(XLA_DEVICE)) == 256.0


def test_explicit_host_placement_and_reads_in_a_step_are_caught():
    """The double's XLA device is ``cpu:0`` (torch-xla's is ``xla:0``) and our code sees it as ``t.device`` of a
    device tensor, so an explicit ``device="cpu"`` / ``torch.device("cpu")`` makes a host tensor (refused by
    ``where``, ``bridge::GetXlaTensor``), while ``device=x.device`` makes a device one; ``.cpu()``, ``.to("cpu")``,
    ``.item()``, ``.tolist()`` and ``float()`` of a device value each run the pending graph and copy the value
    to the host, recorded in ``XlaLog.host_reads``; the copies are host tensors, the original stays on the
    device."""
    xla = xla_modules(Env(XlaLog()))["torch_xla"]

    def placed(x):
        assert x.device == xla.device() and x.device != torch.device("cpu")
        for host in (torch.zeros(4, device="cpu"), torch.zeros(4, device=torch.device("cpu"))):
            with pytest.raises(RuntimeError, match=r"^Expected XLA tensor\. Got: CPUFloatType$"):
                torch.where(x > 0, x, host)
        return torch.where(x > 0, x, torch.zeros(4, device=x.device))

    got, log = _in_a_step(placed, torch.ones(4))
    assert torch.equal(got, torch.ones(4)) and log.host_reads == [] and log.host_transfers == []

    def read(x):
        copies = [x.cpu(), x.to("cpu"), x.to(device=torch.device("cpu"))]
        values = x.sum().item(), x.tolist(), float(x[0])
        for copy in copies:
            assert copy is not x and copy.device == torch.device("cpu")
            with pytest.raises(RuntimeError, match="CPUFloatType"):
                torch.where(x > 0, x, copy)
        return torch.where(x > 0, x, x * 2), values

    (got, values), log = _in_a_step(read, torch.ones(4))
    assert torch.equal(got, torch.ones(4)) and values == (4.0, [1.0] * 4, 1.0)
    assert [r.split(" at ")[0] for r in log.host_reads] == [
        "Tensor.cpu(<host>)", "Tensor.to(<host>)", "Tensor.to(<host>)", "Tensor.item", "Tensor.tolist",
        "Tensor.__float__"]


def test_an_optimizer_state_made_on_the_host_outside_a_step_fails_the_update(one_rank, monkeypatch):
    """A state our code (or a test) makes with a factory and no ``device=`` before the step is a host tensor on
    torch-xla: NxD's optimizer step refuses it as torch-xla refuses AdamW's in-place update of it (``Expected XLA
    tensor``); made with the device, or moved there, it updates; AdamW's own scalar ``step`` stays on the host."""
    from doubles.xla_host import XLA_DEVICE

    neuron_sdk.install(monkeypatch)
    sys.modules[PARALLEL_STATE].initialize_model_parallel()
    trainer = sys.modules[nxd_api.TRAINER]
    config = trainer.neuronx_distributed_config()

    def update(make_state) -> None:
        (param,) = on_device([torch.nn.Parameter(torch.ones(4, device=XLA_DEVICE))])
        optimizer = trainer.initialize_parallel_optimizer(config, torch.optim.AdamW, [param], lr=0.1)
        optimizer.state[param] = {"step": torch.tensor(0.0), **make_state()}
        param.grad = torch.ones(4, device=XLA_DEVICE)
        optimizer.step()

    with pytest.raises(RuntimeError, match=r"^Expected XLA tensor\. Got: CPUFloatType$"):
        update(lambda: {"exp_avg": torch.zeros(4), "exp_avg_sq": torch.zeros(4, device=XLA_DEVICE)})
    update(lambda: {"exp_avg": torch.zeros(4).to(XLA_DEVICE), "exp_avg_sq": torch.zeros(4, device=XLA_DEVICE)})


def test_a_capturable_adamw_keeps_step_on_the_device_and_refuses_a_host_one(one_rank, monkeypatch):
    """``capturable=True``: torch's AdamW makes ``step`` on the parameter's device and asserts that it is there at
    each update (torch/optim/adam.py ``_single_tensor_adam``; torch-xla's ``xla`` is among
    ``_get_capturable_supported_devices``): a host ``step`` next to a device parameter is refused with torch's
    message, a device one is counted on the device and stays there, and the update equals the host-step AdamW's
    to float32 rounding (the bias corrections in float32 tensors instead of float64 numbers)."""
    from doubles.xla_host import XLA_DEVICE, on_host

    neuron_sdk.install(monkeypatch)
    sys.modules[PARALLEL_STATE].initialize_model_parallel()
    trainer = sys.modules[nxd_api.TRAINER]
    config = trainer.neuronx_distributed_config()

    def update(step: torch.Tensor | None, capturable: bool = True) -> tuple[torch.Tensor, dict]:
        (param,) = on_device([torch.nn.Parameter(torch.arange(4.0, device=XLA_DEVICE))])
        optimizer = trainer.initialize_parallel_optimizer(config, torch.optim.AdamW, [param], lr=0.1,
                                                          betas=(0.9, 0.95), capturable=capturable)
        if step is not None:
            zeros = torch.zeros(4, device=XLA_DEVICE)
            optimizer.optimizer.state[param] = {"step": step, "exp_avg": zeros, "exp_avg_sq": zeros.clone()}
        param.grad = torch.full((4,), 0.5, device=XLA_DEVICE)
        optimizer.step()
        return param.detach(), optimizer.optimizer.state[param]

    with pytest.raises(AssertionError, match=r"^If capturable=True, params and state_steps must be on supported "
                                             r"devices: \[.*'xla'\]\.$"):
        update(torch.tensor(0.0))
    moved, state = update(torch.tensor(0.0).to(XLA_DEVICE))
    made, made_state = update(None)
    host, host_state = update(None, capturable=False)
    assert not on_host(state["step"]) and not on_host(made_state["step"]) and on_host(host_state["step"])
    assert state["step"].item() == made_state["step"].item() == 1.0
    assert torch.equal(moved, made) and (made - host).abs().max().item() <= 1e-7, made - host


def test_host_tensors_made_before_the_step_meet_its_rules_and_host_scalars_0_or_1_are_graph_constants(
        one_rank, monkeypatch):
    """A tensor our code made with a factory and no ``device=`` during a Neuron run, before the step (kept by a
    closure), is a host tensor in the step: ``mm`` refuses it (``bridge::GetXlaTensor``), ``add`` copies it over.
    A no-dimension host tensor copied into the graph is a constant of the graph when it holds 0, 1 or -1 and device
    data otherwise (``XLATensor::GetIrValueForTensor``, tensor.cpp 428-445; torch's ``IsSpecialScalar``): a flag
    going 0, 1, 2, 3 traces three different step graphs (two recompiles); a one-element, one-dimension flag (our
    stop vote's) is device data whatever it holds."""
    neuron_sdk.install(monkeypatch)
    sys.modules[PARALLEL_STATE].initialize_model_parallel()
    kept = torch.ones(4, 4)
    with pytest.raises(RuntimeError, match=r"^Expected XLA tensor\. Got: CPUFloatType$"):
        _in_a_step(lambda x: x @ kept, torch.ones(4))
    got, log = _in_a_step(lambda x: x + kept[0], torch.ones(4))
    assert torch.equal(got, torch.full((4,), 2.0))
    assert [t.split(" at ")[0] for t in log.host_transfers] == ["add with a host tensor"]

    def step_graph(flag: torch.Tensor) -> tuple:
        _, log = _in_a_step(lambda x: x * flag, torch.ones(4))
        return tuple(log.graphs[-1][1:])

    scalars = [step_graph(torch.tensor(v)) for v in (0.0, 1.0, 2.0, 3.0)]
    assert len(set(scalars)) == 3 and scalars[2] == scalars[3] and ("constant", "0.0", "torch.float32") in scalars[0]
    assert step_graph(torch.tensor([0.0])) == step_graph(torch.tensor([1.0])) == scalars[3]


def test_python_numbers_0_or_1_in_a_step_op_are_graph_constants():
    """A Python number in an op on a device tensor is device data unless it is 0, 1 or -1 (torch's
    ``IsSpecialScalar`` through ``XLAGraphExecutor::GetIrValueForScalar``, xla_graph_executor.cpp 294-300, or a
    wrapped-number tensor through ``GetIrValueForTensor``, tensor.cpp 428-445): AdamW's ``denom`` divided by
    ``bias_correction2 ** 0.5`` in float64 traces one graph while that number is below 1 and another once it is
    exactly 1.0 (from update 709 with beta2 = 0.95); a number that never gets there traces one graph; an int 1 counts as
    the float 1.0, a bool does not count."""
    def step_graph(work) -> tuple:
        _, log = _in_a_step(work, torch.ones(4))
        return tuple(log.graphs[-1][1:])

    def adam_denominator(step: int):
        return lambda x: (x.sqrt() / (1 - 0.95 ** step) ** 0.5).add_(1e-8)

    before, at, after = ([step_graph(adam_denominator(step)) for step in steps] for steps in ((1, 2, 708), (709,),
                                                                                              (729, 730, 731)))
    assert len(set(before)) == 1 and set(at) == set(after) and at[0] != before[0]
    assert ("constant", "1.0") in at[0]  # Python's ``** 0.5`` of 1 - 2**-53 rounds to 1.0 (from 709 on)
    assert len({step_graph(lambda x, lr=lr: x.addcdiv(x, x, value=-lr)) for lr in (1e-3, 5e-4, 3e-5)}) == 1
    assert step_graph(lambda x: x * 1) == step_graph(lambda x: x * 1.0) != step_graph(lambda x: x * 2.0)
    assert step_graph(lambda x: x.lerp(x, 0.0)) != step_graph(lambda x: x.lerp(x, 0.1))
    assert step_graph(lambda x: x.masked_fill(x > 0, True)) == step_graph(lambda x: x.masked_fill(x > 0, False))


def test_fill_values_follow_the_special_scalar_rule_dims_sizes_and_indices_do_not():
    """torch-xla v2.9.0 makes a device ``full``'s fill value a graph value through ``GetIrValueForScalar``
    (aten_xla_type.cpp 1889-1914, tensor_methods.cpp ``full``): 0, 1 or -1 a constant, any other number device
    data; ``new_full`` of a device tensor likewise. Dims, sizes and indices are attributes of the op (``Select``
    hashes dim, start, end, stride: ops/select.cpp 17), never values, so a 0, 1 or -1 among them is no constant."""
    def step_graph(work) -> tuple:
        _, log = _in_a_step(work, torch.ones(4))
        return tuple(log.graphs[-1][1:])

    def full(v):
        return lambda x: x * torch.full((4,), v, device=x.device)

    def new_full(v):
        return lambda x: x * x.new_full((4,), fill_value=v)

    for fill in (full, new_full):
        graphs = [step_graph(fill(v)) for v in (1.0, 2.0, 3.0, -1)]
        assert graphs[1] == graphs[2] != graphs[0] and ("constant", "1.0") in graphs[0]
        assert ("constant", "-1.0") in graphs[3] and not [e for e in graphs[1] if e[0] == "constant"]
    assert step_graph(lambda x: x * torch.full((4,), 1.0, device="cpu").to(x.device)) == step_graph(full(2.0))
    for indexing in (lambda x: x.view(1, -1)[0, 1:], lambda x: x.narrow(0, 1, 1), lambda x: x.unsqueeze(-1).sum(0),
                     lambda x: x.reshape(-1, 1)[:, -1], lambda x: x.new_full((1, 1), 2.0)):
        assert not [e for e in step_graph(indexing) if e[0] == "constant"]


def test_an_index_that_moves_between_steps_is_a_new_graph_at_each_value():
    """torch-xla v2.9.0 hashes a slice's start into its IR node (``Select``: dim, start, end, stride, ops/select.cpp
    17, canonical after ``tensor_methods::slice``), so a step whose ``narrow`` / slice / ``select`` start moves with
    the step cuts a new graph at every new start, shapes unchanged: a compile each. The same slice written another
    way (a negative index, an end past the size) is one graph; a tensor index is device data, one graph whatever it
    holds; ``roll``'s shifts are hashed as given (ops/roll.cpp 10)."""
    x = torch.arange(24.0).view(4, 6)

    def step_graphs(work, values) -> list[tuple]:
        log = XlaLog()
        for value in values:  # one step each, on one log: its graphs in order
            _in_a_step(lambda batch: work(batch, value), x, log)
        return [tuple(g[1:]) for g in log.graphs if g[1:]]  # less the empty ones the loader cut before a batch

    for moving in (lambda b, s: b.narrow(1, s, 2), lambda b, s: b[:, s:s + 2], lambda b, s: b.select(1, s),
                   lambda b, s: b[s], lambda b, s: b.roll(s, 1), lambda b, s: b.clone().__setitem__((0, s), 0.0)):
        assert len(set(step_graphs(moving, (0, 1, 2, 1)))) == 3  # three starts, three graphs: two recompiles
        assert len(set(step_graphs(moving, (1, 1, 1)))) == 1
    assert len(set(step_graphs(lambda b, s: b[:, s], (-1, 5)))) == 1  # one canonical position
    assert len(set(step_graphs(lambda b, s: b[:, 2:s], (6, 9, 100)))) == 1  # an end past the size is the size
    assert len(set(step_graphs(lambda b, s: b[torch.tensor([s]), 1:], (0, 1, 3)))) == 1  # device data


def test_a_0_dim_device_index_is_read_to_the_host_and_its_value_is_a_new_graph():
    """torch's indexing reads a 0-dim integer (or bool) tensor index with ``item()`` and selects with the number
    (``handleDimInMultiDimIndexing``, ATen/TensorIndexing.h): on XLA a device index runs the pending graph to read
    it, and each value is another ``select``, another graph. A one-element, one-dimension index and
    ``index_select`` stay device data: no read, one graph."""
    x = torch.arange(24.0).view(4, 6)

    def step(work, value) -> tuple[list[str], tuple]:
        _, log = _in_a_step(lambda batch: work(batch, torch.tensor(value, device=batch.device)), x)
        return [r.split(" at ")[0] for r in log.host_reads], tuple(log.graphs[-1][1:])

    reads, graph = step(lambda b, i: b[i], 2)  # 2 and 3: uploaded as device data, not as constants
    assert reads == ["Tensor.__getitem__ with a 0-dim device index (item())"] and graph != step(lambda b, i: b[i], 3)[1]
    assert step(lambda b, i: b.clone().__setitem__((0, i), 0.0), 2)[0] == [
        "Tensor.__setitem__ with a 0-dim device index (item())"]
    for device_data in (lambda b, i: b[i.view(1)], lambda b, i: b.index_select(0, i.view(1))):
        (reads, one), (_, two) = step(device_data, 2), step(device_data, 3)
        assert reads == [] and one == two


def test_a_python_list_index_in_a_step_is_uploaded_at_every_step():
    """torch makes a list index an index tensor from the host data on the indexed tensor's device
    (``indexing_tensor_from_data``, torch/csrc/utils/tensor_new.h 45): on XLA an upload at every step, as
    ``torch.tensor([...], device=...)`` is. A device index tensor or a slice uploads nothing."""
    def transfers(work) -> list[str]:
        return [t.split(" at ")[0] for t in _in_a_step(work, torch.arange(24.0).view(4, 6))[1].host_transfers]

    assert transfers(lambda x: x[[0, 2]]) == ["__getitem__ with a Python list index"]
    assert transfers(lambda x: x[:, range(2)]) == ["__getitem__ with a Python list index"]
    assert transfers(lambda x: x.clone().__setitem__([1, 3], 0.0)) == ["__setitem__ with a Python list index"]
    assert transfers(lambda x: (x[torch.arange(0, 4, 2, device=x.device)], x[0:3:2], x[(0, 2)])) == []


def test_dropout_p_is_device_data_and_p_0_or_1_draws_nothing():
    """On XLA ``dropout`` is not fused (torch's ``is_fused_kernel_acceptable`` takes CUDA, XPU, lazy and
    privateuse1 tensors), so ``_dropout_impl`` draws ``bernoulli_(1 - p)`` and divides by ``1 - p``: both numbers
    go through ``GetIrValueForScalar`` (tensor_methods.cpp ``bernoulli`` 1307-1314 after functionalization), device
    data for 0 < p < 1, so p = 0.1 and p = 0.25 trace one graph; p = 0 returns the input and draws no random number,
    another graph (and the seed does not step); p = 1 draws nothing either and returns ``input * at::zeros({})``:
    zeros, no NaN, and a third graph, whose zeros are the constant 0 (torch-xla's ``zero_``, tensor_methods.cpp
    3878-3882)."""
    graphs, outputs, seeds = {}, {}, {}
    for p in (0.1, 0.25, 0.0, 1.0):
        modules, env = _doubles_and_env()
        nxd_model = modules["neuronx_distributed.trainer.model"].NxDModel
        model = nxd_model(torch.nn.Dropout(p), {"pipeline_parallel_size": 1})
        outputs[p], seeds[p] = model(torch.ones(4)), env.log.rng
        env.log.sync("code")
        graphs[p] = env.log.graphs[-1][1:]
    assert graphs[0.1] == graphs[0.25] != graphs[0.0] and ("random", "bernoulli") in graphs[0.1]
    assert not [e for e in graphs[0.1] if e[0] == "constant"]
    assert len({tuple(graphs[p]) for p in (0.1, 0.0, 1.0)}) == 3 and ("constant", "0.0") in graphs[1.0]
    assert torch.equal(outputs[1.0], torch.zeros(4)) and torch.equal(outputs[0.0], torch.ones(4))
    assert seeds[0.0] == seeds[1.0] == XLA_DEFAULT_SEED != seeds[0.1]


def test_zero1_takes_parameters_on_one_xla_device_and_keeps_fp32_masters(one_rank, caplog):
    """NxD's ZeRO-1 turns torch-xla's one-device assertion into its RuntimeError (optimizer/
    zero_redundancy_optimizer.py 59-69; torch-xla 234-247): a parameter NxD did not move to the device is refused.
    torch-xla warns unless master weights are saved (86-89); a bf16 parameter gets an fp32 shard, its master, which
    the step updates and rounds to nearest into the parameter (440-465), and ``state_dict`` holds the shards under
    ``sharded_master_weights`` with ``save_master_weights`` (496-510)."""
    zero1 = _initialized()["neuronx_distributed.optimizer"].NeuronZero1Optimizer
    with pytest.raises(RuntimeError, match="all parameters passed in should on the same XLA device"):
        zero1([torch.nn.Parameter(torch.ones(3))], torch.optim.AdamW, lr=0.1)
    (weight,) = on_device([torch.nn.Parameter(torch.full((3,), 1.0, dtype=torch.bfloat16))])
    caplog.clear()
    zero1([weight], torch.optim.AdamW, lr=0.1)
    assert "Not saving master weights may have accuracy issues when resuming training!" in caplog.text
    caplog.clear()
    optimizer = zero1([weight], torch.optim.SGD, save_master_weights=True, grad_clipping=False, lr=1e-3)
    assert caplog.text == ""
    weight.grad = torch.ones(3, dtype=torch.bfloat16)
    optimizer.step()
    (master,) = optimizer.base_optimizer.param_groups[0]["params"]
    assert master.dtype == torch.float32 and master[0].item() == pytest.approx(0.999)  # bf16 cannot hold it
    assert torch.equal(weight.detach(), master.detach().bfloat16()) and weight[0].item() == 1.0
    state = optimizer.state_dict()
    assert torch.equal(state["sharded_master_weights"][0], master.detach()) and state["shape_info"] == {0: (3,)}


def test_gradients_are_averaged_over_the_data_groups_in_nxd_s_buckets(monkeypatch):
    """NxD's ``bucket_allreduce_gradients`` (parallel_layers/grads.py 259-327): per dtype, last gradient first, each
    divided by dp in place, summed over the data groups in coalesced all-reduces of at most
    ``ALLREDUCE_BUCKET_CAP_MB``, a larger gradient alone; torch-xla's ``CoalescingBuckets`` (xla_model.py 596-671)
    puts a large tensor with a small bucket and sends them at once. Rank 1 of a world of 2, data groups [[0, 1]],
    gloo standing in (each rank holding the same gradients)."""
    from doubles.nxd_runtime import bucket_allreduce_gradients, coalescing_buckets

    env = Env(XlaLog())
    xla_modules(env)
    env.grid.update(tp=1, pp=1, dp=2)
    env.replica_groups["dp"] = [[0, 1]]
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 1)
    monkeypatch.setattr(env, "group_of", lambda ranks: tuple(ranks))
    monkeypatch.setattr(dist, "all_reduce", lambda tensor, group=None: tensor.mul_(2))
    monkeypatch.setenv("ALLREDUCE_BUCKET_CAP_MB", "1")
    quarter, big = 2**16, 3 * 2**17  # float32 elements: 0.25 MB and 1.5 MB
    grads = [torch.full((quarter,), 3.0), torch.full((big,), 5.0), torch.full((quarter,), 1.0),
             torch.full((quarter,), 7.0, dtype=torch.bfloat16)]
    bucket_allreduce_gradients(grads, env)
    assert [g[0].item() for g in grads] == [3.0, 5.0, 1.0, 7.0]  # the mean of two equal gradients
    kinds = [(e[0], e[1], e[2], e[3]) for e in env.log._events]
    assert kinds == [("all_reduce", "[[0, 1]]", f"[({quarter},)]", "torch.float32"),  # the last gradient first
                     ("all_reduce", "[[0, 1]]", f"[({big},)]", "torch.float32"),  # over the cap: alone
                     ("all_reduce", "[[0, 1]]", f"[({quarter},)]", "torch.float32"),
                     ("all_reduce", "[[0, 1]]", f"[({quarter},)]", "torch.bfloat16")]
    assert coalescing_buckets([torch.empty(quarter), torch.empty(big), torch.empty(quarter)], 1) == [[0, 1], [2]]
    assert coalescing_buckets([torch.empty(quarter)] * 5, 1) == [[0, 1, 2, 3], [4]]
