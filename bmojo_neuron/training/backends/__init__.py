"""The training backends: `local`, `torchrun` and `neuron` (see `bmojo_neuron.training.backend`)."""
