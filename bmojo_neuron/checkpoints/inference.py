"""Load a trained model for `eval` / `generate` from whatever a run left: an export, a checkpoint, a run directory.

Nothing here imports the trainer: a one-process checkpoint is read with
`local.load_model_weights`, a sharded one is consolidated in memory
(`sharded.consolidated_model`), an export goes through ``AutoModelForCausalLM``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from bmojo_neuron.configuration_bmojo import BMojoConfig
from bmojo_neuron.modeling_bmojo import BMojoForCausalLM

from .export import quiet_transformers
from .initial_config import shape_refusal
from .layout import CONFIG_FILE, FINAL, MODEL_FILE, RUN_INFO_FILE, STEP_PATTERN, is_complete
from .local import load_model_weights
from .locate import initial_weights_dir, resolve_model_dir
from .manifest import check_readable, read_json_object, verify_manifest
from .sharded import consolidated_model, is_sharded
from .state import stored_recipe


@dataclass
class Trained:
    """A model read back for eval / generate, with what is needed to feed it data."""

    model: nn.Module
    recipe: dict[str, Any]
    tokenizer: str
    source: Path  # the export or checkpoint directory actually read
    run_dir: Path  # the run (or model) folder: eval outputs go under its eval/ by default


def load_trained(path: str | Path, device: str | torch.device = "cpu", command: str | None = None) -> Trained:
    """Load the model behind `path` (see `resolve_model_dir`, which `command` is for) in eval mode on `device`."""
    source = resolve_model_dir(path, command)
    verify_manifest(source)  # a damaged file fails here in one line, not deep inside a loader
    check_readable(source)  # the same for a directory written before manifests existed
    recipe = stored_recipe(source)
    if is_complete(source):  # a training checkpoint
        if is_sharded(source):
            model = consolidated_model(source)
        else:
            model = BMojoForCausalLM(BMojoConfig.from_json_file(str(source / CONFIG_FILE)))
            load_model_weights(model, source)
        tokenizer = str(recipe.get("data", {}).get("tokenizer") or "byte")
    else:
        model = _from_pretrained(source)
        info_file = source / RUN_INFO_FILE
        tokenizer = str((read_json_object(info_file) if info_file.is_file() else {}).get("tokenizer") or "byte")
    run_dir = source.parent if (source.name == FINAL or STEP_PATTERN.match(source.name)) else source
    return Trained(model.to(device).eval(), recipe, tokenizer, source, run_dir)


def _from_pretrained(source: Path) -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained`` of an export; a folder it cannot load as a model (no weights file,
    say: a config.json alone) is one FileNotFoundError naming the folder, not a traceback from `transformers`."""
    if not any(source.glob("*.safetensors")) and not any(source.glob("pytorch_model*.bin")):
        raise FileNotFoundError(f"{source} has a {CONFIG_FILE} but no weights ({MODEL_FILE}): not a whole "
                                "export; copy it again, or give the run or checkpoint it was made from")
    try:
        with quiet_transformers():
            return AutoModelForCausalLM.from_pretrained(str(source))
    except (OSError, ValueError) as exc:  # how transformers says a folder is not a model it can load
        if isinstance(exc, OSError) and exc.errno is not None:  # the file system's own error: the CLI names it
            raise
        # its messages run over several lines (an unknown model_type adds install advice): the first says it
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FileNotFoundError(f"{source}: not a loadable model ({detail})") from None


def initial_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The whole model's weights behind `path` (export, primed folder, checkpoint or run), float32 on the CPU:
    what a new run with ``init.weights`` starts from. Parallel backends take their shard of it."""
    model = load_trained(initial_weights_dir(path)).model
    if not isinstance(model, BMojoForCausalLM):
        raise ValueError(f"init.weights {path}: holds a {type(model).__name__}, not a B'MOJO model; "
                         "start from a transformer with `bmojo-neuron prime` first")
    return {name: tensor.float() for name, tensor in model.state_dict().items()}


def check_initial_weights(weights: dict[str, torch.Tensor], shapes: dict[str, Any], path: str | Path) -> None:
    """`ValueError` naming the first tensor where `weights` (from `initial_weights`) and the recipe's model
    (its state-dict `shapes`) differ in name or shape (`initial_config.shape_refusal`)."""
    refusal = shape_refusal({name: tuple(tensor.shape) for name, tensor in weights.items()},
                            {name: tuple(shape) for name, shape in shapes.items()}, path)
    if refusal is not None:
        raise ValueError(refusal)


def load_initial_weights(model: nn.Module, weights: dict[str, torch.Tensor], path: str | Path) -> None:
    """Copy `weights` (from `initial_weights`) into the whole one-device `model`, after `check_initial_weights`."""
    own = model.state_dict()
    check_initial_weights(weights, {name: t.shape for name, t in own.items()}, path)
    model.load_state_dict({name: weights[name].to(own[name].dtype) for name in own})
