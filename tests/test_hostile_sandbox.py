"""Hostile programs against the pass verdict and the sandbox's walls (issue 23): forging a pass through the harness's
frames, reading a Hugging Face token kept outside the home directory, and temp dirs left by a killed evaluator."""

from __future__ import annotations

import glob
import os
import signal
import stat
import string
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from imtune.evaluation import sandbox as S
from imtune.evaluation.humaneval import humaneval_program, load_humaneval

ATTACKS = Path(__file__).parent / "hostile" / "attacks"
pytestmark = pytest.mark.skipif(os.name != "posix", reason="the sandbox uses POSIX resource limits")
isolated = pytest.mark.skipif(not S.isolation().isolated and not os.environ.get("CI"),
                              reason=f"no OS isolation here: {S.isolation().reason}")

# Every way to end the process with status 0 early, each tried in turn; the last one is a plain os._exit(0).
ESCAPE = """\
import os, posix
for attempt in (
    lambda: os._exit(0),
    lambda: posix._exit(0),
    lambda: __import__("_imp").create_builtin(__import__("importlib.util").util.find_spec("posix"))._exit(0),
    lambda: __import__("importlib").reload(posix)._exit(0),
    lambda: __import__("ctypes").CDLL(None)._exit(0),
    lambda: os.execv("/bin/true", ["true"]),
    lambda: open("/proc/self/mem", "r+b"),
    lambda: __import__("signal").signal(__import__("signal").SIGUSR1, lambda *a: os._exit(0)),
):
    try:
        attempt()
    except BaseException as e:
        print("blocked:", type(e).__name__)
os._exit(0)
"""


def run(source: str, **kw):
    return S.run_program(source, **{"allow_unsafe": not S.isolation().isolated, "timeout": 20, **kw})


def attack(name: str, **values) -> str:
    values.setdefault("escape", ESCAPE)
    values.setdefault("escape_indented", textwrap.indent(ESCAPE, "    "))
    return string.Template((ATTACKS / f"{name}.py.tmpl").read_text()).substitute(values)


@pytest.mark.parametrize("name", ["forge_getframe", "forge_excepthook", "forge_current_frames"])
def test_reading_the_harness_frames_cannot_forge_a_pass(name):
    problem = load_humaneval()[0]
    # A wrong answer whose module-level code tries to forge the pass before the tests run.
    completion = "    return None\n\n\n" + attack(name)
    r = run(humaneval_program(problem, completion))
    assert r.status == "failed", (name, r)
    assert "blocked:" in r.stdout or name == "forge_excepthook", r  # the escapes were tried and refused


def test_exit_routes_are_all_refused_and_named():
    r = run(ESCAPE)
    assert r.status == "failed" and r.returncode == 1, r
    assert r.stdout.count("blocked:") == 8, r.stdout
    assert "PermissionError" in r.error and "os._exit is not allowed" in r.error, r.error


def test_ordinary_programs_still_pass():
    # What HumanEval completions do: imports (preloaded or compiled from source), threads, eval, namedtuple, typing.
    src = ("import collections, typing, statistics, threading, json\n"
           "P = collections.namedtuple('P', 'x y')\nT = typing.TypeVar('T')\n"
           "out = []\nt = threading.Thread(target=lambda: out.append(eval('2 + 3')))\nt.start(); t.join()\n"
           "assert out == [5] and statistics.mean([1, 2, 3]) == 2 and json.dumps(P(1, 2)) == '[1, 2]'\n")
    r = run(src)
    assert r.passed, r
    for problem in load_humaneval()[:5]:
        assert run(humaneval_program(problem, problem["canonical_solution"])).passed, problem["task_id"]


@pytest.fixture
def outside_token(monkeypatch):
    """A world-readable HF token in $HF_HOME outside the home directory (e.g. a shared /var/tmp cache)."""
    root = Path(tempfile.mkdtemp(prefix="imtune-hf-", dir="/var/tmp" if os.access("/var/tmp", os.W_OK) else None))
    root.chmod(0o755)
    token = root / "token"
    value = "hf_" + "Q" * 34
    token.write_text(value)
    token.chmod(stat.S_IRUSR | stat.S_IWUSR | stat.S_IRGRP | stat.S_IROTH)
    monkeypatch.setenv("HF_HOME", str(root))
    monkeypatch.setenv("HF_TOKEN", value)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-" + "W" * 30)
    yield token, value
    token.unlink()
    root.rmdir()


@isolated
def test_hf_token_outside_home_is_not_readable(outside_token):
    token, value = outside_token
    r = run(attack("read_hf_token", token_path=str(token)))
    assert r.status == "failed" and "FileNotFoundError" in r.error, r
    assert value not in r.stdout + r.stderr and "sk-" not in r.stdout
    assert "HF_TOKEN" not in r.stdout and "OPENAI_API_KEY" not in r.stdout  # the environment is cleared


@isolated
def test_only_the_system_is_visible():
    r = run("import os\nprint(sorted(os.listdir('/')))\nprint(os.path.exists('/work'), os.path.exists('/var'))")
    assert r.passed, r
    top = eval(r.stdout.splitlines()[0])
    assert {"usr", "tmp", "proc", "dev"} <= set(top) and not {"var", "home", "srv", "mnt", "work"} & set(top)


def test_credential_paths_follow_the_environment(outside_token):
    token, _ = outside_token
    found = S.credential_paths()
    assert str(token.resolve()) in found and str(token.parent.resolve()) in found


def test_a_killed_evaluators_temp_dir_is_removed_at_the_next_start(tmp_path):
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    code = ("import sys\nfrom imtune.evaluation import sandbox as S\n"
            "S.run_program('import time\\ntime.sleep(60)', timeout=120, allow_unsafe=not S.isolation().isolated)")
    proc = subprocess.Popen([sys.executable, "-c", code], env=env)
    try:
        deadline = time.monotonic() + 60
        while not glob.glob(str(tmp_path / f"{S.PREFIX}{proc.pid}-*")) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = glob.glob(str(tmp_path / f"{S.PREFIX}{proc.pid}-*"))
        assert left, "the evaluator never made its sandbox dir"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert all(os.path.isdir(d) for d in left)  # SIGKILL: its own clean-up never ran
    # A live evaluator's dir is left alone.
    live = tmp_path / f"{S.PREFIX}{os.getpid()}-x"
    live.mkdir()
    nxt = subprocess.run([sys.executable, "-c", code.replace("time.sleep(60)", "print(1)")], env=env, timeout=120)
    assert nxt.returncode == 0
    assert not any(os.path.exists(d) for d in left) and live.is_dir()
