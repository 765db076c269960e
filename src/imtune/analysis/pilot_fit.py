"""The pilot's statistics: IM − IT held-out loss per training size, a fitted curve over n, and the call at the
user's n. Pure functions of the per-example differences; the resampling itself is `imtune.statistics`'.

The curve is Δ(n) = a + b·ln n, fitted by weighted least squares with each size weighted by the inverse variance of
its own mean (from the bootstrap), the IM paper's Figure 2 shape over a small range of sizes: the gain shrinks
(roughly) linearly in log n. Two free parameters is all that two or three sizes can support; a power law or a
saturating curve would need more sizes than a pilot can afford. Its interval comes from refitting the line to every
bootstrap replicate (held-out examples resampled once for all sizes, since every size scores the same examples;
each size's seeds resampled on their own, the spread scaled by √(k/(k−1)) for k seeds), so the slope's uncertainty
widens the extrapolation with the distance beyond the measured sizes.

A pilot's sizes are few and close together, so the line's slope is uncertain and its interval at the user's n
(reported as `fitted_ci95`) is wide: requiring it to exclude 0 would make the pilot say "cannot tell" whenever the
user's n lies well beyond the measured sizes, which is always. The call therefore rests on what was measured: the
largest size's interval must exclude 0, and the fitted trend, taken at the user's n, must not reverse that sign
(its point estimate stays on the same side of 0). A line that crosses 0 between the largest size and the user's n
thus yields "cannot tell", never a flipped call, and beyond MAX_EXTRAPOLATION × the largest size no call is made at
all. What the call assumes is the paper's Figure 2: the difference changes smoothly with n, without changing sign
beyond where the trend says it would.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from imtune.statistics import N_BOOT, crossed_bootstrap_shared

IM_BETTER, IT_BETTER = "IM expected better", "IT expected better"
CANNOT_TELL = "cannot tell within this budget"
MAX_EXTRAPOLATION = 16.0  # beyond this multiple of the largest measured size, the pilot makes no call


def line_weights(x: np.ndarray, var: np.ndarray, x0: float) -> np.ndarray:
    """The linear functional g with ĝ·y = the weighted least-squares line's value at x0 (weights 1/var). With one
    size it is that size's value; a fixed-weight fit is linear in y, so bootstrap refits are boots @ g."""
    x = np.asarray(x, float)
    if x.size == 1 or np.ptp(x) < 1e-12:
        w = 1.0 / np.maximum(var, 1e-12)
        return w / w.sum()
    w = 1.0 / np.maximum(np.asarray(var, float), 1e-12)
    design = np.column_stack([np.ones_like(x), x])
    solve = np.linalg.solve((design.T * w) @ design, design.T * w)  # 2 × k: coefficients = solve @ y
    return np.array([1.0, x0]) @ solve


