"""Issue 23, as a hostile tester: no command replaces a file imtune did not write, --overwrite replaces only imtune's
own, a read-only or full output is one line and exit 2 with nothing half-written, and an interrupt ends in one line
with no worker process and no temp file left behind."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from imtune.cli.main import main
from imtune.io_utils import MANIFEST

from .test_training import write_data

NOPE = "no/such-model-dir"  # had a command started its work, it would fail on the model, not on the output


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def listing(d):
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture()
def data(tmp_path):
    return write_data(tmp_path / "d.jsonl")


# ---- a user's file at an output path ------------------------------------------------------------------------------
def _inputs(tmp_path, data):
    losses = tmp_path / "l.jsonl"
    losses.write_text(json.dumps({"loss": 1.0}) + "\n")
    gens = tmp_path / "g.jsonl"
    gens.write_text(json.dumps({"output": "a", "reference": "a"}) + "\n")
    outs = tmp_path / "o.json"
    outs.write_text(json.dumps([{"instruction": "hi", "output": "x"}]))
    answers = tmp_path / "a.jsonl"
    answers.write_text(json.dumps({"question_id": 81, "turns": ["a", "b"]}) + "\n")
    return losses, gens, outs, answers


JUDGE = ["--judge-base-url", "http://127.0.0.1:9/v1", "--judge-model", "m"]


def cases(tmp_path, data):
    """command -> (argv without --overwrite, the user's file it would write, whether the command has --overwrite)."""
    losses, gens, outs, answers = _inputs(tmp_path, data)
    o = tmp_path / "out"
    return {
        "generate": (["generate", "--model", NOPE, "--data", str(data), "--out", str(o / "gen.jsonl")],
                     o / "gen.jsonl", True),
        "loss": (["loss", "--model", NOPE, "--data", str(data), "--out", str(o / "l.jsonl")], o / "l.jsonl", True),
        "loss-summary": (["loss", "--model", NOPE, "--data", str(data), "--out", str(o / "l.jsonl")],
                         o / "l.summary.json", True),
        "evaluate": (["evaluate", "--model", NOPE, "--tasks", "arc_easy", "--limit", "2", "--out", str(o / "r.json")],
                     o / "r.json", True),
        "inspect": (["inspect", "--model", NOPE, "--data", str(data), "--format", "json", "--out", str(o / "t.json")],
                    o / "t.json", True),
        "memorisation": (["memorisation", "--generations", str(gens), "--out", str(o)], o / "summary.json", True),
        "plot": (["plot", str(losses), "--out", str(o / "fig")], o / "fig.svg", True),
        "judge-alpaca-eval": (["judge", "alpaca-eval", "--outputs", str(outs), *JUDGE, "--out", str(o)],
                              o / "alpaca_eval_results.json", True),
        "judge-mt-bench": (["judge", "mt-bench", "--answers", str(answers), "--limit", "1", *JUDGE, "--out", str(o)],
                           o / "mt_bench_judgements.jsonl", True),
        "compare": (["compare", "--data", str(data), "--model", NOPE, "--out", str(o)], o / "report.md", False),
        "advise-pilot": (["advise", "--data", str(data), "--model", NOPE, "--pilot", "--out", str(o)],
                         o / "pilot.json", False),
        "demo": (["demo", "--model", NOPE, "--out", str(o)], o / "report.html", False),
        "train": (["train", "--model", NOPE, "--data", str(data), "--out", str(o), "--overwrite"], o / "README.md",
                  False),
    }


COMMANDS = ["generate", "loss", "loss-summary", "evaluate", "inspect", "memorisation", "plot", "judge-alpaca-eval",
            "judge-mt-bench", "compare", "advise-pilot", "demo", "train"]


@pytest.mark.parametrize("command", COMMANDS)
def test_a_users_file_is_never_replaced_even_with_overwrite(command, data, tmp_path, capsys):
    argv, mine, has_overwrite = cases(tmp_path, data)[command]
    mine.parent.mkdir(parents=True, exist_ok=True)
    mine.write_bytes(b"\x00my own work\n")
    before = listing(tmp_path)
    for extra in ([], ["--overwrite"]) if has_overwrite else ([],):
        assert main([*argv, *extra]) == 2
        line = one_line(capsys.readouterr().err)
        assert str(mine) in line and "not written by imtune" in line, line
        assert listing(tmp_path) == before  # byte-identical, and nothing else written either


def test_overwrite_replaces_only_what_imtune_wrote(tiny_dir, data, tmp_path, capsys):
    out = tmp_path / "res" / "l.jsonl"
    loss = ["loss", "--model", str(tiny_dir), "--data", str(data), "--template", "chatml", "--out", str(out)]
    assert main(loss) == 0
    capsys.readouterr()
    manifest = json.loads((out.parent / MANIFEST).read_text())
    assert manifest["files"] == ["l.jsonl", "l.summary.json"]
    first = listing(tmp_path)
    assert main(loss) == 2  # imtune's own file: replaced only when asked
    assert "pass --overwrite" in one_line(capsys.readouterr().err) and listing(tmp_path) == first
    assert main([*loss, "--overwrite"]) == 0
    capsys.readouterr()
    assert listing(tmp_path) == first  # same model, same data: the same bytes, written again
    # the user's own copy of the summary beside imtune's output is not imtune's, whatever the name
    other = out.with_name("m.summary.json")
    other.write_text("mine")
    assert main([*loss[:-1], str(out.with_name("m.jsonl")), "--overwrite"]) == 2
    assert "m.summary.json exists and was not written by imtune" in one_line(capsys.readouterr().err)
    assert other.read_text() == "mine" and not out.with_name("m.jsonl").exists()


def test_plot_over_its_own_figure_with_overwrite(tmp_path, capsys):
    losses = tmp_path / "l.jsonl"
    losses.write_text("".join(json.dumps({"loss": x}) + "\n" for x in (1.0, 2.0, 1.5)))
    fig = ["plot", str(losses), "--out", str(tmp_path / "fig")]
    assert main(fig) == 0
    svg = (tmp_path / "fig.svg").read_bytes()
    assert main([*fig, "--title", "again"]) == 2
    assert (tmp_path / "fig.svg").read_bytes() == svg
    assert main([*fig, "--title", "again", "--overwrite"]) == 0
    assert (tmp_path / "fig.svg").read_bytes() != svg
    capsys.readouterr()


def test_a_later_write_still_refuses_a_file_that_appeared_meanwhile(tmp_path):
    """The writer itself checks again: a file put there after the command's checks is not replaced either."""
    from imtune.errors import ImtuneError
    from imtune.io_utils import atomic_write_text

    p = tmp_path / "report.md"
    atomic_write_text(p, "imtune's")
    atomic_write_text(p, "imtune's again")  # its own: the command decided at its start
    q = tmp_path / "notes.md"
    q.write_text("mine")
    with pytest.raises(ImtuneError, match="notes.md exists and was not written by imtune"):
        atomic_write_text(q, "x")
    assert q.read_text() == "mine" and sorted(x.name for x in tmp_path.iterdir()) == [MANIFEST, "notes.md",
                                                                                        "report.md"]


# ---- read-only and full file systems (a private mount namespace: real EROFS / ENOSPC) -------------------------------
def _in_mount(tmp_path, mnt, options, argv, remount_ro=False):
    """Run `imtune argv` with a tmpfs (mount `options`) at `mnt`, in a mount namespace of its own (nothing is
    mounted on the machine); returns (exit code, stderr, files left in the mount)."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare(1) for a private tmpfs")
    mnt.mkdir()
    err = tmp_path / "stderr.txt"
    cmd = " ".join(f"'{a}'" for a in [sys.executable, "-m", "imtune.cli.main", *argv])
    script = (f"mount -t tmpfs -o {options} tmpfs {mnt} || exit 99; "
              + (f"mount -o remount,ro {mnt} || exit 99; " if remount_ro else "")
              + f"{cmd} 2>{err}; echo \"rc=$?\"; find {mnt} -mindepth 1")
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                       capture_output=True, text=True, timeout=300)
    if r.returncode == 99 or "unshare failed" in r.stderr:
        pytest.skip(f"no private tmpfs here: {r.stderr.strip()}")
    lines = r.stdout.strip().splitlines()
    rc_line = next(x for x in lines if x.startswith("rc="))
    left = [x for x in lines[lines.index(rc_line) + 1:]]
    return int(rc_line[3:]), err.read_text(), left


@pytest.mark.parametrize("command", ["generate", "train"])
def test_read_only_out_is_one_line_before_any_work(command, data, tmp_path):
    mnt = tmp_path / "ro"
    out = mnt / ("gen.jsonl" if command == "generate" else "run")
    rc, err, left = _in_mount(tmp_path, mnt, "size=64k", [command, "--model", NOPE, "--data", str(data), "--out",
                                                            str(out)], remount_ro=True)
    assert rc == 2 and left == []
    assert "Read-only file system" in one_line(err) and str(mnt) in err


def test_full_disk_on_an_output_leaves_nothing_half_written(tiny_dir, data, tmp_path):
    mnt = tmp_path / "full"
    rc, err, left = _in_mount(tmp_path, mnt, "size=8k", ["inspect", "--model", str(tiny_dir), "--data", str(data),
                                                           "--template", "chatml", "--format", "html", "--n", "8",
                                                           "--out", str(mnt / "tokens.html")])
    assert rc == 2 and left == []  # no temp file, no manifest naming a file that is not there
    assert "No space left on device" in one_line(err) and "tokens.html" in err


@pytest.mark.slow  # a whole training run in a subprocess (~30 s on 2 busy cores)
def test_full_disk_on_the_final_save_removes_the_run(tiny_dir, data, tmp_path):
    mnt = tmp_path / "full"
    rc, err, left = _in_mount(tmp_path, mnt, "size=64k", [
        "train", "--model", str(tiny_dir), "--data", str(data), "--out", str(mnt / "run"), "--template", "chatml",
        "--max-length", "96", "--micro-batch-size", "2", "--max-steps", "1", "--no-progress", "--no-checkpoints"])
    assert rc == 2 and left == [], (err, left)
    line = err.strip().splitlines()[-1]
    assert "No space left on device" in line and "Traceback" not in err, err


def test_a_checkpoint_cut_short_by_a_full_disk_is_never_resumed(tiny_dir, data, tmp_path, capsys, monkeypatch):
    """The disk fills while checkpoint 2 is written (its last file half-written): one line, exit 2, no trace of
    checkpoint 2, and --resume continues from checkpoint 1."""
    import errno

    from imtune.training import checkpointing

    real, calls = checkpointing.write_state, []

    def disk_full_on_second(tmp, state):
        calls.append(state.global_step)
        if state.global_step == 2:
            (tmp / checkpointing.STATE_FILE).write_text('{"global_step": 2, "ep')  # what a full disk leaves
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp / checkpointing.STATE_FILE))
        return real(tmp, state)

    out = tmp_path / "run"
    args = ["train", "--model", str(tiny_dir), "--data", str(data), "--out", str(out), "--template", "chatml",
            "--max-length", "96", "--micro-batch-size", "2", "--global-batch-size", "2", "--max-steps", "3",
            "--save-steps", "1", "--no-progress"]
    monkeypatch.setattr(checkpointing, "write_state", disk_full_on_second)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "cannot write the checkpoint" in err and "checkpoint-000002: No space left on device" in err
    assert "Traceback" not in err
    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["checkpoint-000001"]  # nothing of 2, not even its temp dir
    monkeypatch.setattr(checkpointing, "write_state", real)
    assert main([*args, "--resume"]) == 0
    assert "checkpoint-000001" in capsys.readouterr().err
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]


# ---- interrupts during encoding -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def big_data(tmp_path_factory):
    """Enough rows that encoding runs in a pool of worker processes for seconds."""
    p = tmp_path_factory.mktemp("big") / "big.jsonl"
    q = "Explain why the sky is blue. " * 3
    with open(p, "w") as f:
        for i in range(60000):
            f.write(json.dumps({"id": f"r{i}", "messages": [{"role": "user", "content": f"{i}: {q}"},
                                                            {"role": "assistant", "content": "It is 4. " * 5}]})
                    + "\n")
    return p


def _stats_in_encoding(tiny_dir, big_data, tmp_path):
    """Start `imtune stats` (its own session, as a terminal job) and return it with its workers once they run."""
    import psutil

    cache = tmp_path / "cache"  # fresh: a cache hit would skip the encoding
    env = {**os.environ, "IMTUNE_ENCODE_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    err = open(tmp_path / "stderr.txt", "w+")  # noqa: SIM115 - a pipe would be held open by surviving workers
    p = subprocess.Popen([sys.executable, "-m", "imtune.cli.main", "stats", "--data", str(big_data), "--model",
                          str(tiny_dir), "--template", "chatml"], env=env, stdout=subprocess.DEVNULL, stderr=err,
                         start_new_session=True)
    proc = psutil.Process(p.pid)
    deadline = time.monotonic() + 240
    while len(proc.children(recursive=True)) < 2:  # a datasets map's pool (and its manager) is running
        assert p.poll() is None and time.monotonic() < deadline, "stats ended before its encoding pool started"
        time.sleep(0.02)
    return p, proc.children(recursive=True), err, cache


def _gone(procs, within_s=10.0) -> list:
    import psutil

    _, alive = psutil.wait_procs(procs, timeout=within_s)
    alive = [a for a in alive if a.status() != psutil.STATUS_ZOMBIE]
    for a in alive:
        a.kill()  # never leave them running, whatever the test says
    return alive


def _temp_files(root) -> list[str]:
    return [os.path.join(r, n) for r, ds, fs in os.walk(root) for n in ds + fs if n.startswith(".tmp")]


@pytest.mark.parametrize("sig", ["SIGINT", pytest.param("SIGTERM", marks=pytest.mark.slow)])  # ~25 s each
def test_interrupt_during_encoding_is_one_line_and_leaves_nothing(sig, tiny_dir, big_data, tmp_path):
    p, workers, err, cache = _stats_in_encoding(tiny_dir, big_data, tmp_path)
    try:
        if sig == "SIGINT":
            os.killpg(p.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the whole job, workers included
        else:
            os.kill(p.pid, signal.SIGTERM)
        rc = p.wait(timeout=120)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    assert _gone(workers) == []
    err.seek(0)
    text = err.read()
    assert rc == (130 if sig == "SIGINT" else 143), text
    assert "Traceback" not in text and text.strip().splitlines()[-1] == \
        f"imtune stats: {'interrupted' if sig == 'SIGINT' else 'terminated'}", text
    assert _temp_files(cache) == []


def test_sigkill_of_imtune_takes_its_workers_with_it(tiny_dir, big_data, tmp_path):
    p, workers, _, _ = _stats_in_encoding(tiny_dir, big_data, tmp_path)
    os.kill(p.pid, signal.SIGKILL)
    p.wait(timeout=60)
    assert _gone(workers, within_s=5.0) == []


def test_an_interrupt_a_library_turns_into_its_own_error_is_still_130(data, monkeypatch, capsys):
    import imtune.cli.stats as stats_cmd

    def run(args):
        try:
            signal.raise_signal(signal.SIGINT)  # Ctrl-C, here
            time.sleep(30)
        finally:
            raise TimeoutError("the pool's own error on the way out")  # as datasets' map does on an interrupt

    monkeypatch.setattr(stats_cmd, "run", run)
    assert main(["stats", "--data", str(data)]) == 130
    assert capsys.readouterr().err == "imtune stats: interrupted\n"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handlers before are back


def test_an_interrupt_python_had_to_swallow_is_delivered_again(data, monkeypatch, capsys):
    import imtune.cli.stats as stats_cmd

    class Finaliser:
        def __del__(self):  # a signal handled in here raises where Python can only print "Exception ignored"
            signal.raise_signal(signal.SIGTERM)

    def run(args):
        Finaliser()
        time.sleep(30)  # ended by the interrupt delivered again
        return 0

    monkeypatch.setattr(stats_cmd, "run", run)
    assert main(["stats", "--data", str(data)]) == 143  # without the second delivery: 0, after the sleep
    assert capsys.readouterr().err == "imtune stats: terminated\n"
