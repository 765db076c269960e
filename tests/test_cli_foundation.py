"""CLI behaviour of stats / inspect / advise: outputs, help, and one-line errors with exit code 2."""

import json
import subprocess
import sys

import pytest

from imtune.cli.main import build_parser, main

from .conftest import data_file

MSGS = [{"messages": [{"role": "user", "content": f"Question {i}? " * (i + 1)},
                      {"role": "assistant", "content": f"Answer {i}."}]} for i in range(5)]


@pytest.fixture()
def small_data(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps(m) + "\n" for m in MSGS))
    return p


def test_inspect_json_rows(tiny_dir, small_data, capsys):
    assert main(["inspect", "--data", str(small_data), "--model", str(tiny_dir), "--objective", "it",
                 "--format", "json", "--n", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out) == 2
    rows = out[0]["tokens"]
    assert set(rows[0]) == {"id", "text", "segment", "weight"}
    assert {r["segment"] for r in rows} >= {"user", "assistant", "template", "eos"}
    assert all(r["weight"] == 0 for r in rows if r["segment"] in ("user", "template"))
    assert any(r["weight"] == 1 for r in rows if r["segment"] == "assistant")


def test_inspect_text_and_html(tiny_dir, small_data, tmp_path, capsys):
    assert main(["inspect", "--data", str(small_data), "--model", str(tiny_dir), "--index", "3"]) == 0
    out = capsys.readouterr().out
    assert "legend" in out and "Question 3" in out and "total" in out
    html = tmp_path / "v.html"
    assert main(["inspect", "--data", str(small_data), "--model", str(tiny_dir), "--format", "html",
                 "--out", str(html)]) == 0
    assert "<span" in html.read_text() and "weight 1" in html.read_text()


def test_stats_json(tiny_dir, small_data, capsys):
    assert main(["stats", "--data", str(small_data), "--model", str(tiny_dir), "--json", "--max-length", "16"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["examples"] == 5 and s["turns"]["total"] == 5
    assert s["instruction_output_ratio"] > 1
    assert s["truncation"]["truncated"] >= 1


def test_advise_states_its_measured_accuracy_and_evidence(tiny_dir, small_data, capsys):
    """The rule itself is tested in tests/test_advisor.py; here: the CLI's JSON carries it with the evidence."""
    assert main(["advise", "--data", str(small_data), "--model", str(tiny_dir), "--json"]) == 0
    a = json.loads(capsys.readouterr().out)["advice"]
    assert a["recommendation"] in ("it", "im") and a["accuracy"] and a["evidence"]
    assert a["predicted_im_minus_it"] in ("IM better", "IT better", "no clear difference")
    assert any("ratio" in r for r in a["reasons"])


@pytest.mark.parametrize("argv,needle", [
    (["inspect", "--data", "/nonexistent.jsonl"], "/nonexistent.jsonl: file not found"),
    # A split / config / revision with a data file would be ignored: refused, for the table and in-memory loaders.
    (["stats", "--data", "GOOD", "--data-split", "dev"],
     "is a data file: --data-split applies only to a Hub dataset id or a dataset directory"),
    (["inspect", "--data", "GOOD", "--data-config", "x", "--data-revision", "v1"],
     "is a data file: --data-config, --data-revision apply only to a Hub dataset id"),
    (["stats", "--data", "BAD"], ":2: malformed JSON"),
    (["inspect", "--data", "GOOD", "--objective", "bogus"], "unknown objective 'bogus'"),
    (["inspect", "--data", "GOOD", "--template", "nope"], "unknown template 'nope'"),
    (["inspect", "--data", "GOOD", "--index", "99"], "--index 99 out of range"),
])
def test_bad_input_one_line_exit_2(tiny_dir, small_data, tmp_path, argv, needle):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(MSGS[0]) + "\n{nope\n")
    argv = [{"BAD": str(bad), "GOOD": str(small_data)}.get(a, a) for a in argv] + ["--model", str(tiny_dir)]
    r = subprocess.run([sys.executable, "-m", "imtune.cli.main", *argv], capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    assert needle in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("command", ["stats", "inspect"])  # the Arrow-table path and the in-memory one
def test_skip_invalid_reports_counts_per_reason(tiny_dir, tmp_path, capsys, command):
    empty = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]}
    bad = tmp_path / "bad.jsonl"
    rows = [MSGS[0], "{nope", MSGS[1], empty, "{nope", empty, empty, MSGS[2], empty]
    bad.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    extra = ["--json"] if command == "stats" else ["--format", "json", "--n", "9"]
    assert main([command, "--data", str(bad), "--model", str(tiny_dir), "--skip-invalid", *extra]) == 0
    cap = capsys.readouterr()
    # The line `train` prints: the total, then per reason its count and first rows.
    assert cap.err.strip() == (
        f"skipped 6 invalid record(s) in {bad}: 2x malformed JSON: Expecting property name enclosed in double "
        "quotes at column 2 (line 2, line 5); 4x message 1: empty content (line 4, line 6, line 7, ...)"), cap.err
    assert len(json.loads(cap.out)) == 3 if command == "inspect" else json.loads(cap.out)["examples"] == 3


def test_help_is_complete():
    parser = build_parser()
    text = parser.format_help()
    for cmd in ("stats", "inspect", "advise"):
        assert cmd in text
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, p in sub.choices.items():
        h = p.format_help()
        assert p.description or p.format_usage(), name
        for action in p._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"{name} {action.option_strings} has no help"
        assert h


@pytest.mark.real_model
def test_stats_on_lima_with_smollm2(capsys):
    assert main(["stats", "--data", str(data_file("lima.jsonl")), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["examples"] == 1030
    assert 0.05 < s["instruction_output_ratio"] < 0.3  # LIMA: short prompts, long answers
