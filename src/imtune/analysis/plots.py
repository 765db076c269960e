"""Figures for reports: per-example loss distributions (the paper's Figure 3), training curves, benchmark bars.

Every plot is written as PNG and SVG next to each other (`out_path` with either suffix, or none) and returned as
`(png_path, svg_path)`. Figures are drawn with matplotlib's object API on the Agg canvas, never through pyplot, so
no global backend or figure state is touched; SVG ids are salted with a constant and dates are left out, so the
same data gives byte-identical files. `to_data_uri` inlines a written figure into an HTML report.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from imtune.io_utils import atomic_path

_DPI = 120
# Colour-blind-safe (Okabe-Ito); series keep their colour by position, so "IT train"/"IM train" stay comparable.
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000")
_RC = {"svg.hashsalt": "imtune", "svg.fonttype": "path", "font.size": 10, "axes.spines.top": False,
       "axes.spines.right": False}


def _figure(figsize=(7.0, 4.2)):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def figure_paths(out_path) -> tuple[Path, Path]:
    p = Path(out_path)
    base = p.with_suffix("") if p.suffix.lower() in (".png", ".svg") else p
    return base.with_name(base.name + ".png"), base.with_name(base.name + ".svg")


def _save(fig, out_path) -> tuple[Path, Path]:
    """Write PNG and SVG atomically (temp file beside the target, then rename)."""
    import matplotlib

    png, svg = figure_paths(out_path)
    meta = {"png": {"Software": None}, "svg": {"Date": None, "Creator": None}}
    with matplotlib.rc_context(_RC):
        for path, fmt in ((png, "png"), (svg, "svg")):
            with atomic_path(path) as tmp:
                fig.savefig(tmp, format=fmt, dpi=_DPI, metadata=meta[fmt])
    return png, svg


def _colour(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def _clean(vals) -> np.ndarray:
    return np.asarray([v for v in vals if v is not None and math.isfinite(v)], dtype=np.float64)


def _edges(clean: Mapping[str, np.ndarray], bins: int | None) -> np.ndarray | None:
    """Shared bin edges; `bins=None` scales the count with the sample size (10 to 40)."""
    allv = np.concatenate([v for v in clean.values() if v.size] or [np.zeros(0)])
    if not allv.size:
        return None
    lo, hi = float(allv.min()), float(allv.max())
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    if bins is None:
        n_med = float(np.median([v.size for v in clean.values() if v.size]))
        bins = int(min(40, max(10, round(1.5 * math.sqrt(n_med)))))
    return np.linspace(lo, hi, bins + 1)


def _hist_panel(ax, clean: Mapping[str, np.ndarray], edges, colours: Mapping[str, str]) -> None:
    """Step histograms (densities) with each series' mean as a dashed line in its colour."""
    for name, v in clean.items():
        c = colours[name]
        if v.size == 0:
            ax.plot([], [], color=c, label=f"{name} (no data)")
            continue
        ax.hist(v, bins=edges, density=True, histtype="step", linewidth=1.6, color=c,
                label=f"{name}  (n={v.size}, mean {v.mean():.3f})")
        ax.axvline(float(v.mean()), color=c, linestyle="--", linewidth=1.2)
    if clean:
        ax.legend(frameon=False, fontsize=8)


def plot_loss_distributions(series: Mapping[str, Sequence[float]], out_path, *,
                            title: str = "Per-example output loss", xlabel: str = "loss (nats / token)",
                            bins: int | None = None) -> tuple[Path, Path]:
    """Step histograms (as densities, shared bins) of per-example losses, one per series, each with its mean as a
    dashed vertical line in the series' colour. Typical keys: "IT train", "IT held-out", "IM train", "IM held-out".
    """
    import matplotlib

    clean = {k: _clean(v) for k, v in series.items()}
    with matplotlib.rc_context(_RC):
        fig = _figure()
        ax = fig.add_subplot()
        _hist_panel(ax, clean, _edges(clean, bins), {k: _colour(i) for i, k in enumerate(clean)})
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("density")
        return _save(fig, out_path)


def plot_loss_distribution_panels(panels: Mapping[str, Mapping[str, Sequence[float]]], out_path, *,
                                  title: str = "Per-example output loss", xlabel: str = "loss (nats / token)",
                                  bins: int | None = None) -> tuple[Path, Path]:
    """One panel per split (e.g. "train", "held-out"), each with one histogram per objective, as in the IM
    paper's Figure 3. Bins and x-axis are shared across panels; an objective keeps its colour in every panel."""
    import matplotlib

    clean = {p: {k: _clean(v) for k, v in series.items()} for p, series in panels.items()}
    names = list(dict.fromkeys(k for series in clean.values() for k in series))
    colours = {k: _colour(i) for i, k in enumerate(names)}
    edges = _edges({f"{p}/{k}": v for p, s in clean.items() for k, v in s.items()}, bins)
    with matplotlib.rc_context(_RC):
        fig = _figure(figsize=(4.2 * max(1, len(clean)), 4.0))
        axes = fig.subplots(1, max(1, len(clean)), sharex=True, squeeze=False)[0]
        for ax, (panel, series) in zip(axes, clean.items(), strict=False):
            _hist_panel(ax, series, edges, colours)
            ax.set_title(panel)
            ax.set_xlabel(xlabel)
        axes[0].set_ylabel("density")
        fig.suptitle(title)
        return _save(fig, out_path)


