"""Test doubles of the Neuron stack, for a machine without Neuron (one module per fake).

They mirror the pinned SDK 2.28 stack: NeuronX Distributed (NxD) 0.17 as in
``aws-neuron/neuronx-distributed`` tag ``v2.28.0`` and torch-xla 2.9 as in
``pytorch/xla`` tag ``v2.9.0``, wherever our code depends on their behaviour.

- `nxd_layers`: NxD's tensor-parallel layers, mappings, loss and grads over a
  one-rank or a gloo tensor-parallel group (dtype casts, in-place loss and all-reduce);
- `nxd_api`: NxD's ``parallel_layers`` module API in one process at tensor-parallel
  size 1, recording every layer built; and a spy of ``neuronx_distributed.trainer``
  that records its calls.
- `nxd_runtime`: NxD's trainer for the Neuron training loop (``NxDModel``,
  ``NxDOptimizer`` with its data-parallel reduction, ZeRO-1 over the data groups, parallel
  state over gloo with NxD's replica groups, ``parallel_layers.utils``).
- `nxd_pp`: NxD's ``NxDPPModel`` (pipeline parallelism), one stage per process over gloo.
- `nxd_gloo`: NxD's tensor-parallel layers and collectives over gloo (tp = world size).
- `xla`: torch-xla's ``xla_model``, ``runtime``, ``MpDeviceLoader`` and ``"xla"``
  backend on the CPU, syncs and step closures recorded.
- `xla_host`: the host tensors our code makes inside a step (and the tensor attributes NxD's
  move leaves on the host, and what ``torch.load`` reads in a Neuron run), what torch-xla does
  when a step's op mixes one with device tensors (its error, or a recorded copy), and the
  device values our code reads back in a step.
- `env`: what the torch-xla and NxD doubles share (the log of what they saw, the graphs
  each rank cut, NxD's grid);
- `mpmd`: whether ranks cut the same graphs (one program per pipeline stage);
- `neuron_sdk`: `install(monkeypatch)` puts the torch-xla and NxD doubles into
  ``sys.modules`` under the SDK's import names.

Every callable has the real signature at the pins (``tests/test_doubles.py`` holds them);
docs/trn1.md ("How faithful the doubles are") says what they do not model.
"""
