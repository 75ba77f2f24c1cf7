"""Subcommands of `bmojo-neuron`: each module registers itself with `bmojo_neuron.cli.register_command`."""
