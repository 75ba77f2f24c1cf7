"""`bmojo-neuron export-transformer RUN OUTPUT`: an all-attention B'MOJO model as a Llama / Qwen checkpoint."""

from __future__ import annotations

import argparse
import json

from bmojo_neuron.cli import register_command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", metavar="RUN_OR_EXPORT", help="a run directory, checkpoint or export of an all-A model")
    parser.add_argument("output", metavar="OUTPUT", help="folder to write the Hugging Face checkpoint to")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUTPUT")


@register_command("export-transformer",
                  help="write an all-attention (all A) model as a Hugging Face Llama / Qwen2 / Qwen3 checkpoint",
                  add_arguments=add_arguments)
def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from bmojo_neuron.checkpoints.exportable import exported_family
    from bmojo_neuron.fsutil import check_new_output

    # Read from folders and config.json alone, so each is one line before torch loads: a path that is no model,
    # a model that is no B'MOJO or not all attention, an OUTPUT that is a file or (without --overwrite) not empty.
    exported_family(args.path)
    check_new_output(Path(args.output).expanduser(), args.overwrite)
    from bmojo_neuron.priming.export import export_transformer

    output = export_transformer(args.path, args.output, overwrite=args.overwrite)
    family = json.loads((output / "config.json").read_text())["model_type"]
    print(f"wrote {family} checkpoint {output}")
    return 0
