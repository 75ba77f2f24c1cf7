"""`bmojo-neuron generate PATH --prompt TEXT`: sample a continuation with `model.generate()`."""

from __future__ import annotations

import argparse

from bmojo_neuron.cli import register_command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", metavar="CHECKPOINT_OR_EXPORT_DIR",
                        help="a run directory, a step-XXXXXXX checkpoint or a final export")
    parser.add_argument("--prompt", required=True, help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--greedy", action="store_true", help="argmax decoding (ignores the sampling flags)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")


def check_arguments(args: argparse.Namespace) -> None:
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.temperature <= 0:
        raise ValueError(f"--temperature must be > 0 (use --greedy for argmax), got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        raise ValueError(f"--top-k must be >= 1, got {args.top_k}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}")
    if not args.prompt:
        raise ValueError("--prompt must not be empty: generation needs at least one token to start from")


def generate_text(trained, prompt: str, max_new_tokens: int, greedy: bool = False, temperature: float = 1.0,
                  top_k: int | None = None, top_p: float | None = None, seed: int = 0) -> tuple[list[int], str]:
    """Continuation token ids and text of `prompt` (the prompt itself excluded)."""
    import torch

    from bmojo_neuron.data.tokenizer import eos_token_id, load_tokenizer

    tokenizer = load_tokenizer(trained.tokenizer)
    model = trained.model
    ids = tokenizer.encode(prompt)
    vocab = model.config.vocab_size
    if not ids:
        raise ValueError("the prompt encodes to no tokens")
    if max(ids) >= vocab:
        raise ValueError(f"the prompt has token id {max(ids)}, outside this model's vocabulary ({vocab}); "
                         f"was it trained with tokenizer {trained.tokenizer!r}?")
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


@register_command("generate", help="continue a prompt with a trained model", add_arguments=add_arguments)
def run(args: argparse.Namespace) -> int:
    check_arguments(args)
    from bmojo_neuron.checkpoints.inference import load_trained
    from bmojo_neuron.device import resolve_device

    trained = load_trained(args.path, resolve_device(args.device))
    _, text = generate_text(trained, args.prompt, args.max_new_tokens, args.greedy, args.temperature,
                            args.top_k, args.top_p, args.seed)
    print(args.prompt + text)
    return 0
