"""Which torch device a run uses: ``run.device`` (and the ``--device`` of eval / generate) to a `torch.device`."""

from __future__ import annotations

import torch


def resolve_device(name: str | None) -> torch.device:
    """``cpu``, ``cuda`` (``cuda:N``), ``auto`` (CUDA when available, else CPU), or ``neuron`` (the XLA device).

    ValueError for an unknown name, or CUDA asked for where it is not available.
    """
    name = (name or "auto").lower()
    if name == "neuron":
        return torch.device("xla")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"run.device={name} but CUDA is not available here; use cpu or auto")
        return torch.device(name)
    raise ValueError(f"run.device must be cpu, cuda, auto or neuron, got {name!r}")
