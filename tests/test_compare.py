"""`imtune compare` end to end on the tiny model: runs, verdict, report files, resumability, browser rendering."""

import itertools
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from imtune.analysis.compare import CompareConfig, run_compare, verdict
from imtune.statistics import paired_difference

LONG_PROMPT = "Please read the following passage carefully and answer the question about it. " * 3


def _data(tmp_path, n=24):
    rows = [{"id": f"ex{i}", "messages": [{"role": "user", "content": f"{LONG_PROMPT} Question {i}: what is {i}+{i}?"},
                                          {"role": "assistant", "content": f"The answer is {2 * i}."}]}
            for i in range(n)]
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def _cfg(tiny_dir, tmp_path, out):
    return CompareConfig(data=str(_data(tmp_path)), out=str(out), model=str(tiny_dir), objectives=("it", "im"),
                         n_val=6, evals=("loss", "memorisation"), memorisation_n=3, max_new_tokens=8,
                         eval_batch_size=4, progress=False,
                         train_overrides={"max_steps": 3, "micro_batch_size": 4, "lr": 1e-3, "max_length": 512,
                                          "template": "chatml"})


def test_paired_difference_is_exact_and_deterministic():
    a = {str(i): 1.0 for i in range(50)}
    b = {str(i): 0.8 for i in range(50)}
    d = paired_difference(a, b)
    assert d["n"] == 50 and d["mean"] == pytest.approx(-0.2) and d["resolved"]
    assert d["ci95"][0] == pytest.approx(-0.2) and d["ci95"][1] == pytest.approx(-0.2)
    rng = np.random.default_rng(0)
    noisy = {k: v + rng.normal(0, 1) for k, v in a.items()}
    d2 = paired_difference(a, noisy)
    assert d2 == paired_difference(a, noisy) and not d2["resolved"]
    assert d2["ci95"][0] < d2["mean"] < d2["ci95"][1]


def _ev(mean, train=1.0, n=20, spread=0.0, seed=0):
    rng = np.random.default_rng(seed)
    rows = [{"id": str(i), "loss": mean + spread * rng.normal()} for i in range(n)]
    m = float(np.mean([r["loss"] for r in rows]))
    return {"loss_heldout": {"rows": rows, "summary": {"mean": m}}, "loss_train": {"summary": {"mean": train}}}


ADVICE = {"recommendation": "im", "predicted_im_minus_it": "IM better"}


def _check_consistent(v, order):
    """The headline names the winner as written, says "wins" exactly when resolved, and the advisor's measured
    label is the sign of the IM − IT interval."""
    assert v["headline"].startswith(f"{v['winner']} {'wins' if v['resolved'] else 'is ahead'}:")
    others = [o for o in order if o != v["winner"]]
    assert set(v["paired_diff_vs_winner"]) == set(others)
    d = v["im_minus_it"]
    if "it" in order and "im" in order:
        want = ("no clear difference" if not d["resolved"] else "IM better" if d["mean"] < 0 else "IT better")
        assert v["measured_im_vs_it"] == want == v["advisor"]["measured"]
        assert v["advisor"]["agrees"] == (want == ADVICE["predicted_im_minus_it"])
    else:
        assert d is None and v["advisor"]["measured"] is None and v["advisor"]["agrees"] is None


@pytest.mark.parametrize("order", list(itertools.permutations(["it", "im", "weighted:0.1"])))
@pytest.mark.parametrize("winner", ["it", "im", "weighted:0.1"])
def test_verdict_any_order_names_the_winner_as_written(order, winner):
    means = {"it": 2.0, "im": 2.1, "weighted:0.1": 2.2}
    means = {o: 1.5 if o == winner else m for o, m in means.items()}
    ev = {o: _ev(means[o]) for o in order}
    v = verdict(list(order), ev, ADVICE)
    assert v["winner"] == winner and v["resolved"] and v["baseline"] == order[0]
    _check_consistent(v, order)
    measured = "IT better" if winner == "it" else "IM better" if winner == "im" else v["measured_im_vs_it"]
    assert v["measured_im_vs_it"] == measured
    if winner == "it":
        assert not v["advisor"]["agrees"]  # the old bug: an IT win reported as "IM better, agrees"
    assert json.loads(json.dumps(v)) == v


