"""Subcommands of the `sct-edge` CLI, one module each; see `sct_edge/cli.py`."""
