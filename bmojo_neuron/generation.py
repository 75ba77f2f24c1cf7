"""Continue a prompt with a trained model: tokenize with the run's tokenizer, `model.generate()`, decode."""

from __future__ import annotations

import torch

from bmojo_neuron.checkpoints.inference import Trained
from bmojo_neuron.data.tokenizer import eos_token_id, load_tokenizer


def generate_text(trained: Trained, prompt: str, max_new_tokens: int, greedy: bool = False, temperature: float = 1.0,
                  top_k: int | None = None, top_p: float | None = None, seed: int = 0) -> tuple[list[int], str]:
    """Continuation token ids and text of `prompt` (the prompt itself excluded), greedy or sampled with `seed`."""
    tokenizer = load_tokenizer(trained.tokenizer)
    model = trained.model
    ids = tokenizer.encode(prompt)
    vocab = model.config.vocab_size
    if not ids:
        raise ValueError("the prompt encodes to no tokens")
    if max(ids) >= vocab:
        raise ValueError(f"the prompt has token id {max(ids)}, outside this model's vocabulary ({vocab}); "
                         + _vocabulary_hint(trained))
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], device=device)
    try:
        eos = eos_token_id(tokenizer)
    except ValueError:
        eos = None
    options = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=temperature,
                                                        top_k=top_k or 0, top_p=top_p or 1.0)
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(input_ids, max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=eos,
                             **options)
    new = out[0, len(ids):].tolist()
    return new, tokenizer.decode(new)


def _vocabulary_hint(trained: Trained) -> str:
    """Why a prompt may not fit the model: an MQAR model reads task token ids, not text, which no tokenizer helps."""
    if (trained.recipe.get("data") or {}).get("kind") == "mqar":
        return ("this model was trained on MQAR (data.kind: mqar), whose tokens are task ids, not text: "
                "`bmojo-neuron eval` and `inspect` measure it")
    return f"was it trained with tokenizer {trained.tokenizer!r}?"
