"""The advisor: a rule fitted to measured comparisons, its leave-one-source-out accuracy, "no clear difference"
where the evidence says so, the nearest rows, users' own evidence, and the study script that makes the table."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from imtune.analysis.advise import (
    NO_DIFF,
    advise_from_stats,
    evidence_rows,
    fit,
    leave_one_source_out,
    load_table,
    nearest_rows,
)
from imtune.errors import ImtuneError

ROOT = Path(__file__).resolve().parents[1]


def _stats(ratio, n, out_mean=100.0):
    tok = {"mean": out_mean, "median": out_mean}
    return {"instruction_output_ratio": ratio, "examples": n, "instruction_tokens": {"mean": ratio * out_mean,
                                                                                     "median": ratio * out_mean},
            "output_tokens": tok}


def _row(source, ratio, n, delta, half=0.01):
    lo, hi = delta - half, delta + half
    measured = NO_DIFF if lo <= 0 <= hi else "IM better" if delta < 0 else "IT better"
    return {"source": source, "ratio": ratio, "n": n, "im_minus_it": delta, "ci95": [lo, hi], "measured": measured,
            "model": "m", "seeds": 2}


def _trend_table():
    """IM − IT = 0.05 − 0.1·ln(ratio) + 0.01·ln(n): IM better for instruction-heavy data, IT for output-heavy."""
    rows = []
    for s, ratio in (("a", 0.2), ("b", 0.5), ("c", 1.0), ("d", 2.0), ("e", 4.0)):
        for n in (8, 16, 32):
            rows.append(_row(s, ratio, n, 0.05 - 0.1 * np.log(ratio) + 0.01 * np.log(n)))
    return {"meta": {"date": "2026-12-02", "settings": {"max_length": 128, "epochs": 2}}, "rows": rows}


def test_fit_recovers_the_trend_and_states_its_accuracy():
    t = _trend_table()
    f = fit(t["rows"])
    assert f.coef == pytest.approx([0.05, -0.1, 0.01], abs=1e-6)
    acc = leave_one_source_out(t["rows"])
    assert acc["total"] == 15 and acc["sources"] == 5 and acc["correct"] >= 12
    hi = advise_from_stats(_stats(4.0, 16), table=t)
    assert hi.predicted_im_minus_it == "IM better" and hi.recommendation == "im"
    lo = advise_from_stats(_stats(0.2, 16), table=t)
    assert lo.predicted_im_minus_it == "IT better" and lo.recommendation == "it"
    for a in (hi, lo):
        assert a.accuracy.startswith(f"{acc['correct']}/15") and any(a.accuracy in r for r in a.reasons)
        assert "m:" in a.evidence and "8–32 training examples" in a.evidence


def test_no_clear_difference_where_the_data_say_so_even_against_the_paper():
    """Every measured interval contains 0: long instructions and few examples (the paper's IM regime) still get
    'no clear difference expected'."""
    rng = np.random.default_rng(0)
    rows = [_row(s, r, n, float(rng.normal(0, 0.002)), half=0.05)
            for s, r in (("a", 0.3), ("b", 1.0), ("c", 3.0)) for n in (8, 16, 32)]
    a = advise_from_stats(_stats(5.0, 8), table={"meta": {}, "rows": rows})
    assert a.predicted_im_minus_it == NO_DIFF and a.confidence == "weak"
    assert any("No clear difference expected" in r for r in a.reasons)
    assert a.interval[0] < 0 < a.interval[1]


def test_large_data_is_not_extrapolated_and_empty_table_claims_nothing():
    a = advise_from_stats(_stats(4.0, 10_000), table=_trend_table())
    assert any("10,000 examples (measured: 8–32) lie outside the evidence" in r for r in a.reasons)
    assert a.figures["examples"] == 10_000
    e = advise_from_stats(_stats(4.0, 100), table={"meta": {}, "rows": []})
    assert e.predicted_im_minus_it == NO_DIFF and e.accuracy == "not measurable"


def test_nearest_rows_and_user_evidence(tmp_path):
    rows = _trend_table()["rows"]
    near = nearest_rows(rows, 2.1, 15, k=3)
    assert near[0]["source"] == "d" and near[0]["n"] == 16
    res = {"verdict": {"im_minus_it": {"mean": -0.2, "ci95": [-0.3, -0.1], "n": 40, "n_seeds": 3,
                                       "resolved": True}, "measured_im_vs_it": "IM better"},
           "split": {"n_train": 200}, "stats": {"instruction_output_ratio": 1.5}, "config": {"model": "m"},
           "train_config": {"template": "tulu"}}
    p = tmp_path / "results.json"
    p.write_text(json.dumps(res))
    (ev,) = evidence_rows([p])
    assert ev["n"] == 200 and ev["ratio"] == 1.5 and ev["im_minus_it"] == -0.2 and ev["seeds"] == 3
    a = advise_from_stats(_stats(1.5, 32), table=_trend_table(), evidence=[p])
    assert "16 measured comparisons (6 sources)" in a.evidence
    res["verdict"]["im_minus_it"] = None
    p.write_text(json.dumps(res))
    with pytest.raises(ImtuneError, match="did not run both it and im"):
        evidence_rows([p])
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ImtuneError, match="not an imtune compare results.json"):
        evidence_rows([tmp_path / "bad.json"])


def test_bundled_table_is_labelled_and_the_advisor_works_from_it():
    t = load_table()
    meta = t["meta"]
    for k in ("date", "machine", "torch", "transformers", "model", "settings", "cells_done", "cells_planned"):
        assert k in meta, k
    for r in t["rows"]:
        assert {"source", "ratio", "n", "im_minus_it", "ci95", "measured", "model", "seeds"} <= set(r)
        assert r["measured"] in ("IM better", "IT better", NO_DIFF)
    a = advise_from_stats(_stats(0.5, 1000))
    assert a.predicted_im_minus_it in ("IM better", "IT better", NO_DIFF) and a.accuracy and a.evidence


def test_advise_cli_explain_json(tiny_dir, tmp_path, capsys):
    from imtune.cli.main import main

    table = tmp_path / "t.json"
    table.write_text(json.dumps(_trend_table()))
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"question {i} " * 5},
                                                     {"role": "assistant", "content": "ok"}]}) + "\n"
                            for i in range(10)))
    assert main(["advise", "--data", str(data), "--model", str(tiny_dir), "--template", "chatml",
                 "--table", str(table), "--explain", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["nearest"]) == 5 and out["advice"]["accuracy"]
    assert main(["advise", "--data", str(data), "--model", str(tiny_dir), "--template", "chatml",
                 "--table", str(table), "--explain"]) == 0
    text = capsys.readouterr().out
    assert "Nearest measured comparisons" in text and "leave one source out" in text


@pytest.mark.slow
def test_advisor_study_script_on_the_tiny_model(tiny_dir, tmp_path):
    spec = importlib.util.spec_from_file_location("advisor_study", ROOT / "bench" / "advisor_study.py")
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    table = tmp_path / "study.json"
    argv = ["--model", str(tiny_dir), "--sources", "code-alpaca,dolly-instruction-heavy,dolly-output-heavy",
            "--sizes", "4,8", "--seeds", "2", "--n-val", "4", "--max-length", "256", "--epochs", "1",
            "--template", "chatml", "--out", str(tmp_path / "runs"), "--table", str(table)]
    assert study.main(argv) == 0
    t = json.loads(table.read_text())
    assert t["meta"]["cells_done"] == t["meta"]["cells_planned"] == 6
    assert {r["source"] for r in t["rows"]} == {"code-alpaca", "dolly-instruction-heavy", "dolly-output-heavy"}
    assert all(r["seeds"] == 2 and r["n"] == r["n_requested"] for r in t["rows"])
    heavy = {r["source"]: r["ratio"] for r in t["rows"] if r["n"] == 8}
    assert heavy["dolly-instruction-heavy"] > heavy["dolly-output-heavy"]
    # Resumable: a rerun trains nothing and gives the same table rows.
    assert study.main(argv) == 0
    def strip(rows):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]

    assert strip(json.loads(table.read_text())["rows"]) == strip(t["rows"])
    a = advise_from_stats(_stats(1.0, 8), table=t)
    assert a.accuracy and a.predicted_im_minus_it in ("IM better", "IT better", NO_DIFF)


def test_findings_doc_is_built_from_measured_rows(tmp_path):
    spec = importlib.util.spec_from_file_location("findings", ROOT / "bench" / "findings.py")
    findings = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(findings)
    t = _trend_table()
    t["rows"][0]["seeds"], t["rows"][0]["n_heldout"] = 2, 16
    t["rows"][0]["resolved"] = True
    for r in t["rows"]:
        r.setdefault("n_heldout", 16)
        r.setdefault("resolved", r["measured"] != NO_DIFF)
    noisy = _row("z", 1.0, 8, -0.01, half=0.02) | {"n_heldout": 16, "resolved": False}
    t["rows"].append(noisy)
    p = tmp_path / "t.json"
    p.write_text(json.dumps(t))
    doc = tmp_path / "F.md"
    findings.write_findings(tmp_path / "none", doc, table_path=p, pilot_path=tmp_path / "no_pilot.json")
    text = doc.read_text()
    assert text.count("\n| ") == 1 + 16 and "Advisor accuracy, leave one source out: " in text
    text, pilot = text.split("\n## 3. ")
    assert "Not run yet: `python bench/advisor_check.py`" in pilot
    # The unresolved row: half-width 0.02 vs |mean| 0.01 → 4× the 16 held-out examples.
    assert "| z | 1.00 | 8 | 2 | 16 | -0.0100 [-0.0300, +0.0100] | no | no clear difference |" in text
    assert text.rstrip().endswith("recommendation.") and "≈ 64 |" in text


def test_a_term_the_evidence_does_not_vary_is_left_out():
    rows = [r for r in _trend_table()["rows"] if r["n"] == 8]
    f = fit(rows)
    assert f.terms == (True, True, False) and f.coef[2] == 0.0
    assert f.coef[1] == pytest.approx(-0.1, abs=1e-6)
    a = advise_from_stats(_stats(4.0, 8), table={"meta": {}, "rows": rows})
    assert a.predicted_im_minus_it == "IM better" and any("n is not in the rule" in r for r in a.reasons)


def test_a_rule_no_better_than_saying_no_difference_claims_none():
    """Five one-size rows like the first cells of the real study: the fitted line favours IM at low ratios, but
    it predicts left-out sources worse than 'no clear difference' does, so that is what it says."""
    rows = [_row("ih", 1.39, 8, -0.017, 0.06), _row("oh", 0.30, 8, -0.016, 0.008), _row("lima", 0.31, 8, 0.002, 0.045),
            _row("code", 0.66, 8, -0.049, 0.03), _row("dolly", 0.55, 8, 0.002, 0.046)]
    acc = leave_one_source_out(rows)
    assert acc["correct"] <= acc["baseline_no_diff"] == 3 and acc["total"] == 5
    a = advise_from_stats(_stats(0.3, 8), table={"meta": {}, "rows": rows})
    assert a.predicted_im_minus_it == NO_DIFF and a.recommendation == "im" and a.confidence == "weak"
    assert any("claims no difference" in r for r in a.reasons)


def _bench(name):
    import sys

    sys.path.insert(0, str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_advisor_check_reads_the_full_results_from_findings_and_renders_its_section(tmp_path):
    check = _bench("advisor_check")
    doc = tmp_path / "F.md"
    doc.write_text("# F\n\n## 1. Per-set\n\n| dataset | a | b | c | d | e | f | g | h | minutes |\n|---|\n"
                   "| LIMA | 183 / 57 / 3 | 0.10 | it 2.8 | `im` wins | -0.0129 [-0.0225, -0.0039] * | — | x | resolved | 42 |\n"
                   "| Code-Alpaca-2k | 199 / 64 / 3 | 0.43 | it 0.9 | `im` ahead | -0.0257 [-0.0890, +0.0085] | — | x | ≈ 230 | 31 |\n"
                   "\n## 2. Study\n\ntext\n")
    full = check.full_rows(doc, tmp_path / "no_runs")
    assert full["LIMA"] == {**full["LIMA"], "n": 183, "mean": -0.0129, "ci95": [-0.0225, -0.0039], "resolved": True,
                            "minutes": 42.0, "measured": "IM better"}
    assert full["Code-Alpaca-2k"]["measured"] == NO_DIFF and "Alpagasus-Dolly-3k" not in full
    assert check.verdict_of("IM expected better", full["LIMA"]) == "right"
    assert check.verdict_of("IT expected better", full["LIMA"]) == "WRONG"
    assert check.verdict_of("cannot tell within this budget", full["LIMA"]).startswith("missed")
    assert check.verdict_of("IT expected better", full["Code-Alpaca-2k"]).startswith("unverifiable")
    per = [{"n": 8, "mean": -0.03, "ci95": [-0.05, -0.01], "resolved": True}]
    s = {"set": "LIMA", "per_size": per, "fit": {"a": -0.03, "b": 0.0}, "full": full["LIMA"], "delta": -0.03,
         "ci95": [-0.05, -0.01], "call": "IM expected better", "outcome": "right", "wall_minutes": 5.0,
         "minutes_fraction": 5 / 42, "planned_fraction": 0.15, "planned_minutes": 3.0, "full_planned_minutes": 20.0,
         "training_tokens": 100, "full_training_tokens": 1000, "tokens_fraction": 0.1}
    res = {"date": "d", "machine": "m", "load_average": [1.0, 1.0, 1.0], "command": "c", "budget_frac": 0.15,
           "seeds": 2, "heldout": 32, "sets": [s]}
    section = check.pilot_section(res)
    assert "| LIMA | n 8: -0.0300 [-0.0500, -0.0100] * |" in section and "Right on 1 of 1 set(s)" in section
    check.splice(doc, section)
    check.splice(doc, section)  # replaces its own section, keeps the others
    text = doc.read_text()
    assert text.count("## 3. ") == 1 and "| LIMA | 183 / 57 / 3 |" in text and "## 2. Study" in text
    # The full comparisons join the study table once, at n ≥ 100, with where they came from; the rule refits on them.
    table = tmp_path / "study.json"
    table.write_text(json.dumps({"meta": {}, "rows": []}))
    assert check.add_to_study([], full, table, 100) == 2
    assert check.add_to_study([], full, table, 100) == 0
    rows = json.loads(table.read_text())["rows"]
    lima = next(r for r in rows if r["source"] == "lima")
    assert lima["n"] == 183 and lima["ratio"] == 0.10 and lima["measured"] == "IM better"
    assert lima["provenance"]["full_comparison"] == "F.md §1"
    assert check.add_to_study([], full, table, 500) == 0


def test_findings_keep_the_rows_of_sets_not_rerun_and_name_each_rows_machine(tmp_path):
    """Rerunning one set (say on another machine) rewrites its row; the others keep their measured rows and the
    machine they ran on, and the pilot check says whether its wall-minute fraction compares like with like."""
    findings, check = _bench("findings"), _bench("advisor_check")
    doc = tmp_path / "F.md"
    doc.write_text("# F\n\n## 1. Per-set\n\nSettings (read from each results.json): `m`, lr 0.0001, batch 4. Machine:"
                   " AMD EPYC,\n2 cores. Intervals\n\n| dataset | a | b | c | d | e | f | g | h | minutes |\n|---|\n"
                   "| LIMA | 183 / 57 / 3 | 0.10 | it 2.8 | `im` wins | -0.0129 [-0.0225, -0.0039] * | — | x | resolved | 42 |\n"
                   "\n## 2. Study\n\ntext\n")
    t = _trend_table()
    for r in t["rows"]:
        r.update(n_heldout=16, resolved=r["measured"] != NO_DIFF)
    table = tmp_path / "t.json"
    table.write_text(json.dumps(t))
    findings.write_findings(tmp_path / "none", doc, table_path=table, pilot_path=tmp_path / "no_pilot.json")
    text = doc.read_text()
    assert "| LIMA | 183 / 57 / 3 | 0.10 | it 2.8 | `im` wins | -0.0129 [-0.0225, -0.0039] * | — | x | resolved | 42 " \
           "| AMD EPYC |" in text and "Settings (read from each results.json): `m`, lr 0.0001, batch 4. Each row" in text
    findings.write_findings(tmp_path / "none", doc, table_path=table, pilot_path=tmp_path / "no_pilot.json")
    assert doc.read_text() == text  # regenerating from its own output changes nothing
    full = check.full_rows(doc, tmp_path / "none")["LIMA"]
    assert full["machine"] == "AMD EPYC" and full["minutes"] == 42.0 and full["settings"] == "`m`, lr 0.0001, batch 4"
    s = {"wall_minutes": 6.3, "minutes_fraction": 6.3 / 42, "full": full}
    assert findings._wall_cell(s, "AMD EPYC 7B13, 2 cores") == "6.3 / 42 = 15% (same machine)"
    assert findings._wall_cell(s, "Intel(R) Xeon(R), 2 cores") == "6.3 / 42 = 15% (full on AMD EPYC)"
    (tmp_path / "runs" / "LIMA").mkdir(parents=True)
    findings.record_machine(tmp_path / "runs" / "LIMA")
    assert findings.set_machine(tmp_path / "runs" / "LIMA") == findings.cpu_name()
    assert findings.set_machine(tmp_path / "none") == "an unrecorded machine"
