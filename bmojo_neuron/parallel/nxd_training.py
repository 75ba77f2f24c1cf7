"""Pipeline parallelism and ZeRO-1 on Trainium through NxD's trainer API (NxD 0.17).

Three functions wrap ``neuronx_distributed.trainer``: `nxd_config` builds NxD's
training config from the recipe's ``parallel.*`` keys, `build_nxd_model` builds the
model through `NxDTensorParallelFactory` and hands it to ``initialize_parallel_model``
(which wraps it in ``NxDPPModel`` when ``pp > 1``: then the model handed over is the
trace-friendly `bmojo_neuron.parallel.nxd_pipeline.PipelineCausalLM`), and
`build_nxd_optimizer` builds AdamW over the trainer's decay / no-decay parameter
groups with ``initialize_parallel_optimizer`` (NxD's ZeRO-1 optimizer when
``parallel.zero1``). NxD is imported lazily, through
`bmojo_neuron.neuron.import_neuron_module`: without Neuron every function raises
`NeuronUnavailableError` naming what to install.

The NxD API this follows (argument names, what each call does at NxD 0.17) and the
upstream files it was read from are listed in docs/trn1.md ("Sources and status").
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..layers.decoder import BMojoDecoderLayer
from ..layers.factory import use_layer_factory
from ..layers.norms import RMSNorm
from ..modeling_bmojo import BMojoForCausalLM
from ..neuron import import_neuron_module
from .nxd import NxDTensorParallelFactory, check_nxd_dtypes
from .nxd_pipeline import INPUT_NAMES, LOSS_SPEC, PipelineCausalLM, PipelineDecoderLayer, pipeline_cuts
from .one_device_init import one_device_shard
from .pipeline import check_pipeline_config

FEATURE = "pipeline parallelism and ZeRO-1 on Trainium"


def _trainer() -> Any:
    return import_neuron_module("neuronx_distributed.trainer", FEATURE)


def nxd_microbatches(parallel: Any, grad_accum: int) -> int:
    """NxD's ``num_microbatches`` under pp: ``parallel.microbatches`` per accumulated micro-batch, times
    ``train.grad_accum`` (one ``run_train`` per optimizer step, see `pipeline_config`)."""
    return parallel.microbatches * grad_accum


def pipeline_config(parallel: Any, model_config: Any, grad_accum: int = 1) -> dict[str, Any]:
    """``NxDPPModel``'s arguments for `PipelineCausalLM` (see `bmojo_neuron.parallel.nxd_pipeline`).

    - cuts after the last layer of each `split_layers` block (named, not NxD's
      ``auto_partition``, whose uneven splits differ);
    - the decoder layers, our RMSNorm (its parameter would otherwise be read by the
      traced top level, which NxD cannot pass between stages) and NxD's parallel
      layers are leaf calls; the functions of NxD's ``mappings`` and ``loss_functions``
      modules (the factory calls them: autograd Functions that cannot take an FX proxy)
      are leaf calls through ``autowrap_modules``, as in NxD's Llama example;
    - one ``run_train`` per optimizer step over all of its rows: ``train.grad_accum``
      becomes more NxD micro-batches. NxD reduces shared (tied) gradients at the end of
      every ``run_train``, so accumulating over several calls would sum them twice;
    - the loss stays on the device (``return_loss_on_cpu=False``: no host sync in a step);
    - gradients are averaged over data ranks once, by NxD's optimizer wrapper.
    """
    mappings = import_neuron_module("neuronx_distributed.parallel_layers.mappings", FEATURE)
    loss_functions = import_neuron_module("neuronx_distributed.parallel_layers.loss_functions", FEATURE)
    return {
        "transformer_layer_cls": PipelineDecoderLayer,
        "num_microbatches": nxd_microbatches(parallel, grad_accum),
        "output_loss_value_spec": LOSS_SPEC,
        "input_names": list(INPUT_NAMES),
        "pipeline_cuts": pipeline_cuts(model_config.num_hidden_layers, parallel.pp),
        "auto_partition": False,
        "leaf_module_cls": [RMSNorm.__name__],
        "autowrap_modules": [mappings, loss_functions],
        "tracer_cls": "torch",
        "return_loss_on_cpu": False,
        "use_zero1_optimizer": bool(parallel.zero1),
        "use_optimizer_wrapper": True,
    }


def nxd_config(
    parallel: Any,
    activation_checkpointing: bool,
    mixed_precision: bool,
    *,
    model_config: Any = None,
    max_grad_norm: float = 1.0,
    grad_accum: int = 1,
) -> dict:
    """NxD's training config for a recipe's ``parallel`` section (``tp``, ``pp``, ``sp``, ``zero1``, ``microbatches``).

    `model_config` (a `BMojoConfig`) is needed when ``pp > 1`` (the stage cuts depend on
    the layer count), and so is ``train.grad_accum`` (see `pipeline_config`).
    ``max_grad_norm`` 0 turns clipping off (``optim.grad_clip: 0``). `mixed_precision`
    (bf16) with ZeRO-1 keeps fp32 master weights and fp32 gradient accumulation in the
    optimizer; NxD allows neither without ZeRO-1.
    """
    trainer = _trainer()
    if max_grad_norm < 0:
        raise ValueError(f"optim.grad_clip must be >= 0, got {max_grad_norm}")
    pipeline = None
    if parallel.pp > 1:
        if model_config is None:
            raise ValueError("nxd_config with parallel.pp > 1 needs model_config (the model's BMojoConfig)")
        pipeline = pipeline_config(parallel, model_config, grad_accum)
    elif parallel.microbatches != 1:
        raise ValueError("parallel.microbatches only applies to pipeline parallelism; use train.grad_accum")
    zero1 = bool(parallel.zero1)
    master = zero1 and bool(mixed_precision)
    return trainer.neuronx_distributed_config(
        tensor_parallel_size=parallel.tp,
        pipeline_parallel_size=parallel.pp,
        pipeline_config=pipeline,
        optimizer_config={"zero_one_enabled": zero1, "grad_clipping": max_grad_norm > 0,
                          "max_grad_norm": float(max_grad_norm)},
        sequence_parallel=bool(getattr(parallel, "sp", False)),  # NxD's optimizer then sums the norms' grads over tp
        activation_checkpoint_config=BMojoDecoderLayer if activation_checkpointing else None,  # subclasses too
        mixed_precision_config={"use_master_weights": master, "use_fp32_grad_acc": master,
                                "use_master_weights_in_ckpt": False},
    )


def build_nxd_model(config: Any, nxd_cfg: dict, *, dtype: torch.dtype = torch.float32,
                    one_device_init: bool = False, count_correct: bool = False,
                    start_weights: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """``initialize_parallel_model`` over a `BMojoForCausalLM` built with NxD's tensor-parallel layers.

    The model is built inside NxD's ``model_fn`` (after NxD initialises its parallel
    state, which `NxDTensorParallelFactory` reads), in `dtype`: NxD's layers are built
    for it (their output dtype depends on it, see `bmojo_neuron.parallel.nxd`) and the
    rest is cast, on the host, before NxD moves it to the device. `one_device_init`
    loads this tensor rank's shard of the whole one-device model built from the current
    torch RNG state, so every tp degree starts from the weights a one-process run would
    (NxD's layers initialise their own way otherwise); the ranks of a node build that
    model in waves (`bmojo_neuron.parallel.one_device_init`), and the RNG is left as if only it had been
    built. `start_weights` (the whole model's, from ``init.weights``, names and shapes
    checked by the caller) replace that initialisation before it is sharded. With ``pp > 1`` NxD gets the
    model as a `PipelineCausalLM` (`count_correct`: its stats count right answers, for MQAR); a tied
    embedding stays one Parameter, which NxD shares between the first and last stage.
    """
    trainer = _trainer()
    pp = nxd_cfg["pipeline_parallel_size"]
    check_pipeline_config(config, pp)

    def model_fn() -> nn.Module:
        before = torch.get_rng_state()
        factory = NxDTensorParallelFactory(sequence_parallel=nxd_cfg.get("sequence_parallel", False), dtype=dtype)
        with use_layer_factory(factory):
            model = BMojoForCausalLM(config)
        if one_device_init:
            one_device_shard(model, config, factory.tp_rank, factory.tp_size, before, start_weights)
        model.to(dtype)
        check_nxd_dtypes(model, dtype)
        if pp == 1:
            return model
        return PipelineCausalLM(model, count_correct=count_correct)

    return trainer.initialize_parallel_model(nxd_cfg, model_fn)


def build_nxd_optimizer(param_groups: list[dict], nxd_cfg: dict, optim_section: Any) -> Any:
    """AdamW over `param_groups` (the trainer's decay / no-decay groups), wrapped by NxD (ZeRO-1 when
    configured); lr, betas, eps and weight decay from the recipe's ``optim`` section."""
    trainer = _trainer()
    o = optim_section
    if o.lr <= 0 or o.weight_decay < 0:
        raise ValueError(f"need optim.lr > 0 and optim.weight_decay >= 0, got {o.lr}, {o.weight_decay}")
    b1, b2 = (float(b) for b in o.betas)
    extra = {}
    optimizer_config = nxd_cfg.get("optimizer_config") or {}
    if optimizer_config.get("zero_one_enabled") and optimizer_config.get("grad_clipping"):
        # NxD 0.17 does not hand optimizer_config["max_grad_norm"] to its ZeRO-1 optimizer (torch-xla's
        # ZeroRedundancyOptimizer then clips at its default 1.0); its `max_norm` argument comes through
        # these keyword defaults. Without ZeRO-1 the defaults go to AdamW, which has no such argument.
        extra["max_norm"] = float(optimizer_config["max_grad_norm"])
    # capturable: AdamW keeps `step` on the device and computes its bias corrections there, so the update graph
    # is the same at every update. Without it they are Python floats in the update's ops, and torch-xla makes a
    # float that is exactly 0 or ±1 a constant of the graph (torch's IsSpecialScalar), any other device data:
    # `bias_correction2 ** 0.5` turns 1.0 at update 709 with beta2 = 0.95, a second graph and a recompile (docs/trn1.md).
    # torch's single-tensor AdamW accepts an XLA parameter with it (optim/adam.py `_single_tensor_adam`,
    # `_get_capturable_supported_devices` lists "xla"); NxD and torch-xla's ZeRO-1 hand it to AdamW with the
    # other keywords (trainer.py 296-310; zero_redundancy_optimizer.py 138).
    return trainer.initialize_parallel_optimizer(
        nxd_cfg, torch.optim.AdamW, param_groups,
        lr=o.lr, betas=(b1, b2), eps=o.eps, weight_decay=o.weight_decay, capturable=True, **extra,
    )


__all__ = ["build_nxd_model", "build_nxd_optimizer", "nxd_config", "nxd_microbatches", "pipeline_config"]
