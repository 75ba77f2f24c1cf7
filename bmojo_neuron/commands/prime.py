"""`bmojo-neuron prime SOURCE OUTPUT --pattern PATTERN [key=value ...]`: a B'MOJO model from a transformer."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from bmojo_neuron.cli import register_command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="SOURCE",
                        help="local Hugging Face checkpoint folder (llama, mistral, qwen2 or qwen3)")
    parser.add_argument("output", metavar="OUTPUT", help="folder to write the primed B'MOJO model to")
    parser.add_argument("--pattern", required=True,
                        help="layer kinds, one letter per layer (A keeps full attention; B, F, S, M replace it), "
                             "or a group repeated over the layers, e.g. AB")
    parser.add_argument("overrides", nargs="*", default=[], metavar="key=value",
                        help="B'MOJO options (BMojoConfig fields), e.g. window_size=512 memory_size=64")
    parser.add_argument("--ssm-init", default="auto", choices=("auto", "attention", "random"),
                        help="seed the SSM from the layer's attention weights, or keep the Mamba init; auto "
                             "(default) seeds it whenever the SSM is shaped like the attention")
    parser.add_argument("--seed", type=int, default=0, help="seed of the parameters that are initialised")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="weights on disk")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUTPUT")
    parser.add_argument("--compare-tokens", type=int, default=64, metavar="N",
                        help="after writing, compare the primed model's logits with the source's on N random "
                             "tokens (0 skips; needs the source to load with transformers)")


def parse_overrides(items: list[str]) -> dict:
    """``window_size=512`` (or ``model.window_size=512``) -> {"window_size": 512}."""
    from bmojo_neuron.recipes import parse_yaml_value

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{item!r}: expected key=value, e.g. window_size=512")
        out[key.removeprefix("model.")] = parse_yaml_value(value)
    return out


@register_command("prime", help="initialise a B'MOJO model from a Llama, Mistral or Qwen checkpoint",
                  add_arguments=add_arguments)
def run(args: argparse.Namespace) -> int:
    from bmojo_neuron.fsutil import check_new_output
    from bmojo_neuron.priming.options import check_options, expand_pattern
    from bmojo_neuron.priming.source_files import check_source_files

    if args.compare_tokens < 0:
        raise ValueError(f"--compare-tokens must be >= 0, got {args.compare_tokens}")
    overrides = parse_overrides(args.overrides)
    # What the folders, the files and the arguments show is refused before torch and transformers load (seconds):
    # an OUTPUT that cannot be written, a SOURCE that is no checkpoint of a family prime reads or whose weights'
    # headers are not what its config.json describes, an option that is no B'MOJO one, a pattern that does not
    # fit the source's layers.
    check_new_output(Path(args.output).expanduser(), args.overwrite)
    config = check_source_files(args.source)
    check_options(overrides)
    layers = config.get("num_hidden_layers")
    expand_pattern(args.pattern, layers if isinstance(layers, int) and layers > 0 else len(args.pattern))
    from bmojo_neuron.checkpoints.state import stored_tokenizer
    from bmojo_neuron.priming import prime
    from bmojo_neuron.priming.compare import compare_with_source

    primed = prime(args.source, args.output, args.pattern, overrides, ssm_init=args.ssm_init, seed=args.seed,
                   dtype=args.dtype, overwrite=args.overwrite)
    print(format_report(primed, args.output))
    if args.compare_tokens:
        difference = compare_with_source(primed, args.compare_tokens, seed=args.seed)
        print(f"  logits vs source on {args.compare_tokens} random tokens: max relative difference {difference:.2e}")
    print(next_line(args.output, stored_tokenizer(Path(args.output).expanduser())))
    return 0


def next_line(output: str, tokenizer: str | None) -> str:
    """The command that trains the primed folder: ``model=none`` drops a shipped recipe's model section, which
    restates other sizes, so the folder's config is taken whole; a tokenizer other than bytes (the source's,
    copied into the folder) is named, since a recipe's own would feed the model ids it never learned."""
    command = ["bmojo-neuron", "train", "RECIPE", f"init.weights={output}", "model=none"]
    if tokenizer is not None and tokenizer != "byte":
        same = Path(tokenizer) == Path(output).expanduser().resolve()
        command.append(f"data.tokenizer={output if same else tokenizer}")
    return f"next: {shlex.join(command)}  (RECIPE: a text recipe, e.g. cpu-text; docs/priming.md)"


def format_report(primed, output: str) -> str:
    report, config = primed.report, primed.model.config
    total = report["copied"] + report["seeded_from_source"] + report["initialised"]
    lines = [
        f"primed {report['source_model_type']} ({config.num_hidden_layers} layers, d {config.hidden_size}, "
        f"{total:,} parameters) -> {output}",
        f"  pattern      {config.layer_pattern}",
        f"  copied       {report['copied']:>12,}  embeddings, norms, MLPs, attention q/k/v/o",
    ]
    if report["seeded_from_source"]:
        lines.append(f"  seeded       {report['seeded_from_source']:>12,}  new paths from the attention weights "
                     f"({'; '.join(report['seeded_paths'])})")
    if report["initialised"]:
        names = ", ".join(sorted({_short_name(n) for n in report["initialised_names"]}))
        lines.append(f"  initialised  {report['initialised']:>12,}  ({names})")
    lines += [f"  note: {note}" for note in report["notes"]]
    return "\n".join(lines)


def _short_name(name: str) -> str:
    """``model.layers.*.mixer.ssm.in_proj_dt.weight`` -> ``in_proj_dt``; ``...ssm.A_log`` -> ``A_log``."""
    parts = name.split(".")
    return parts[-2] if parts[-1] in ("weight", "bias") else parts[-1]
