"""`imtune` command line: one module per subcommand under `imtune.cli`, errors as one line with exit code 2."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from imtune.config import DEFAULT_MODEL
from imtune.errors import ImtuneError

# (module, command) in help order; each module has add_parser(subparsers) and run(args) -> int | None.
COMMANDS = ("stats", "inspect", "export", "advise", "train", "loss", "plot", "generate", "memorisation", "evaluate", "judge",
            "compare", "demo")


class _Parser(argparse.ArgumentParser):
    """A bad command line is one line and exit code 2, like every other bad input (argparse would print the whole
    usage first); subcommands' parsers are made of the same class."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="imtune",
        description="Instruction tuning with exact control over which tokens carry loss: IT (output only), "
                    "IM (instruction + output, the NeurIPS 2024 'Instruction Modelling'), or anything between.",
        epilog=f"Run 'imtune <command> --help' for a command's options. Models: {DEFAULT_MODEL} (default), "
               "gemma3-270m, a local directory, or a .gguf file.",
    )
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for name in COMMANDS:
        try:
            mod = importlib.import_module(f"imtune.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"imtune.cli.{name}":
                continue
            raise
        mod.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        rc = args.func(args)
    except ImtuneError as e:
        print(f"imtune {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"imtune {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
