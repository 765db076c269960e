"""Does `imtune advise --pilot` make the call the full comparison makes, at a fraction of its cost?

    python bench/advisor_check.py                      # the pilot on LIMA, Alpagasus-Dolly-3k, Code-Alpaca-2k
    python bench/advisor_check.py --only LIMA --budget-frac 0.15
    python bench/advisor_check.py --report-only        # rewrite its FINDINGS.md section from bench/advisor_check.json

The full results are `bench/findings.py`'s `compare --seeds 3` at 200 examples: read from
runs/findings/<set>/results.json when present, else parsed from docs/FINDINGS.md §1 (which findings.py generated
from those files; nothing is retyped). Each set's pilot gets `--budget-frac` of the full comparison's minutes
(both through the pilot's cost model) as its budget, is trained with the same model, max length, epochs and
precision (batch and lr: the pilot's defaults, see PilotConfig), and is extrapolated to the full comparison's training-set size. Per set it reports the pilot's
call and interval, the full result, the cost as a fraction of the full comparison's (wall minutes, and training tokens: the full run's counted
from the same tokenisation of its split), and whether the call is right where the full comparison resolved.

Results go to bench/advisor_check.json (committed); bench/findings.py renders them as section 3 of FINDINGS.md, and
this script splices that section into the current FINDINGS.md (the other sections are left as they are). With
--add-to-study, the pilot's per-size rows and the full comparisons at n ≥ --study-min-n are appended to the advisor
study table (once), marked with
their provenance (bench/advisor_study.py keeps such rows when it rewrites the table).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from advisor_study import TABLE, cpu_name  # noqa: E402  (sibling scripts, not a package)
from findings import DATA, ROOT, SETS, pilot_section  # noqa: E402

from imtune.analysis.pilot import PilotConfig  # noqa: E402

RESULTS = ROOT / "bench" / "advisor_check.json"
DOC = ROOT / "docs" / "FINDINGS.md"
CI = re.compile(r"([+-]?\d+\.\d+) \[([+-]?\d+\.\d+), ([+-]?\d+\.\d+)\]( \*)?")


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=None, help="comma-separated dataset names")
    ap.add_argument("--budget-frac", type=float, default=0.15, help="pilot budget / full comparison's minutes")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--heldout", type=int, default=PilotConfig.n_val)
    ap.add_argument("--lr", type=float, default=PilotConfig.lr)
    ap.add_argument("--batch", type=int, default=PilotConfig.batch)
    ap.add_argument("--findings-root", default=str(ROOT / "runs" / "findings"))
    ap.add_argument("--out", default=str(ROOT / "runs" / "advisor_check"))
    ap.add_argument("--doc", default=str(DOC))
    ap.add_argument("--results", default=str(RESULTS))
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--reuse", action="append", default=[], metavar="NAME=DIR",
                    help="take the finished pilot in DIR (made with these settings) for set NAME instead of rerunning")
    ap.add_argument("--add-to-study", action="store_true",
                    help="append the pilots' rows and the full comparisons at n ≥ --study-min-n to the study table")
    ap.add_argument("--study-min-n", type=int, default=100)
    ap.add_argument("--table", default=str(TABLE))
    return ap.parse_args(argv)


def full_rows(doc: Path, root: Path) -> dict[str, dict]:
    """The full comparisons: results.json where present, else the rows of FINDINGS.md §1."""
    from findings import previous_section1, set_machine, set_minutes

    rows = {}
    previous, settings = previous_section1(doc)
    for name, cells in previous.items():
        m = CI.search(cells[5])
        n_train, n_held, seeds = (int(x) for x in cells[1].split("/"))
        rows[name] = {"n": n_train, "n_heldout": n_held, "seeds": seeds, "mean": float(m[1]),
                      "ratio": float(cells[2]), "ci95": [float(m[2]), float(m[3])], "resolved": bool(m[4]),
                      "minutes": float(cells[9]), "machine": cells[10], "from": f"{doc.name} §1",
                      "settings": settings}
    for name in SETS:
        p = root / name / "results.json"
        if p.exists():
            r = json.loads(p.read_text())
            d = r["verdict"]["im_minus_it"]
            rows[name] = {"n": r["split"].get("n_train_common", r["split"]["n_train"]), "n_heldout": d["n"],
                          "seeds": d["n_seeds"], "mean": d["mean"], "ci95": d["ci95"], "resolved": d["resolved"],
                          "minutes": set_minutes(root / name), "machine": set_machine(root / name), "from": str(p),
                          "ratio": r["stats"]["instruction_output_ratio"], "settings": r.get("train_config"),
                          "n_objectives": len(r["config"]["objectives"])}
    for r in rows.values():
        r["measured"] = "no clear difference" if not r["resolved"] else "IM better" if r["mean"] < 0 else "IT better"
    return rows


def full_cost(name: str, n_train: int = 200, n_val: int = 64, max_length: int = 160, seeds: int = 3,
              objectives: int = 3, epochs: int = 2, batch: int = 4) -> dict:
    """findings.py's comparison of `name` through the pilot's own cost model: its split (seed 42), tokenised as
    training does, the examples every objective keeps, × objectives × seeds × epochs. The same model plans the
    pilot, so the budget fraction does not depend on how busy the machine was when either ran."""
    from imtune.analysis.pilot import estimate
    from imtune.config import DEFAULT_TEMPLATE
    from imtune.masking.encoding import encode
    from imtune.models import load_tokenizer
    from imtune.records.loading import load_dataset
    from imtune.records.split import holdout_split

    recs = load_dataset(DATA / SETS[name], skip_invalid=True).records
    train, held = holdout_split(recs, n_val, 42, n_train=n_train)
    tok = load_tokenizer("smollm2-135m")
    lens = [len(e) for e in encode(train, tok, "it", DEFAULT_TEMPLATE, max_length)]
    held_tokens = sum(len(e) for e in encode(held, tok, "it", DEFAULT_TEMPLATE, max_length))
    est = estimate([len(lens)], seeds, epochs, lens, held_tokens, 1.0, objectives=objectives, batch=batch)
    return {"training_tokens": est["train_tokens"], "planned_minutes": est["seconds"] / 60}


def verdict_of(call: str, full: dict) -> str:
    want = {"IM better": "IM expected better", "IT better": "IT expected better"}.get(full["measured"])
    if want is None:
        return "unverifiable (full comparison unresolved)" + (
            "; the pilot called a direction" if not call.startswith("cannot") else "")
    if call == want:
        return "right"
    return "missed (cannot tell)" if call.startswith("cannot") else "WRONG"


def reused(args, name: str, cfg) -> dict | None:
    """A finished `imtune advise --pilot` of this set given with --reuse NAME=DIR (its pilot.json), taken as is when
    it was made with this check's settings (its own budget, which the row then reports, may differ)."""
    from dataclasses import asdict

    given = dict(x.split("=", 1) for x in args.reuse)
    if name not in given:
        return None
    r = json.loads((Path(given[name]) / "pilot.json").read_text())
    want, have = asdict(cfg), dict(r["config"])
    # A pilot that loaded its data without --skip-invalid had nothing to skip: the same records either way.
    drop = ("out", "progress", "budget_min", "train_overrides") + (("skip_invalid",) if not have["skip_invalid"] else ())
    for d in (want, have):
        for k in drop:
            d.pop(k, None)
        d["data"] = str(Path(d["data"]).resolve())
        d["sizes"] = list(d["sizes"]) if d.get("sizes") else None
    if want != have:
        diff = sorted(k for k in want if want[k] != have.get(k))
        raise SystemExit(f"--reuse {name}: that pilot was made with other settings ({', '.join(diff)})")
    print(f"[advisor check] {name}: reusing the pilot in {given[name]}", file=sys.stderr)
    return r


