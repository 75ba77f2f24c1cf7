"""Benchmarks of B'MOJO against the Hugging Face models a user would pick instead.

`bmojo-neuron bench SUITE` (``bmojo_neuron/commands/bench.py``) runs one suite and
writes a JSON report and a PNG plot; ``docs/benchmarks.md`` explains the method.

* `candidates`: the models, built locally at matched parameter count;
* `harness`: probes under a time cap (forked child), peak memory, alternating timing;
* `suites`: ``train-step``, ``scaling``, ``decode``, ``kernels``;
* `plot`: one PNG per report.

Imports torch lazily: nothing heavy happens until a suite runs.
"""

from __future__ import annotations

SUITES = ("train-step", "scaling", "decode", "kernels")

__all__ = ["SUITES"]
