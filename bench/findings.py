"""Does IM beat IT? `imtune compare` on the bundled training sets, and docs/FINDINGS.md from what was measured.

    python bench/findings.py                       # it,im,weighted:0.1 × 3 seeds × 200 examples per set (~1 h, 2 cores, bf16)
    python bench/findings.py --only LIMA --n-train 64 --seeds 2
    python bench/findings.py --report-only         # rewrite docs/FINDINGS.md from finished runs + the study table

Each set's comparison lands in runs/findings/<name>/ (report.html etc.); reruns resume (per objective and seed).
FINDINGS.md is built only from results.json files and the advisor study table (src/imtune/data/advisor/study.json),
so every figure in it is a measured one. For each row it says whether the interval resolves and, from the measured
spread, how many held-out examples (at the same number of seeds) would resolve a difference of the measured size.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from advisor_study import cpu_name, prune  # noqa: E402  (a sibling script, not a package)

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "src" / "imtune" / "data" / "train"
SETS = {"LIMA": "lima.jsonl", "Alpagasus-Dolly-3k": "alpagasus_dolly_3k.jsonl", "Code-Alpaca-2k": "code_alpaca_2k.json"}


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-train", type=int, default=200)
    ap.add_argument("--n-val", type=int, default=64)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--objectives", default="it,im,weighted:0.1")
    ap.add_argument("--max-length", type=int, default=160)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--out", default=str(ROOT / "runs" / "findings"))
    ap.add_argument("--only", default=None, help="comma-separated dataset names to run")
    ap.add_argument("--report-only", action="store_true", help="only rewrite FINDINGS.md from finished work")
    ap.add_argument("--keep-weights", action="store_true",
                    help="keep each evaluated run's weights and checkpoints (~2 GB a run; by default they are removed)")
    ap.add_argument("--doc", default=str(ROOT / "docs" / "FINDINGS.md"))
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    from imtune.cli.main import main as cli

    names = args.only.split(",") if args.only else list(SETS)
    for name in [] if args.report_only else names:
        rc = cli(["compare", "--data", str(DATA / SETS[name]), "--objectives", args.objectives,
                  "--out", str(Path(args.out) / name), "--seeds", str(args.seeds), "--n-train", str(args.n_train),
                  "--n-val", str(args.n_val), "--max-length", str(args.max_length), "--epochs", str(args.epochs),
                  "--lr", str(args.lr), "--precision", args.precision, "--micro-batch-size", "4",
                  "--global-batch-size", "4", "--eval", "loss,memorisation", "--memorisation-n", "8",
                  "--max-new-tokens", "32", "--skip-invalid"])
        if rc:
            return rc
        record_machine(Path(args.out) / name)
        if not args.keep_weights:
            prune(Path(args.out) / name)
    write_findings(Path(args.out), Path(args.doc))
    return 0


def needed_heldout(d: dict) -> str:
    """Held-out examples that would make the 95% half-width equal the measured |IM − IT| (half-width ∝ 1/√n,
    seeds fixed): a planning figure that assumes the measured difference is the true one."""
    if d.get("mean") is None or d["ci95"][0] is None:
        return "—"
    half = (d["ci95"][1] - d["ci95"][0]) / 2
    if d["mean"] == 0 or half == 0:
        return "not estimable"
    k = (half / abs(d["mean"])) ** 2
    return "resolved" if d["resolved"] else f"≈ {math.ceil(d['n'] * k):,}"


def _ci_text(d: dict | None) -> str:
    if not d or d.get("mean") is None:
        return "—"
    return f"{d['mean']:+.4f} [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}]{' *' if d.get('resolved') else ''}"


MACHINE_FILE = "machine.json"


def record_machine(set_dir: Path) -> None:
    """Which machine finished a set's comparison (results.json does not say), for its row's wall minutes."""
    from imtune.io_utils import atomic_write_json

    atomic_write_json(set_dir / MACHINE_FILE, {"machine": cpu_name(), "cores": os.cpu_count(),
                                               "load_average": list(os.getloadavg())}, own=False)


def set_machine(set_dir: Path) -> str:
    p = set_dir / MACHINE_FILE
    return json.loads(p.read_text())["machine"] if p.exists() else "an unrecorded machine"


def previous_section1(doc: Path) -> tuple[dict[str, list[str]], str | None]:
    """The rows (cells, machine last) and settings of an existing FINDINGS.md §1, kept for the sets whose results
    are not under --out: a rerun of one set on another machine does not drop the others' measured rows."""
    text = doc.read_text() if doc.exists() else ""
    sec1 = text.split("## 1.", 1)[-1].split("## 2.", 1)[0]
    settings = re.search(r"Settings \(read from each results\.json\): (.*?)\.\s+(?:Machine|Each row)", sec1, re.S)
    machine = re.search(r"Machine: (.*?),\s*\n?\s*\d+ cores", sec1)
    rows = {}
    for line in sec1.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 10 and cells[0] in SETS:
            rows[cells[0]] = cells[:10] + [cells[10] if len(cells) > 10 else (machine[1] if machine else "—")]
    return rows, (settings[1].replace("\n", " ") if settings else None)


