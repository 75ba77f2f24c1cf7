"""Pipeline parallelism and ZeRO-1 on Trainium through NxD's trainer API (NxD 0.17).

Three functions wrap ``neuronx_distributed.trainer``: `nxd_config` builds NxD's
training config from the recipe's ``parallel.*`` keys, `build_nxd_model` builds the
model through `NxDTensorParallelFactory` and hands it to ``initialize_parallel_model``
(which wraps it in ``NxDPPModel`` when ``pp > 1``), and `build_nxd_optimizer` builds
AdamW over the project's decay / no-decay parameter groups with
``initialize_parallel_optimizer`` (NxD's ZeRO-1 optimizer when ``parallel.zero1``).
NxD is imported lazily, through `bmojo_neuron.neuron.import_neuron_module`: without
Neuron every function raises `NeuronUnavailableError` naming what to install.

Status: wiring only, tested with a test double of NxD's module API; never run on
Trainium hardware.

Argument names checked against NxD's public source, repository
``aws-neuron/neuronx-distributed`` at commit ``0598cd8bfc046daf1105b79acd283ff5b6db657e``:

- ``src/neuronx_distributed/trainer/__init__.py`` exports ``neuronx_distributed_config``,
  ``initialize_parallel_model``, ``initialize_parallel_optimizer``;
- ``src/neuronx_distributed/trainer/trainer.py``:
  ``neuronx_distributed_config(tensor_parallel_size, pipeline_parallel_size,
  expert_parallel_size, pipeline_config, optimizer_config, activation_checkpoint_config,
  pad_model, sequence_parallel, model_init_config, lora_config, mixed_precision_config)``;
  optimizer_config keys ``zero_one_enabled``, ``grad_clipping``, ``max_grad_norm``;
  mixed_precision_config keys ``use_master_weights``, ``use_fp32_grad_acc``,
  ``use_master_weights_in_ckpt`` (master weights / fp32 accumulation without ZeRO-1
  raise there); ``activation_checkpoint_config`` may be ``"full"`` or module classes;
  ``initialize_parallel_model(nxd_config, model_fn, *args, **kwargs)``;
  ``initialize_parallel_optimizer(nxd_config, optimizer_class, parameters, **defaults)``;
- ``src/neuronx_distributed/pipeline/model.py``: ``NxDPPModel(module, transformer_layer_cls,
  num_microbatches, output_loss_value_spec, input_names, auto_partition, ...)`` (the
  ``pipeline_config`` keys);
- ``src/neuronx_distributed/utils/serialization.py``: ``find_loss_from_output_and_spec``
  needs a dict spec with exactly the output's keys (see `loss_value_spec`).

Not confirmed: that this commit is the 0.17 release (0.17.26814 ships on the Neuron pip
index, not on GitHub with a tag we could read); names may differ in 0.17.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..neuron import import_neuron_module
from .pipeline import check_pipeline_config

FEATURE = "pipeline parallelism and ZeRO-1 on Trainium"
INPUT_NAMES = ["input_ids", "labels"]


def _trainer() -> Any:
    return import_neuron_module("neuronx_distributed.trainer", FEATURE)


def loss_value_spec(model_config: Any) -> dict[str, bool]:
    """NxD's ``output_loss_value_spec`` for ``BMojoForCausalLM(input_ids, labels=...)``.

    The output is a `BMojoCausalLMOutput` (a dict without its None fields): ``loss``,
    ``logits``, ``lm_loss``, and ``aux_loss`` when the model has B (eidetic memory)
    layers. NxD requires the spec's keys to equal the output's keys.
    """
    spec = {"loss": True, "logits": False, "lm_loss": False}
    if any(model_config.layer_kind(i) == "B" for i in range(model_config.num_hidden_layers)):
        spec["aux_loss"] = False
    return spec


def nxd_config(
    parallel: Any,
    activation_checkpointing: bool,
    mixed_precision: bool,
    *,
    model_config: Any = None,
    max_grad_norm: float = 1.0,
) -> dict:
    """NxD's training config for a recipe's ``parallel`` section (``tp``, ``pp``, ``sp``, ``zero1``, ``microbatches``).

    `model_config` (a `BMojoConfig`) is needed when ``pp > 1`` (the loss spec depends on
    the layer pattern). ``max_grad_norm`` 0 turns clipping off (``optim.grad_clip: 0``).
    `mixed_precision` (bf16) with ZeRO-1 keeps fp32 master weights and fp32 gradient
    accumulation in the optimizer; NxD allows neither without ZeRO-1.
    """
    trainer = _trainer()
    from ..layers.decoder import BMojoDecoderLayer

    if max_grad_norm < 0:
        raise ValueError(f"optim.grad_clip must be >= 0, got {max_grad_norm}")
    pipeline_config = None
    if parallel.pp > 1:
        if model_config is None:
            raise ValueError("nxd_config with parallel.pp > 1 needs model_config (the model's BMojoConfig)")
        pipeline_config = {
            "transformer_layer_cls": BMojoDecoderLayer,
            "num_microbatches": parallel.microbatches,
            "output_loss_value_spec": loss_value_spec(model_config),
            "input_names": list(INPUT_NAMES),
            "auto_partition": True,
        }
    elif parallel.microbatches != 1:
        raise ValueError("parallel.microbatches only applies to pipeline parallelism; use train.grad_accum")
    zero1 = bool(parallel.zero1)
    master = zero1 and bool(mixed_precision)
    return trainer.neuronx_distributed_config(
        tensor_parallel_size=parallel.tp,
        pipeline_parallel_size=parallel.pp,
        pipeline_config=pipeline_config,
        optimizer_config={"zero_one_enabled": zero1, "grad_clipping": max_grad_norm > 0,
                          "max_grad_norm": float(max_grad_norm)},
        sequence_parallel=bool(getattr(parallel, "sp", False)),  # NxD's optimizer then sums the norms' grads over tp
        activation_checkpoint_config=BMojoDecoderLayer if activation_checkpointing else None,
        mixed_precision_config={"use_master_weights": master, "use_fp32_grad_acc": master,
                                "use_master_weights_in_ckpt": False},
    )


def build_nxd_model(config: Any, nxd_cfg: dict, *, one_device_init: bool = False) -> nn.Module:
    """``initialize_parallel_model`` over a `BMojoForCausalLM` built with NxD's tensor-parallel layers.

    The model is built inside NxD's ``model_fn`` (after NxD initialises its parallel
    state, which `NxDTensorParallelFactory` reads). ``pp > 1`` needs untied embeddings.
    `one_device_init` first builds the whole one-device model (on CPU, from the current
    torch RNG state) and loads this tensor rank's shard of it, so every tp degree
    starts from the weights a one-process run would (NxD's layers initialise their
    own way otherwise); the RNG is left as if only that model had been built.
    """
    trainer = _trainer()
    check_pipeline_config(config, nxd_cfg["pipeline_parallel_size"])

    def model_fn() -> nn.Module:
        from .. import BMojoForCausalLM
        from ..layers.factory import use_layer_factory
        from .nxd import NxDTensorParallelFactory

        full = BMojoForCausalLM(config) if one_device_init else None
        after_init = torch.get_rng_state()
        factory = NxDTensorParallelFactory(sequence_parallel=nxd_cfg.get("sequence_parallel", False))
        with use_layer_factory(factory):
            model = BMojoForCausalLM(config)
        if full is not None:
            from .checkpoint_format import load_into
            from .sharding import shard_state_dict

            torch.set_rng_state(after_init)
            shapes = {k: v.shape for k, v in model.state_dict().items()}
            load_into(model, shard_state_dict(full.state_dict(), shapes, factory.tp_rank, factory.tp_size),
                      "the tensor shard of the one-device initialisation")
        return model

    return trainer.initialize_parallel_model(nxd_cfg, model_fn)


def build_nxd_optimizer(model: nn.Module, nxd_cfg: dict, optim_section: Any) -> Any:
    """AdamW over `bmojo_neuron.training.optim.parameter_groups`, wrapped by NxD (ZeRO-1 when configured)."""
    trainer = _trainer()
    from ..training.optim import parameter_groups

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
    return trainer.initialize_parallel_optimizer(
        nxd_cfg, torch.optim.AdamW, parameter_groups(model, o.weight_decay),
        lr=o.lr, betas=(b1, b2), eps=o.eps, weight_decay=o.weight_decay, **extra,
    )


__all__ = ["build_nxd_model", "build_nxd_optimizer", "loss_value_spec", "nxd_config"]
