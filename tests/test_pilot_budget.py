"""The pilot's budget is wall minutes on the machine it runs on (issue 23): the cost model is calibrated on the first
size's first run and the rest is fitted to the wall clock left. Pure planning properties, plus the tiny model end to
end (calibration recorded, reused by a rerun)."""

from __future__ import annotations

import json
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from imtune.analysis import pilot_budget as B
from imtune.analysis.pilot import PilotConfig, estimate, plan_sizes, run_pilot


def _cost(pool, held=32 * 150, epochs=2, scale=1.0, batch=2):
    return B.cost_function(estimate, epochs, pool, held, scale, batch)


@settings(max_examples=60, deadline=None)
@given(k=st.floats(0.1, 20), remaining=st.floats(0, 4000), seeds=st.integers(1, 3), first=st.integers(4, 40),
       tokens=st.integers(50, 400), n_max=st.integers(41, 500))
def test_the_rest_never_plans_past_the_wall_clock_left(k, remaining, seeds, first, tokens, n_max):
    cost = _cost([tokens] * 500)
    r = B.fit_rest(first, seeds, k, remaining, cost, n_max)
    assert 1 <= r["seeds"] <= seeds and r["sizes"][0] == first
    if len(r["sizes"]) == 2:
        assert first < r["sizes"][1] <= n_max
    added = len(r["sizes"]) == 2 or r["seeds"] > 1
    assert not added or r["seconds"] <= remaining + 1e-9
    # A slower machine never gets a larger second size; more time left never a smaller one (same seeds).
    slower = B.fit_rest(first, seeds, k * 2, remaining, cost, n_max)
    if slower["seeds"] == r["seeds"]:
        assert slower["sizes"][-1] <= r["sizes"][-1]
    more = B.fit_rest(first, seeds, k, remaining * 2 + 10, cost, n_max)
    if more["seeds"] == r["seeds"]:
        assert more["sizes"][-1] >= r["sizes"][-1]


def test_the_issue_machine_stays_within_its_budget():
    # `advise --pilot --budget-min 8` planned 7.7 min and took 14.7 (a machine ≈ 1.9× the cost model). Calibrated on
    # its first size, the pilot fits the rest to what is left, so its predicted total stays under 8 minutes.
    pool, budget, seeds = [150] * 900, 8 * 60, 2
    cost = _cost(pool)
    prior = plan_sizes(budget, seeds, 2, pool, 32 * 150, n_max=900)
    k_true, setup_s = 14.7 / 7.7, 20.0
    first_s = k_true * cost(prior["sizes"][:1], 1)
    cal = B.calibrated(prior, first_s, budget - setup_s - first_s, seeds, cost, n_max=900)
    assert abs(cal["k"] - k_true) < 1e-9
    total = setup_s + first_s + cal["seconds"] + B.FINISH_RESERVE_S
    assert total <= budget, total
    assert cal["sizes"][-1] < prior["sizes"][-1]  # the second size shrank to fit
    # Had it kept the prior plan, it would have overrun the budget (the issue's 14.7 minutes).
    assert setup_s + k_true * prior["seconds"] > budget


def test_a_fast_machine_measures_larger_and_a_very_slow_one_adds_nothing():
    pool, budget = [150] * 900, 8 * 60
    cost = _cost(pool)
    prior = plan_sizes(budget, 2, 2, pool, 32 * 150, n_max=900)
    first = prior["sizes"][0]
    fast = B.calibrated(prior, 0.5 * cost([first], 1), budget - 60, 2, cost, n_max=900)
    assert fast["sizes"][-1] > prior["sizes"][-1] and fast["seeds"] == 2
    # The first size alone took (nearly) the whole budget: no further size or seed is started.
    slow = B.calibrated(prior, budget * 0.95, budget * 0.05, 2, cost, n_max=900)
    assert slow["sizes"] == [first] and slow["seeds"] == 1


def test_recheck_only_shrinks_and_keeps_the_seeds():
    pool = [150] * 900
    cost = _cost(pool)
    cal = {"sizes": [40, 80], "seeds": 2, "first_measured_s": 100.0}
    same = B.recheck(cal, cost([40], 2), 10**6, cost)
    assert same["sizes"] == [40, 80] and same["seeds"] == 2
    tight = B.recheck(cal, 3 * cost([40], 2), 3 * cost([60], 2) + B.FINISH_RESERVE_S, cost)
    assert tight["sizes"][0] == 40 and 40 < tight["sizes"][1] <= 60
    assert B.recheck(cal, 3 * cost([40], 2), 1.0, cost)["sizes"] == [40]


def _data(path: Path, n: int = 40) -> Path:
    with path.open("w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"r{i}", "messages": [{"role": "user", "content": f"add {i} and {i} please"},
                                                             {"role": "assistant", "content": f"{2 * i}"}]}) + "\n")
    return path


def test_a_planned_pilot_calibrates_on_this_machine_and_a_rerun_reuses_it(tiny_dir, tmp_path, capfd,
                                                                            one_torch_thread):
    cfg = PilotConfig(data=str(_data(tmp_path / "d.jsonl")), out=str(tmp_path / "pilot"), model=str(tiny_dir),
                      seeds=1, n_val=8, max_length=64, template="chatml", epochs=1, n_target=10**6, budget_min=1.5)
    r = run_pilot(cfg)
    cal = r["plan"]["calibration"]
    assert B.K_RANGE[0] <= cal["k"] <= B.K_RANGE[1] and cal["first_measured_s"] > 0
    assert [s["n"] for s in r["extrapolation"]["per_size"]] == cal["sizes"]
    assert r["cost"]["pilot_wall_minutes"] > 0
    assert "calibrated on this machine" in capfd.readouterr().err
    again = run_pilot(cfg)
    err = capfd.readouterr().err
    assert "training →" not in err and "calibrated on this machine" not in err
    assert again["plan"]["calibration"]["sizes"] == cal["sizes"]
    assert again["extrapolation"]["per_size"] == r["extrapolation"]["per_size"]
