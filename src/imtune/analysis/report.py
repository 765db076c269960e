"""Comparison report: verdict first, then the evidence.

Rendered once: a Jinja2 template (report.md.j2) gives report.md, and the HTML page is that Markdown converted by
the `markdown` library, so both carry the same content. A small Markdown extension marks the verdict and advisor
paragraphs for styling and inlines the figures as data URIs, so report.html is one self-contained file.
"""

from __future__ import annotations

import math
from pathlib import Path
from xml.etree.ElementTree import Element

import numpy as np

from imtune.analysis.plots import (
    plot_loss_distribution_panels,
    plot_metric_bars,
    plot_seed_curves,
    to_data_uri,
)
from imtune.io_utils import atomic_write_text

HEAD = ["objective", "seed", "held-out output loss", "train output loss", "gap (held-out − train)",
        "Δ held-out vs winner [95% CI]", "memorisation BLEU", "ROUGE-L"]
HIDDEN = ("objective", "out", "data", "seed", "progress", "resume", "overwrite", "val_data", "val_fraction")
CSS = """body{font-family:system-ui,sans-serif;max-width:64em;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em}.verdict{font-size:1.25em;background:#eef6ee;border-left:6px solid #2a7;padding:.8em 1em}
.verdict.unresolved{background:#fff7e6;border-color:#e90}.advisor{background:#f3f3fb;padding:.6em 1em;
border-left:6px solid #77c}table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;
text-align:right}td:first-child,th:first-child{text-align:left}img{max-width:100%;border:1px solid #eee}"""


def _fmt(x, nd=4) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def _ci(ci, nd=4) -> str:
    if not ci or ci[0] is None:
        return "—"
    return f"[{ci[0]:+.{nd}f}, {ci[1]:+.{nd}f}]"


def _primary(res: dict) -> tuple[str, float, float | None] | None:
    metric = res.get("primary_metric") or next(
        (k for k, v in res.items() if isinstance(v, (int, float)) and not k.endswith("stderr")
         and k not in ("n", "n_samples", "num_fewshot", "limit")), None)
    if metric is None or not isinstance(res.get(metric), (int, float)):
        return None
    se = res.get(f"{metric}_stderr")
    return metric, float(res[metric]), float(se) if isinstance(se, (int, float)) else None


def benchmark_table(result: dict) -> dict[str, dict[str, tuple[float, float | None, float | None]]]:
    """{task (metric): {objective: (value, lo, hi)}}: the primary metric of each task, averaged over training seeds;
    the interval combines each seed's standard error with the spread between seeds (±1.96 standard errors)."""
    per: dict = {}
    for obj, run in result["runs"].items():
        for s in run.get("seeds") or [run]:
            for task, res in (s["evals"].get("benchmarks") or {}).items():
                if isinstance(res, dict) and (p := _primary(res)):
                    per.setdefault(f"{task} ({p[0]})", {}).setdefault(obj, []).append(p[1:])
    out: dict = {}
    for key, objs in per.items():
        for obj, vals in objs.items():
            v = np.asarray([x for x, _ in vals])
            ses = [se for _, se in vals]
            if any(se is None for se in ses):
                out.setdefault(key, {})[obj] = (float(v.mean()), None, None)
                continue
            var = (np.mean(np.square(ses)) + (v.var(ddof=1) if v.size > 1 else 0.0)) / v.size
            half = 1.96 * math.sqrt(var)
            out.setdefault(key, {})[obj] = (float(v.mean()), float(v.mean() - half), float(v.mean() + half))
    return out


def make_plots(result: dict, evals: dict, out: Path) -> list[dict]:
    """Loss curves (thin per seed, thick mean), per-split loss distributions, evaluation bars."""
    plots, found = out / "plots", []
    runs = result["runs"]
    seeds_of = {o: r.get("seeds") or [r] for o, r in runs.items()}
    curves = {o: [[tuple(p) for p in s["history"]["train_loss"]] for s in ss] for o, ss in seeds_of.items()}
    ev_pts = {o: [[tuple(p) for p in s["history"]["eval_loss"]] for s in ss] for o, ss in seeds_of.items()}
    if any(any(c) for c in curves.values()):
        found.append(("Loss curves", plot_seed_curves(
            curves, plots / "loss_curves", eval_points=ev_pts, smooth=5,
            title="Training loss (own objective; thin = one seed), held-out loss (dots)")[0]))
    panels = {}
    for split, label in (("train", "train"), ("heldout", "held-out")):
        series = {o: [r["loss"] for ev in evals[o] for r in ev.get(f"loss_{split}", {}).get("rows", [])]
                  for o in runs}
        if any(series.values()):
            panels[label] = series
    if panels:
        found.append(("Train vs held-out loss distributions", plot_loss_distribution_panels(
            panels, plots / "loss_distributions",
            title="Per-example output loss (pooled over seeds; dashed = mean)")[0]))
    bars = benchmark_table(result)
    mem = {o: r["evals"].get("memorisation") for o, r in runs.items()}
    if any(mem.values()):
        bars["memorisation BLEU (lower = copies less)"] = {
            o: (m["sentence_bleu_mean"], *m["sentence_bleu_ci95"]) for o, m in mem.items() if m}
    if bars:
        found.append(("Evaluations", plot_metric_bars(bars, plots / "metrics", title="Evaluations (95% CI)")[0]))
    return [{"title": t, "path": p.relative_to(out).as_posix(), "file": p} for t, p in found]


