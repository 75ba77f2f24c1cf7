"""What a saved B'MOJO directory carries so that transformers loads it without ``import bmojo_neuron``.

`BMojoConfig.save_pretrained` (and so `BMojoForCausalLM.save_pretrained`) writes an
``auto_map`` into ``config.json`` and a three-line module, `LOADER_FILE`, beside it
that imports the classes from the installed ``bmojo_neuron`` package. Then

    AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)

works in a process that never imported ``bmojo_neuron`` (transformers runs the
loader module, which needs ``bmojo_neuron`` installed and says so if it is not).
After ``import bmojo_neuron`` the registered classes are used and
``trust_remote_code`` is not needed.
"""

from __future__ import annotations

from pathlib import Path

LOADER_MODULE = "bmojo_loader"
LOADER_FILE = f"{LOADER_MODULE}.py"
AUTO_MAP = {
    "AutoConfig": f"{LOADER_MODULE}.BMojoConfig",
    "AutoModel": f"{LOADER_MODULE}.BMojoModel",
    "AutoModelForCausalLM": f"{LOADER_MODULE}.BMojoForCausalLM",
}

LOADER_SOURCE = '''"""Loads this B'MOJO model with the installed bmojo-neuron package (`pip install bmojo-neuron`)."""

from bmojo_neuron.configuration_bmojo import BMojoConfig
from bmojo_neuron.modeling_bmojo import BMojoForCausalLM, BMojoModel

__all__ = ["BMojoConfig", "BMojoForCausalLM", "BMojoModel"]
'''


def write_loader(directory: str | Path) -> Path:
    """Write `LOADER_FILE` into `directory` (created if missing); returns its path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOADER_FILE
    path.write_text(LOADER_SOURCE)
    return path
