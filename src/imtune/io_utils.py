"""Writing outputs without harm: every output goes to a temp name beside the target and is renamed (nothing is
ever half-written), `remove_dead_builds` clears the temp directories of builds that were killed, and
`prepare_output` checks an `--out` path before any work is done."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
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