def _rows(result: dict) -> list[list[str]]:
    v = result["verdict"]
    rows = []
    for o, run in result["runs"].items():
        seeds = run.get("seeds") or []
        mem = run["evals"].get("memorisation") or {}
        d = (v.get("paired_diff_vs_winner") or {}).get(o)
        delta = "winner" if o == v.get("winner") else "—" if d is None else f"{d['mean']:+.4f} {_ci(d['ci95'])}"
        rows.append([f"`{o}`", "all" if len(seeds) > 1 else str(seeds[0]["seed"]) if seeds else "—",
                     _fmt(v["heldout_loss_mean"].get(o)), _fmt(v["train_loss_mean"].get(o)),
                     _fmt(v["overfitting_gap"].get(o)), delta, _fmt(mem.get("sentence_bleu_mean"), 2),
                     _fmt(mem.get("rougeL_mean"), 3)])
        if len(seeds) > 1:
            for k, s in enumerate(seeds):
                h, t = v["heldout_loss_per_seed"][o][k], v["train_loss_per_seed"][o][k]
                dk = "—" if d is None else f"{d['per_seed'][k]:+.4f}"
                m = s["evals"].get("memorisation") or {}
                rows.append(["", f"seed {s['seed']}", _fmt(h), _fmt(t), _fmt(h - t), dk,
                             _fmt(m.get("sentence_bleu_mean"), 2), _fmt(m.get("rougeL_mean"), 3)])
    return rows


def _advisor_line(v: dict) -> str | None:
    a = v.get("advisor")
    if not a:
        return None
    acc = a.get("accuracy")
    line = f"recommended `{a['recommendation']}` and predicted *{a['predicted']}*"
    if acc:
        line += f" (its leave-one-source-out accuracy: {acc})"
    if a["measured"] is None:
        return line + f"; {a.get('note', 'no IM vs IT measurement')}."
    return line + f"; measured: *{a['measured']}* — {'agrees' if a['agrees'] else 'does not agree'}."


def to_markdown(result: dict, plots: list[dict]) -> str:
    import jinja2

    v = result["verdict"]
    d = v.get("im_minus_it")
    im_it = None if not d or d.get("mean") is None else (
        f"IM − IT held-out output loss: {d['mean']:+.4f} {_ci(d['ci95'])}"
        + (f"; per seed: {', '.join(f'{x:+.4f}' for x in d['per_seed'])}" if d["n_seeds"] > 1 else "")
        + f" → measured: {v['measured_im_vs_it']}.")
    method = next((x["method"] for x in (v.get("paired_diff_vs_winner") or {}).values() if x.get("method")), "—")
    bench = benchmark_table(result)
    objs = list(result["runs"])
    env = jinja2.Environment(loader=jinja2.PackageLoader("imtune.analysis", "."), autoescape=False,
                             keep_trailing_newline=True, undefined=jinja2.StrictUndefined)
    return env.get_template("report.md.j2").render(
        objectives=[f"`{o}`" for o in objs], v=v, advisor=_advisor_line(v), head=HEAD, rows=_rows(result),
        im_it=im_it, base_loss=_fmt((result.get("base", {}).get("heldout_loss") or {}).get("mean")),
        method=method, plots=plots, data=result["config"]["data"], split=result["split"],
        split_seed=result["config"]["seed"], seeds=result.get("seeds") or [result["config"]["seed"]],
        stats=result["stats"], model=result["config"]["model"], reasons=result["advice"]["reasons"],
        bench_rows=[[t, *(_fmt(vals.get(o, (None,))[0], 3) for o in objs)] for t, vals in bench.items()],
        hyper=[(k, val) for k, val in result["train_config"].items() if k not in HIDDEN and val is not None])


def to_html(markdown_text: str, out: Path, resolved: bool) -> str:
    import html

    import markdown

    body = markdown.markdown(markdown_text, extensions=["tables", _ReportExtension(out=out, resolved=resolved)])
    title = html.escape(markdown_text.splitlines()[0].lstrip("# ").replace("`", ""))
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title><style>{CSS}</style></head>"
            f"<body>{body}</body></html>")


def _ReportExtension(out: Path, resolved: bool):  # noqa: N802  (a factory standing in for the class)
    from markdown.extensions import Extension
    from markdown.treeprocessors import Treeprocessor

    class Marks(Treeprocessor):
        def run(self, root: Element) -> None:
            for p in root.iter("p"):
                first = p.find("strong")
                if first is not None and p.text in (None, "") and first.text == "Verdict.":
                    p.set("id", "verdict")
                    p.set("class", "verdict" if resolved else "verdict unresolved")
                elif first is not None and p.text in (None, "") and (first.text or "").startswith("Advisor"):
                    p.set("class", "advisor")
            for img in root.iter("img"):
                img.set("src", to_data_uri(out / img.get("src")))

    class Ext(Extension):
        def extendMarkdown(self, md):  # noqa: N802  (the library's name)
            md.treeprocessors.register(Marks(md), "imtune_report", 0)

    return Ext()


def write_report(result: dict, evals: dict, out: Path) -> dict[str, Path]:
    """`evals[o]`: one objective's full evaluations, one per training seed (per-example rows for the plots)."""
    out = Path(out)
    evals = {o: [e] if isinstance(e, dict) else list(e) for o, e in evals.items()}
    plots = make_plots(result, evals, out)
    md_text = to_markdown(result, plots)
    md = atomic_write_text(out / "report.md", md_text)
    page = atomic_write_text(out / "report.html", to_html(md_text, out, bool(result["verdict"].get("resolved"))))
    keys = {"Loss curves": "curves", "Train vs held-out loss distributions": "distributions", "Evaluations": "bars"}
    return {"md": md, "html": page, **{keys[p["title"]]: p["file"] for p in plots}}
