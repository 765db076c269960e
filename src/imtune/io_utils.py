"""Writing outputs without harm, by one rule for every command:

- An existing file imtune did not write is never replaced, with or without --overwrite: the command refuses, in
  one line naming it, before any work (`prepare_output`), and the writer refuses again at the write itself.
- A file imtune wrote may be replaced only with --overwrite (or by the command that keeps it as its own resumable
  state: compare, advise --pilot, train --resume).
- What imtune wrote is known from a small manifest, `.imtune-manifest.json`, in the directory of the file: the
  names (paths relative to that directory) of the files imtune wrote there. `imtune train` keeps the same manifest
  for its run directory (training/outputs.py). A file is imtune's when the manifest of its directory, or of a
  directory above it, lists it (or a tree holding it).
- Every output goes to a temp name beside the target, is flushed to disk and renamed: a failed, interrupted or
  killed write (full disk, read-only directory, Ctrl-C, SIGKILL) leaves the old file or nothing, never half a file;
  an OSError ends the command with one line naming the path and the reason.

Also here: `remove_dead_builds` clears the temp directories of builds that were killed, and worker processes
imtune starts die with it (`children_die_with_us`, `die_with_parent`), so a killed run leaves no process behind
writing into its outputs."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

MANIFEST = ".imtune-manifest.json"


@contextlib.contextmanager
def atomic_path(path: str | Path, own: bool = True) -> Iterator[Path]:
    """A temp path beside `path` to write to; flushed and renamed onto `path` when the block succeeds, removed
    otherwise. `own` (outputs): refuse to replace a file imtune did not write, and record `path` in its directory's
    manifest before the rename. Caches, the manifest itself and files of the repository (bench) pass own=False."""
    from imtune.errors import ImtuneError

    path = Path(path)
    if own and os.path.lexists(path) and not written_by_imtune(path):
        raise ImtuneError(f"{path} exists and was not written by imtune; imtune never replaces it (move it away, "
                          "or choose another output path)")
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        yield Path(tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; outputs are meant to be shared like any other file
        _fsync(tmp)
        if own:
            _record(path)
        os.replace(tmp, path)
    except OSError as e:
        if not own:  # a cache's caller decides (an unwritable cache may only cost time)
            raise
        raise ImtuneError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)  # gone already after the rename; else half a file nobody may trust


_OS_ERROR = re.compile(r"os error (\d+)")


def write_error_reason(e: BaseException) -> str | None:
    """Why a write failed, when `e` is a failed write: an OSError, or a library's own error wrapping one
    (safetensors names "os error N"; torch.save's writer reports only a short write). None: not a write error."""
    if isinstance(e, OSError):
        return e.strerror or str(e)
    m = _OS_ERROR.search(str(e))
    if m:
        return os.strerror(int(m.group(1)))
    if isinstance(e, RuntimeError) and any(s in str(e) for s in ("inline_container", "file write failed")):
        return "the write stopped short (disk full, or the file size limit reached?)"
    return None


def fsync_tree(d: str | Path) -> None:
    """Flush every file under `d` and the directories themselves to disk (before a rename commits them)."""
    for root, _, files in os.walk(d):
        for f in files:
            _fsync(os.path.join(root, f))
        _fsync(root)


def _fsync(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_manifest(d: str | Path) -> dict:
    """The manifest of directory `d` ({} when it has none); an unreadable one is refused rather than guessed."""
    from imtune.errors import ImtuneError

    m = Path(d) / MANIFEST
    try:
        data = json.loads(m.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise ImtuneError(f"{m}: unreadable manifest ({e}); move it away to start over") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(k, []), list) for k in ("files", "trees")):
        raise ImtuneError(f"{m}: not an imtune manifest; move it away to start over")
    return data


def write_manifest(d: str | Path, data: dict) -> None:
    atomic_write_json(Path(d) / MANIFEST, {"written_by": "imtune", **data}, own=False)


def written_by_imtune(path: str | Path) -> bool:
    """Whether a manifest of `path`'s directory or of one above lists it (or a tree holding it)."""
    path = Path(path).absolute()
    for d in path.parents:
        if (d / MANIFEST).is_file():
            m = read_manifest(d)
            rel = path.relative_to(d)
            if rel.as_posix() in m.get("files", []) or any(
                    Path(t) in rel.parents for t in m.get("trees", [])):
                return True
    return False


def _record(path: Path) -> None:
    """Add `path` to its directory's manifest (under a lock: two commands may write into one directory at once)."""
    import fcntl

    fd = os.open(path.parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        m = read_manifest(path.parent)
        if path.name not in m.get("files", []):
            m["files"] = sorted({*m.get("files", []), path.name})
            m.pop("written_by", None)
            write_manifest(path.parent, m)
    finally:
        os.close(fd)  # releases the lock


def check_replace(path: str | Path, overwrite: bool, flag: str = "--out") -> None:
    """Refuse (one line naming `path`) to replace an existing file, unless imtune wrote it and `overwrite`."""
    from imtune.errors import ImtuneError

    path = Path(path)
    if not os.path.lexists(path):
        return
    if not written_by_imtune(path):
        raise ImtuneError(f"{flag}: {path} exists and was not written by imtune; imtune never replaces it, even "
                          f"with --overwrite (move it away, or choose another {flag})")
    if not overwrite:
        raise ImtuneError(f"{flag}: {path} exists (written by imtune before); pass --overwrite to replace it, or "
                          f"choose another {flag}")


def _check_writable(out: Path, flag: str) -> None:
    """The nearest existing directory of `out` must be writable: a read-only --out fails before any work."""
    from imtune.errors import ImtuneError

    d = out if out.is_dir() else out.parent
    while not d.exists() and d != d.parent:
        d = d.parent
    if not os.access(d, os.W_OK | os.X_OK):
        ro = hasattr(os, "statvfs") and os.statvfs(d).f_flag & os.ST_RDONLY
        raise ImtuneError(f"{flag} {out}: cannot write in {d} ({os.strerror(errno.EROFS if ro else errno.EACCES)})")


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


def atomic_write_text(path: str | Path, text: str, own: bool = True) -> Path:
    with atomic_path(path, own) as tmp:
        # A path that is not valid UTF-8 (an undecodable file name quoted in a README) is written escaped.
        tmp.write_text(text, encoding="utf-8", errors="backslashreplace")
    return Path(path)


def atomic_write_json(path: str | Path, obj, indent: int = 2, own: bool = True) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n", own)


def atomic_write_jsonl(path: str | Path, rows, own: bool = True) -> Path:
    return atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), own)


