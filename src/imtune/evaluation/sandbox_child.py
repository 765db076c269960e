"""The script `sandbox.run_program` runs in the child process (as `python -I -B -c <this file> ...`).

It sets the resource limits (hard, so the program cannot raise them), locks the interpreter (`_lock`), runs the
program, and ends the process normally (exit status 0) only when the program returned: any exception, SystemExit
included, is reported on stderr and ends it with status 1. The evaluator counts a pass only for status 0.

There is no secret or marker for the program to find: the verdict is the exit status, and the program has no way
to end the process with status 0 early. `_lock` takes away every way to do that from Python: `os._exit`/`posix._exit`
are replaced, exec/settrace/setprofile/ctypes/crafted bytecode (`code.__new__`, `marshal`)/`/proc/*/mem` are refused
by an audit hook (which cannot be removed), `_imp` cannot rebuild `posix`, `_signal`, `_thread`, `_imp` or load a
native extension from outside the Python installation, no Python signal handler can be installed (none can raise
into the harness), and the process is made non-dumpable, so no process it starts can ptrace it or write its memory.
Reading the harness's frames (`sys._getframe`, `sys._current_frames`, a traceback in an excepthook) finds nothing
that helps.

Without OS isolation (`allow_unsafe=True`, no bubblewrap) it also installs HumanEval-style Python-level guards
(no sockets, no writes outside the work directory, no new processes) against accidents; any program can get
around those, see sandbox.py. Importing this module does nothing.
"""

import contextlib
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


# Imported before the lock (from their cached bytecode): the typical HumanEval program needs no import after it.
_PRELOAD = ("typing", "math", "re", "collections", "itertools", "functools", "string", "heapq", "bisect", "copy",
            "operator", "hashlib", "fractions", "random")
_DENIED_EVENTS = frozenset({"os.exec", "sys.settrace", "sys.setprofile", "sys._settraceallthreads",
                            "sys._setprofileallthreads", "code.__new__", "marshal.loads", "marshal.load",
                            "gc.get_objects", "gc.get_referrers", "gc.get_referents"})
_DENIED_PREFIXES = ("ctypes.", "sys.monitoring", "cffi")
_PROTECTED = frozenset({"posix", "_signal", "_thread", "_imp", "_ctypes", "builtins", "sys"})


def _refuse(what: str):
    def refuse(*a, **k):
        raise PermissionError(1, f"{what} is not allowed in the imtune sandbox")
    return refuse


def _audit(event: str, args) -> None:
    if event in _DENIED_EVENTS or event.startswith(_DENIED_PREFIXES):
        raise PermissionError(1, f"{event} is not allowed in the imtune sandbox")
    if event == "open" and args and isinstance(args[0], str | bytes):
        name = os.path.basename(os.fsdecode(args[0]))
        if name in ("mem", "pagemap"):  # writing /proc/self/mem patches the interpreter in memory
            raise PermissionError(1, f"opening {name} is not allowed in the imtune sandbox")


def _guard_imp() -> None:
    """`_imp` cannot rebuild a protected module (a fresh `posix` would bring back the real `_exit`) nor load native
    code from outside the Python installation (a program could write its own extension module)."""
    import _imp

    roots = tuple({os.path.realpath(p) + os.sep for p in (sys.base_prefix, sys.prefix, sys.exec_prefix)})
    create_builtin, exec_builtin, create_dynamic = _imp.create_builtin, _imp.exec_builtin, _imp.create_dynamic

    def guarded_create_builtin(spec):
        if spec.name in _PROTECTED:
            raise PermissionError(1, f"rebuilding {spec.name} is not allowed in the imtune sandbox")
        return create_builtin(spec)

    def guarded_exec_builtin(mod):
        if getattr(mod, "__name__", None) in _PROTECTED:
            raise PermissionError(1, "re-initialising a protected module is not allowed in the imtune sandbox")
        return exec_builtin(mod)

    def guarded_create_dynamic(spec, *a):
        origin = os.path.realpath(str(getattr(spec, "origin", "") or ""))
        if spec.name in _PROTECTED or not origin.startswith(roots):
            raise PermissionError(1, f"loading native code from {origin} is not allowed in the imtune sandbox")
        return create_dynamic(spec, *a)

    _imp.create_builtin, _imp.exec_builtin = guarded_create_builtin, guarded_exec_builtin
    _imp.create_dynamic = guarded_create_dynamic


def _non_dumpable() -> None:
    """PR_SET_DUMPABLE 0: processes the program starts (same user) can neither ptrace this one nor open its memory."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(4, 0, 0, 0, 0)
    except Exception:  # no ctypes in this interpreter: the other locks still hold
        pass
    for name in [m for m in sys.modules if m == "ctypes" or m.startswith(("ctypes.", "_ctypes"))]:
        del sys.modules[name]


def _lock() -> None:
    import _signal
    import posix
    import signal

    _non_dumpable()
    for name in _PRELOAD:
        with contextlib.suppress(ImportError):
            __import__(name)
    sys.pycache_prefix = "/nonexistent-imtune-pycache"  # later imports compile from source: no marshal needed
    _guard_imp()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # interrupt_main / SIGINT cannot raise into the harness
    signal.signal = _signal.signal = _refuse("installing a signal handler")
    os._exit = posix._exit = _refuse("os._exit")
    sys.addaudithook(_audit)


def _report(e: BaseException) -> None:
    """One line on stderr naming how the program ended (the evaluator shows the last exception line)."""
    try:
        if isinstance(e, SystemExit):
            line = "SystemExit: exited before the program finished (sys.exit, exit(), quit() or SystemExit)"
        else:
            line = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
    except BaseException:  # a hostile __str__: the type name is enough
        line = "Exception: the program raised an exception that cannot be printed"
    try:
        sys.stderr.flush()
        os.write(2, ("\n" + line + "\n").encode("utf-8", "replace"))
    except BaseException:
        pass


def main() -> None:
    prog, mem, cpu, fsize, nproc, guard = sys.argv[1], *map(int, sys.argv[2:7])
    fail = SystemExit  # a local: the program can read it through frames but never rebind it
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    _limits(mem, cpu, fsize, nproc)
    if guard:
        _guards(os.path.dirname(prog))
    with open(prog, encoding="utf-8") as f:
        code = compile(f.read(), prog, "exec")
    sys.argv = [prog]
    _lock()
    try:
        exec(code, {"__name__": "__main__", "__file__": prog, "__builtins__": __builtins__})
        sys.stdout.flush()
    except BaseException as e:
        _report(e)
        raise fail(1) from None


if __name__ == "__main__":
    main()
