"""Comparison report: verdict first, then the evidence — as Markdown and as one self-contained HTML page."""

from __future__ import annotations

import html
from pathlib import Path

from imtune.io_utils import atomic_write_text
from imtune.analysis.plots import plot_loss_curves, plot_loss_distributions, plot_metric_bars, to_data_uri


def _fmt(x, nd=4) -> str:
    return "—" if x is None else f"{x:.{nd}f}"


def _ci(ci, nd=4) -> str:
    if not ci or ci[0] is None:
        return "—"
    return f"[{ci[0]:+.{nd}f}, {ci[1]:+.{nd}f}]"


def benchmark_table(result: dict) -> dict[str, dict[str, tuple[float, float | None, float | None]]]:
    """{task/metric: {objective: (value, lo, hi)}} from each run's benchmark results (primary metric per task)."""
    out: dict = {}
    for obj, run in result["runs"].items():
        for task, res in (run["evals"].get("benchmarks") or {}).items():
            if not isinstance(res, dict):
                continue
            metric = res.get("primary_metric") or next(
                (k for k, v in res.items() if isinstance(v, (int, float)) and not k.endswith("stderr")
                 and k not in ("n", "n_samples", "num_fewshot", "limit")), None)
            if metric is None:
                continue
            v = float(res[metric])
            se = res.get(f"{metric}_stderr")
            lo, hi = (v - 1.96 * se, v + 1.96 * se) if isinstance(se, (int, float)) else (None, None)
            out.setdefault(f"{task} ({metric})", {})[obj] = (v, lo, hi)
    return out


def make_plots(result: dict, evals: dict, out: Path) -> dict[str, Path]:
    plots = out / "plots"
    paths = {}
    curves = {o: [tuple(p) for p in r["history"]["train_loss"]] for o, r in result["runs"].items()}
    eval_pts = {o: [tuple(p) for p in r["history"]["eval_loss"]] for o, r in result["runs"].items()}
    if any(curves.values()):
        paths["curves"] = plot_loss_curves(curves, plots / "loss_curves", eval_points=eval_pts,
                                           title="Training loss (each run's own objective) and held-out output "
                                                 "loss (markers)", smooth=5)[0]
    series = {}
    for o in result["runs"]:
        for split, label in (("train", "train"), ("heldout", "held-out")):
            rows = evals[o].get(f"loss_{split}", {}).get("rows", [])
            if rows:
                series[f"{o.upper()} {label}"] = [r["loss"] for r in rows]
    if series:
        paths["distributions"] = plot_loss_distributions(
            series, plots / "loss_distributions",
            title="Per-example output loss: train vs held-out (dashed = mean)")[0]
    bars = benchmark_table(result)
    mem = {o: r["evals"].get("memorisation") for o, r in result["runs"].items()}
    if any(mem.values()):
        bars["memorisation BLEU (lower = copies less)"] = {
            o: (m["sentence_bleu_mean"], *m["sentence_bleu_ci95"]) for o, m in mem.items() if m}
    if bars:
        paths["bars"] = plot_metric_bars(bars, plots / "metrics", title="Evaluations (95% CI)")[0]
    return paths


def _summary_rows(result: dict) -> list[list[str]]:
    v = result["verdict"]
    rows = []
    for o, run in result["runs"].items():
        ev = run["evals"]
        mem = ev.get("memorisation") or {}
        d = v["paired_diff_vs_baseline"].get(o)
        rows.append([o, _fmt(v["heldout_loss_mean"].get(o)), _fmt(v["train_loss_mean"].get(o)),
                     _fmt(v["overfitting_gap"].get(o)),
                     "baseline" if d is None else f"{d['mean']:+.4f} {_ci(d['ci95'])}",
                     _fmt(mem.get("sentence_bleu_mean"), 2), _fmt(mem.get("rougeL_mean"), 3)])
    return rows


HEAD = ["objective", "held-out output loss", "train output loss", "gap (held-out − train)",
        "Δ held-out vs baseline [95% CI]", "memorisation BLEU", "ROUGE-L"]


