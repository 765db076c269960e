"""`imtune` command line: one module per subcommand under `imtune.cli`, errors as one line with exit code 2."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import signal
import sys
import threading

from imtune.config import DEFAULT_MODEL
from imtune.errors import ImtuneError
from imtune.io_utils import children_die_with_us, stop_children

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
    with _signals() as stop:
        command = None
        try:
            parser = build_parser()
            args = parser.parse_args(argv)
            command = args.command
            if not getattr(args, "func", None):
                parser.print_help()
                return 0
            with children_die_with_us():  # for every fork the command makes, from any thread
                return int(args.func(args) or 0)
        except BaseException as e:  # noqa: BLE001 - every way out of a command is one line, none a traceback
            if stop["signal"] is not None or isinstance(e, KeyboardInterrupt):
                stop_children()
            code = _exit(f"imtune {command}" if command else "imtune", e, stop)
            if code is None:
                raise
            return code


def _exit(who: str, e: BaseException, stop: dict) -> int | None:
    """Print the one line a failure ends with and return its exit code; None: a bug, shown with its traceback."""
    if stop["signal"] is not None or isinstance(e, KeyboardInterrupt):
        # Whatever surfaced (a library may turn the interrupt into its own error on the way out), it was the signal.
        term = stop["signal"] == signal.SIGTERM
        print(f"{who}: {'terminated' if term else 'interrupted'}", file=sys.stderr)
        return 143 if term else 130
    if isinstance(e, ImtuneError):
        print(f"{who}: error: {_one_line(str(e))}", file=sys.stderr)
        return e.exit_code
    if isinstance(e, OSError) and e.strerror:  # a write refused by the OS (full disk, read-only, permissions)
        where = f"{e.filename}: " if e.filename else ""
        print(f"{who}: error: {_one_line(where + e.strerror)}", file=sys.stderr)
        return 2
    return None  # SystemExit (argparse's own usage errors) and bugs go on as they are


def _one_line(text: str) -> str:
    """A failure is one line even when it quotes a path or value holding line breaks or other control characters."""
    return "".join(c if c.isprintable() or c == "\t" else ascii(c)[1:-1] for c in text)


@contextlib.contextmanager
def _signals():
    """Ctrl-C (and SIGTERM, outside a torchrun launch, whose launcher escalates to SIGKILL itself) become one
    exception in the main thread, so every `finally` removes its temp files; later signals are ignored until that
    clean-up is done. An interrupt Python had to swallow (one landing in a fork handler or a finaliser, which
    Python reports as "Exception ignored") is delivered again a moment later. The previous handlers are restored
    after."""
    stop = {"signal": None, "again": False, "active": True}
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum, frame):
        if stop["active"] and (stop["signal"] is None or stop["again"]):
            stop["signal"], stop["again"] = signum, False
            raise KeyboardInterrupt

    def again():
        if stop["again"] and stop["active"]:
            signal.pthread_kill(threading.main_thread().ident, stop["signal"])

    def unraisable(u, default=sys.unraisablehook):
        if stop["signal"] is not None and isinstance(u.exc_value, KeyboardInterrupt):
            stop["again"] = True
            stop["timer"] = threading.Timer(0.05, again)
            stop["timer"].daemon = True
            stop["timer"].start()
        else:
            default(u)

    sigs = [signal.SIGINT] + ([signal.SIGTERM] if "TORCHELASTIC_RUN_ID" not in os.environ else [])
    before = {s: signal.getsignal(s) for s in sigs}
    hook_before, sys.unraisablehook = sys.unraisablehook, unraisable
    for s in sigs:
        if before[s] in (signal.default_int_handler, signal.SIG_DFL):  # never take over an embedding app's handler
            signal.signal(s, handler)
    try:
        yield stop
    finally:
        stop["active"] = False  # from here a late delivery is a no-op, never an exception in this clean-up
        if stop.get("timer") is not None:
            stop["timer"].cancel()
            stop["timer"].join()
        sys.unraisablehook = hook_before
        for s, h in before.items():
            signal.signal(s, h)


if __name__ == "__main__":
    sys.exit(main())
