"""`imtune advise --pilot`: the extrapolation on synthetic outcome curves, the plan, and the pilot end to end on the
tiny model (resume, reuse of compare's runs, the pilot-model tokenizer check, the pilot as advisor evidence)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from imtune.analysis.pilot import PilotConfig, estimate, plan_sizes, run_pilot, size_config
from imtune.analysis.pilot_fit import CANNOT_TELL, IM_BETTER, IT_BETTER, call_text, extrapolate, needed

SIZES = (8, 16, 32)


def _tables(a: float, b: float, noise: float, seeds: int = 3, n_ex: int = 200, seed: int = 0):
    """IM − IT per (seed, example) at each size: the curve a + b·ln n, plus a per-example effect shared by every
    size (the same held-out examples), a per-run effect and cell noise."""
    rng = np.random.default_rng(seed)
    ex = rng.normal(0, noise, n_ex)
    return [a + b * math.log(n) + ex[None, :] + rng.normal(0, noise / 3, (seeds, 1))
            + rng.normal(0, noise, (seeds, n_ex)) for n in SIZES]


@settings(max_examples=8, deadline=None, derandomize=True)
@given(a=st.floats(-0.12, -0.04), shrink=st.floats(0.0, 0.6))
def test_extrapolation_covers_a_known_curve_and_calls_its_direction(a, shrink):
    # The gain shrinks with n (b ≥ 0 for IM better) but stays clearly below 0 at the target. Coverage is a rate
    # (a 95% interval misses now and then, more often with 3 seeds), so it is checked over 20 noise draws.
    b = -a * shrink / math.log(200)
    truth = a + b * math.log(200)
    covered = calls = 0
    for seed in range(20):
        ext = extrapolate(SIZES, _tables(a, b, 0.01, seed=seed), 200, n_boot=400)
        covered += ext["ci95"][0] <= truth <= ext["ci95"][1]
        calls += ext["call"] == IM_BETTER
        assert ext["call"] != IT_BETTER  # never the wrong direction
        assert abs(ext["fit"]["b"] - b) < 0.01
    # Measured: 16 of 20 for the line's interval and for the largest size's alike. Resampling 3 seeds cannot see
    # the seed effect's spread well (this curve gives it most of the variance), so a nominal 95% interval covers
    # about 80% here; docs/FINDINGS.md states it. The call's direction must still never flip.
    assert covered >= 15 and calls >= 17
    # The mirror image (IT better) is called the other way.
    mirror = extrapolate(SIZES, [-t for t in _tables(a, b, 0.01)], 200, n_boot=400)
    assert mirror["call"] == IT_BETTER


@settings(max_examples=10, deadline=None, derandomize=True)
@given(a=st.floats(-0.05, 0.05), seed=st.integers(0, 10_000))
def test_large_noise_cannot_tell_and_says_what_would(a, seed):
    ext = extrapolate(SIZES, _tables(a, 0.0, 1.0, seeds=2, n_ex=16, seed=seed), 200, n_boot=600)
    assert ext["call"] == CANNOT_TELL
    need = needed(ext, seeds=2, n_heldout=16, minutes_per_seed=3.0)
    assert need["factor"] is None or (need["more_minutes"] > 0 and need["heldout"] > 16)


def test_a_line_that_crosses_zero_beyond_the_measured_sizes_is_not_a_call():
    # IM clearly better at every measured size, a steep shrink: the line alone would say "IT better" at n = 500.
    tables = _tables(-0.2, 0.04, 0.002, seed=1)
    ext = extrapolate(SIZES, tables, 500, n_boot=600)  # within MAX_EXTRAPOLATION of 32
    assert ext["fitted_ci95"][0] > 0  # what the line alone says
    assert all(s["resolved"] and s["mean"] < 0 for s in ext["per_size"])
    assert ext["call"] == CANNOT_TELL  # the line's sign at the target must agree with the largest size's: no flip
    assert "changes the sign" in call_text(ext, needed(ext, 3, 200, 1.0), 32)


def test_a_resolved_largest_size_is_called_though_the_line_is_wide_at_the_target():
    # Two close sizes, IM ahead at both: the line's slope is too uncertain for its interval at n = 200 to exclude 0,
    # but the largest size resolves and the line keeps its sign, so the call is made (LIMA's case).
    rng = np.random.default_rng(3)
    ex = rng.normal(0, 0.05, 96)
    tables = [-0.02 + ex[None, :] + rng.normal(0, 0.05, (2, 96)) for _ in (16, 32)]
    ext = extrapolate((16, 32), tables, 200, n_boot=800)
    assert ext["largest_size_ci95"][1] < 0 and ext["delta"] < 0
    assert ext["fitted_ci95"][0] < 0 < ext["fitted_ci95"][1]
    assert ext["call"] == IM_BETTER
    assert call_text(ext, needed(ext, 2, 96, 1.0), 32).startswith(IM_BETTER)


def test_far_extrapolation_makes_no_call():
    ext = extrapolate(SIZES, _tables(-0.1, 0.0, 0.001), 100_000, n_boot=300)
    assert ext["too_far"] and ext["call"] == CANNOT_TELL
    # The message says what budget would let the pilot call at this n (plan["call_reach"], from the cost model).
    need = {**needed(ext, 3, 200, 1.0), "call_reach": {"largest_size": 6250, "minutes": 312.4}}
    assert "--budget-min 313 would measure up to 6,250" in call_text(ext, need, 32)


def test_plan_fits_the_budget_and_is_deterministic():
    pool = [150] * 500
    small = plan_sizes(300, 2, 2, pool, 32 * 150, n_max=400)
    assert small == plan_sizes(300, 2, 2, pool, 32 * 150, n_max=400)
    assert small["fits"] and small["seconds"] <= 300
    big = plan_sizes(3000, 2, 2, pool, 32 * 150, n_max=400)
    assert max(big["sizes"]) > max(small["sizes"]) and len(big["sizes"]) == 2
    assert big["sizes"][0] == round(big["sizes"][1] / 2)
    assert big["train_tokens"] == estimate(big["sizes"], 2, 2, pool, 32 * 150, 1.0)["train_tokens"]
    assert max(plan_sizes(10**6, 2, 2, pool, 0, n_max=40)["sizes"]) == 40  # never beyond the user's n


# ---- end to end on the tiny model --------------------------------------------------------------------------------

def _data(path: Path, n: int = 40) -> Path:
    rng = np.random.default_rng(0)
    words = np.array(["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "sea", "sky", "blue", "poem",
                      "answer", "add", "two"])
    with path.open("w") as f:
        for i in range(n):
            ins = " ".join(rng.choice(words, rng.integers(3, 8)))
            out = " ".join(rng.choice(words, rng.integers(2, 6)))
            f.write(json.dumps({"id": f"r{i}", "messages": [{"role": "user", "content": ins},
                                                             {"role": "assistant", "content": out}]}) + "\n")
    return path


def _cfg(tiny_dir, tmp, **kw) -> PilotConfig:
    base = dict(data=str(_data(tmp / "d.jsonl")), out=str(tmp / "pilot"), model=str(tiny_dir), sizes=(4, 8),
                seeds=1, n_val=8, max_length=64, template="chatml", epochs=1, n_target=10**6)
    return PilotConfig(**{**base, **kw})


def _marks(out: Path) -> dict:
    return {str(p): p.stat().st_mtime_ns for p in out.glob("n*/runs/*/compare_done.json")} | {
        str(p): p.stat().st_mtime_ns for p in out.glob("n*/runs/*/metrics.jsonl")}


@pytest.fixture(scope="module")
def pilot(tiny_dir, tmp_path_factory, one_torch_thread):
    tmp = tmp_path_factory.mktemp("pilot")
    cfg = _cfg(tiny_dir, tmp)
    # A compare made beforehand with the pilot's settings for size 4 is reused, not retrained.
    from imtune.analysis.compare import run_compare

    run_compare(size_config(cfg, Path(cfg.out), 4))
    before = _marks(Path(cfg.out))
    return cfg, run_pilot(cfg), before


def test_pilot_end_to_end_cannot_tell_path(pilot):
    cfg, r, _ = pilot
    assert r["kind"] == "imtune-pilot" and [s["n"] for s in r["extrapolation"]["per_size"]] == [4, 8]
    assert r["call"] == CANNOT_TELL and r["extrapolation"]["too_far"]  # 10⁶ is far beyond size 8
    reach = r["plan"]["call_reach"]  # a call at 10⁶ needs 10⁶/16 examples: more than the data has, so all of it
    assert reach["largest_size"] == 40 - cfg.n_val  # _data writes 40 records
    assert f"would measure up to {reach['largest_size']}" in r["text"]
    assert r["text"].startswith(CANNOT_TELL)
    assert r["cost"]["training_tokens"] > 0 and r["cost"]["wall_minutes"] > 0
    assert json.loads((Path(cfg.out) / "pilot.json").read_text())["text"] == r["text"]
    assert all(s["n_heldout"] == r["extrapolation"]["per_size"][0]["n_heldout"] for s in r["extrapolation"]["per_size"])


def test_pilot_reuses_a_compare_made_beforehand(pilot):
    cfg, _, before = pilot
    after = _marks(Path(cfg.out))
    assert before and all(after[k] == v for k, v in before.items())


def test_rerun_reuses_every_run(pilot, capfd):
    cfg, first, _ = pilot
    before = _marks(Path(cfg.out))
    again = run_pilot(cfg)
    assert _marks(Path(cfg.out)) == before  # no run retrained, no metrics rewritten
    assert "training →" not in capfd.readouterr().err
    assert again["extrapolation"]["per_size"] == first["extrapolation"]["per_size"]


def test_an_interrupted_pilot_resumes_retraining_only_the_unfinished_run(pilot, capfd):
    # A lean run keeps no checkpoints: one killed before it finished is trained again from the start; every
    # finished run and cached evaluation is reused, and the result is the same.
    cfg, first, _ = pilot
    out = Path(cfg.out)
    killed = next(out.glob("n8/runs/im*"))
    (killed / "compare_done.json").unlink()
    (killed / "eval" / "loss_heldout.json").unlink()
    before = {k: v for k, v in _marks(out).items() if str(killed) not in k}
    capfd.readouterr()
    again = run_pilot(cfg)
    err = capfd.readouterr().err
    assert err.count("training →") == 1 and "starting it over" in err
    assert {k: v for k, v in _marks(out).items() if str(killed) not in k} == before
    assert again["extrapolation"]["per_size"] == first["extrapolation"]["per_size"]


def test_a_pilot_on_part_of_a_hub_dataset_passes_its_split_to_every_size(tmp_path):
    cfg = PilotConfig(data="org/name", out=str(tmp_path), data_source={"split": "test", "revision": "v1"})
    assert size_config(cfg, tmp_path, 16).data_source == {"split": "test", "revision": "v1"}


def test_pilot_cli_prints_the_call_and_figures(pilot, capsys):
    from imtune.cli.main import main

    cfg, r, _ = pilot
    rc = main(["advise", "--pilot", "--data", cfg.data, "--model", cfg.model, "--template", "chatml",
               "--max-length", "64", "--pilot-sizes", "4,8", "--pilot-seeds", "1", "--pilot-heldout", "8",
               "--epochs", "1", "--n", str(10**6), "--out", cfg.out])
    out = capsys.readouterr().out
    assert rc == 0 and out.startswith(f"Pilot: {r['text']}") and "fitted: IM − IT" in out and "training tokens" in out


def test_pilot_result_is_advisor_evidence(pilot):
    from imtune.analysis.advise import advise_from_stats, evidence_rows

    cfg, r, _ = pilot
    rows = evidence_rows([Path(cfg.out) / "pilot.json"])
    assert [x["n"] for x in rows] == [s["n"] for s in r["sizes"]]
    assert all(x["source"] == "pilot:d" and x["provenance"]["pilot"].endswith("pilot.json") for x in rows)
    stats = {"instruction_output_ratio": 1.0, "examples": 100, "instruction_tokens": {"mean": 10, "median": 10},
             "output_tokens": {"mean": 10, "median": 10}}
    table = {"meta": {}, "rows": []}
    assert advise_from_stats(stats, table=table, evidence=[Path(cfg.out) / "pilot.json"]).accuracy == \
        "not measurable"  # two rows are still too few to fit a rule, but they were read


def test_pilot_model_with_another_tokenizer_is_one_line_exit_2(tiny_dir, tmp_path, capsys):
    from imtune.cli.main import main
    from tests.tiny import make_tiny_model

    other = tmp_path / "other"
    make_tiny_model(other, vocab_size=300)
    capsys.readouterr()  # the model writer's progress bar
    rc = main(["advise", "--pilot", "--data", str(_data(tmp_path / "d.jsonl")), "--model", str(tiny_dir),
               "--pilot-model", str(other), "--out", str(tmp_path / "p")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "tokenizer does not match" in err
    assert not (tmp_path / "p").exists()


def test_demo_data_keeps_every_example_whole(smol_tok):
    from imtune.cli.demo import DEMO, fitting_records
    from imtune.config import DEFAULT_TEMPLATE
    from imtune.masking.encoding import encode_with_report
    from tests.conftest import data_file

    recs = fitting_records(data_file("lima.jsonl"), smol_tok, DEMO["max_length"], DEFAULT_TEMPLATE)
    assert len(recs) >= DEMO["n_train"] + DEMO["n_val"]
    for objective in ("it", "im"):
        enc, rep = encode_with_report(recs, smol_tok, objective, DEFAULT_TEMPLATE, DEMO["max_length"])
        assert len(enc) == len(recs) and not rep.dropped_no_weight and rep.n_truncated == 0
        assert all(len(e) <= DEMO["max_length"] for e in enc)