def _is_model_dir(d: Path) -> bool:
    return any((d / n).is_file() for n in ("config.json", "adapter_config.json"))


def prepare_output(out: str | Path, inputs: Iterable[str | Path | None] = (), kind: str = "file",
                   flag: str = "--out", example: str = "results.json", overwrite: bool = False,
                   names: Iterable[str] = ()) -> Path:
    """Check an output path before any work, so a command never fails after its work is done and never writes
    over what it reads or over a file it did not write. `kind` "file": one file is written there, so an existing
    directory is refused (the message suggests a file inside it); "dir": files are written inside (`names`, paths
    relative to it), so an existing non-directory is refused. Either way the output may neither be nor contain an
    existing input path (a dataset, a model directory), must be writable, and the files it names follow the rule
    of `check_replace` (resumable commands pass overwrite=True: their own files are their state)."""
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
        if src.is_dir() and target.is_relative_to(src) and not _is_model_dir(src):
            # A data directory is read whole (every data file in it): an output inside would become its data. A
            # model directory may hold a command's outputs, e.g. `loss --model run --out run/x.jsonl`.
            raise ImtuneError(f"{flag} {out} is inside {inp}, an input directory whose files this command reads; "
                              f"choose an output path outside it")
    _check_writable(out, flag)
    for p in [out] if kind == "file" else [out / n for n in names]:
        if p.name == MANIFEST:
            raise ImtuneError(f"{flag} {out}: {MANIFEST} is the name of imtune's own list of what it wrote")
        check_replace(p, overwrite, flag)
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


_SIGNALS = (signal.SIGINT, signal.SIGTERM)


_fork_mask = threading.local()  # per forking thread: two threads may fork at once (a pool's handler thread)


def _block_signals_over_fork() -> None:
    # Held pending across the fork, so a signal at that instant reaches the child only once it has its own
    # dispositions (the parent's Python handler must never run in a worker).
    _fork_mask.saved = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS) if _tie["on"] else None


def _unblock_in_parent() -> None:
    saved, _fork_mask.saved = getattr(_fork_mask, "saved", None), None
    if saved is not None:
        signal.pthread_sigmask(signal.SIG_SETMASK, saved)


def _tie_forked_child() -> None:
    if not _tie["on"]:
        return
    # Ctrl-C reaches the whole terminal process group: the parent handles it (and stops its workers), so a worker
    # neither prints a traceback nor dies half-way through a write of its own. A pool stops its workers by SIGTERM.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    die_with_parent(signal.SIGKILL, _tie["parent"])
    _tie["parent"] = os.getpid()  # for the children this one forks in turn
    _unblock_in_parent()


@contextlib.contextmanager
def children_die_with_us() -> Iterator[None]:
    """Every process forked inside the block (a `datasets` map's pool workers and its manager process) is killed by
    the kernel when this process dies, even by SIGKILL, and ignores Ctrl-C, which is this process' to handle."""
    if not _tie["registered"] and hasattr(os, "register_at_fork"):
        _tie["prctl"] = _libc_prctl() if sys.platform.startswith("linux") else None  # loaded before any fork
        os.register_at_fork(before=_block_signals_over_fork, after_in_parent=_unblock_in_parent,
                            after_in_child=_tie_forked_child)
        _tie["registered"] = True
    was = (_tie["on"], _tie["parent"])
    _tie["on"], _tie["parent"] = True, os.getpid()
    try:
        yield
    finally:
        _tie["on"], _tie["parent"] = was


def stop_children(grace_s: float = 2.0) -> None:
    """Terminate the worker processes this process started through multiprocessing / multiprocess (a pool that an
    interrupt caught half-built is never terminated by its own `with` block) and wait for them briefly."""
    procs = []
    for name in ("multiprocess", "multiprocessing"):
        mod = sys.modules.get(name)
        if mod is not None:
            procs += mod.active_children()
    for p in procs:
        with contextlib.suppress(OSError, AttributeError):
            p.terminate()
    for p in procs:
        with contextlib.suppress(OSError, AssertionError, AttributeError):
            p.join(grace_s)
