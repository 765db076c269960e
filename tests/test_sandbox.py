"""The code sandbox: separate process, limits, no network, writes confined to a temp dir that is removed."""

import glob
import os
import tempfile

import pytest

from imtune.evaluation.sandbox import network_isolation_available, run_program, run_programs

pytestmark = pytest.mark.skipif(os.name != "posix", reason="the sandbox uses POSIX resource limits")


def test_correct_program_passes_and_runs_in_another_process():
    r = run_program("import os\nprint(os.getpid())\nassert sum([1, 2]) == 3", timeout=20)
    assert r.passed and r.status == "passed" and r.returncode == 0
    assert int(r.stdout.strip()) != os.getpid()


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


def test_network_is_blocked():
    src = "import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=2)"
    r = run_program(src, timeout=20)
    assert r.status == "failed" and r.error.startswith("OSError")
    # The in-process guard alone (no namespace) also refuses to create sockets.
    r = run_program("import socket\ns = socket.socket()\nprint('created')", timeout=20, isolate_network=False)
    assert r.status == "failed" and "network access is disabled" in r.error and "created" not in r.stdout


@pytest.mark.skipif(not network_isolation_available(), reason="unshare -rn is not available here")
def test_network_namespace_has_no_route_even_past_the_guard():
    # Reach the C-level socket module behind the Python guard: the empty network namespace still has no route.
    src = ("import importlib, sys\nsys.modules.pop('_socket', None)\nimport _socket\n"
           "s = _socket.socket(2, 1)\ns.settimeout(2)\ns.connect(('1.1.1.1', 80))")
    r = run_program(src, timeout=20)
    assert r.status == "failed" and r.error.startswith("OSError"), r.error
    assert "unreachable" in r.error.lower(), r.error


def test_files_are_written_only_inside_a_temp_dir_that_is_removed():
    outside = os.path.join(tempfile.gettempdir(), f"imtune-escape-{os.getpid()}.txt")
    src = ("import os\nopen('inside.txt', 'w').write('ok')\nprint(os.getcwd())\n"
           "assert open('inside.txt').read() == 'ok'\n"
           f"open({outside!r}, 'w').write('escaped')\n")
    r = run_program(src, timeout=20)
    assert r.status == "failed" and "PermissionError" in r.error and "outside the sandbox" in r.error
    workdir = r.stdout.strip()
    assert workdir and not os.path.exists(workdir)
    assert not os.path.exists(outside)
    r = run_program(f"import os\nos.makedirs({outside + '.d'!r})", timeout=20)
    assert r.status == "failed" and not os.path.exists(outside + ".d")


def test_subprocesses_are_refused():
    r = run_program("import subprocess\nsubprocess.run(['echo', 'hi'])", timeout=20)
    assert r.status == "failed" and "PermissionError" in r.error


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