@pytest.mark.parametrize("order", [("im", "it"), ("it", "im")])
def test_verdict_unresolved_and_without_both_it_and_im(order):
    ev = {"it": _ev(2.0, spread=0.5, seed=1), "im": _ev(1.99, spread=0.5, seed=2)}
    v = verdict(list(order), ev, ADVICE)
    assert not v["resolved"] and "is ahead" in v["headline"] and "not resolved" in v["headline"]
    assert v["measured_im_vs_it"] == "no clear difference" and v["advisor"]["agrees"] is False
    _check_consistent(v, order)
    w = verdict(["weighted:0.1", "im-all"], {"weighted:0.1": _ev(1.0), "im-all": _ev(1.2)}, ADVICE)
    assert w["winner"] == "weighted:0.1" and w["headline"].startswith("weighted:0.1 wins")
    _check_consistent(w, ["weighted:0.1", "im-all"])


def test_verdict_over_seeds_pools_and_needs_consistent_seeds():
    """Per seed IM is far ahead on every example, but one seed reverses it: pooled, not resolved."""
    it = [_ev(2.0, seed=s) for s in range(3)]
    im = [_ev(1.7), _ev(2.25), _ev(1.9)]
    v = verdict(["im", "it"], {"im": im, "it": it}, ADVICE)
    assert v["n_seeds"] == 3 and v["heldout_loss_per_seed"]["im"] == pytest.approx([1.7, 2.25, 1.9])
    assert v["winner"] == "im" and not v["resolved"] and "3 seeds × 20 held-out examples" in v["headline"]
    assert v["im_minus_it"]["per_seed"] == pytest.approx([-0.3, 0.25, -0.1])
    _check_consistent(v, ["im", "it"])
    im_ok = [_ev(1.7), _ev(1.8), _ev(1.9)]
    v2 = verdict(["it", "im"], {"im": im_ok, "it": it}, ADVICE)
    assert v2["resolved"] and v2["advisor"]["agrees"]


