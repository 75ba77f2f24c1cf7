"""How far a primed model starts from its source: logits side by side on the same tokens."""

from __future__ import annotations

import torch

from ..checkpoints.export import quiet_transformers
from .primed import PrimedModel


def relative_difference(reference: torch.Tensor, other: torch.Tensor) -> float:
    """``max |other - reference| / max |reference|``: the measure the priming exactness tests use."""
    return float((other - reference).abs().max() / reference.abs().max())


@torch.no_grad()
def compare_with_source(primed: PrimedModel, tokens: int, seed: int = 0) -> float:
    """Relative logit difference (float32) between `primed` and its source on `tokens` random token ids."""
    from transformers import AutoModelForCausalLM

    with quiet_transformers():
        source = AutoModelForCausalLM.from_pretrained(str(primed.source.path), local_files_only=True,
                                                      dtype=torch.float32).eval()
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, primed.source.vocab_size, (1, tokens), generator=generator)
    return relative_difference(source(ids).logits, primed.model.float().eval()(ids).logits)
