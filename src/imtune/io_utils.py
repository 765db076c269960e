"""Writing outputs without harm: every output goes to a temp name beside the target and is renamed (nothing is
ever half-written), `remove_dead_builds` clears the temp directories of builds that were killed, and
`prepare_output` checks an `--out` path before any work is done. Worker processes imtune starts die with it
(`children_die_with_us`, `die_with_parent`), so a killed run leaves no process behind writing into its outputs."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temp path beside `path` to write to; renamed onto `path` when the block succeeds, removed otherwise."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; outputs are meant to be shared like any other file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_dead_builds(parent: Path, pattern: str) -> None:
    """Remove the directories in `parent` whose name fullmatches `pattern` (group 1: the pid of the process that
    was building it) when that process is gone: a killed build that nothing will finish or clean up. A build of a
    live process, or of another user's (no permission to signal it), is left alone."""
    try:
        entries = list(Path(parent).iterdir())
    except OSError:
        return
    for d in entries:
        m = re.fullmatch(pattern, d.name)
        if m is None or d.is_symlink() or not d.is_dir():
            continue
        try:
            os.kill(int(m.group(1)), 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except (PermissionError, OverflowError):  # alive but not ours; or no pid a process can have
            pass


def atomic_write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def atomic_write_json(path: str | Path, obj, indent: int = 2) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def atomic_write_jsonl(path: str | Path, rows) -> Path:
    return atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def read_jsonl_rows(path: str | Path, required: dict[str, type | tuple[type, ...]] | None = None,
                    what: str = "rows") -> list[dict]:
    """JSON objects of a JSONL file, each checked for `required` fields/types; errors name the file and line."""
    from imtune.errors import InputError

    path = Path(path)
    if not path.is_file():
        raise InputError(str(path), "file not found" if not path.exists() else "not a file")
    rows = []
    with open(path, "rb") as f:
        for n, bline in enumerate(f, 1):
            if not bline.strip():
                continue
            try:
                row = json.loads(bline.decode("utf-8-sig" if n == 1 else "utf-8"))
            except UnicodeDecodeError as e:
                raise InputError(str(path), f"not valid UTF-8 (byte {e.start} of the line)", line=n) from None
            except json.JSONDecodeError as e:
                raise InputError(str(path), f"malformed JSON: {e.msg} at column {e.colno}", line=n) from None
            if not isinstance(row, dict):
                raise InputError(str(path), f"expected a JSON object, got {type(row).__name__}", line=n)
            for key, typ in (required or {}).items():
                if not isinstance(row.get(key), typ) or isinstance(row.get(key), bool):
                    got = "missing" if key not in row else f"not a {_type_name(typ)} ({type(row[key]).__name__})"
                    raise InputError(str(path), f"field '{key}' {got}", line=n)
            rows.append(row)
    if not rows:
        raise InputError(str(path), f"no {what}")
    return rows


def _type_name(typ) -> str:
    names = {str: "string", int: "number", float: "number", list: "list", dict: "object"}
    typs = typ if isinstance(typ, tuple) else (typ,)
    return "/".join(dict.fromkeys(names.get(t, t.__name__) for t in typs))


def prepare_output(out: str | Path, inputs: Iterable[str | Path | None] = (), kind: str = "file",
                   flag: str = "--out", example: str = "results.json") -> Path:
    """Check an output path before any work, so a command never fails after its work is done and never writes
    over what it reads. `kind` "file": one file is written there, so an existing directory is refused (the message
    suggests a file inside it); "dir": files are written inside, so an existing non-directory is refused. Either
    way the output may neither be nor contain an existing input path (a dataset, a model directory)."""
    from imtune.errors import ImtuneError

    out = Path(out)
    if kind == "file" and out.is_dir():
        raise ImtuneError(f"{flag} {out} is a directory; give a file path, e.g. {out / example}")
    if kind == "dir" and out.exists() and not out.is_dir():
        raise ImtuneError(f"{flag} {out} exists and is not a directory")
    for parent in out.absolute().parents:
        if parent.exists() and not parent.is_dir():
            raise ImtuneError(f"{flag} {out}: {parent} is not a directory")
    target = out.resolve()
    for inp in inputs:
        if inp is None or not Path(inp).exists():  # a model alias or a missing file is nothing to protect
            continue
        src = Path(inp).resolve()
        if src == target:
            raise ImtuneError(f"{flag} {out} is an input of this command ({inp}); choose another output path")
        if src.is_relative_to(target):
            raise ImtuneError(f"{flag} {out} contains an input of this command ({inp}), which its outputs could "
                              f"replace; choose an output directory that holds no input")
    return out


# ---- processes that die with imtune -----------------------------------------------------------------------------------
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
_tie = {"on": False, "parent": 0, "prctl": None, "registered": False}  # a forked child reads its parent's copy


def _libc_prctl():
    import ctypes

    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # no prctl (not Linux, an unusual libc)
        return None


def die_with_parent(sig: int = signal.SIGKILL, parent: int | None = None) -> bool:
    """Ask the kernel to send `sig` to this process when its parent dies (Linux); False where it cannot. `parent`:
    the pid the parent had; if it is already gone (died before the request took effect), die now."""
    prctl = _tie["prctl"] or (_libc_prctl() if sys.platform.startswith("linux") else None)
    if prctl is None or prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        return False
    if (os.getppid() != parent) if parent else os.getppid() == 1:  # init adopted us: the parent is gone
        os.kill(os.getpid(), sig)
    return True


def _tie_forked_child() -> None:
    if not _tie["on"]:
        return
    # Ctrl-C reaches the whole terminal process group: the parent handles it (and stops its workers), so a worker
    # neither prints a traceback nor dies half-way through a write of its own.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the parent's handler (cli.main) is not the worker's: a pool
    # terminates its workers with SIGTERM
    die_with_parent(signal.SIGKILL, _tie["parent"])
    _tie["parent"] = os.getpid()  # for the children this one forks in turn


@contextlib.contextmanager
def children_die_with_us() -> Iterator[None]:
    """Every process forked inside the block (a `datasets` map's pool workers and its manager process) is killed by
    the kernel when this process dies, even by SIGKILL, and ignores Ctrl-C, which is this process' to handle."""
    if not _tie["registered"] and hasattr(os, "register_at_fork"):
        _tie["prctl"] = _libc_prctl() if sys.platform.startswith("linux") else None  # loaded before any fork
        os.register_at_fork(after_in_child=_tie_forked_child)
        _tie["registered"] = True
    was = (_tie["on"], _tie["parent"])
    _tie["on"], _tie["parent"] = True, os.getpid()
    try:
        yield
    finally:
        _tie["on"], _tie["parent"] = was
