"""Choose the SSM mixer (fading memory) named by `config.ssm_mixer`."""

from __future__ import annotations

from torch import nn

from ..configuration_bmojo import BMojoConfig
from .mamba1 import Mamba1Mixer
from .mamba2 import Mamba2Mixer


def build_ssm_mixer(config: BMojoConfig, layer_idx: int) -> nn.Module:
    """A `Mamba2Mixer` or `Mamba1Mixer`; both map (batch, L, d) -> (batch, L, d)."""
    if config.ssm_mixer == "mamba2":
        return Mamba2Mixer(config, layer_idx)
    return Mamba1Mixer(config, layer_idx)
