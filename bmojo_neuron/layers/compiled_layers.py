"""An optional `torch.compile` of the decoder layers for training (``train.compile: true``; off by default).

The reference ops (chunked SSD, eidetic attention) are many small tensor ops; on CUDA
each is a kernel launch, so a train step is bound by launches, not arithmetic. Compiled
with inductor (Triton kernels on CUDA, C++ on CPU), the element-wise chains fuse.

Granularity: one decoder layer. A layer's forward compiles whole (``fullgraph=True``,
static shapes), the model around it (embedding, loss, the layer loop) stays eager, and
one compiled function serves every layer: the layer is an argument whose parameters are
graph inputs, so a model gets one graph per layer kind (B, F, M, ...), not per layer.
Only the training call compiles: a layer in training mode, with gradients on, without a
cache or padding (``start == 0``). Evaluation, length generalisation and decoding run the
eager forward, so they never recompile for their shapes. The parameters, their names and
the state dict are the model's own: checkpoints and exports do not change.

Compiling happens on the first training step (tens of seconds; again for a new batch
shape). It is never required: when torch.compile is missing or unsupported here the
layers stay eager with one warning, and the trainer runs its first step again eagerly,
with one warning, when compiling or running the compiled graph fails (`disable`).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..ops import dispatch
from .decoder import BMojoDecoderLayer


BACKEND_ENV = "BMOJO_COMPILE_BACKEND"  # torch.compile's backend; ``eager`` captures graphs without code generation


def default_backend() -> str:
    """torch.compile's backend for compiled training: ``$BMOJO_COMPILE_BACKEND``, else ``inductor``.

    ``eager`` (what the tests use) checks that the layers compile whole, in seconds,
    without generating kernels.
    """
    return os.environ.get(BACKEND_ENV) or "inductor"


def _layer_forward(layer: BMojoDecoderLayer, hidden_states: Tensor) -> tuple[Tensor, Tensor | None]:
    """The eager forward of `layer` on a whole sequence (what gets compiled)."""
    return BMojoDecoderLayer.forward(layer, hidden_states)


def compile_unavailable() -> str | None:
    """Why torch.compile cannot run here (None: it can)."""
    if not hasattr(torch, "compile"):
        return f"torch {torch.__version__} has no torch.compile"
    try:
        import torch._dynamo as dynamo
    except Exception as exc:  # noqa: BLE001 - a broken install is "unavailable", not a crash
        return f"torch._dynamo does not import ({type(exc).__name__}: {exc})"
    if not dynamo.is_dynamo_supported():
        return "torch.compile does not support this Python or platform"
    return None


class CompiledLayers:
    """The decoder layers of `model` routed through one `torch.compile`d forward while training.

    `backend` is torch.compile's (default `default_backend`): ``"inductor"`` generates
    kernels; ``"eager"`` only captures the graph.
    """

    def __init__(self, model: nn.Module, backend: str | None = None) -> None:
        self.layers = [m for m in model.modules() if isinstance(m, BMojoDecoderLayer)]
        self.backend = backend = backend or default_backend()
        self.compiled: Callable[..., Any] | None = None
        self.active = False
        if not self.layers:
            raise ValueError("compiled layers: the model has no B'MOJO decoder layers")
        reason = compile_unavailable()
        if reason is not None:
            warnings.warn(f"train.compile: {reason}; training eagerly", RuntimeWarning, stacklevel=2)
            return
        # The ops dispatch fills its table lazily on the first lookup; filled now, the compiled
        # graph does not see it change (which would cost one needless recompile).
        for op in dispatch.OP_NAMES:
            dispatch.get_backend(op)
        self.compiled = torch.compile(_layer_forward, fullgraph=True, dynamic=False, backend=backend)
        for layer in self.layers:
            layer.forward = self._forward_of(layer)  # an instance attribute: the class and state dict are untouched
        self.active = True

    def _forward_of(self, layer: BMojoDecoderLayer) -> Callable[..., tuple[Tensor, Tensor | None]]:
        eager = BMojoDecoderLayer.forward.__get__(layer)

        def forward(hidden_states: Tensor, start: int = 0, cache: Any = None,
                    real_tokens: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
            if (self.active and layer.training and torch.is_grad_enabled() and start == 0 and cache is None
                    and real_tokens is None):
                return self.compiled(layer, hidden_states)
            return eager(hidden_states, start, cache, real_tokens)

        forward.__doc__ = BMojoDecoderLayer.forward.__doc__
        return forward

    def disable(self, exc: BaseException) -> None:
        """Run eagerly from now on, with one warning naming `exc` (the compiler's failure)."""
        if not self.active:
            return
        self.active = False
        for layer in self.layers:
            layer.__dict__.pop("forward", None)
        warnings.warn(f"train.compile: torch.compile failed, training eagerly ({type(exc).__name__}: "
                      f"{str(exc).splitlines()[0] if str(exc) else ''})", RuntimeWarning, stacklevel=2)


def compile_layers(model: nn.Module, backend: str | None = None) -> CompiledLayers:
    """Route `model`'s decoder layers through torch.compile while training (see the module docstring)."""
    return CompiledLayers(model, backend)
