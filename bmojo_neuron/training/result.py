"""What a training run returns, and the files it writes beside its checkpoints."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bmojo_neuron.evaluation import LengthResult

PLOT_FILE = "training.png"
LENGTH_FILE = "length_eval.json"
LENGTH_PLOT = "length_eval.png"


@dataclass
class TrainResult:
    run_dir: Path
    params: int
    step: int
    final_dir: Path | None = None  # None when stopped early (`stop_after`)
    final_eval: dict[str, float] = field(default_factory=dict)
    length_eval: list[LengthResult] = field(default_factory=list)
    metrics: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


def tokenizer_name(recipe: Any) -> str:
    """The tokenizer an export records: the text data's, or the byte tokenizer (MQAR)."""
    return str(getattr(recipe.data, "tokenizer", None) or "byte")
