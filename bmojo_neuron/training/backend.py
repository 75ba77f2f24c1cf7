"""What the training loop needs from the machine it runs on: the `Backend` protocol, and choosing one.

The loop (`bmojo_neuron.training.trainer`) is written once; a backend says how each of
its steps happens here:

==============  ===========================================================================
``local``       one process on CPU or CUDA (`backends/local.py`)
``torchrun``    tensor / sequence / data / pipeline parallelism and ZeRO-1 on torch.distributed,
                one process per rank (`backends/torchrun.py`)
``neuron``      Trainium through torch-xla and NeuronX Distributed (`backends/neuron.py`)
==============  ===========================================================================

Every backend reproduces the one-process run on the same recipe: same initial
weights, same batches (``train.batch_size`` is the global micro-batch), same losses.
A step's numbers are device tensors until `finish_step` reads them, which on an XLA
device happens after the step's graph ran (a step closure), never inside it.
`finish_step` also settles whether every process stops after the step (`agree_to_stop`
answers the same question at once, where a host round trip costs nothing that matters).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, Sequence

import torch
from torch import Tensor, nn

from bmojo_neuron.checkpoints.state import Checkpoint, TrainerState
from bmojo_neuron.evaluation import LengthResult

from .backends.local import LocalBackend
from .backends.neuron import NeuronBackend
from .backends.torchrun import TorchrunBackend, wants_parallel
from .objective import Objective, objective_for


class Backend(Protocol):
    """One process of a training run: its device, its share of the model and data, its collectives."""

    is_main: bool  # the rank that logs, prints and writes the run's shared files
    objective: Objective  # what a step minimises (`objective_for`): its metric_names name the logged numbers

    def seed(self, seed: int) -> None:
        """Seed every generator the model's initialisation and the step use (before `build_model`)."""

    def load_latest(self, run_dir: Path) -> Checkpoint | None:
        """This process's view of the newest checkpoint of `run_dir`, or None."""

    def build_model(self, previous: Checkpoint | None) -> nn.Module:
        """The model (this rank's part of it) as the one-process run initialises it, in training mode."""

    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """AdamW over the decay / no-decay parameter groups (`bmojo_neuron.training.optim`)."""

    def restore(self, previous: Checkpoint, model: nn.Module, optimizer: Any, scheduler: Any) -> None:
        """Weights, optimizer, scheduler and RNG states from `previous` (`load_latest`)."""

    def batches(self, train_data: Any, epoch: int, position: int, steps: int) -> Iterator[Any]:
        """One item per optimizer step for `steps` steps, continuing the data order at ``(epoch, position)``."""

    def step(self, model: nn.Module, optimizer: Any, batch: Any) -> Tensor:
        """Forward and backward of the step's ``train.grad_accum`` micro-batches, gradients reduced and clipped,
        then ``optimizer.step()``. Returns the objective's numbers and the gradient norm (``[loss, lm_loss,
        aux_loss, grad_norm]``) on the device, unread."""

    def finish_step(self, records: Sequence[Tensor], read: Callable[[Tensor], None], log: bool,
                    stop_requested: bool) -> bool:
        """End the step and say whether the run stops after it: true on every process or on none, once any asked
        (`stop_requested` is this one's wish; a signal reaches ranks at different moments). When `log` is set or
        the run stops, `read` gets `records` on the host once they are computed: one row per step, in a tensor of
        their dtype (the trainer averages them with any rows a resumed checkpoint carried)."""

    def evaluate(self, model: nn.Module, eval_data: Any) -> dict[str, float]:
        """Held-out loss, perplexity (and MQAR recall) over ``eval.batches`` batches, on every rank."""

    def length_eval(self, model: nn.Module, eval_data: Any, multipliers: list[int]) -> list[LengthResult]:
        """`evaluate` at multiples of the training length."""

    def save(self, run_dir: Path, model: nn.Module, optimizer: Any, scheduler: Any, state: TrainerState,
             recipe: dict[str, Any]) -> None:
        """Write and publish checkpoint ``step-XXXXXXX`` of `state` (collective), pruning to ``checkpoint.keep_last``."""

    def export(self, run_dir: Path, model: nn.Module, recipe: dict[str, Any], tokenizer: str,
               metrics: dict[str, Any]) -> Path:
        """Write ``final/``, the Hugging Face export of the whole model (collective); returns its path."""

    def parameter_count(self, model: nn.Module, which: Callable[[str], bool] | None = None) -> int:
        """Parameters of the whole model (every shard and stage), a tied head counted once; with `which`, only
        those whose name it accepts."""

    def agree_to_stop(self, requested: bool) -> bool:
        """True on every process when any asked to stop, at once (each process calls it at the same point)."""

    def barrier(self, tag: str) -> None:
        """Wait for every process of the run (`tag` names the meeting point where the runtime uses one)."""

    def close(self) -> None:
        """Release the process group and device state this backend created."""


def open_backend(recipe: Any) -> Backend:
    """The backend for ``run.device`` and the process world: ``neuron``; ``torchrun`` when the recipe asks for
    parallelism or torchrun started several processes; otherwise ``local``."""
    objective = objective_for(recipe)
    if recipe.train.compile and (recipe.run.device == "neuron" or wants_parallel(recipe)):
        raise ValueError("recipe key train.compile: torch.compile runs one-process cpu or cuda training only "
                         "(on neuron the step is compiled by neuronx-cc anyway); set train.compile=false")
    if recipe.run.device == "neuron":
        return NeuronBackend.start(recipe, objective)  # imports torch-xla and NxD (NeuronUnavailableError without them)
    if wants_parallel(recipe):
        return TorchrunBackend(recipe, objective)
    return LocalBackend(recipe, objective)