def check_set(args, name: str, full: dict) -> dict:
    from imtune.analysis.pilot import run_pilot

    cost = full_cost(name)
    budget = args.budget_frac * cost["planned_minutes"]
    cfg = PilotConfig(data=str(DATA / SETS[name]), out=str(Path(args.out) / name), model="smollm2-135m",
                      n_target=full["n"], budget_min=budget, seeds=args.seeds, n_val=args.heldout, max_length=160,
                      epochs=2, lr=args.lr, batch=args.batch, precision="auto", skip_invalid=True)
    r = reused(args, name, cfg) or run_pilot(cfg)
    e, c = r["extrapolation"], r["cost"]
    budget = r["plan"]["budget_s"] / 60
    return {"set": name, "call": r["call"], "text": r["text"], "delta": e["delta"], "ci95": e["ci95"],
            "largest_size_ci95": e["largest_size_ci95"], "largest_size_mean": e["largest_size_mean"],
            "per_size": e["per_size"], "fit": e["fit"], "full": full, "budget_min": budget,
            "wall_minutes": c["wall_minutes"], "training_tokens": c["training_tokens"],
            "planned_minutes": c["planned_minutes"], "full_training_tokens": cost["training_tokens"],
            "full_planned_minutes": cost["planned_minutes"],
            "minutes_fraction": c["wall_minutes"] / full["minutes"],
            "planned_fraction": c["planned_minutes"] / cost["planned_minutes"],
            "tokens_fraction": c["training_tokens"] / cost["training_tokens"], "outcome": verdict_of(r["call"], full),
            "pilot": str(Path(dict(x.split("=", 1) for x in args.reuse).get(name, cfg.out)) / "pilot.json")}


