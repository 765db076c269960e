"""Run untrusted, model-written Python (HumanEval completions) in a separate, limited process.

Every program runs as `python -I -B` in a fresh process (never in the evaluator's own process) inside a new
temporary directory that is deleted afterwards, with a minimal environment, in its own session so that the
whole process group can be killed. A small guard script runs first in the child and then executes the program.

What is enforced by the operating system (holds whatever the program does):
  * wall-clock timeout: the process group is SIGKILLed when it expires;
  * CPU time (RLIMIT_CPU), address space (RLIMIT_AS, so large allocations fail with MemoryError), size of any
    file written (RLIMIT_FSIZE) and no core dumps; these limits are inherited by any child processes;
  * no network when `unshare -rn` works (Linux with unprivileged user namespaces): the program gets an empty
    network namespace with only a down loopback interface, so no connection can leave the machine.
What is best effort (Python-level guards installed before the program runs; code that uses ctypes, or reaches
the C-level `_io`/`posix` functions some other way, can get around them):
  * socket creation raises OSError (the only network barrier when `unshare` is unavailable);
  * files can be created, written, renamed or deleted only inside the temporary working directory (reads are
    allowed, the interpreter needs its standard library);
  * new processes cannot be started (os.system, subprocess, fork, exec, spawn), since a child process would not
    carry the Python-level guards.
Not covered: fork bombs beyond the guard (no RLIMIT_NPROC: it counts every process of the user, so a useful
value cannot be chosen here), reading files the user can read, and CPU/memory contention with the evaluator.
For adversarial code use a container or VM; this sandbox is meant for benchmark completions from a model.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache

_GUARD = r'''
import builtins, io, os, resource, sys

work, prog, mem, cpu, fsize = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
if mem > 0:
    resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
if cpu > 0:
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

import socket, _socket

def _no_network(*a, **k):
    raise OSError(101, "network access is disabled in the imtune sandbox")

class _NoSocket:
    def __new__(cls, *a, **k):
        _no_network()

for _mod in (socket, _socket):
    for _name in ("socket", "SocketType"):
        if hasattr(_mod, _name):
            setattr(_mod, _name, _NoSocket)
for _name in ("create_connection", "create_server", "socketpair", "fromfd", "getaddrinfo", "gethostbyname"):
    if hasattr(socket, _name):
        setattr(socket, _name, _no_network)

_root = os.path.realpath(work)
_real = {n: getattr(os, n) for n in dir(os) if callable(getattr(os, n, None))}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

def _inside(path):
    if isinstance(path, int):
        return True
    p = os.path.realpath(os.fspath(path))
    return p == _root or p.startswith(_root + os.sep)

def _deny(path):
    raise PermissionError(13, "writing outside the sandbox directory is not allowed", os.fspath(path))

_open = io.open

def _guarded_open(file, mode="r", *a, **k):
    if any(c in mode for c in "wax+") and not _inside(file):
        _deny(file)
    return _open(file, mode, *a, **k)

builtins.open = io.open = _guarded_open

def _guarded_os_open(path, flags, *a, **k):
    if flags & _WRITE_FLAGS and (k.get("dir_fd") is not None or not _inside(path)):
        _deny(path)
    return _real["open"](path, flags, *a, **k)

os.open = _guarded_os_open

def _path_guard(name, nargs):
    real = _real[name]
    def f(*a, **k):
        if k.get("dir_fd") is not None or k.get("src_dir_fd") is not None or k.get("dst_dir_fd") is not None:
            _deny(a[0] if a else "?")
        for p in a[:nargs]:
            if not _inside(p):
                _deny(p)
        return real(*a, **k)
    return f

for _name, _n in (("remove", 1), ("unlink", 1), ("rmdir", 1), ("mkdir", 1), ("rename", 2), ("replace", 2),
                  ("symlink", 2), ("link", 2), ("truncate", 1), ("chmod", 1), ("chown", 1), ("lchown", 1),
                  ("utime", 1), ("mkfifo", 1), ("mknod", 1)):
    if _name in _real:
        setattr(os, _name, _path_guard(_name, _n))

def _no_process(*a, **k):
    raise PermissionError(1, "starting processes is not allowed in the imtune sandbox")

for _name in ("system", "popen", "fork", "forkpty", "execv", "execve", "execl", "execle", "execlp", "execlpe",
              "execvp", "execvpe", "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnv", "spawnve", "spawnvp",
              "spawnvpe", "posix_spawn", "posix_spawnp", "kill", "killpg"):
    if hasattr(os, _name):
        setattr(os, _name, _no_process)
import subprocess
subprocess.Popen = _no_process
subprocess._fork_exec = _no_process

with _open(prog, "r", encoding="utf-8") as _f:
    _src = _f.read()
del _f, _name, _n, _mod
sys.argv = [prog]
_code = compile(_src, prog, "exec")
exec(_code, {"__name__": "__main__", "__file__": prog, "__builtins__": builtins})
'''


@dataclass(frozen=True)
class ExecResult:
    status: str  # "passed" | "failed" | "timeout"
    returncode: int | None
    stdout: str
    stderr: str
    duration_s: float
    error: str = ""  # one line: the exception, the signal, or the limit that was hit

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@lru_cache(maxsize=1)
def network_isolation_available() -> bool:
    """Whether `unshare -rn` (new user + network namespace, no privileges needed) works on this machine."""
    exe = shutil.which("unshare")
    if not exe or not sys.platform.startswith("linux"):
        return False
    try:
        r = subprocess.run([exe, "-rn", "true"], capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return False
    return r.returncode == 0


def _tail(path: str, limit: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - limit))
            data = f.read()
    except OSError:
        return ""
    return data.decode("utf-8", errors="replace")


def _last_exception(stderr: str) -> str:
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    for ln in reversed(lines):
        head = ln.split(":", 1)[0].strip()
        if head and not ln.startswith(" ") and (head.endswith(("Error", "Exception", "Exit", "Interrupt"))
                                                or "." in head and head.split(".")[-1][:1].isupper()):
            return ln.strip()[:300]
    return lines[-1].strip()[:300] if lines else ""


def run_program(source: str, *, timeout: float = 10.0, memory_mb: int = 1024, cpu_seconds: int | None = None,
                file_size_mb: int = 16, max_output: int = 65536, isolate_network: bool | None = None
                ) -> ExecResult:
    """Run `source` as a Python program in a separate sandboxed process; see the module docstring.

    `cpu_seconds` defaults to the wall-clock timeout rounded up. `isolate_network=None` uses `unshare -rn` when it
    works here; True requires it (RuntimeError if unavailable); False relies on the socket guard alone.
    """
    if isolate_network is None:
        isolate_network = network_isolation_available()
    elif isolate_network and not network_isolation_available():
        raise RuntimeError("network isolation requested but `unshare -rn` does not work on this machine")
    cpu = int(cpu_seconds if cpu_seconds is not None else max(1, int(timeout + 0.999)))
    root = tempfile.mkdtemp(prefix="imtune-sandbox-")
    try:
        work = os.path.join(root, "work")
        os.mkdir(work, 0o700)
        prog = os.path.join(work, "program.py")
        guard = os.path.join(root, "guard.py")
        with open(prog, "w", encoding="utf-8") as f:
            f.write(source)
        with open(guard, "w", encoding="utf-8") as f:
            f.write(_GUARD)
        cmd = [sys.executable, "-I", "-B", guard, work, prog, str(memory_mb * 2**20 if memory_mb else 0),
               str(cpu), str(file_size_mb * 2**20)]
        if isolate_network:
            cmd = [shutil.which("unshare") or "unshare", "-rn"] + cmd
        env = {"PATH": "/usr/bin:/bin", "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
        out_path, err_path = os.path.join(root, "stdout"), os.path.join(root, "stderr")
        t0 = time.monotonic()
        timed_out = False
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(cmd, cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    start_new_session=True, close_fds=True)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                # Kill the whole session: the program may have left children behind even when it exited.
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        duration = time.monotonic() - t0
        stdout, stderr = _tail(out_path, max_output), _tail(err_path, max_output)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    rc = proc.returncode
    if timed_out:
        return ExecResult("timeout", rc, stdout, stderr, duration, f"timed out after {timeout:g} s (wall clock)")
    if rc == 0:
        return ExecResult("passed", rc, stdout, stderr, duration)
    if rc < 0:
        sig = -rc
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
        if sig == signal.SIGXCPU:
            return ExecResult("timeout", rc, stdout, stderr, duration, f"CPU time limit of {cpu} s exceeded")
        return ExecResult("failed", rc, stdout, stderr, duration, f"killed by {name}")
    error = _last_exception(stderr) or f"exit status {rc}"
    if error.startswith("MemoryError"):
        error = f"MemoryError (memory limit {memory_mb} MB)"
    return ExecResult("failed", rc, stdout, stderr, duration, error)


def run_programs(sources: list[str], *, workers: int | None = None, **kwargs) -> list[ExecResult]:
    """`run_program` over many sources with a pool of `workers` concurrent processes; results in input order."""
    if not sources:
        return []
    workers = workers or max(1, min(4, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda s: run_program(s, **kwargs), sources))
