"""`bmojo-neuron generate PATH --prompt TEXT`: sample a continuation with `model.generate()`."""

from __future__ import annotations

import argparse
import sys

from bmojo_neuron.cli import register_command, say_on_terminal


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", metavar="RUN_OR_EXPORT",
                        help="a run directory (uses final/, else the latest checkpoint), a step-XXXXXXX "
                             "checkpoint or a final export")
    parser.add_argument("--prompt", required=True, help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most (default 64)")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature, > 0 (default 1.0)")
    parser.add_argument("--top-k", type=int, default=None,
                        help="sample among the k likeliest tokens only (default: all)")
    parser.add_argument("--top-p", type=float, default=None,
                        help="sample among the likeliest tokens whose probabilities sum to p, in (0, 1] "
                             "(default 1: all)")
    parser.add_argument("--greedy", action="store_true", help="argmax decoding (ignores the sampling flags)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
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


@register_command("generate", help="continue a prompt with a trained model", add_arguments=add_arguments)
def run(args: argparse.Namespace) -> int:
    check_arguments(args)
    from bmojo_neuron.checkpoints.locate import resolve_sized_model_dir

    # a path that is no model, or a model with a missing or truncated file: one line, before torch loads
    model_dir = resolve_sized_model_dir(args.path, "generate")
    say_on_terminal(f"generate from {model_dir}: loading torch and the model")  # stdout: the text alone
    from bmojo_neuron.checkpoints.inference import load_trained
    from bmojo_neuron.device import resolve_device, set_cpu_threads
    from bmojo_neuron.generation import generate_text

    device = resolve_device(args.device, "--device", neuron=False)
    set_cpu_threads()
    trained = load_trained(args.path, device, "generate")
    new, text = generate_text(trained, args.prompt, args.max_new_tokens, args.greedy, args.temperature,
                              args.top_k, args.top_p, args.seed)
    print(args.prompt + text)
    if len(new) < args.max_new_tokens:  # `generate` ends a sequence early only at its end-of-sequence token
        print(f"note: stopped after {len(new)} of {args.max_new_tokens} new tokens: the model generated its "
              "end-of-sequence token", file=sys.stderr)
    return 0
