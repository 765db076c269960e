"""The code sandbox: OS isolation (bubblewrap), limits, the pass marker, and the hostile corpus in tests/hostile/.

Every attack from issue 8 must fail, leave no file outside the sandbox's temp dir and no process behind, and
never touch the evaluator. Without bubblewrap these tests skip, except on CI (CI=true), where they fail.
"""

import contextlib
import glob
import json
import os
import socket
import string
import tempfile
import threading
import time
from pathlib import Path

import pytest

from imtune.evaluation import sandbox as S
from imtune.evaluation.humaneval import humaneval_program, load_humaneval
from imtune.evaluation.sandbox import UnsafeExecError, isolation
from imtune.evaluation.sandbox import run_program as _run_program
from imtune.evaluation.sandbox import run_programs as _run_programs

HOSTILE = Path(__file__).parent / "hostile"
pytestmark = pytest.mark.skipif(os.name != "posix", reason="the sandbox uses POSIX resource limits")
isolated = pytest.mark.skipif(not isolation().isolated and not os.environ.get("CI"),
                              reason=f"no OS isolation here: {isolation().reason}")


def run_program(source: str, **kw):
    """The behaviour tests run wherever they can: unisolated (explicitly allowed) where bubblewrap is missing."""
    return _run_program(source, **{"allow_unsafe": not isolation().isolated, **kw})


def run_programs(sources: list[str], **kw):
    return _run_programs(sources, **{"allow_unsafe": not isolation().isolated, **kw})


def _attack(name: str, **values) -> str:
    return string.Template((HOSTILE / "attacks" / f"{name}.py.tmpl").read_text()).substitute(values)


def _token() -> tuple[str, str]:
    """A unique sleep duration, so processes an attack leaves behind can be found by their command line."""
    secs = f"{time.time_ns() % 10**6 + 1000}.{os.getpid() % 1000:03d}"
    return secs, secs.replace(".", "")


def _processes_with(text: str) -> list[int]:
    found = []
    for d in glob.glob("/proc/[0-9]*/cmdline"):
        try:
            if text.encode() in Path(d).read_bytes():
                found.append(int(d.split("/")[2]))
        except OSError:
            pass
    return found


@pytest.fixture
def home():
    return os.path.expanduser("~")


# ------------------------------------------------------------------------------------------------ plain runs

def test_correct_program_passes_in_another_process_as_nobody():
    r = run_program("import os\nprint(os.getpid(), os.getuid())\nassert sum([1, 2]) == 3", timeout=20)
    assert r.passed and r.status == "passed" and r.returncode == 0
    pid, uid = map(int, r.stdout.split())
    assert pid != os.getpid()
    if isolation().isolated:
        assert uid == S.NOBODY and pid < 10  # a fresh PID namespace


def test_wrong_answer_fails_with_the_assertion():
    r = run_program("def f(x):\n    return x * 2\nassert f(2) == 5, 'f(2) should be 5'", timeout=20)
    assert not r.passed and r.status == "failed"
    assert r.error == "AssertionError: f(2) should be 5"


def test_exceptions_are_reported():
    r = run_program("raise KeyError('missing')", timeout=20)
    assert r.status == "failed" and r.error.startswith("KeyError")
    r = run_program("def f(:\n  pass", timeout=20)
    assert r.status == "failed" and "SyntaxError" in r.error


def test_infinite_loop_times_out():
    r = run_program("while True:\n    pass", timeout=1.5)
    assert r.status == "timeout" and "timed out" in r.error
    assert r.duration_s < 15


def test_cpu_time_limit():
    r = run_program("while True:\n    pass", timeout=60, cpu_seconds=1)
    assert r.status == "timeout" and "CPU" in r.error


def test_memory_bomb_is_stopped():
    r = run_program("chunks = []\nwhile True:\n    chunks.append(bytearray(100 * 2**20))", timeout=30,
                    memory_mb=300)
    assert r.status == "failed" and "MemoryError" in r.error


def test_minimal_environment():
    os.environ["IMTUNE_SANDBOX_SECRET"] = "x"
    try:
        r = run_program("import os\nprint(sorted(os.environ))", timeout=20)
    finally:
        del os.environ["IMTUNE_SANDBOX_SECRET"]
    assert r.passed and "IMTUNE_SANDBOX_SECRET" not in r.stdout


def test_run_programs_keeps_order_and_leaves_no_temp_dirs():
    before = set(glob.glob(os.path.join(tempfile.gettempdir(), "imtune-sandbox-*")))
    res = run_programs(["print(1)", "raise SystemExit(3)", "print(3)"], workers=2, timeout=20)
    assert [r.status for r in res] == ["passed", "failed", "passed"]
    assert res[2].stdout.strip() == "3"
    after = set(glob.glob(os.path.join(tempfile.gettempdir(), "imtune-sandbox-*")))
    assert after <= before


# ------------------------------------------------------------------------------------------------ pass marker

