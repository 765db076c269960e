"""The script `sandbox.run_program` runs in the child process (as `python -I -B -c <this file> ...`).

It reads the run's secret from stdin and replaces stdin by /dev/null before any program code runs, sets the
resource limits (hard, so the program cannot raise them), runs the program, and prints the secret on its own
line only when the program returned normally. The evaluator counts a pass only when it finds that line and the
exit status is 0, so `sys.exit(0)`, `exit()`, `raise SystemExit`, `os._exit(0)` or an exit hook are failures.

Without OS isolation (`allow_unsafe=True`, no bubblewrap) it also installs HumanEval-style Python-level guards
(no sockets, no writes outside the work directory, no new processes) against accidents; any program can get
around those, see sandbox.py. Importing this module does nothing.
"""

import os
import sys


def _limits(mem: int, cpu: int, fsize: int, nproc: int) -> None:
    import resource

    for what, value in ((resource.RLIMIT_AS, mem), (resource.RLIMIT_CPU, cpu), (resource.RLIMIT_FSIZE, fsize),
                        (resource.RLIMIT_NPROC, nproc), (resource.RLIMIT_CORE, 0)):
        if value > 0 or what == resource.RLIMIT_CORE:
            hard = value + 1 if what == resource.RLIMIT_CPU else value  # SIGXCPU first, then SIGKILL
            resource.setrlimit(what, (value, hard))


def _guards(work: str) -> None:
    import builtins
    import io
    import socket
    import subprocess

    def refuse(*a, **k):
        raise PermissionError(1, "not allowed in the unisolated imtune sandbox")

    for name in ("socket", "SocketType", "create_connection", "create_server", "socketpair", "fromfd",
                 "getaddrinfo", "gethostbyname"):
        if hasattr(socket, name):
            setattr(socket, name, refuse)
    root = os.path.realpath(work)

    def inside(path) -> bool:
        if isinstance(path, int):
            return True
        p = os.path.realpath(os.fspath(path))
        return p == root or p.startswith(root + os.sep)

    real_open, real_os_open = io.open, os.open
    writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def guarded_open(file, mode="r", *a, **k):
        if any(c in mode for c in "wax+") and not inside(file):
            raise PermissionError(13, "writing outside the sandbox directory is not allowed", str(file))
        return real_open(file, mode, *a, **k)

    def guarded_os_open(path, flags, *a, **k):
        if flags & writing and (k.get("dir_fd") is not None or not inside(path)):
            raise PermissionError(13, "writing outside the sandbox directory is not allowed", str(path))
        return real_os_open(path, flags, *a, **k)

    builtins.open = io.open = guarded_open
    os.open = guarded_os_open
    for name in ("remove", "unlink", "rmdir", "mkdir", "makedirs", "rename", "replace", "symlink", "link",
                 "truncate", "chmod", "chown", "utime", "mkfifo", "mknod", "system", "popen", "fork", "forkpty",
                 "execv", "execve", "execvp", "execvpe", "spawnv", "spawnve", "posix_spawn", "posix_spawnp",
                 "kill", "killpg"):
        if hasattr(os, name):
            setattr(os, name, refuse)
    subprocess.Popen = refuse


def main() -> None:
    prog, mem, cpu, fsize, nproc, guard = sys.argv[1], *map(int, sys.argv[2:7])
    secret = sys.stdin.readline().strip()
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    _limits(mem, cpu, fsize, nproc)
    if guard:
        _guards(os.path.dirname(prog))
    with open(prog, encoding="utf-8") as f:
        code = compile(f.read(), prog, "exec")
    sys.argv = [prog]
    exec(code, {"__name__": "__main__", "__file__": prog, "__builtins__": __builtins__})
    sys.stdout.flush()
    os.write(1, f"\n{secret}\n".encode())


if __name__ == "__main__":
    main()
