"""The verdict of a comparison: which objective, named as written, reached the lowest held-out output loss, and
whether the interval on its lead excludes 0 — over every training seed and the held-out examples.

Objectives may come in any order and any number; no position is special. The advisor's prediction (IM vs IT) is
checked against the measured IM − IT difference only when both `it` and `im` ran.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from imtune.statistics import paired_difference

MEASURED = ("IM better", "IT better", "no clear difference")


def loss_map(ev: dict, split: str) -> dict[str, float]:
    rows = ev.get(f"loss_{split}", {}).get("rows", [])
    return {str(r["id"]): float(r["loss"]) for r in rows}


def _seed_means(runs: Sequence[dict], split: str) -> list[float]:
    out = []
    for ev in runs:
        m = ev.get(f"loss_{split}", {}).get("summary", {}).get("mean")
        if m is not None:
            out.append(float(m))
    return out


def _find(objectives: Sequence[str], name: str) -> str | None:
    from imtune.masking.objectives import parse_objective

    return next((o for o in objectives if parse_objective(o).spec == name), None)


def measured_im_vs_it(d: dict | None) -> str | None:
    """'IM better' / 'IT better' when the IM − IT interval excludes 0, else 'no clear difference'."""
    if d is None or d.get("mean") is None:
        return None
    if not d["resolved"]:
        return "no clear difference"
    return "IM better" if d["mean"] < 0 else "IT better"


def _ci(d: dict) -> str:
    return f"95% CI [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}]"


def _headline(winner: str, means: dict, vs_winner: dict, n_seeds: int) -> tuple[str, bool]:
    others = list(vs_winner)
    beaten = [o for o in others if vs_winner[o]["resolved"] and vs_winner[o]["mean"] > 0]
    resolved = len(beaten) == len(others)
    runner = min(others, key=lambda o: means[o])
    d = vs_winner[runner]
    scope = (f" over {n_seeds} seeds × {d['n']} held-out examples" if n_seeds > 1 else
             f" over {d['n']} held-out examples")
    if resolved:
        tail = "the interval excludes 0" + (" against every other objective" if len(others) > 1 else "") + ")."
    else:
        tail = f"the interval includes 0 against {', '.join(o for o in others if o not in beaten)}: not resolved " \
               "at this size)."
    text = (f"{winner} {'wins' if resolved else 'is ahead'}: held-out output loss {means[winner]:.4f} vs "
            f"{means[runner]:.4f} for {runner} ({runner} − {winner} = {d['mean']:+.4f}, {_ci(d)}{scope}; {tail}")
    return text, resolved


def verdict(objectives: Sequence[str], evals: Mapping[str, dict | Sequence[dict]], advice: dict | None = None) -> dict:
    """`evals[o]` is one evaluation dict or a list of them, one per training seed (same seeds, same order for every
    objective). Means are pooled over seeds; intervals come from `imtune.statistics.paired_difference`."""
    objectives = list(objectives)
    runs = {o: [evals[o]] if isinstance(evals[o], Mapping) else list(evals[o]) for o in objectives}
    n_seeds = max(len(r) for r in runs.values())
    per_seed = {o: _seed_means(runs[o], "heldout") for o in objectives}
    means = {o: float(np.mean(v)) if v else None for o, v in per_seed.items()}
    train_per_seed = {o: _seed_means(runs[o], "train") for o in objectives}
    train_means = {o: float(np.mean(v)) if v else None for o, v in train_per_seed.items()}
    gaps = {o: (means[o] - train_means[o]) if means[o] is not None and train_means[o] is not None else None
            for o in objectives}
    maps = {o: [loss_map(ev, "heldout") for ev in runs[o]] for o in objectives}
    base = objectives[0]
    out = {"baseline": base, "n_seeds": n_seeds, "heldout_loss_mean": means, "heldout_loss_per_seed": per_seed,
           "train_loss_mean": train_means, "train_loss_per_seed": train_per_seed, "overfitting_gap": gaps,
           "paired_diff_vs_baseline": {o: paired_difference(maps[base], maps[o]) for o in objectives[1:]}}
    scored = {o: m for o, m in means.items() if m is not None}
    winner = min(scored, key=scored.get) if len(scored) >= 2 else None
    if winner is None:
        out.update(winner=None, resolved=False, paired_diff_vs_winner={},
                   headline="Held-out loss was not measured for two or more objectives, so there is no verdict.")
    else:
        vs_winner = {o: paired_difference(maps[winner], maps[o]) for o in scored if o != winner}
        headline, resolved = _headline(winner, means, vs_winner, n_seeds)
        out.update(winner=winner, resolved=resolved, headline=headline, paired_diff_vs_winner=vs_winner)
    it, im = _find(objectives, "it"), _find(objectives, "im")
    im_it = paired_difference(maps[it], maps[im]) if it and im and means[it] is not None and means[im] is not None \
        else None
    out["im_minus_it"] = im_it
    out["measured_im_vs_it"] = measured_im_vs_it(im_it)
    if advice:
        predicted = advice.get("predicted_im_minus_it")
        measured = out["measured_im_vs_it"]
        out["advisor"] = {"recommendation": advice.get("recommendation"), "predicted": predicted,
                          "measured": measured, "agrees": None if measured is None else predicted == measured,
                          "accuracy": advice.get("accuracy")}
        if measured is None:
            out["advisor"]["note"] = "the advisor predicts IM vs IT; this comparison did not run both it and im"
    return out