def _fakes() -> list[dict]:
    with open(HOSTILE / "faking_completions.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("fake", _fakes(), ids=lambda f: f["trick"])
def test_faking_completion_is_not_a_pass(fake):
    problem = {p["task_id"]: p for p in load_humaneval()}[fake["task_id"]]
    r = run_program(humaneval_program(problem, fake["completion"]), timeout=20)
    assert r.status == "failed", (fake["trick"], r)
    good = run_program(humaneval_program(problem, problem["canonical_solution"]), timeout=20)
    assert good.passed, good  # the same problem does pass with a right answer


def test_exit_without_finishing_is_named():
    r = run_program("import sys\nprint('half')\nsys.exit(0)\nprint('never')", timeout=20)
    assert r.status == "failed" and r.returncode == 1 and "exited before the program finished" in r.error
    assert r.stdout == "half\n"


def test_marker_never_shows_in_stdout():
    r = run_program("print('a')", timeout=20)
    assert r.passed and r.stdout == "a\n"


# ------------------------------------------------------------------------------------------------ attacks

@isolated
def test_files_in_temp_dir_and_home_are_not_created(home):
    secs, token = _token()
    outside = os.path.join(tempfile.gettempdir(), f"imtune-escape-{token}.txt")
    r = run_program(_attack("tmp_file", outside=outside), timeout=20)
    assert not os.path.exists(outside)
    # Inside, /tmp is the sandbox's own work dir: the write lands there and is deleted with it.
    assert r.passed or r.status == "failed"
    r = run_program(_attack("home_file", home=home, token=token), timeout=20)
    assert r.status == "failed" and ("Read-only" in r.error or "Permission" in r.error), r.error
    assert not glob.glob(os.path.join(home, f".imtune-escape*{token}"))


@isolated
def test_file_outside_is_not_deleted_or_overwritten():
    victim_dir = tempfile.mkdtemp(prefix="imtune-victim-", dir="/var/tmp" if os.access("/var/tmp", os.W_OK)
                                  else None)
    victim = os.path.join(victim_dir, "precious.txt")
    Path(victim).write_text("precious")
    try:
        r = run_program(_attack("delete_outside", victim=victim), timeout=20)
        assert r.status == "failed", r
        assert Path(victim).read_text() == "precious"
    finally:
        os.remove(victim)
        os.rmdir(victim_dir)


@isolated
def test_exec_of_bin_sh_is_harmless(home):
    secs, token = _token()
    outside = os.path.join(tempfile.gettempdir(), f"imtune-sh-{token}.txt")
    r = run_program(_attack("exec_sh", outside=outside, home=home, token=token, token_secs=secs), timeout=20)
    assert r.status == "failed", r  # the program never ran to its end
    assert not os.path.exists(outside) and not glob.glob(os.path.join(home, f".imtune-sh-{token}"))
    assert _processes_with(secs) == []


@isolated
def test_evaluator_cannot_be_killed():
    r = run_program(_attack("kill_parent", evaluator_pid=os.getpid()), timeout=20)
    assert r.status == "failed" and "ProcessLookupError" in r.error, r  # the evaluator is not even visible


@isolated
def test_setsid_child_does_not_outlive_the_sandbox():
    secs, _ = _token()
    r = run_program(_attack("setsid_survivor", token_secs=secs), timeout=20)
    assert r.passed and "left a survivor" in r.stdout
    assert _processes_with(secs) == []


@isolated
def test_fork_bomb_is_capped_and_leaves_nothing():
    secs, _ = _token()
    t0 = time.monotonic()
    r = run_program(_attack("fork_bomb", token_secs=secs), timeout=4, max_processes=24)
    assert r.status == "timeout" and time.monotonic() - t0 < 20
    if isolation().user is not None or os.geteuid() != 0:  # RLIMIT_NPROC holds (never for root)
        forked, in_namespace = map(int, r.stdout.split())
        assert forked <= 24 and in_namespace <= 26, r.stdout
    assert _processes_with(secs) == []


@isolated
def test_no_network_even_to_the_evaluators_loopback():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.2)
    accepted = []

    def serve():
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not accepted:
            with contextlib.suppress(TimeoutError, OSError):
                accepted.append(server.accept())

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        r = run_program(_attack("network", port=server.getsockname()[1]), timeout=20)
    finally:
        t.join(timeout=15)
        server.close()
    assert r.status == "failed" and "connected" not in r.stdout, r
    assert "refused" in r.error.lower() and "unreachable" in r.error.lower(), r.error
    assert not accepted


@isolated
def test_home_directory_is_hidden(home):
    _, token = _token()
    secret = os.path.join(home, f".imtune-secret-{token}")
    Path(secret).write_text("api-key")
    try:
        r = run_program(_attack("read_home", home=home, token=token), timeout=20)
    finally:
        os.remove(secret)
    assert r.status == "failed" and "api-key" not in r.stdout and "FileNotFoundError" in r.error, r


@isolated
def test_limits_cannot_be_raised_from_inside():
    src = ("import resource\nsoft, hard = resource.getrlimit(resource.RLIMIT_NPROC)\nprint(hard)\n"
           "resource.setrlimit(resource.RLIMIT_NPROC, (hard * 2, hard * 2))")
    r = run_program(src, timeout=20, max_processes=20)
    assert r.stdout.strip() == "20" and r.status == "failed" and "ValueError" in r.error, r


# ------------------------------------------------------------------------------------------------ no isolation

def test_unisolated_execution_needs_explicit_consent(monkeypatch):
    monkeypatch.setattr(S, "isolation", lambda: S.Isolation(None, None, S.sys.executable, "no bwrap (test)"))
    with pytest.raises(UnsafeExecError, match="unisolated.*no bwrap.*--allow-unsafe-exec"):
        _run_program("print(1)")
    with pytest.raises(UnsafeExecError):
        _run_programs(["print(1)"])
    assert _run_program("print(1)", allow_unsafe=True, timeout=20).passed
    # The Python guards still stop the accidents they can (a program that means harm gets past them).
    outside = os.path.join(tempfile.gettempdir(), f"imtune-unsafe-{os.getpid()}.txt")
    r = _run_program(f"open({outside!r}, 'w').write('x')", allow_unsafe=True, timeout=20)
    assert r.status == "failed" and "outside the sandbox" in r.error and not os.path.exists(outside)
    fake = _fakes()[0]
    problem = load_humaneval()[0]
    r = _run_program(humaneval_program(problem, fake["completion"]), allow_unsafe=True, timeout=20)
    assert r.status == "failed"