def _coefficients(x: np.ndarray, var: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    if x.size == 1 or np.ptp(x) < 1e-12:
        return float(y.mean()), 0.0
    w = 1.0 / np.maximum(var, 1e-12)
    design = np.column_stack([np.ones_like(x), x])
    a, b = np.linalg.solve((design.T * w) @ design, (design.T * w) @ y)
    return float(a), float(b)


def _ci(v: np.ndarray, point: float) -> list[float]:
    lo, hi = np.percentile(v, [2.5, 97.5])
    return [float(min(lo, point)), float(max(hi, point))]


def extrapolate(sizes: Sequence[int], tables: Sequence[np.ndarray], n_target: int, n_boot: int = N_BOOT,
                seed: int = 0) -> dict:
    """`tables[k]` holds size k's IM − IT per (seed, held-out example), the same examples (columns) at every size.
    Returns per-size means and intervals, the fitted line, and the extrapolated Δ at `n_target` with its interval
    (see the module doc), `call` one of IM_BETTER / IT_BETTER / CANNOT_TELL."""
    order = np.argsort(sizes)
    sizes = [int(sizes[i]) for i in order]
    tables = [np.asarray(tables[i], float) for i in order]
    boots = crossed_bootstrap_shared(tables, n_boot=n_boot, seed=seed)
    means = np.asarray([t.mean() for t in tables])
    # Resampling k seeds with replacement gives (k-1)/k of their variance (a half with a pilot's 2 seeds), so the
    # replicates' spread is scaled back up: with so few seeds an interval must err wide, not narrow.
    k = min(t.shape[0] for t in tables)
    if k > 1:
        boots = means + (boots - means) * math.sqrt(k / (k - 1))
    var = np.maximum(boots.var(axis=0, ddof=1), 1e-12)
    x = np.log(np.asarray(sizes, float))
    x0 = math.log(max(n_target, 1))
    g = line_weights(x, var, x0)
    fitted = float(g @ means)
    fitted_ci = _ci(boots @ g, fitted)
    last_mean = float(means[-1])
    last_ci = _ci(boots[:, -1], last_mean)
    a, b = _coefficients(x, var, means)
    per_size = [{"n": n, "seeds": int(t.shape[0]), "n_heldout": int(t.shape[1]), "mean": float(m),
                 "ci95": _ci(boots[:, j], float(m)), "per_seed": [float(r) for r in t.mean(axis=1)]}
                for j, (n, t, m) in enumerate(zip(sizes, tables, means, strict=True))]
    for r in per_size:
        r["resolved"] = bool(r["ci95"][0] > 0 or r["ci95"][1] < 0)
    too_far = n_target > MAX_EXTRAPOLATION * sizes[-1]
    im = last_ci[1] < 0 and fitted < 0
    it = last_ci[0] > 0 and fitted > 0
    call = CANNOT_TELL if too_far else IM_BETTER if im else IT_BETTER if it else CANNOT_TELL
    return {"per_size": per_size, "fit": {"a": a, "b": b, "form": "IM − IT = a + b·ln n",
                                          "weights": "1 / bootstrap variance of each size's mean"},
            "n_target": int(n_target), "delta": fitted, "fitted_ci95": fitted_ci, "largest_size": sizes[-1],
            "largest_size_mean": last_mean, "largest_size_ci95": last_ci, "ci95": fitted_ci, "call": call,
            "too_far": too_far, "n_boot": n_boot,
            "method": "two-way bootstrap (held-out examples shared across sizes, seeds per size), line refitted "
                      "per replicate; the call needs the largest size's 95% interval to exclude 0 and the line's "
                      "value at the target n to keep that sign"}


def reverses(ext: dict) -> bool:
    """The trend's value at the target n has the other sign from the largest measured size's mean."""
    return ext["delta"] * ext["largest_size_mean"] < 0


def needed(ext: dict, seeds: int, n_heldout: int, minutes_per_seed: float) -> dict:
    """What would likely resolve a 'cannot tell' at the largest size (the measurement the call rests on): its
    interval's half-width shrinks as 1/√(units), so a difference of the measured size needs (half-width / |Δ|)²
    times the seeds (or held-out examples). A planning figure that assumes the measured Δ is the true one, not a
    promise; none when the trend reverses the sign (more of the same pilot would not settle that)."""
    lo, hi = ext["largest_size_ci95"]
    half, d = (hi - lo) / 2, abs(ext["largest_size_mean"])
    if d < 1e-9 or half <= 0 or reverses(ext):
        return {"factor": None, "more_minutes": None, "heldout": None}
    k = (half / d) ** 2
    more_seeds = max(math.ceil(seeds * k) - seeds, 1)
    return {"factor": k, "more_seeds": more_seeds, "more_minutes": more_seeds * minutes_per_seed,
            "heldout": math.ceil(n_heldout * k)}


def call_text(ext: dict, need: dict, largest: int) -> str:
    """The one sentence the pilot says."""
    (lo, hi), (flo, fhi) = ext["largest_size_ci95"], ext["fitted_ci95"]
    at = (f"IM − IT held-out loss {ext['largest_size_mean']:+.4f} [{lo:+.4f}, {hi:+.4f}] measured at n = "
          f"{largest:,}; the trend over sizes gives {ext['delta']:+.4f} at n = {ext['n_target']:,} (extrapolated "
          f"interval [{flo:+.4f}, {fhi:+.4f}])")
    if ext["call"] != CANNOT_TELL:
        return f"{ext['call']}: {at}."
    if ext["too_far"]:
        reach = need.get("call_reach")
        more = (f"--budget-min {math.ceil(reach['minutes'])} would measure up to {reach['largest_size']:,}"
                if reach else "raise --budget-min")
        return (f"{CANNOT_TELL}: the pilot measured up to {largest:,} examples and {ext['n_target']:,} lies more "
                f"than {MAX_EXTRAPOLATION:.0f}× beyond; {more}, or run `imtune compare` at your size ({at}).")
    if reverses(ext):
        return (f"{CANNOT_TELL}: the trend over sizes changes the sign of the difference before n = "
                f"{ext['n_target']:,}; run `imtune compare` at your size ({at}).")
    if need.get("factor") is None:
        return f"{CANNOT_TELL}; the measured difference is 0 to 4 decimals, so no practical difference ({at})."
    if need["factor"] > 100:
        return (f"{CANNOT_TELL}; a difference this small would take over 100× this pilot to resolve, so no "
                f"practical difference is expected ({at}).")
    return (f"{CANNOT_TELL}; about {need['more_minutes']:.0f} more minutes ({need['more_seeds']} more seed(s) at "
            f"every size) or {need['heldout']:,} held-out examples would tell ({at}).")