def set_minutes(set_dir: Path) -> float:
    """Wall time of one set's comparison, from its first written file (the split) to its results file."""
    start = (set_dir / "data" / "split.json").stat().st_mtime
    return ((set_dir / "results.json").stat().st_mtime - start) / 60


def findings_settings(root: Path) -> str:
    """The settings every finished set ran with, read back from its results.json (never from this script's
    defaults), and the precision the runs resolved to on this machine (as compare resolves it)."""
    from imtune.analysis.compare import eval_precision

    seen = []
    for name in SETS:
        p = root / name / "results.json"
        if p.exists():
            r = json.loads(p.read_text())
            t = r["train_config"]
            seen.append(f"`{r['config']['model']}`, full fine-tuning, precision {t['precision']} "
                        f"(here: {eval_precision(t['precision'])}), "
                        f"{t['epochs']} epochs, lr {t['lr']}, batch {t['global_batch_size']}, max length "
                        f"{t['max_length']}, template `{t['template']}`, objectives {','.join(r['config']['objectives'])}")
    return "; ".join(sorted(set(seen))) or "—"


def findings_rows(root: Path, table: dict, previous: dict[str, list[str]] | None = None) -> list[str]:
    from imtune.analysis.advise import advise_from_stats

    rows = []
    for name in SETS:
        p = root / name / "results.json"
        if not p.exists():
            if name in (previous or {}):
                rows.append("| " + " | ".join(previous[name]) + " |")
            continue
        r = json.loads(p.read_text())
        v = r["verdict"]
        d = v.get("im_minus_it") or {}
        if d.get("mean") is None:
            continue
        # The prediction of the advisor as it is now (fitted to the current study table), from the set's statistics.
        pred = advise_from_stats(r["stats"], table=table).predicted_im_minus_it
        means = " / ".join(f"{o} {m:.4f}" for o, m in v["heldout_loss_mean"].items() if m is not None)
        others = "; ".join(f"{o} − it {_ci_text(x)}" for o, x in v["paired_diff_vs_baseline"].items()
                           if o != "im") if v["baseline"] == "it" else ""
        rows.append(f"| {name} | {r['split'].get('n_train_common', r['split']['n_train'])} / {d['n']} / "
                    f"{d['n_seeds']} | {r['stats']['instruction_output_ratio']:.2f} | {means} | `{v['winner']}` "
                    f"{'wins' if v['resolved'] else 'ahead, not resolved'} | {_ci_text(d)} | {others or '—'} | "
                    f"{pred} → {v['measured_im_vs_it']} | {needed_heldout(d)} | {set_minutes(root / name):.0f} | "
                    f"{set_machine(root / name)} |")
    return rows


def study_rows(table: dict) -> tuple[list[str], str]:
    from imtune.analysis.advise import accuracy_text, fit, label, leave_one_source_out

    rows = table.get("rows", [])
    out = []
    for r in sorted(rows, key=lambda r: (r["n"], r["source"])):
        f = fit([x for x in rows if x["source"] != r["source"]])
        pred = label(*f.predict(r["ratio"], r["n"])) if f else "—"
        d = {"mean": r["im_minus_it"], "ci95": r["ci95"], "resolved": r["resolved"], "n": r["n_heldout"]}
        out.append(f"| {r['source']} | {r['ratio']:.2f} | {r['n']} | {r['seeds']} | {r['n_heldout']} | "
                   f"{r['im_minus_it']:+.4f} [{r['ci95'][0]:+.4f}, {r['ci95'][1]:+.4f}] | "
                   f"{'yes' if r['resolved'] else 'no'} | {r['measured']} | {pred} | {needed_heldout(d)} |")
    neg = sum(r["im_minus_it"] < 0 for r in rows)
    res = [r["measured"] for r in rows if r["resolved"]]
    summary = (f"IM − IT was below 0 (IM ahead) in {neg} of {len(rows)} cells; {len(res)} interval(s) exclude 0 "
               f"({res.count('IM better')} IM better, {res.count('IT better')} IT better).") if rows else ""
    return out, (accuracy_text(leave_one_source_out(rows)) if rows else "not measurable"), summary


