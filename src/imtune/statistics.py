"""The one statistics module: mean and standard error, percentile bootstrap of a mean, and paired differences
between two models scored on the same examples, over one or several training seeds.

Used by evaluation (loss probe, memorisation, judge win rates) and analysis (compare's verdict, the advisor study),
so it sits at the top level, below both stages. Every resampling takes a fixed seed: the same data give the same
interval.

Paired differences over seeds use a two-way (crossed) bootstrap: every seed's run scored the same held-out examples,
so the per-example differences form a seeds × examples table, and each replicate resamples seeds and examples
independently, with replacement, and averages the selected cells. Its interval therefore widens with both the
run-to-run variation (initialisation, data order, dropout, noise) and the sampling of held-out examples. With one
seed it is the ordinary paired bootstrap over examples.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

N_BOOT = 2000
BOOT_SEED = 0
PAIRED_METHOD = ("two-way bootstrap over training seeds and held-out examples (both resampled with replacement, "
                 "{n_boot} replicates, percentile 95% interval)")


def mean_stderr(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Sample mean and standard error of the mean (ddof=1; 0 for one value; None for none)."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return None, None
    se = float(x.std(ddof=1) / math.sqrt(x.size)) if x.size > 1 else 0.0
    return float(x.mean()), se


def bootstrap_mean_ci(values: Sequence[float], n_boot: int = N_BOOT, seed: int = BOOT_SEED,
                      level: float = 0.95) -> list[float]:
    """Percentile bootstrap CI of the mean, `[lo, hi]`; a fixed seed makes it reproducible."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return [math.nan, math.nan]
    if x.size == 1:
        return [float(x[0]), float(x[0])]
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot, dtype=np.float64)
    # Resample in chunks so n_boot x n indices never need to be held at once for large n.
    chunk = max(1, min(n_boot, 4_000_000 // x.size))
    for s in range(0, n_boot, chunk):
        k = min(chunk, n_boot - s)
        means[s:s + k] = x[rng.integers(0, x.size, size=(k, x.size))].mean(axis=1)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    # Quantile interpolation can land a hair inside the sample mean when the bootstrap distribution is degenerate.
    m = float(x.mean())
    return [float(min(lo, m)), float(max(hi, m))]


def crossed_bootstrap_means(table: np.ndarray, n_boot: int = N_BOOT, seed: int = BOOT_SEED) -> np.ndarray:
    """Bootstrap means of a rows × columns table, resampling rows and columns independently (see module doc).

    A replicate draws row counts c_r and column counts c_c (multinomial, as index draws with replacement) and takes
    c_rᵀ · table · c_c / (rows · columns), the mean of the selected cells, without materialising them."""
    t = np.asarray(table, dtype=np.float64)
    k, n = t.shape
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot, dtype=np.float64)
    chunk = max(1, min(n_boot, 4_000_000 // max(n, 1)))
    for s in range(0, n_boot, chunk):
        b = min(chunk, n_boot - s)
        rows = _counts(rng.integers(0, k, size=(b, k)), k) if k > 1 else np.ones((b, 1))
        cols = _counts(rng.integers(0, n, size=(b, n)), n)
        means[s:s + b] = np.einsum("bk,kn,bn->b", rows, t, cols) / (k * n)
    return means


def _counts(idx: np.ndarray, size: int) -> np.ndarray:
    out = np.zeros((idx.shape[0], size), dtype=np.float64)
    np.add.at(out, (np.arange(idx.shape[0])[:, None], idx), 1.0)
    return out


def paired_difference(a: Mapping[str, float] | Sequence[Mapping[str, float]],
                      b: Mapping[str, float] | Sequence[Mapping[str, float]],
                      n_boot: int = N_BOOT, seed: int = 1234) -> dict:
    """Mean of b − a over the examples every run scored, with a 95% interval (pure and deterministic).

    `a` and `b` map example id → value for one run each, or are lists of such maps, one per training seed (the
    i-th of `a` paired with the i-th of `b`: same seed, same data order). `resolved` is True only when the interval
    excludes 0. `per_seed` gives each seed's own mean difference."""
    a_runs = [a] if isinstance(a, Mapping) else list(a)
    b_runs = [b] if isinstance(b, Mapping) else list(b)
    if len(a_runs) != len(b_runs):
        raise ValueError(f"paired_difference: {len(a_runs)} seed(s) for A but {len(b_runs)} for B")
    ids = [i for i in a_runs[0] if all(i in r for r in (*a_runs, *b_runs))] if a_runs else []
    if not ids:
        return {"n": 0, "n_seeds": len(a_runs), "mean": None, "ci95": [None, None], "resolved": False,
                "per_seed": [], "share_b_lower": None}
    d = np.asarray([[rb[i] - ra[i] for i in ids] for ra, rb in zip(a_runs, b_runs, strict=True)], dtype=np.float64)
    boots = crossed_bootstrap_means(d, n_boot=n_boot, seed=seed)
    lo, hi = np.percentile(boots, [2.5, 97.5])
    m = float(d.mean())
    lo, hi = float(min(lo, m)), float(max(hi, m))
    return {"n": len(ids), "n_seeds": len(a_runs), "mean": m, "ci95": [lo, hi], "resolved": bool(lo > 0 or hi < 0),
            "per_seed": [float(x) for x in d.mean(axis=1)], "share_b_lower": float((d < 0).mean()),
            "method": PAIRED_METHOD.format(n_boot=n_boot)}


def required_n(mean: float | None, sd: float | None, z: float = 1.96) -> int | None:
    """Examples (independent units) needed for a 95% interval of half-width |mean|: (z·sd/mean)²; a planning
    figure from a measured spread, not a guarantee."""
    if mean is None or sd is None or mean == 0:
        return None
    return int(math.ceil((z * sd / abs(mean)) ** 2))


def crossed_bootstrap_shared(tables: Sequence[np.ndarray], n_boot: int = N_BOOT, seed: int = BOOT_SEED) -> np.ndarray:
    """Bootstrap means of several seeds × examples tables whose columns are the same examples (a pilot's training
    sizes, all scored on one held-out set): each replicate resamples the examples once, shared by every table (so
    the sizes' correlation through the shared examples is kept), and each table's seeds independently (every size
    trained its own runs). Returns an n_boot × len(tables) array of replicate means, for callers that refit a curve
    per replicate (the refit of a fixed-weight least-squares line is linear in these means)."""
    ts = [np.asarray(t, dtype=np.float64) for t in tables]
    n = ts[0].shape[1]
    if any(t.shape[1] != n for t in ts):
        raise ValueError("crossed_bootstrap_shared: every table must score the same examples (columns)")
    rng = np.random.default_rng(seed)
    out = np.empty((n_boot, len(ts)), dtype=np.float64)
    chunk = max(1, min(n_boot, 4_000_000 // max(n, 1)))
    for s in range(0, n_boot, chunk):
        b = min(chunk, n_boot - s)
        cols = _counts(rng.integers(0, n, size=(b, n)), n)
        for j, t in enumerate(ts):
            k = t.shape[0]
            rows = _counts(rng.integers(0, k, size=(b, k)), k) if k > 1 else np.ones((b, 1))
            out[s:s + b, j] = np.einsum("bk,kn,bn->b", rows, t, cols) / (k * n)
    return out
