"""NxD's move of a model to the XLA device, as torch's ``Module.to`` does it there (NxD v2.28.0, torch-xla 2.9).

On the double the "device" is the CPU, where ``module.to(<device>)`` would keep every Parameter and buffer
object. On XLA it does not: ``Module._apply`` (torch/nn/modules/module.py) keeps a Parameter object only when
``torch._has_compatible_shallow_copy_type(param, moved)`` holds, which it does not for a CPU tensor and an XLA
one, so every parameter becomes a new ``Parameter`` (``Parameter(moved, param.requires_grad)``) without the
Python attributes of the old one, every buffer a new tensor, and two modules that shared a Parameter hold two.
NxD therefore wraps its move (``utils/model_utils.py`` ``move_model_to_device``, lines 232-235) in

- ``preserve_parallel_attributes`` (lines 164-202): by parameter name, it puts back ``tensor_model_parallel``
  (with ``partition_dim``, ``partition_stride`` and ``num_partitions``, through
  ``set_tensor_model_parallel_attributes``: ``rank_ordering`` comes back None), ``expert_model_parallel``,
  ``sequence_parallel_enabled`` and ``shared``, and nothing else;
- ``preserve_shared_weights`` (lines 147-161): a transformers ``PreTrainedModel`` is re-tied with its own
  ``tie_weights()``; any other module by the names ``analyze_shared_parameters`` found before the move
  (lines 48-95: every ``_parameters`` entry reached twice), the later uses set to the first one's module
  attribute.

`move_model_to_device` does the same, so a Parameter object or attribute our code kept from before the move is
not the model's afterwards, and a tie our model cannot restore comes apart. Every parameter and buffer it moved
carries `env.ON_XLA_DEVICE`; a buffer registered after the move from a tensor our code made on the host
(`xla_host.MADE_ON_HOST`) is a host tensor in the steps (`xla_host.mark_buffers_left_on_the_host`, called when a
step begins), where torch-xla's rules for host operands apply to it.

Not modelled: parameter gradients at the move (NxD moves models before any backward), and a module reached
twice in the module tree (``_apply`` would convert it twice).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .env import ON_XLA_DEVICE
# What ``preserve_parallel_attributes`` restores (model_utils.py 177-202); the partition details come back with
# ``tensor_model_parallel`` only.
TP_ATTRIBUTES = ("tensor_model_parallel", "partition_dim", "partition_stride", "num_partitions")
OTHER_PRESERVED = ("expert_model_parallel", "sequence_parallel_enabled", "shared")


def move_model_to_device(module: nn.Module) -> None:
    """NxD's ``move_model_to_device`` over torch's XLA ``Module.to``: new parameters and buffers, NxD's attributes
    put back by name, shared parameters re-tied (see the module docstring)."""
    kept = {name: {a: getattr(p, a) for a in (*TP_ATTRIBUTES, *OTHER_PRESERVED) if hasattr(p, a)}
            for name, p in module.named_parameters()}
    hf = _is_pretrained_model(module)
    shared = None if hf else shared_parameter_names(module)
    _convert(module)
    if hf:
        module.tie_weights()
    else:
        for names in shared:
            first = _by_path(module, names[0])
            for path in names[1:]:
                owner, _, attribute = path.rpartition(".")
                setattr(_by_path(module, owner) if owner else module, attribute, first)
    for name, param in module.named_parameters():
        attributes = kept.get(name, {})
        if "tensor_model_parallel" in attributes and not hasattr(param, "tensor_model_parallel"):
            # ``set_tensor_model_parallel_attributes(param, *values)``: rank_ordering comes back None
            for attribute in TP_ATTRIBUTES:
                setattr(param, attribute, attributes[attribute])
            param.rank_ordering = None
        for attribute in OTHER_PRESERVED:
            if attribute in attributes and not hasattr(param, attribute):
                setattr(param, attribute, attributes[attribute])
        setattr(param, ON_XLA_DEVICE, True)
    for buffer in module.buffers():
        setattr(buffer, ON_XLA_DEVICE, True)


def shared_parameter_names(module: nn.Module) -> list[list[str]]:
    """NxD's ``analyze_shared_parameters`` (model_utils.py 48-70): the names of every Parameter reached through
    more than one ``_parameters`` entry, in module order."""
    uses: dict[int, list[str]] = {}
    for prefix, owner in module.named_modules(remove_duplicate=False):
        for name, param in owner._parameters.items():
            if param is not None:
                uses.setdefault(id(param), []).append(f"{prefix}.{name}" if prefix else name)
    return [names for names in uses.values() if len(names) > 1]


def _convert(module: nn.Module) -> None:
    """``Module._apply`` with an XLA destination: each module's parameters and buffers become new objects."""
    for owner in module.modules():
        for key, param in owner._parameters.items():
            if param is not None:
                owner._parameters[key] = nn.Parameter(param.detach().clone(), param.requires_grad)
        for key, buffer in owner._buffers.items():
            if buffer is not None:
                owner._buffers[key] = buffer.detach().clone()


def _by_path(module: nn.Module, path: str) -> Any:
    for name in path.split("."):
        module = getattr(module, name)
    return module


def _is_pretrained_model(module: nn.Module) -> bool:
    """NxD's ``is_hf_pretrained_model`` (model_utils.py 98-99)."""
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency of the package
        return False
    return isinstance(module, PreTrainedModel)