def _study_minutes(table: dict) -> str:
    secs = [r.get("seconds") for r in table.get("rows", [])]
    return f"{sum(secs) / 60:.0f}" if secs and all(secs) else "—"


PILOT_RESULTS = ROOT / "bench" / "advisor_check.json"


def _wall_cell(s: dict, machine: str) -> str:
    f = s["full"]
    where = ("same machine" if f.get("machine") and machine.startswith(f["machine"])
             else "full on " + (f.get("machine") or "section 1's machine"))
    return f"{s['wall_minutes']:.1f} / {f['minutes']:.0f} = {100 * s['minutes_fraction']:.0f}% ({where})"


def _pilot_row(s: dict, machine: str) -> str:
    f = s["full"]
    sizes = "; ".join(f"n {r['n']}: {r['mean']:+.4f} [{r['ci95'][0]:+.4f}, {r['ci95'][1]:+.4f}]"
                      f"{' *' if r['resolved'] else ''}" for r in s["per_size"])
    return (f"| {s['set']} | {sizes} | {s['fit']['a']:+.4f} {s['fit']['b']:+.4f}·ln n | {f['n']} | "
            f"{s['delta']:+.4f} [{s['ci95'][0]:+.4f}, {s['ci95'][1]:+.4f}] | {s['call']} | "
            f"{f['mean']:+.4f} [{f['ci95'][0]:+.4f}, {f['ci95'][1]:+.4f}]{' *' if f['resolved'] else ''} → "
            f"{f['measured']} | {s['outcome']} | {_wall_cell(s, machine)} | {s['planned_minutes']:.1f} / {s.get('full_planned_minutes', 0):.0f} = "
            f"{100 * s['planned_fraction']:.0f}% | "
            f"{s['training_tokens']:,} / {s['full_training_tokens']:,} = {100 * s['tokens_fraction']:.1f}% |")


def pilot_section(res: dict | None) -> str:
    """Section 3 of FINDINGS.md, from bench/advisor_check.json (written by bench/advisor_check.py)."""
    head = "## 3. The measured pilot (`bench/advisor_check.py`: `imtune advise --pilot` vs the full comparison)\n\n"
    if not res or not res.get("sets"):
        return head + "Not run yet: `python bench/advisor_check.py`.\n"
    sets = res["sets"]
    resolved = [s for s in sets if s["full"]["resolved"]]
    right = sum(s["outcome"] == "right" for s in resolved)
    wrong = sum(s["outcome"] == "WRONG" for s in sets)
    rows = "\n".join(_pilot_row(s, res["machine"]) for s in sets)
    return head + f"""Run {res['date']} on {res['machine']} (load average {', '.join(f'{x:.1f}' for x in res['load_average'])}
at the end), `{res['command']}`.

Per set, the pilot trains it and im with the full comparison's model, max length, epochs and precision ({res['seeds']}
seeds, {res['heldout']} held-out examples shared by every size, batch {res.get('batch', '—')}, lr {res.get('lr', '—')}), at the
two sizes its cost model plans for a budget of {100 * res['budget_frac']:.0f}% of the full comparison's cost-model
minutes. It fits IM − IT = a + b·ln n (each size weighted by its bootstrap variance) and extrapolates to the full
comparison's n; the interval refits the line to every bootstrap replicate. It calls a direction only when the
largest size's interval excludes 0 and the line keeps that sign at the full comparison's n
(`analysis/pilot_fit.py`). The full results are section 1's (3 seeds, it/im/weighted:0.1).

Cost is given three ways. Wall minutes compare the pilot (this run's machine) with section 1's full comparison on
the machine its row names (the cell says whether that is the pilot's; where not, the fraction mixes machines and
loads). Cost-model minutes put both through the pilot's one cost model;
the budget is set from this fraction. Training tokens count the full run from the same tokenisation of its split ×
objectives × seeds × epochs.

| dataset | pilot IM − IT per size [95% CI] | fitted | n | extrapolated Δ [95% CI] | pilot's call | full comparison | outcome | wall minutes, pilot / full | cost-model minutes, pilot / full | training tokens, pilot / full |
|---|---|---|---|---|---|---|---|---|---|---|
{rows}

Right on {right} of {len(resolved)} set(s) where the full comparison resolved; confident wrong calls: {wrong}.
"""


