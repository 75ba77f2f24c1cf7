"""`bmojo-neuron checkpoint consolidate|shard`: change a parallel run's degrees through one full copy."""

from __future__ import annotations

import argparse

from bmojo_neuron.cli import register_command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="{consolidate,shard}")
    con = sub.add_parser("consolidate", help="sharded checkpoint (or run dir) -> one save_pretrained directory",
                         description="write the full model of a sharded checkpoint (or of a run directory's "
                                     "latest checkpoint) and its training state to one save_pretrained directory")
    con.add_argument("source", help="a sharded step-XXXXXXX directory, or a run directory (its latest checkpoint)")
    con.add_argument("output", help="new directory for the Hugging Face export (+ training_state.pt)")
    shard = sub.add_parser("shard", help="save_pretrained directory -> sharded checkpoint at any degree",
                           description="write a save_pretrained directory as the sharded checkpoint of a new "
                                       "run at tensor degree --tp and pipeline degree --pp")
    shard.add_argument("source", help="a save_pretrained directory (from `checkpoint consolidate` to keep the "
                                      "optimizer and data position; a plain export or `prime` output starts at step 0)")
    shard.add_argument("--tp", type=int, required=True, help="tensor-parallel degree of the new run")
    shard.add_argument("--pp", type=int, default=1,
                       help="pipeline-parallel degree of the new run (default 1; at most the model's layers)")
    shard.add_argument("--output-dir", required=True,
                       help="new run directory; continue with `torchrun ... bmojo-neuron train RECIPE "
                            "parallel.tp=N parallel.pp=M --resume --output-dir DIR`")


@register_command("checkpoint", help="consolidate a sharded checkpoint, or shard a model at new parallel degrees",
                  add_arguments=add_arguments)
def run(args: argparse.Namespace) -> int:
    from bmojo_neuron.checkpoints.locate import check_shard_request, resolve_sharded  # reads folders only: no torch

    # a source of the wrong kind is one line before torch loads (the converters check again for library callers)
    if args.action == "consolidate":
        resolve_sharded(args.source)
    else:
        check_shard_request(args.source, args.output_dir, args.tp, args.pp)
    from bmojo_neuron.checkpoints.convert import consolidate_checkpoint, shard_checkpoint

    if args.action == "consolidate":
        out = consolidate_checkpoint(args.source, args.output)
        print(f"consolidated into {out}")
    else:
        out = shard_checkpoint(args.source, args.output_dir, args.tp, args.pp)
        print(f"sharded for tp={args.tp}, pp={args.pp} into {out}")
    return 0