# The study table's source names for the bundled sets.
STUDY_SOURCE = {"LIMA": "lima", "Alpagasus-Dolly-3k": "dolly", "Code-Alpaca-2k": "code-alpaca"}


def full_study_row(name: str, full: dict) -> dict:
    """A full comparison as a study-table row, marked with where it was read from and its settings."""
    return {"source": STUDY_SOURCE[name], "n": full["n"], "ratio": full["ratio"], "template": "tulu",
            "model": "smollm2-135m", "n_heldout": full["n_heldout"], "seeds": full["seeds"],
            "im_minus_it": full["mean"], "ci95": full["ci95"], "resolved": full["resolved"],
            "measured": full["measured"], "provenance": {"full_comparison": full["from"],
                                                         "settings": full.get("settings")}}


def add_to_study(rows: list[dict], fulls: dict[str, dict], table_path: Path, min_n: int) -> int:
    """Append the pilots' per-size rows and the full comparisons at n ≥ min_n (once: a rerun adds nothing new)."""
    from imtune.analysis.advise import evidence_rows
    from imtune.io_utils import atomic_write_json

    table = json.loads(table_path.read_text())
    have = {(r["source"], r["n"], json.dumps(r.get("provenance"), sort_keys=True)) for r in table["rows"]}
    new = [row for s in rows for row in evidence_rows([s["pilot"]])]
    new += [full_study_row(name, f) for name, f in fulls.items() if name in STUDY_SOURCE]
    added = 0
    for row in new:
        key = (row["source"], row["n"], json.dumps(row.get("provenance"), sort_keys=True))
        if row["n"] >= min_n and key not in have:
            table["rows"].append(row)
            have.add(key)
            added += 1
    if added:
        atomic_write_json(table_path, table, own=False)
    return added


def splice(doc: Path, section: str) -> None:
    """Replace (or append) section 3 of FINDINGS.md, leaving the rest as it is."""
    from imtune.io_utils import atomic_write_text

    text = doc.read_text()
    head = text.split("\n## 3. ", 1)[0].rstrip("\n")
    atomic_write_text(doc, head + "\n\n" + section, own=False)


def main(argv=None) -> int:
    args = parse(argv)
    res_p = Path(args.results)
    if not args.report_only:
        fulls = full_rows(Path(args.doc), Path(args.findings_root))
        names = args.only.split(",") if args.only else [n for n in SETS if n in fulls]
        old = json.loads(res_p.read_text())["sets"] if res_p.exists() else []
        sets = {s["set"]: s for s in old}
        for name in names:
            if name not in fulls:
                print(f"[advisor check] {name}: no full comparison in {args.doc} or {args.findings_root}; skipped",
                      file=sys.stderr)
                continue
            sets[name] = check_set(args, name, fulls[name])
        from imtune.io_utils import atomic_write_json

        atomic_write_json(res_p, {"date": datetime.date.today().isoformat(), "machine": f"{cpu_name()}, "
                                  f"{os.cpu_count()} cores", "load_average": list(os.getloadavg()),
                                  "budget_frac": args.budget_frac, "seeds": args.seeds, "heldout": args.heldout,
                                  "lr": args.lr, "batch": args.batch,
                                  "command": "python bench/advisor_check.py " + " ".join(sys.argv[1:]),
                                  "sets": [sets[n] for n in SETS if n in sets]}, own=False)
        if args.add_to_study:
            print(f"[advisor check] {add_to_study(list(sets.values()), fulls, Path(args.table), args.study_min_n)} "
                  "row(s) added to the study table", file=sys.stderr)
    section = pilot_section(json.loads(res_p.read_text()) if res_p.exists() else None)
    splice(Path(args.doc), section)
    print(section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
