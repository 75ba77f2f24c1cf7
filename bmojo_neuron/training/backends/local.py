"""The ``local`` backend: one process on CPU or CUDA.

The reference every other backend is measured against: on CPU the AdamW loop
implementation (`bmojo_neuron.training.optim`) and one thread per test make a resumed
run reproduce the uninterrupted one bitwise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from bmojo_neuron.checkpoints.export import export_final
from bmojo_neuron.checkpoints.inference import initial_weights, load_initial_weights
from bmojo_neuron.checkpoints.local import load_latest, load_model_weights, save_checkpoint
from bmojo_neuron.checkpoints.state import Checkpoint, TrainerState, set_rng_states
from bmojo_neuron.device import resolve_device, set_cpu_threads
from bmojo_neuron.evaluation import LengthResult, autocast, evaluate, length_generalisation
from bmojo_neuron.host_allocator import keep_freed_memory
from bmojo_neuron.layers.compiled_layers import CompiledLayers, compile_layers
from bmojo_neuron.modeling_bmojo import BMojoForCausalLM
from bmojo_neuron.training.data_order import DataOrder, seed_everything
from bmojo_neuron.training.objective import Objective, causal_lm_loss
from bmojo_neuron.training.optim import build_optimizer

MicroBatch = tuple[Tensor, Tensor]  # (input_ids, labels) on the device


class LocalBackend:
    """One process: the whole model on one device."""

    is_main = True
    pipeline: Any = None  # the torchrun backend's `PipelineRunner` under pp > 1: eval goes through it

    def __init__(self, recipe: Any, objective: Objective = causal_lm_loss) -> None:
        self.recipe, self.objective = recipe, objective
        self.device = resolve_device(recipe.run.device)
        set_cpu_threads(recipe.run.threads)  # 0: every usable core but one (`device.default_cpu_threads`)
        if self.device.type == "cpu":
            keep_freed_memory()  # no fresh pages for every step's activations (`host_allocator`)
        self.mqar = recipe.data.kind == "mqar"
        self.compiled: CompiledLayers | None = None  # train.compile: the layers' compiled forward
        self.compile_checked = False  # a step has run through the compiled layers

    # ------------------------------------------------------------------ set-up

    def seed(self, seed: int) -> None:
        seed_everything(seed)

    def load_latest(self, run_dir: Path) -> Checkpoint | None:
        return load_latest(run_dir)

    def build_model(self, previous: Checkpoint | None) -> nn.Module:
        model = self.init_model(start_weights=previous is None).to(self.device)
        if self.recipe.train.activation_checkpointing:
            enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
            enable()
        if self.recipe.train.compile:
            self.compiled = compile_layers(model)
        return model.train()

    def init_model(self, start_weights: bool = True) -> nn.Module:
        """The whole model under the current RNG state (`seed` first); with `start_weights`, holding
        ``init.weights`` when the recipe names them (a resumed run reads its checkpoint instead)."""
        model = BMojoForCausalLM(self.recipe.model_config())
        path = self.recipe.init.weights
        if start_weights and path:
            load_initial_weights(model, initial_weights(path), path)
        return model

    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        o = self.recipe.optim
        return build_optimizer(model, o.lr, o.weight_decay, o.betas, o.eps, self.device.type, o.lr_multipliers)

    def restore(self, previous: Checkpoint, model: nn.Module, optimizer: Any, scheduler: Any) -> None:
        load_model_weights(model, previous.path)
        optimizer.load_state_dict(previous.optimizer)
        scheduler.load_state_dict(previous.scheduler)
        set_rng_states(previous.rng)

    def parameter_count(self, model: nn.Module, which: Callable[[str], bool] | None = None) -> int:
        return sum(p.numel() for name, p in model.named_parameters() if which is None or which(name))

    # ------------------------------------------------------------------ a step

    def batches(self, train_data: Any, epoch: int, position: int, steps: int) -> Iterator[list[MicroBatch]]:
        order = DataOrder(len(train_data), self.recipe.train.batch_size, self.recipe.run.seed, epoch, position)
        return (self.step_batch(train_data, order) for _ in range(steps))

    def step_batch(self, train_data: Any, order: DataOrder) -> list[MicroBatch]:
        """The step's ``train.grad_accum`` micro-batches, moved to the device."""
        out = []
        for _ in range(self.recipe.train.grad_accum):
            rows = train_data[self.local_rows(order.next())]
            out.append((rows["input_ids"].to(self.device, non_blocking=True),
                        rows["labels"].to(self.device, non_blocking=True)))
        return out

    def local_rows(self, rows: list[int]) -> list[int]:
        """This process's rows of a global micro-batch (all of them here)."""
        return rows

    def step(self, model: nn.Module, optimizer: Any, batch: list[MicroBatch]) -> Tensor:
        losses = self.forward_backward_all(model, optimizer, batch)
        losses = self.reduce(model, losses)
        grad_clip = self.recipe.optim.grad_clip
        grad_norm = self.clip(model, grad_clip) if grad_clip else torch.zeros((), device=self.device)
        optimizer.step()
        return torch.cat([losses, grad_norm.detach().float().reshape(1)])

    def forward_backward_all(self, model: nn.Module, optimizer: Any, batch: list[MicroBatch]) -> Tensor:
        """Forward and backward of every micro-batch of a step (their summed numbers).

        Under ``train.compile`` the first step compiles the layers (forward and backward);
        when that fails, the layers go back to eager and the step runs again from zero
        gradients, so a compiler that does not work here costs one warning, not the run.
        """
        if self.compiled is None or not self.compiled.active or self.compile_checked:
            return sum(self.forward_backward(model, input_ids, labels) for input_ids, labels in batch)
        rng = torch.get_rng_state()
        try:
            losses = sum(self.forward_backward(model, input_ids, labels) for input_ids, labels in batch)
        except Exception as exc:  # noqa: BLE001 - any compiler failure means: train eagerly
            self.compiled.disable(exc)
            optimizer.zero_grad(set_to_none=True)
            torch.set_rng_state(rng)
            losses = sum(self.forward_backward(model, input_ids, labels) for input_ids, labels in batch)
        self.compile_checked = True
        return losses

    def forward_backward(self, model: nn.Module, input_ids: Tensor, labels: Tensor) -> Tensor:
        """One micro-batch; returns its objective's numbers (``[loss, lm_loss, aux_loss]``) / ``grad_accum``."""
        accum = self.recipe.train.grad_accum
        with autocast(self.device, self.recipe.train.precision):
            loss, parts = self.objective(model, input_ids, labels)
        (loss / accum).backward()
        return parts / accum

    def reduce(self, model: nn.Module, losses: Tensor) -> Tensor:
        """Gradients and logged losses over the processes of the run (nothing to do in one)."""
        return losses

    def clip(self, model: nn.Module, max_norm: float) -> Tensor:
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)

    def finish_step(self, records: Sequence[Tensor], read: Callable[[Tensor], None], log: bool,
                    stop_requested: bool) -> bool:
        stop = self.agree_to_stop(stop_requested)  # torchrun: an all-reduce (this class is its base)
        if records and (log or stop):
            read(torch.stack(list(records)).cpu())
        return stop

    # ------------------------------------------------------------------ eval, checkpoints, export

    def evaluate(self, model: nn.Module, eval_data: Any) -> dict[str, float]:
        t = self.recipe.train
        return evaluate(model, eval_data, t.batch_size, self.device, self.recipe.eval.batches, t.precision, self.mqar,
                        pipeline=self.pipeline)

    def length_eval(self, model: nn.Module, eval_data: Any, multipliers: list[int]) -> list[LengthResult]:
        t = self.recipe.train
        return length_generalisation(model, self.recipe, eval_data, multipliers, t.batch_size, self.device,
                                     self.recipe.eval.batches, t.precision, pipeline=self.pipeline)

    def save(self, run_dir: Path, model: nn.Module, optimizer: Any, scheduler: Any, state: TrainerState,
             recipe: dict[str, Any]) -> None:
        save_checkpoint(run_dir, model, optimizer, scheduler, state, recipe, self.recipe.checkpoint.keep_last)

    def export(self, run_dir: Path, model: nn.Module, recipe: dict[str, Any], tokenizer: str,
               metrics: dict[str, Any]) -> Path:
        return export_final(run_dir, model, recipe, tokenizer, metrics)

    def agree_to_stop(self, requested: bool) -> bool:
        return requested

    def barrier(self, tag: str) -> None:
        pass

    def close(self) -> None:
        pass
