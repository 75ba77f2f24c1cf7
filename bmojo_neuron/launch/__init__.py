"""Launch planning for Trn1: what `bmojo-neuron plan` prints, without running anything.

`memory` estimates the HBM one NeuronCore needs; `plan` validates the shapes against
Trainium's tiling rules and builds the torchrun / srun lines, environment and rank layout.
"""

from bmojo_neuron.launch.memory import NEURONCORE_HBM_BYTES, MemoryEstimate, estimate_memory
from bmojo_neuron.launch.plan import INSTANCES, LaunchPlan, build_plan, validate_for_trainium

__all__ = ["INSTANCES", "NEURONCORE_HBM_BYTES", "LaunchPlan", "MemoryEstimate", "build_plan",
           "estimate_memory", "validate_for_trainium"]
