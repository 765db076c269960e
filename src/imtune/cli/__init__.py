"""Subcommands. Each module: `add_parser(subparsers)` registers flags and sets `func`; shared flags live in `common`."""
