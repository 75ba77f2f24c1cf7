"""What NeuronX Distributed 0.17 needs from transformers 4 that transformers 5 no longer has, and an
optional import of NxD's that must not break ours.

NxD 0.17 (SDK 2.28; ``aws-neuron/neuronx-distributed`` tag ``v2.28.0``,
``src/neuronx_distributed/pipeline/trace.py``) runs, at ``import neuronx_distributed``,
``from transformers.utils.fx import HFTracer`` whenever transformers is installed,
and subclasses it (``class HFTracerWrapper(NxDTracer, HFTracer)``). transformers 5
removed ``transformers.utils.fx`` (huggingface/transformers#41683), so with the
transformers this project needs, importing NxD fails before any of it runs.

`provide_transformers_fx` registers a stand-in module whose ``HFTracer`` is a plain
``torch.fx.Tracer`` subclass. NxD only uses ``HFTracerWrapper`` to trace a Hugging
Face ``PreTrainedModel`` when no tracer is named; the pipeline wiring here traces its
own (non-HF) module and names ``tracer_cls="torch"`` (`bmojo_neuron.parallel.nxd_training`),
so the stand-in is never used to trace. `bmojo_neuron.neuron` calls it before it first
imports ``neuronx_distributed`` (every NxD import goes through `import_neuron_module`).

NxD 0.17 also tries, at import (``utils/model_utils.py``), ``from
neuronx_distributed_training.models.megatron.module import MegatronModule`` and only
catches ``ImportError``. NxD Training pulls in NeMo, which can fail to import under
transformers 5 with other exceptions, and nothing here uses it (NxD only needs it for
``activation_checkpoint_config="full"`` on NxDT models). `hide_nxd_training` makes that
import an ``ImportError`` unless NxD Training was already imported on purpose, so an
installation that happens to include it (a Neuron DLAMI environment) cannot break ours.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

FX_MODULE = "transformers.utils.fx"
NXD_TRAINING = "neuronx_distributed_training"


def hide_nxd_training() -> bool:
    """Make NxD's optional ``import neuronx_distributed_training`` raise ImportError (``None`` in
    ``sys.modules``) unless it was already imported; True if it did."""
    if NXD_TRAINING in sys.modules:
        return False
    sys.modules[NXD_TRAINING] = None  # type: ignore[assignment]  # "import of ... halted": a ModuleNotFoundError
    return True


def provide_transformers_fx() -> bool:
    """Register the ``transformers.utils.fx`` stand-in when NxD is installed and transformers lacks the
    module; True if it did."""
    if "neuronx_distributed" not in sys.modules and importlib.util.find_spec("neuronx_distributed") is None:
        return False  # nothing will import it
    try:
        importlib.import_module(FX_MODULE)
        return False
    except ModuleNotFoundError as error:
        if error.name not in (FX_MODULE, "transformers"):
            raise
        if error.name == "transformers":
            return False  # no transformers at all: NxD skips the import itself
    import torch.fx
    import transformers.utils

    class HFTracer(torch.fx.Tracer):
        """Stand-in for transformers 4's ``HFTracer`` (removed in transformers 5); never used to trace here."""

    module = types.ModuleType(FX_MODULE, "Stand-in registered by bmojo_neuron.nxd_compat for NxD 0.17.")
    module.HFTracer = HFTracer
    sys.modules[FX_MODULE] = module
    transformers.utils.fx = module
    return True