def to_markdown(result: dict, plot_paths: dict[str, Path], out: Path) -> str:
    v, adv = result["verdict"], result["advice"]
    lines = [f"# imtune compare: {' vs '.join(result['runs'])}", "", f"**Verdict.** {v['headline']}", ""]
    if "advisor" in v:
        a = v["advisor"]
        lines.append(f"**Advisor (before training)** recommended `{a['recommendation']}` and predicted "
                     f"*{a['predicted']}*; measured: *{a['measured']}* — "
                     f"{'agrees' if a['agrees'] else 'does not agree'}.")
        lines.append("")
    lines += ["| " + " | ".join(HEAD) + " |", "|" + "---|" * len(HEAD)]
    lines += ["| " + " | ".join(r) + " |" for r in _summary_rows(result)]
    base = result.get("base", {}).get("heldout_loss") or {}
    if base:
        lines += ["", f"Starting model's held-out output loss: {_fmt(base.get('mean'))}."]
    lines += ["", "Lower held-out loss is better; a larger gap means more overfitting (the paper's finding: IM has the "
              "higher train loss and the lower held-out loss). Intervals are paired bootstrap 95% CIs over the same "
              "held-out examples.", ""]
    for key, title in (("curves", "Loss curves"), ("distributions", "Train vs held-out loss distributions"),
                       ("bars", "Evaluations")):
        if key in plot_paths:
            lines += [f"## {title}", "", f"![{title}]({plot_paths[key].relative_to(out).as_posix()})", ""]
    bench = benchmark_table(result)
    if bench:
        objs = list(result["runs"])
        lines += ["## Benchmarks", "", "| task | " + " | ".join(objs) + " |", "|" + "---|" * (len(objs) + 1)]
        for task, vals in bench.items():
            lines.append(f"| {task} | " + " | ".join(_fmt(vals.get(o, (None,))[0], 3) for o in objs) + " |")
        lines.append("")
    s = result["stats"]
    lines += ["## Data and set-up", "",
              f"- data: `{result['config']['data']}` → {result['split']['n_train']} train / "
              f"{result['split']['n_heldout']} held-out examples (seed {result['config']['seed']})",
              f"- instruction/output token ratio {s['instruction_output_ratio']:.3f} (instruction mean "
              f"{s['instruction_tokens']['mean']:.0f}, output mean {s['output_tokens']['mean']:.0f} tokens)",
              f"- model: `{result['config']['model']}`; identical seed, data order and hyper-parameters for every "
              "objective: " + ", ".join(f"{k}={v}" for k, v in result["train_config"].items()
                                        if k in ("epochs", "max_steps", "lr", "lr_scheduler", "warmup_ratio",
                                                 "micro_batch_size", "global_batch_size", "max_length", "template",
                                                 "precision", "lora")),
              "", "### Advisor's reasons", ""]
    lines += [f"- {r}" for r in adv["reasons"]]
    return "\n".join(lines) + "\n"


CSS = """body{font-family:system-ui,sans-serif;max-width:64em;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em}.verdict{font-size:1.25em;background:#eef6ee;border-left:6px solid #2a7;padding:.8em 1em}
.verdict.unresolved{background:#fff7e6;border-color:#e90}.advisor{background:#f3f3fb;padding:.6em 1em;
border-left:6px solid #77c}table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;
text-align:right}td:first-child,th:first-child{text-align:left}img{max-width:100%;border:1px solid #eee}
.small{color:#666;font-size:.9em}"""


def to_html(result: dict, plot_paths: dict[str, Path]) -> str:
    v = result["verdict"]
    e = html.escape
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>imtune compare report</title>",
             f"<style>{CSS}</style></head><body>",
             f"<h1>imtune compare: {e(' vs '.join(result['runs']))}</h1>",
             f"<p class='verdict{'' if v['resolved'] else ' unresolved'}' id='verdict'><b>Verdict.</b> "
             f"{e(v['headline'])}</p>"]
    if "advisor" in v:
        a = v["advisor"]
        parts.append(f"<p class='advisor'><b>Advisor (before training)</b> recommended "
                     f"<code>{e(str(a['recommendation']))}</code> and predicted <i>{e(str(a['predicted']))}</i>; "
                     f"measured: <i>{e(a['measured'])}</i> — {'agrees' if a['agrees'] else 'does not agree'}.</p>")
    parts.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in HEAD) + "</tr>")
    for r in _summary_rows(result):
        parts.append("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>")
    parts.append("</table><p class='small'>Lower held-out loss is better; a larger gap means more overfitting. "
                 "Intervals: paired bootstrap 95% CI over the same held-out examples.</p>")
    for key, title in (("curves", "Loss curves"), ("distributions", "Train vs held-out loss distributions"),
                       ("bars", "Evaluations")):
        if key in plot_paths:
            parts.append(f"<h2>{e(title)}</h2><img alt='{e(title)}' src='{to_data_uri(plot_paths[key])}'>")
    s, adv = result["stats"], result["advice"]
    parts.append("<h2>Data and set-up</h2><ul>"
                 f"<li>{result['split']['n_train']} train / {result['split']['n_heldout']} held-out examples from "
                 f"<code>{e(result['config']['data'])}</code></li>"
                 f"<li>instruction/output token ratio {s['instruction_output_ratio']:.3f}</li>"
                 f"<li>model <code>{e(result['config']['model'])}</code></li></ul>"
                 "<h3>Advisor's reasons</h3><ul>" + "".join(f"<li>{e(r)}</li>" for r in adv["reasons"]) + "</ul>")
    parts.append("</body></html>")
    return "".join(parts)


def write_report(result: dict, evals: dict, out: Path) -> dict[str, Path]:
    out = Path(out)
    plot_paths = make_plots(result, evals, out)
    md = atomic_write_text(out / "report.md", to_markdown(result, plot_paths, out))
    page = atomic_write_text(out / "report.html", to_html(result, plot_paths))
    return {"md": md, "html": page, **plot_paths}
