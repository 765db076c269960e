"""The pilot's budget is wall minutes on the machine it runs on: calibrate the cost model there, then fit the rest.

The cost model (`pilot.estimate`) was measured on one machine; another can be several times slower (or faster), and
a user's `--budget-min 8` means eight minutes of their wall clock, set-up and evaluation included. So the pilot runs
its smaller size first with one seed, times it (loading, encoding, training, scoring: the whole compare), and
takes `k = measured / modelled` as this machine's factor. Everything after is planned on `k × model` against the
budget left on the wall clock since the pilot started: the seeds, and the largest second size that still fits
(smaller than planned on a slow machine, larger on a fast one, never past the user's n). Before the second size
starts the check is repeated with what the extra seeds measured; a size or seed that would overrun is not started.
The calibrated plan is kept in plan.json, so a rerun reuses it (and every finished run) instead of re-timing runs
it no longer trains.
"""

from __future__ import annotations

from collections.abc import Sequence

# The bootstrap fit and the files written after the last run (measured: a few seconds); kept out of the budget.
FINISH_RESERVE_S = 10.0
K_RANGE = (0.1, 50.0)  # a factor outside this is a broken measurement (a reused run), not a machine


def machine_factor(measured_s: float, modelled_s: float) -> float:
    """This machine's seconds per cost-model second, clamped to K_RANGE."""
    if modelled_s <= 0 or measured_s <= 0:
        return 1.0
    return min(max(measured_s / modelled_s, K_RANGE[0]), K_RANGE[1])


def _shrink(m: int) -> int:
    return int(m * 0.95) if m > 20 else m - 1


def fit_rest(first: int, seeds: int, k: float, remaining_s: float, cost, n_max: int, seeds_done: int = 1) -> dict:
    """Seeds and sizes for the rest of the pilot after `first` ran with `seeds_done` seeds, on `remaining_s` seconds.

    `cost(sizes, seeds)` is the cost model's seconds (`pilot.estimate`); this machine's are `k` times them. All the
    requested seeds are kept when a second size at least twice `first` then fits; else fewer seeds, for the largest
    second size above `first` that fits; else no second size, and as many seeds on `first` as fit. Pure: the same
    inputs give the same plan, and its `seconds` (this machine's) never exceed `remaining_s` unless nothing is
    added at all."""
    def extra_first(s: int) -> float:
        return k * max(0.0, cost([first], s) - cost([first], seeds_done)) if s > seeds_done else 0.0

    best = None
    for s in range(seeds, 0, -1):
        left = remaining_s - extra_first(s)
        m = n_max
        while m > first and k * cost([m], s) > left:
            m = _shrink(m)
        if m > first and (best is None or m > best[1]):
            best = (s, m, extra_first(s) + k * cost([m], s))
        if best is not None and best[1] >= 2 * first:
            break
    if best is not None:
        s, m, secs = best
        return {"sizes": [first, m], "seeds": s, "seconds": secs}
    s = max([s for s in range(seeds_done, seeds + 1) if extra_first(s) <= remaining_s], default=seeds_done)
    return {"sizes": [first], "seeds": s, "seconds": extra_first(s)}


def calibrated(plan: dict, measured_s: float, remaining_s: float, seeds: int, cost, n_max: int) -> dict:
    """`plan` after its first size ran once (one seed, `measured_s` seconds): the machine factor and what fits the
    `remaining_s` seconds left on the budget."""
    first = plan["sizes"][0]
    modelled = cost([first], 1)
    k = machine_factor(measured_s, modelled)
    rest = fit_rest(first, seeds, k, remaining_s - FINISH_RESERVE_S, cost, n_max)
    return {"k": k, "first_measured_s": measured_s, "first_modelled_s": modelled, "remaining_s": remaining_s,
            "planned_sizes": list(plan["sizes"]), "planned_seeds": seeds, **rest}


def recheck(cal: dict, first_measured_s: float, remaining_s: float, cost) -> dict:
    """Before the second size: the factor from everything the first size measured (all its seeds), and the second
    size shrunk (or dropped) to what the wall clock still allows; it never grows, and keeps the seeds."""
    first, seeds = cal["sizes"][0], cal["seeds"]
    if len(cal["sizes"]) < 2:
        return cal
    k = machine_factor(first_measured_s, cost([first], seeds))
    m, left = cal["sizes"][1], remaining_s - FINISH_RESERVE_S
    while m > first and k * cost([m], seeds) > left:
        m = _shrink(m)
    return {**cal, "k_rechecked": k, "sizes": [first, m] if m > first else [first],
            "remaining_s_rechecked": remaining_s}


def cost_function(estimate, epochs: int, pool_tokens: Sequence[int], heldout_tokens: int, scale: float,
                  batch: int):
    """`cost(sizes, seeds)` in cost-model seconds for this pilot's data and model."""
    def cost(sizes, seeds):
        return estimate(sizes, seeds, epochs, pool_tokens, heldout_tokens, scale, batch=batch)["seconds"]
    return cost
