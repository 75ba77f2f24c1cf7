"""The names in a run directory: its files, its step folders (and the scan that finds them by name), its export.

They sit apart from `layout` (which finds, publishes and prunes checkpoints) so that
`manifest` can word its damage advice by what a folder is without importing `layout`,
which imports it.
"""

from __future__ import annotations

import re
from pathlib import Path

LATEST = "latest"
FINAL = "final"
METRICS_FILE = "metrics.jsonl"
STEP_PATTERN = re.compile(r"^step-(\d{7,})$")
MODEL_FILE = "model.safetensors"
OPTIM_FILE = "optimizer.pt"
STATE_FILE = "trainer_state.json"  # written last: its presence marks a complete checkpoint
RECIPE_FILE = "recipe.json"
CONFIG_FILE = "config.json"
RUN_INFO_FILE = "bmojo_run.json"
SUMMARY_FILE = "summary.txt"  # the table `train` writes beside the runs of a suite or comparison
PARALLEL_FILE = "parallel.json"  # marks a sharded checkpoint (`bmojo_neuron.checkpoints.sharded`)
REQUIRED_FILES = (MODEL_FILE, OPTIM_FILE, RECIPE_FILE, CONFIG_FILE, STATE_FILE)
SHARDED_REQUIRED_FILES = (PARALLEL_FILE, RECIPE_FILE, CONFIG_FILE, STATE_FILE)


def step_dir_name(step: int) -> str:
    return f"step-{step:07d}"


def step_folders(run_dir: str | Path) -> list[Path]:
    """Every ``step-*`` folder of `run_dir`, complete or not, in no particular order (none when it is no folder)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    return [entry for entry in run_dir.iterdir() if STEP_PATTERN.match(entry.name) and entry.is_dir()]
