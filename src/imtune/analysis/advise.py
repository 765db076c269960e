"""Before training: will IM help this data? A rule fitted to measured comparisons, not asserted.

The evidence is the advisor study's outcome table (package data `data/advisor/study.json`, written by
`bench/advisor_study.py`): one row per `imtune compare` cell (training source, instruction/output token ratio, n,
model) with the measured held-out output loss IM − IT and its 95% interval over seeds and held-out examples. Users
can add rows from their own `compare` results (`--evidence results.json`).

The rule is a weighted least-squares line, IM − IT ≈ b0 + b1·log(ratio) + b2·log(n), each row weighted by the
inverse variance of its measurement. For new data it predicts IM − IT with a 95% interval: "IM better" or "IT
better" only when that interval excludes 0, else "no clear difference expected", whatever the paper's trend. Its
leave-one-source-out accuracy (refit without each source, predict that source's rows, compare with what was
measured) is stated with every recommendation, beside the accuracy of always saying "no clear difference".
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from imtune.config import DEFAULT_MAX_LENGTH, DEFAULT_OBJECTIVE, DEFAULT_PILOT_BUDGET_MIN, DEFAULT_TEMPLATE
from imtune.errors import ImtuneError
from imtune.inputs import read_json, read_json_object

NO_DIFF = "no clear difference"
MIN_ROWS = 4  # fewer rows than this cannot support three coefficients and a residual spread


@dataclass
class Advice:
    recommendation: str  # it | im | the default objective when no difference is expected
    confidence: str  # strong | moderate | weak
    predicted_im_minus_it: str  # "IM better" | "no clear difference" | "IT better"
    ratio: float
    examples: int
    predicted_delta: float | None = None  # predicted held-out loss IM − IT
    interval: list | None = None
    accuracy: str | None = None  # leave-one-source-out, stated with every recommendation
    evidence: str = ""  # which model, scale and table the rule comes from
    reasons: list[str] = field(default_factory=list)
    figures: dict = field(default_factory=dict)
    coefficients: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


# ---- evidence ----------------------------------------------------------------------------------------------------

def study_table_path() -> Path:
    from importlib.resources import files

    return Path(str(files("imtune") / "data" / "advisor" / "study.json"))


def load_table(path: str | Path | None = None) -> dict:
    p = Path(path) if path else study_table_path()
    if not p.exists():
        return {"meta": {}, "rows": []}
    table = read_json_object(p, "advisor table")
    if not isinstance(table.get("rows"), list) or not all(isinstance(r, dict) for r in table["rows"]):
        raise ImtuneError(f"{p}: not a valid advisor table: expected 'rows', a list of objects")
    return table


def evidence_rows(paths) -> list[dict]:
    """Rows from users' `imtune compare` results.json files (those that ran both it and im) and `imtune advise
    --pilot` pilot.json files (one row per measured size)."""
    rows = []
    for path in paths:
        p = Path(path)
        try:
            r = read_json(p, "evidence file")
            if isinstance(r, dict) and r.get("kind") == "imtune-pilot":
                rows.extend(_pilot_rows(p, r))
                continue
            d, v = r["verdict"].get("im_minus_it"), r["verdict"]
            if not d or d.get("mean") is None:
                raise ImtuneError(f"{p}: this comparison did not run both it and im, so it says nothing about "
                                  "IM vs IT")
            rows.append({"source": f"evidence:{p}", "n": r["split"].get("n_train_common", r["split"]["n_train"]),
                         "ratio": r["stats"]["instruction_output_ratio"], "model": r["config"]["model"],
                         "template": r["train_config"].get("template"), "n_heldout": d["n"],
                         "seeds": d.get("n_seeds", 1), "im_minus_it": d["mean"], "ci95": d["ci95"],
                         "resolved": d["resolved"], "measured": v.get("measured_im_vs_it")})
        except (KeyError, TypeError, AttributeError, IndexError, ValueError) as e:  # a JSON file of another shape
            raise ImtuneError(f"{p}: not an imtune compare results.json or pilot.json ({type(e).__name__}: {e})") \
                from None
    return rows


def _pilot_rows(p: Path, r: dict) -> list[dict]:
    """One row per size a pilot measured (each is a compare of it vs im), marked with its provenance: the pilot
    file and its settings."""
    c = r["config"]
    settings = {k: c[k] for k in ("max_length", "epochs", "lr", "batch", "n_val", "seeds", "precision")}
    rows = evidence_rows([s["results"] for s in r["sizes"]])
    for row in rows:
        row.update(source=f"pilot:{Path(c['data']).stem}", provenance={"pilot": str(p), "settings": settings})
    return rows


# ---- the fitted rule ---------------------------------------------------------------------------------------------

def _design(ratio, n) -> np.ndarray:
    r, k = np.atleast_1d(np.asarray(ratio, float)), np.atleast_1d(np.asarray(n, float))
    return np.column_stack([np.ones_like(r), np.log(np.maximum(r, 1e-6)), np.log(np.maximum(k, 1.0))])


def _sd(row: dict) -> float:
    lo, hi = row["ci95"]
    return max((hi - lo) / (2 * 1.96), 1e-4)


@dataclass
class Fit:
    coef: np.ndarray  # intercept, log ratio, log n (0 for a term the evidence does not vary)
    cov: np.ndarray
    rows: int
    terms: tuple[bool, bool, bool] = (True, True, True)

    def predict(self, ratio: float, n: float) -> tuple[float, float]:
        x = _design(ratio, n)[0]
        return float(x @ self.coef), float(math.sqrt(max(x @ self.cov @ x, 0.0)))


def fit(rows: list[dict]) -> Fit | None:
    """Weighted least squares on log ratio and log n; the coefficient covariance is scaled by the residual spread
    (at least 1), so rows that disagree beyond their own intervals widen the predictions. A term whose input does
    not vary in the evidence (e.g. every row at one size) is left out rather than guessed."""
    if len(rows) < MIN_ROWS:
        return None
    full = _design([r["ratio"] for r in rows], [r["n"] for r in rows])
    terms = (True, *(bool(np.ptp(full[:, j]) > 1e-9) for j in (1, 2)))
    x = full[:, list(terms)]
    y = np.asarray([r["im_minus_it"] for r in rows], float)
    w = np.asarray([1.0 / _sd(r) ** 2 for r in rows])
    xtw = x.T * w
    try:
        inv = np.linalg.inv(xtw @ x)
    except np.linalg.LinAlgError:
        inv = np.linalg.pinv(xtw @ x)
    coef = inv @ xtw @ y
    dof = max(len(rows) - x.shape[1], 1)
    scale = max(float(np.sum(w * (y - x @ coef) ** 2)) / dof, 1.0)
    idx = np.flatnonzero(terms)
    full_coef, full_cov = np.zeros(3), np.zeros((3, 3))
    full_coef[idx] = coef
    full_cov[np.ix_(idx, idx)] = inv * scale
    return Fit(full_coef, full_cov, len(rows), terms)


def label(delta: float, sd: float) -> str:
    lo, hi = delta - 1.96 * sd, delta + 1.96 * sd
    return "IM better" if hi < 0 else "IT better" if lo > 0 else NO_DIFF


def leave_one_source_out(rows: list[dict]) -> dict:
    """Refit without each source and predict its rows; compare with what each row measured."""
    sources = sorted({r["source"] for r in rows})
    hits = total = baseline = 0
    for s in sources:
        f = fit([r for r in rows if r["source"] != s])
        if f is None:
            continue
        for r in (r for r in rows if r["source"] == s):
            hits += label(*f.predict(r["ratio"], r["n"])) == r["measured"]
            baseline += r["measured"] == NO_DIFF
            total += 1
    return {"correct": hits, "total": total, "sources": len(sources), "baseline_no_diff": baseline,
            "rows": len(rows)}


def accuracy_text(acc: dict) -> str:
    if not acc["total"]:
        return "not measurable (too few table rows to refit without a source)"
    return (f"{acc['correct']}/{acc['total']} table rows ({100 * acc['correct'] / acc['total']:.0f}%) predicted "
            f"correctly with their source left out; always saying '{NO_DIFF}' gets {acc['baseline_no_diff']}/"
            f"{acc['total']}")


def nearest_rows(rows: list[dict], ratio: float, n: int, k: int = 5) -> list[dict]:
    """Table rows closest to (ratio, n) in log ratio and log n, each scaled by its spread in the table."""
    if not rows:
        return []
    pts = np.log(np.asarray([[max(r["ratio"], 1e-6), max(r["n"], 1)] for r in rows], float))
    sd = np.maximum(pts.std(axis=0), 1e-9)
    q = np.log([max(ratio, 1e-6), max(n, 1)])
    order = np.argsort((((pts - q) / sd) ** 2).sum(axis=1), kind="stable")
    return [rows[i] for i in order[:k]]


# ---- advice ------------------------------------------------------------------------------------------------------

def _span(xs, fmt: str) -> str:
    lo, hi = min(xs), max(xs)
    return fmt.format(lo) if lo == hi else f"{fmt.format(lo)}–{fmt.format(hi)}"


def _evidence_text(meta: dict, rows: list[dict]) -> str:
    if not rows:
        return "no measured evidence (the advisor study table is empty)"
    models = sorted({str(r.get("model")) for r in rows})
    ns = [r["n"] for r in rows]
    ratios = [r["ratio"] for r in rows]
    s = meta.get("settings", {})
    return (f"{len(rows)} measured comparisons ({len({r['source'] for r in rows})} sources) with "
            f"{', '.join(models)}: {_span(ns, '{:,}')} training examples, instruction/output ratio "
            f"{_span(ratios, '{:.2f}')}" + (f", max length {s['max_length']}, {s.get('epochs')} epoch(s)"
                                                      if s.get("max_length") else "")
            + (f"; table dated {meta['date']}" if meta.get("date") else ""))


def advise_from_stats(stats: dict, table: dict | None = None, evidence=()) -> Advice:
    """Pure function of `imtune.analysis.stats.dataset_stats` output and the evidence table."""
    table = load_table() if table is None else table
    rows = list(table.get("rows", [])) + evidence_rows(evidence)
    r = float(stats["instruction_output_ratio"])
    n = int(stats["examples"])
    instr, out = stats["instruction_tokens"], stats["output_tokens"]
    figures = {"instruction_tokens_mean": instr["mean"], "output_tokens_mean": out["mean"],
               "instruction_tokens_median": instr["median"], "output_tokens_median": out["median"],
               "log10_ratio": round(math.log10(max(r, 1e-9)), 3), "examples": n}
    reasons = [f"Instructions average {instr['mean']:.0f} tokens and outputs {out['mean']:.0f} tokens: "
               f"instruction/output ratio {r:.2f}; {n:,} training examples."]
    evidence_text = _evidence_text(table.get("meta", {}), rows)
    f = fit(rows)
    if f is None:
        reasons.append(f"Too little measured evidence to fit a rule ({len(rows)} row(s); {MIN_ROWS} needed): "
                       f"{NO_DIFF} can be claimed. Run `imtune compare` on your data to measure it.")
        return Advice(DEFAULT_OBJECTIVE, "weak", NO_DIFF, round(r, 4), n, accuracy="not measurable",
                      evidence=evidence_text, reasons=reasons, figures=figures)
    ns, rs = [row["n"] for row in rows], [row["ratio"] for row in rows]
    n_used = min(max(n, min(ns)), max(ns))
    r_used = min(max(r, min(rs)), max(rs))
    delta, sd = f.predict(r_used, n_used)
    pred = label(delta, sd)
    loso = leave_one_source_out(rows)
    acc = accuracy_text(loso)
    fitted_pred = pred
    if pred != NO_DIFF and loso["correct"] <= loso["baseline_no_diff"]:
        # A rule that predicts unseen sources no better than "no difference" does not get to claim a difference.
        pred = NO_DIFF
    rec = {"IM better": "im", "IT better": "it"}.get(pred, DEFAULT_OBJECTIVE)
    conf = "weak" if pred == NO_DIFF else "strong" if abs(delta) > 2 * 1.96 * sd else "moderate"
    b = f.coef
    formula = f"{b[0]:+.4f}" + (f" {b[1]:+.4f}·ln(ratio)" if f.terms[1] else "") + (
        f" {b[2]:+.4f}·ln(n)" if f.terms[2] else " (every measured row has one size, so n is not in the rule)")
    reasons.append(f"Fitted to the measured comparisons: IM − IT held-out loss ≈ {formula}. At ratio {r_used:.2f} and n {n_used:,} it predicts {delta:+.4f} "
                   f"(95% interval [{delta - 1.96 * sd:+.4f}, {delta + 1.96 * sd:+.4f}]) → {pred}"
                   + (" expected." if pred == NO_DIFF else "."))
    if n_used != n or r_used != r:
        outside = ([f"{n:,} examples (measured: {_span(ns, '{:,}')})"] if n_used != n else []) + (
            [f"ratio {r:.2f} (measured: {_span(rs, '{:.2f}')})"] if r_used != r else [])
        reasons.append(f"Your {' and '.join(outside)} lie outside the evidence; the rule is evaluated at the nearest "
                       "measured point rather than extrapolated.")
    if fitted_pred != pred:
        reasons.append(f"The fitted rule says {fitted_pred}, but on sources left out of the fit it was right no more "
                       f"often than always saying '{NO_DIFF}' ({loso['correct']} vs {loso['baseline_no_diff']} of "
                       f"{loso['total']}), so it claims no difference.")
    if pred == NO_DIFF:
        reasons.append(f"No clear difference expected, so the recommendation is imtune's default objective "
                       f"({DEFAULT_OBJECTIVE}); the IM paper's trend (larger IM gains for long instructions and few "
                       "examples) is not resolved by this evidence.")
    reasons.append(f"Evidence: {evidence_text}. Leave-one-source-out accuracy: {acc}.")
    reasons.append(f"To measure it on your data: `imtune advise --pilot` (IT and IM trained at two small sizes, "
                   f"about {DEFAULT_PILOT_BUDGET_MIN:g} minutes) or `imtune compare --seeds 3` at your size; "
                   "`imtune advise --explain` lists the nearest measured rows.")
    return Advice(rec, conf, pred, round(r, 4), n, predicted_delta=delta,
                  interval=[delta - 1.96 * sd, delta + 1.96 * sd], accuracy=acc, evidence=evidence_text,
                  reasons=reasons, figures=figures,
                  coefficients={"intercept": b[0], "log_ratio": b[1], "log_n": b[2], "rows": f.rows})


def advise(records, tokenizer, template: str = DEFAULT_TEMPLATE, max_length: int = DEFAULT_MAX_LENGTH,
           evidence=(), table: dict | None = None, cache: bool = False) -> tuple[Advice, dict]:
    from imtune.analysis.stats import dataset_stats

    stats = dataset_stats(records, tokenizer, template=template, max_length=max_length, cache=cache)
    adv = advise_from_stats(stats, table=table, evidence=evidence)
    trunc = stats.get("truncation")
    if trunc and trunc.get("dropped_it"):
        adv.reasons.insert(1, f"Note: at max length {trunc['max_length']}, {trunc['dropped_it']} example(s) would "
                              "keep no output token under IT (dropped) but still train under IM.")
    return adv, stats
