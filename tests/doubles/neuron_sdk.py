"""The Neuron SDK on a machine without Neuron: `install` puts the torch-xla and NxD doubles in ``sys.modules``.

Under the real import names (``torch_xla.core.xla_model``,
``torch_xla.distributed.parallel_loader``, ``neuronx_distributed.trainer``,
``...parallel_layers.parallel_state`` ...), so `bmojo_neuron.neuron.import_neuron_module`
finds them as it would find the SDK; ``torch_neuronx``, ``neuronxcc`` and ``nki``
import too. What the doubles do: `doubles.xla`, `doubles.nxd_runtime`, `doubles.nxd_pp`.
"""

from __future__ import annotations

import sys
from typing import Any

from .env import Env, XlaLog, fake_module
from .nxd_runtime import nxd_modules
from .xla import host_reads_in_steps, xla_modules

__all__ = ["host_reads_in_steps", "install"]


def install(monkeypatch: Any) -> XlaLog:
    """Put every double into ``sys.modules`` (undone with `monkeypatch`); returns their shared log.

    ``transformers.utils.fx`` is hidden, as in transformers 5 (NxD 0.17 imports it; see
    `bmojo_neuron.nxd_compat`), and whatever stands in for it is removed afterwards.
    """
    import transformers.utils

    env = Env(XlaLog())
    modules = {**xla_modules(env), **nxd_modules(env)}
    for name in ("torch_neuronx", "neuronxcc", "nki"):  # present and importable: the SDK "is installed"
        modules[name] = fake_module(name, __version__="double")
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setitem(sys.modules, "transformers.utils.fx", None)  # None: "not importable"
    monkeypatch.setattr(transformers.utils, "fx", None, raising=False)
    env.log.env = env
    return env.log
