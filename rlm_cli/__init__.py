"""The `rlm` command line: one group whose subcommands live beside each component."""