def write_findings(root: Path, doc: Path, table_path: str | Path | None = None,
                   pilot_path: Path = PILOT_RESULTS) -> None:
    from imtune.analysis.advise import load_table
    from imtune.io_utils import atomic_write_text

    table = load_table(table_path)
    meta, s = table.get("meta", {}), table.get("meta", {}).get("settings", {})
    previous, old_settings = previous_section1(doc)
    previous = {k: v for k, v in previous.items() if not (root / k / "results.json").exists()}
    f_rows = findings_rows(root, table, previous)
    settings = "; ".join(sorted({x for x in findings_settings(root).split("; ") if x != "—"}
                                | ({old_settings} if previous and old_settings else set()))) or "—"
    st_rows, acc, summary = study_rows(table)
    text = f"""# Findings: does IM beat IT at CPU scale?

Regenerated by `python bench/findings.py --report-only` on {datetime.date.today()} ({cpu_name()}); every figure
below is read from a results file, none is typed in.

## 1. Per-set comparisons (`bench/findings.py`: it, im, weighted:0.1 × seeds × ≥ 200 examples)

""" + ("""Settings (read from each results.json): """ + settings + """. Each row names the machine it ran on (2
cores); a set not rerun keeps its row from the previous FINDINGS.md. Intervals: 95%, two-way bootstrap over training seeds and held-out examples; `*` marks one that excludes 0.
"Advisor predicted" is what `imtune advise` says for the set's statistics with the study table of section 2.
"Minutes" is wall time from the set's split to its results file, so it includes anything else the machine ran and
any interruption before a resumed run finished.

| dataset | train / held-out / seeds | instr/output ratio | held-out output loss | verdict (best vs runner-up) | IM − IT [95% CI] | other − IT [95% CI] | advisor predicted → measured | held-out examples to resolve | minutes | machine |
|---|---|---|---|---|---|---|---|---|---|---|
""" + "\n".join(f_rows) if f_rows else """Not run yet: `python bench/findings.py` (about an hour on 2 cores with
bf16) and then `--report-only`.""") + f"""

## 2. The advisor study (`bench/advisor_study.py`, the table `imtune advise` is fitted to)

Measured {meta.get('started', meta.get('date', '—'))} → {meta.get('date', '—')} on {meta.get('machine', '—')};
torch {meta.get('torch', '—')}, transformers {meta.get('transformers', '—')}; model `{meta.get('model', '—')}`,
full fine-tuning in {s.get('precision', '—')}, {s.get('epochs', '—')} epoch(s), lr {s.get('lr', '—')}, batch
{s.get('batch', '—')}, max length {s.get('max_length', '—')} ({s.get('examples', '')}); objectives it,im; the
same {s.get('n_heldout', '—')} held-out examples per source at every size. Cells finished:
{meta.get('cells_done', 0)} of {meta.get('cells_planned', 0)} planned
({meta.get('grid', {}).get('sizes', '—')} examples × {meta.get('grid', {}).get('seeds', '—')} seeds ×
{len(meta.get('grid', {}).get('sources', []))} sources), {_study_minutes(table)} minutes of wall time summed over
cells. Interval: {meta.get('outcome', '—')}.

| source | instr/output ratio | n train | seeds | held-out | IM − IT [95% CI] | resolved | measured | fitted rule, source left out | held-out examples to resolve |
|---|---|---|---|---|---|---|---|---|---|
""" + "\n".join(st_rows) + f"""

{summary} Advisor accuracy, leave one source out: {acc}. Where the rule does not beat always
saying "no clear difference", `imtune advise` says "no clear difference expected" whatever the fitted line says.

How to read it: held-out loss is the mean per-example output-token cross-entropy on examples no model saw; IM − IT
below 0 means IM generalises better on that measure. "Held-out examples to resolve" scales the measured interval
(half-width ∝ 1/√examples, seeds fixed) to the size at which a difference as large as the measured one would
exclude 0 — a planning figure that assumes the measured difference is the true one; where seeds disagree, more
seeds are needed as well.

Caveats: a 135M model, 8–32 training examples of at most {s.get('max_length', '—')} tokens, a few optimiser steps
on 2 CPU cores — far from the paper's LLaMA-2-7B/13B with thousands of examples and an LLM judge. These rows check
direction and noise at toy scale; the advisor says which scale its evidence comes from with every recommendation.

""" + pilot_section(json.loads(pilot_path.read_text()) if pilot_path.exists() else None)
    atomic_write_text(doc, text, own=False)
    print(text)


if __name__ == "__main__":
    raise SystemExit(main())
