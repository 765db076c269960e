"""Does IM beat IT? `imtune compare` on the bundled training sets, and docs/FINDINGS.md from what was measured.

    python bench/findings.py                       # it,im,weighted:0.1 × 3 seeds × 200 examples per set (hours)
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
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from advisor_study import cpu_name  # noqa: E402  (a sibling script, not a package)

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "src" / "imtune" / "data" / "train"
SETS = {"LIMA": "lima.jsonl", "Alpagasus-Dolly-3k": "alpagasus_dolly_3k.jsonl", "Code-Alpaca-2k": "code_alpaca_2k.json"}


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-train", type=int, default=200)
    ap.add_argument("--n-val", type=int, default=48)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--objectives", default="it,im,weighted:0.1")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--out", default=str(ROOT / "runs" / "findings"))
    ap.add_argument("--only", default=None, help="comma-separated dataset names to run")
    ap.add_argument("--report-only", action="store_true", help="only rewrite FINDINGS.md from finished work")
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
    write_findings(Path(args.out), Path(args.doc))
    return 0


def throughput_note(study_runs: Path) -> str:
    """The training speed the advisor study's runs logged (tokens/s per optimiser step), and what the full
    findings grid (3 sets × 3 objectives × 3 seeds × 200 examples × 2 epochs, ≤ 256 tokens) would take at it."""
    speeds = []
    for p in study_runs.glob("*/n*/runs/*/metrics.jsonl"):
        for line in p.read_text().splitlines():
            row = json.loads(line) if line.strip() else {}
            if row.get("tokens_per_s"):
                speeds.append(float(row["tokens_per_s"]))
    if not speeds:
        return "it was not run here."
    med = sorted(speeds)[len(speeds) // 2]
    tokens = 3 * 3 * 3 * 200 * 2 * 200  # ~200 tokens per example after truncation at 256
    return (f"the advisor study's {len(speeds)} training steps today ran at a median {med:.1f} tokens/s (niced, on "
            f"the shared 2 cores), at which the grid's ~{tokens / 1e6:.1f}M training tokens would take "
            f"~{tokens / med / 86400:.0f} days (at the ~130 tokens/s of 2 quiet cores noted in cli/demo.py, "
            f"~{tokens / 130 / 3600:.1f} hours), so it was not run here.")


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


def findings_rows(root: Path) -> list[str]:
    rows = []
    for name in SETS:
        p = root / name / "results.json"
        if not p.exists():
            continue
        r = json.loads(p.read_text())
        v, a = r["verdict"], r["advice"]
        d = v.get("im_minus_it") or {}
        if d.get("mean") is None:
            continue
        means = " / ".join(f"{o} {m:.4f}" for o, m in v["heldout_loss_mean"].items() if m is not None)
        rows.append(f"| {name} | {r['split'].get('n_train_common', r['split']['n_train'])} / {d['n']} / "
                    f"{d['n_seeds']} | {r['stats']['instruction_output_ratio']:.2f} | {means} | `{v['winner']}` "
                    f"{'wins' if v['resolved'] else 'ahead, not resolved'} | {d['mean']:+.4f} "
                    f"[{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}] | {a['predicted_im_minus_it']} → "
                    f"{v['measured_im_vs_it']} | {needed_heldout(d)} |")
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


def write_findings(root: Path, doc: Path, study_runs: str | Path = ROOT / "runs" / "advisor_study",
                   table_path: str | Path | None = None) -> None:
    from imtune.analysis.advise import load_table
    from imtune.io_utils import atomic_write_text

    table = load_table(table_path)
    meta, s = table.get("meta", {}), table.get("meta", {}).get("settings", {})
    f_rows = findings_rows(root)
    st_rows, acc, summary = study_rows(table)
    text = f"""# Findings: does IM beat IT at CPU scale?

Regenerated by `python bench/findings.py --report-only` on {datetime.date.today()} ({cpu_name()}); every figure
below is read from a results file, none is typed in.

## 1. Per-set comparisons (`bench/findings.py`: it, im, weighted:0.1 × seeds × ≥ 200 examples)

""" + ("""| dataset | train / held-out / seeds | instr/output ratio | held-out output loss | verdict | IM − IT [95% CI] | advisor predicted → measured | held-out examples to resolve |
|---|---|---|---|---|---|---|---|
""" + "\n".join(f_rows) if f_rows else """Not run at the issue's size yet. `python bench/findings.py` (defaults: 200 training examples, 48 held out,
3 seeds, objectives it,im,weighted:0.1, max length 256, 2 epochs) trains 27 SmolLM2-135M runs of 100 steps;
""" + throughput_note(Path(study_runs)) + """ It is resumable per (objective, seed): run it on a quiet machine
(or a GPU) and then `--report-only`. An earlier three-row table (2026-11-27, 24 examples, one seed) was made before imtune trained
every objective on the same examples and is superseded; it is in the git history of this file.""") + f"""

## 2. The advisor study (`bench/advisor_study.py`, the table `imtune advise` is fitted to)

Measured {meta.get('started', meta.get('date', '—'))} → {meta.get('date', '—')} on {meta.get('machine', '—')};
torch {meta.get('torch', '—')}, transformers {meta.get('transformers', '—')}; model `{meta.get('model', '—')}`,
full fine-tuning in {s.get('precision', '—')}, {s.get('epochs', '—')} epoch(s), lr {s.get('lr', '—')}, batch
{s.get('batch', '—')}, max length {s.get('max_length', '—')} ({s.get('examples', '')}); objectives it,im; the
same {s.get('n_heldout', '—')} held-out examples per source at every size. Cells finished:
{meta.get('cells_done', 0)} of {meta.get('cells_planned', 0)} planned
({meta.get('grid', {}).get('sizes', '—')} examples × {meta.get('grid', {}).get('seeds', '—')} seeds ×
{len(meta.get('grid', {}).get('sources', []))} sources). Interval: {meta.get('outcome', '—')}.

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
on a busy CPU — far from the paper's LLaMA-2-7B/13B with thousands of examples and an LLM judge. These rows check
direction and noise at toy scale; the advisor says which scale its evidence comes from with every recommendation.
"""
    atomic_write_text(doc, text)
    print(text)


if __name__ == "__main__":
    raise SystemExit(main())