def plot_seed_curves(curves: Mapping[str, Sequence[Sequence[tuple[int, float]]]], out_path, *,
                     eval_points: Mapping[str, Sequence[Sequence[tuple[int, float]]]] | None = None,
                     title: str = "Training loss", xlabel: str = "step", ylabel: str = "loss",
                     smooth: int = 0) -> tuple[Path, Path]:
    """Training loss per objective and seed: a thin line per seed and a thick line for the mean over seeds (at the
    steps every seed logged); held-out evaluations (same keys, one list per seed) as markers of their mean."""
    import matplotlib

    eval_points = eval_points or {}
    names = list(dict.fromkeys([*curves, *eval_points]))
    with matplotlib.rc_context(_RC):
        fig = _figure()
        ax = fig.add_subplot()
        for i, name in enumerate(names):
            c = _colour(i)
            runs = [sorted((int(s), float(v)) for s, v in run) for run in curves.get(name, ()) if run]
            for run in runs:
                ax.plot([p[0] for p in run], [p[1] for p in run], color=c, alpha=0.35, linewidth=0.8)
            x, y = _mean_curve(runs)
            if x.size:
                if smooth and smooth > 1 and len(y) >= 4 * smooth:  # shorter curves are drawn as logged
                    y = np.convolve(y, np.ones(smooth) / smooth, mode="valid")
                    x = x[smooth - 1:]
                label = f"{name} (train, mean of {len(runs)} seeds)" if len(runs) > 1 else f"{name} (train)"
                ax.plot(x, y, color=c, linewidth=2.0, label=label)
            ex, ey = _mean_curve([sorted((int(s), float(v)) for s, v in r) for r in eval_points.get(name, ()) if r])
            if ex.size:
                ax.plot(ex, ey, color=c, marker="o", linestyle=":", linewidth=1.0, markersize=5,
                        label=f"{name} (held-out)")
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if names:
            ax.legend(frameon=False, fontsize=8)
        return _save(fig, out_path)


def _mean_curve(runs: Sequence[Sequence[tuple[int, float]]]) -> tuple[np.ndarray, np.ndarray]:
    if not runs:
        return np.zeros(0), np.zeros(0)
    steps = sorted(set.intersection(*(set(s for s, _ in r) for r in runs)))
    maps = [dict(r) for r in runs]
    return np.asarray(steps, dtype=float), np.asarray([np.mean([m[s] for m in maps]) for s in steps])


def plot_loss_curves(curves: Mapping[str, Sequence[tuple[int, float]]], out_path, *,
                     eval_points: Mapping[str, Sequence[tuple[int, float]]] | None = None,
                     title: str = "Training loss", xlabel: str = "step", ylabel: str = "loss",
                     smooth: int = 0) -> tuple[Path, Path]:
    """Training loss against step, one line per objective (one run each); `eval_points` (same keys) drawn as
    markers in the same colour. `smooth` > 1 draws a trailing moving average over the faint raw line."""
    return plot_seed_curves({k: [v] for k, v in curves.items()}, out_path,
                            eval_points={k: [v] for k, v in (eval_points or {}).items()}, title=title,
                            xlabel=xlabel, ylabel=ylabel, smooth=smooth)


def plot_metric_bars(values: Mapping[str, Mapping[str, tuple[float, float | None, float | None]]], out_path, *,
                     title: str = "Benchmarks", ylabel: str = "score") -> tuple[Path, Path]:
    """Grouped bars, one group per benchmark and one bar per objective, with (lo, hi) CI error bars.

    `values = {benchmark: {objective: (value, lo, hi)}}`; a missing objective leaves a gap, and `lo`/`hi` of None
    draw no error bar.
    """
    import matplotlib

    benches = list(values)
    objectives = list(dict.fromkeys(o for b in benches for o in values[b]))
    with matplotlib.rc_context(_RC):
        fig = _figure(figsize=(max(5.0, 1.2 + 0.9 * len(benches) * max(1, len(objectives)) / 2), 4.2))
        ax = fig.add_subplot()
        width = 0.8 / max(1, len(objectives))
        x = np.arange(len(benches), dtype=float)
        for j, obj in enumerate(objectives):
            xs, ys, err_lo, err_hi = [], [], [], []
            for i, b in enumerate(benches):
                if obj not in values[b] or values[b][obj] is None:
                    continue
                v, lo, hi = _triple(values[b][obj])
                if v is None or not math.isfinite(v):
                    continue
                xs.append(x[i] - 0.4 + width * (j + 0.5))
                ys.append(v)
                err_lo.append(max(0.0, v - lo) if lo is not None else 0.0)
                err_hi.append(max(0.0, hi - v) if hi is not None else 0.0)
            if not xs:
                continue
            ax.bar(xs, ys, width=width * 0.95, color=_colour(j), label=obj,
                   yerr=np.array([err_lo, err_hi]), capsize=3, error_kw={"elinewidth": 1.0, "ecolor": "#333333"})
        ax.set_xticks(x)
        ax.set_xticklabels(benches, rotation=20 if len(benches) > 4 else 0, ha="right" if len(benches) > 4 else "center")
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        if objectives:
            ax.legend(frameon=False, fontsize=8)
        return _save(fig, out_path)


def _triple(t) -> tuple[float | None, float | None, float | None]:
    if isinstance(t, (int, float)):
        return float(t), None, None
    v, lo, hi = (list(t) + [None, None])[:3]
    return (None if v is None else float(v), None if lo is None else float(lo), None if hi is None else float(hi))


def to_data_uri(path) -> str:
    """`data:` URI of a PNG or SVG file, for inlining into a self-contained HTML report."""
    p = Path(path)
    mime = {".png": "image/png", ".svg": "image/svg+xml", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}.get(
        p.suffix.lower())
    if mime is None:
        raise ValueError(f"{p}: expected a .png, .svg or .jpg file")
    return f"data:{mime};base64,{base64.b64encode(p.read_bytes()).decode('ascii')}"