@pytest.mark.slow
def test_compare_end_to_end_and_resume(tiny_dir, tmp_path):
    out = tmp_path / "cmp"
    res = run_compare(_cfg(tiny_dir, tmp_path, out))
    for f in ("report.html", "report.md", "results.json", "advice.json", "plots/loss_curves.png",
              "plots/loss_distributions.png", "plots/metrics.png", "data/train.jsonl", "data/heldout.jsonl"):
        assert (out / f).exists(), f
    r = json.loads((out / "results.json").read_text())
    assert set(r["runs"]) == {"it", "im"}
    assert r["split"]["n_heldout"] == 6 and r["split"]["n_train"] == 18
    v = r["verdict"]
    assert v["winner"] in ("it", "im") and v["headline"]
    assert v["paired_diff_vs_baseline"]["im"]["n"] == 6
    md = (out / "report.md").read_text()
    assert md.splitlines()[2].startswith("**Verdict.**")
    assert "memorisation BLEU" in md
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "<link" not in html and "http" not in html.split("<body>")[1]
    # A rerun reuses finished runs and evaluations: nothing is retrained or re-evaluated.
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/eval/*.json")}
    weights = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/model.safetensors")}
    assert stamps and weights
    t = time.time()
    res2 = run_compare(_cfg(tiny_dir, tmp_path, out))
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert {p: p.stat().st_mtime_ns for p in weights} == weights
    assert res2["verdict"] == res["verdict"]
    assert time.time() - t < 60


@pytest.mark.slow
def test_compare_refuses_other_split_in_same_dir(tiny_dir, tmp_path):
    from imtune.analysis.compare import make_split
    from imtune.errors import ImtuneError

    out = tmp_path / "c2"
    cfg = _cfg(tiny_dir, tmp_path, out)
    make_split(cfg, out)
    cfg.n_val = 5
    with pytest.raises(ImtuneError, match="other data/split settings"):
        make_split(cfg, out)


def _chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.slow
def test_report_renders_in_headless_chromium(tiny_dir, tmp_path):
    """Open report.html as a person would and check the screenshot shows the verdict box and the plots."""
    if not _chromium() or not shutil.which("chromedriver"):
        pytest.skip("chromium/chromedriver not installed (apt-get install chromium chromium-driver)")
    pytest.importorskip("selenium")
    from PIL import Image
    from selenium import webdriver

    out = tmp_path / "cmp"
    run_compare(_cfg(tiny_dir, tmp_path, out))
    opts = webdriver.ChromeOptions()
    opts.binary_location = _chromium()
    for a in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
              "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1280,900",
              f"--user-data-dir={tmp_path / 'chrome'}"):
        opts.add_argument(a)
    service = webdriver.ChromeService(executable_path=shutil.which("chromedriver"))
    drv = webdriver.Chrome(options=opts, service=service)
    try:
        drv.get((out / "report.html").as_uri())
        v = drv.find_element("id", "verdict")
        assert v.is_displayed() and ("wins" in v.text or "is ahead" in v.text or "No held-out" in v.text)
        assert v.location["y"] < 300, "the verdict opens the report"
        imgs = drv.find_elements("tag name", "img")
        assert len(imgs) >= 2
        for img in imgs:
            assert drv.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 100", img)
        shot = tmp_path / "top.png"
        drv.save_screenshot(str(shot))
        im = Image.open(shot).convert("RGB")
        # The verdict box's tinted background is visible where the element is.
        r = v.rect
        px = im.getpixel((int(r["x"] + r["width"] - 5), int(r["y"] + 5)))
        assert px in ((0xEE, 0xF6, 0xEE), (0xFF, 0xF7, 0xE6)), px
        # Scroll the first plot into view and check the screenshot there is a drawn figure, not blank.
        drv.execute_script("arguments[0].scrollIntoView()", imgs[0])
        shot2 = tmp_path / "plot.png"
        drv.save_screenshot(str(shot2))
        im2 = np.asarray(Image.open(shot2).convert("L"), dtype=np.float32)
        rr = imgs[0].rect
        y0 = int(drv.execute_script("return arguments[0].getBoundingClientRect().top", imgs[0]))
        crop = im2[max(0, y0): y0 + int(rr["height"]), int(rr["x"]): int(rr["x"] + rr["width"])]
        assert crop.size and crop.std() > 10, "plot area is blank"
        assert (crop < 128).mean() > 0.005, "no dark strokes (axes, lines, text) in the plot"
    finally:
        drv.quit()


def test_common_training_set_removes_examples_some_objective_cannot_train(tiny_dir, tmp_path):
    from imtune.analysis.compare import common_training_set
    from imtune.config import TrainConfig
    from imtune.models import load_tokenizer

    rows = [{"id": "short", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
            {"id": "long", "messages": [{"role": "user", "content": LONG_PROMPT * 3},
                                        {"role": "assistant", "content": "ok"}]}]
    p = tmp_path / "train.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tcfg = TrainConfig(data=str(p), out=str(tmp_path / "o"), max_length=64, template="chatml")
    tok = load_tokenizer(str(tiny_dir))
    common, n = common_training_set(p, tok, ["it", "im"], tcfg)
    assert n == 1 and [json.loads(line)["id"] for line in common.read_text().splitlines()] == ["short"]
    same, none = common_training_set(p, tok, ["im", "im-all"], tcfg)
    assert none is None and same == p


@pytest.mark.slow
def test_compare_cli_seeds_3_any_order_resumable(tiny_dir, tmp_path, capsys):
    """`imtune compare --seeds 3 --objectives im,it`: one run per (objective, seed), pooled verdict that agrees
    with results.json, per-seed values in the report; a rerun reuses every run."""
    from imtune.cli.main import main

    out = tmp_path / "cmp3"
    argv = ["compare", "--data", str(_data(tmp_path)), "--model", str(tiny_dir), "--objectives", "im,it",
            "--seeds", "3", "--n-val", "6", "--eval", "loss", "--out", str(out), "--max-steps", "2",
            "--micro-batch-size", "4", "--lr", "1e-3", "--max-length", "512", "--template", "chatml",
            "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    r = json.loads((out / "results.json").read_text())
    v = r["verdict"]
    assert r["seeds"] == [42, 43, 44] and v["n_seeds"] == 3
    assert printed.splitlines()[0] == v["headline"]
    _check_consistent(v, ["im", "it"])
    for o, slug_ in (("im", "im"), ("it", "it")):
        assert [s["dir"] for s in r["runs"][o]["seeds"]] == [
            str(out / "runs" / n) for n in (slug_, f"{slug_}-seed43", f"{slug_}-seed44")]
        assert len(v["heldout_loss_per_seed"][o]) == 3
        assert v["heldout_loss_mean"][o] == pytest.approx(np.mean(v["heldout_loss_per_seed"][o]))
    assert v["im_minus_it"]["n_seeds"] == 3 and len(v["im_minus_it"]["per_seed"]) == 3
    # Different seeds really are different runs.
    assert len(set(v["heldout_loss_per_seed"]["im"])) == 3
    md = (out / "report.md").read_text()
    assert v["headline"] in md and "seed 43" in md
    # One renderer: the HTML page carries the same content as the Markdown (hyper-parameters, per-seed rows,
    # the IM − IT line and the method), with the figures inlined.
    import html as html_lib
    import re

    page = html_lib.unescape(re.sub(r"<[^>]+>", "", (out / "report.html").read_text()))
    for needle in (v["headline"], "seed 43", "max_steps: 2", "lr: 0.001", "IM − IT held-out output loss",
                   "two-way bootstrap over training seeds and held-out examples", "Advisor's reasons"):
        assert needle in md.replace("`", "") and needle in page, needle
    assert (out / "report.html").read_text().count("data:image/png;base64,") == 2
    weights = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/model.safetensors")}
    assert len(weights) == 6
    assert main(argv) == 0
    assert {p: p.stat().st_mtime_ns for p in weights} == weights
    # bench/findings.py reads its row back from this results.json: the same IM − IT, winner and seed count.
    import importlib.util

    spec = importlib.util.spec_from_file_location("findings", Path(__file__).parents[1] / "bench" / "findings.py")
    findings = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(findings)
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "LIMA").symlink_to(out)
    [row] = findings.findings_rows(tmp_path / "f", {"meta": {}, "rows": []})
    d = v["im_minus_it"]
    assert row.startswith(f"| LIMA | {r['split'].get('n_train_common', r['split']['n_train'])} / {d['n']} / 3 |") and f"`{v['winner']}`" in row
    assert f"{d['mean']:+.4f} [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}]" in row
    assert f"no clear difference → {v['measured_im_vs_it']}" in row
    assert "max length 512" in findings.findings_settings(tmp_path / "f")


@pytest.mark.slow
def test_compare_rerun_with_changed_settings_retrains_and_keeps_foreign_files(tiny_dir, tmp_path, capsys):
    """A finished run whose settings changed is retrained from scratch (never resumed from its old checkpoints,
    never reused with its old evaluations); compare's own files are in the run's manifest, so the retrain may
    remove them, while a file the user put in a run directory stops it with nothing removed."""
    from imtune.cli.main import main

    out = tmp_path / "cmp"
    base = ["compare", "--data", str(_data(tmp_path)), "--model", str(tiny_dir), "--objectives", "it,im",
            "--n-val", "6", "--eval", "loss", "--out", str(out), "--epochs", "1", "--micro-batch-size", "4",
            "--max-length", "512", "--template", "chatml", "--no-progress"]
    assert main(base + ["--lr", "1e-3"]) == 0
    assert any((out / "runs" / "it" / "checkpoints").iterdir())
    first = json.loads((out / "results.json").read_text())["verdict"]["heldout_loss_mean"]
    capsys.readouterr()
    assert main(base + ["--lr", "5e-3"]) == 0
    err = capsys.readouterr().err
    assert "it: settings changed since the finished run; retraining" in err and "resuming" not in err
    second = json.loads((out / "results.json").read_text())["verdict"]["heldout_loss_mean"]
    assert second["it"] != first["it"] and second["im"] != first["im"]
    mine = out / "runs" / "im" / "notes.txt"
    mine.write_text("the user's")
    assert main(base + ["--lr", "2e-3"]) == 2
    assert "notes.txt was not written by imtune" in capsys.readouterr().err and mine.read_text() == "the user's"
    assert (out / "runs" / "im" / "eval").is_dir()
