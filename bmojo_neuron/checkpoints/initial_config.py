"""Whether ``init.weights``' model is the recipe's, from the two configs alone: no torch, no transformers.

`train` asks it before torch loads (`preflight.check_init_weights`), so a model section that restates other
sizes than the folder's config is one line at once; the weights are checked again, with the same words, when
they load (`inference.check_initial_weights`).
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from bmojo_neuron.config_fields import MODEL_TYPE, BMojoFields, saved_defaults
from bmojo_neuron.parameter_shapes import Shapes, parameter_shapes

from .layout import CONFIG_FILE
from .locate import initial_weights_dir
from .manifest import read_json_object

MATCH_ADVICE = "make the model section match it"  # how a run's weights that do not fit the recipe are refused


def shape_refusal(weights: Shapes, shapes: Shapes, path: str | Path) -> str | None:
    """Why the tensors `weights` (name -> shape) behind ``init.weights`` `path` do not fit the recipe's model (its
    state-dict `shapes`): the first names missing or unexpected, else the first tensor of another shape; None when
    they fit."""
    missing, extra = sorted(set(shapes) - set(weights)), sorted(set(weights) - set(shapes))
    if missing or extra:
        return (f"init.weights {path}: its model does not have the recipe's layers (missing {missing[:3]}, "
                f"unexpected {extra[:3]}); {MATCH_ADVICE}")
    for name, shape in shapes.items():
        if tuple(shape) != tuple(weights[name]):
            return (f"init.weights {path}: {name} has shape {tuple(weights[name])}, the recipe's model "
                    f"{tuple(shape)}; {MATCH_ADVICE}")
    return None


def check_initial_config(path: str | Path, fields: BMojoFields, section: dict[str, Any]) -> None:
    """ValueError when the recipe's model (`fields`, from its model `section` over the folder's config) is not the
    one saved behind ``init.weights`` `path` (`shape_refusal` of the two configs' `parameter_shapes`), naming the
    section's keys that differ from the folder's config. A folder that holds no B'MOJO model is left to
    `inference.initial_weights`, which names it when it reads the folder."""
    saved = read_json_object(initial_weights_dir(path) / CONFIG_FILE)
    if saved.get("model_type") != MODEL_TYPE:
        return
    refusal = shape_refusal(parameter_shapes(saved_fields(saved)), parameter_shapes(fields), path)
    if refusal is None:
        return
    differ = [f"{key} {value!r} (the folder's: {saved[key]!r})" for key, value in section.items()
              if key in saved and saved[key] != value]
    if not differ:
        raise ValueError(refusal)
    layers = refusal.removesuffix(f"; {MATCH_ADVICE}")
    # a shipped recipe's section cannot be edited from the command line, but it can be dropped there
    raise ValueError(f"{layers}; the model section sets {', '.join(differ)}: leave these keys out to take the "
                     "folder's (the override model=none drops the recipe's whole model section)")


def saved_fields(saved: dict[str, Any]) -> BMojoFields:
    """The `BMojoFields` of a saved B'MOJO config.json, as `BMojoConfig.from_dict` reads it (`saved_defaults`);
    keys of the Hugging Face config that are no model field (auto_map, dtype, ...) are left out."""
    names = set(inspect.signature(BMojoFields.__init__).parameters) - {"self", "kwargs"}
    return BMojoFields(**{key: value for key, value in saved_defaults(saved).items() if key in names})
