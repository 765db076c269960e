import json
import shutil

import numpy as np
import pytest
import torch

from imtune.cli.main import main
from imtune.evaluation.loss_probe import (
    default_template,
    per_example_loss,
    per_example_loss_with_report,
    summarise,
    summary_path,
)
from imtune.masking.encoding import encode
from imtune.records.conversation import Conversation


def _conv(i, *msgs):
    return Conversation.from_messages([{"role": r, "content": c} for r, c in msgs], id=str(i))


RECORDS = [
    _conv(0, ("user", "Write a poem about the sea."), ("assistant", "The sea is blue and the fox is quick.")),
    _conv(1, ("user", "What is 2 + 2?"), ("assistant", "4")),
    _conv(2, ("system", "Be brief."), ("user", "Explain why the sky is blue. " * 3),
          ("assistant", "Light scatters."), ("user", "Translate to French: hello"), ("assistant", "bonjour")),
    _conv(3, ("user", "Naïve café déjà vu — 你好 世界 🙂"), ("assistant", "ünïcödé\ttabs\nand newlines " * 4)),
    _conv(4, ("user", "def add(a, b):"), ("assistant", "return a + b")),
]


@pytest.fixture(scope="module")
def tiny_model(tiny_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_dir)).eval()


def _naive(model, tok, records, objective, template="tulu", max_length=2048):
    """Full [T x vocab] logits for each example alone, unpadded: the reference the probe must match."""
    out = {}
    for e in encode(records, tok, objective, template, max_length):
        ids = torch.tensor([e.input_ids])
        with torch.no_grad():
            logits = model(ids).logits[0].double()
        ce = torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:], reduction="none")
        w = torch.tensor(e.weights[1:], dtype=torch.float64)
        out[e.id] = ((w * ce).sum() / w.sum()).item(), int((w > 0).sum())
    return out


@pytest.mark.parametrize("objective", ["it", "im", "weighted:0.3"])
def test_matches_naive_full_logits_for_any_batch_size(tiny_model, tiny_tok, objective):
    ref = _naive(tiny_model, tiny_tok, RECORDS, objective)
    for bs in (1, 3):
        rows = per_example_loss(tiny_model, tiny_tok, RECORDS, objective=objective, batch_size=bs, progress=False)
        assert [r["id"] for r in rows] == [c.id for c in RECORDS]  # input order, whatever the batching
        for r in rows:
            assert r["loss"] == pytest.approx(ref[r["id"]][0], abs=1e-5)
            assert r["tokens"] == ref[r["id"]][1]


class _NoLogitsToKeep(torch.nn.Module):
    """A wrapper (like DDP: the model under `.module`) whose forward does not take `logits_to_keep`."""

    def __init__(self, model):
        super().__init__()
        self.module = model

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=None):
        return self.module(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                           use_cache=use_cache)


def test_full_logits_fallback_gives_same_losses(tiny_model, tiny_tok):
    fast = per_example_loss(tiny_model, tiny_tok, RECORDS, batch_size=3, progress=False)
    slow = per_example_loss(_NoLogitsToKeep(tiny_model), tiny_tok, RECORDS, batch_size=3, progress=False)
    np.testing.assert_allclose([r["loss"] for r in fast], [r["loss"] for r in slow], atol=1e-6)


# Padded rows match the probe's layout exactly; padding-free rows sum the same terms in another order.
@pytest.mark.parametrize("padding_free, rel", [(False, 1e-6), (True, 1e-5)])
def test_training_eval_loss_equals_the_probe(tiny_dir, tiny_tok, tmp_path, padding_free, rel):
    """The held-out loss `imtune train` logs is the probe's token-weighted mean on the same examples and model."""
    from transformers import AutoModelForCausalLM

    from imtune.training.recipe import train

    def write(path, recs):
        path.write_text("".join(json.dumps(r.to_dict()) + "\n" for r in recs))
        return str(path)

    val = RECORDS[2:]
    res = train({"model": str(tiny_dir), "data": write(tmp_path / "t.jsonl", RECORDS[:2] * 2),
                 "val_data": write(tmp_path / "v.jsonl", val), "epochs": 1, "lr": 1e-3, "micro_batch_size": 2,
                 "max_length": 64, "template": "chatml", "precision": "fp32", "padding_free": padding_free, "out": str(tmp_path / "run")})
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "run")).eval()
    rows = per_example_loss(model, tiny_tok, val, objective="it", max_length=64, progress=False)
    assert len(rows) == len(val)
    pooled = sum(r["loss"] * r["tokens"] for r in rows) / sum(r["tokens"] for r in rows)
    assert res.eval_history[-1]["step"] == res.metrics["steps"]  # evaluated on the model that was saved
    assert res.metrics["eval_loss"] == pytest.approx(pooled, rel=rel, abs=1e-6)
    untrained = per_example_loss(AutoModelForCausalLM.from_pretrained(str(tiny_dir)), tiny_tok, val,
                                 objective="it", max_length=64, progress=False)
    assert abs(np.mean([r["loss"] for r in untrained]) - np.mean([r["loss"] for r in rows])) > 1e-3


def test_tokens_count_weighted_tokens(tiny_model, tiny_tok):
    it = {r["id"]: r["tokens"] for r in per_example_loss(tiny_model, tiny_tok, RECORDS, objective="it",
                                                           progress=False)}
    im = {r["id"]: r["tokens"] for r in per_example_loss(tiny_model, tiny_tok, RECORDS, objective="im",
                                                           progress=False)}
    enc = {e.id: e for e in encode(RECORDS, tiny_tok, "it", "tulu")}
    for i, n in it.items():
        assert n == sum(w > 0 for w in enc[i].weights) > 0
        assert im[i] > n  # the instruction tokens count too


def test_examples_without_weighted_tokens_are_excluded_and_reported(tiny_model, tiny_tok):
    long_prompt = _conv("long", ("user", "Write a poem about the sea. " * 20), ("assistant", "Blue."))
    rep = per_example_loss_with_report(tiny_model, tiny_tok, [RECORDS[1], long_prompt], objective="it",
                                       max_length=32, progress=False)
    assert [r["id"] for r in rep.rows] == ["1"]
    assert rep.excluded == ["long"]
    assert rep.n_truncated == 1
    assert per_example_loss(tiny_model, tiny_tok, [long_prompt], max_length=32, progress=False) == []


def test_summary_is_deterministic_and_ci_contains_mean():
    rng = np.random.default_rng(1)
    rows = [{"id": str(i), "tokens": 3, "loss": float(x)} for i, x in enumerate(rng.gamma(2.0, 1.0, 300))]
    s1, s2 = summarise(rows), summarise(rows)
    assert s1 == s2
    assert s1["n"] == 300
    lo, hi = s1["ci95"]
    assert lo < s1["mean"] < hi
    assert s1["median"] == pytest.approx(float(np.median([r["loss"] for r in rows])))
    assert s1["std"] == pytest.approx(float(np.std([r["loss"] for r in rows], ddof=1)))
    assert summarise([2.5]) == {"n": 1, "mean": 2.5, "median": 2.5, "std": 0.0, "ci95": [2.5, 2.5]}
    assert summarise([])["n"] == 0


def test_template_defaults_to_training_config(tmp_path, tiny_dir, tiny_tok):
    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    shutil.copytree(tiny_dir, run)
    (run / "imtune_config.yaml").write_text("objective: im\ntemplate: chatml\n")
    ckpt = run / "checkpoint-10"
    ckpt.mkdir()
    assert default_template(run) == "chatml"
    assert default_template(ckpt) == "chatml"
    assert default_template(run, "alpaca") == "alpaca"
    assert default_template(tiny_dir) == "tulu"
    assert default_template("smollm2-135m") == "tulu"
    model = AutoModelForCausalLM.from_pretrained(str(run))
    rep = per_example_loss_with_report(model, tiny_tok, RECORDS[:2], progress=False)
    assert rep.template == "chatml"
    ref = _naive(model, tiny_tok, RECORDS[:2], "it", template="chatml")
    assert rep.rows[0]["loss"] == pytest.approx(ref["0"][0], abs=1e-5)


def test_summary_path():
    assert str(summary_path("out/losses.jsonl")) == "out/losses.summary.json"
    assert str(summary_path("losses")) == "losses.summary.json"


def test_plots_write_png_and_svg(tmp_path):
    from imtune.analysis import plots

    rng = np.random.default_rng(0)
    series = {"IT train": rng.normal(1, .3, 50), "IT held-out": rng.normal(2, .3, 50), "IM train": [1.2, 1.4],
              "IM held-out": []}
    png, svg = plots.plot_loss_distributions(series, tmp_path / "dist.png", title="t")
    assert png.name == "dist.png" and svg.name == "dist.svg"
    first = (png.read_bytes(), svg.read_bytes())
    plots.plot_loss_distributions(series, tmp_path / "dist", title="t")
    assert (png.read_bytes(), svg.read_bytes()) == first  # deterministic
    assert first[0].startswith(b"\x89PNG") and b"<svg" in first[1]
    curves = plots.plot_loss_curves({"it": [(i, 3 - 0.01 * i) for i in range(0, 50, 5)], "im": [(0, 3.1)]},
                                    tmp_path / "curves.svg", eval_points={"it": [(25, 2.9)]}, smooth=3)
    bars = plots.plot_metric_bars({"MMLU": {"it": (40.0, 38.0, 42.0), "im": (41.0, None, None)},
                                   "GSM8K": {"im": (12.0, 10.0, 14.0)}}, tmp_path / "bars")
    for p in (*curves, *bars):
        assert p.stat().st_size > 1000
    assert not list(tmp_path.glob(".*tmp"))
    uri = plots.to_data_uri(png)
    assert uri.startswith("data:image/png;base64,iVBOR")
    assert plots.to_data_uri(svg).startswith("data:image/svg+xml;base64,")


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r.to_dict()) + "\n" for r in records))
    return path


def test_cli_loss_end_to_end(tmp_path, tiny_dir, tiny_model, tiny_tok, capsys):
    data = _write_jsonl(tmp_path / "d.jsonl", RECORDS[:3])
    out = tmp_path / "o" / "losses.jsonl"
    rc = main(["loss", "--model", str(tiny_dir), "--data", str(data), "--out", str(out), "--batch-size", "2"])
    assert rc == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    ref = _naive(tiny_model, tiny_tok, RECORDS[:3], "it")
    assert [r["id"] for r in rows] == ["0", "1", "2"]
    assert all(r["loss"] == pytest.approx(ref[r["id"]][0], abs=1e-5) for r in rows)
    summary = json.loads((tmp_path / "o" / "losses.summary.json").read_text())
    assert summary["n"] == 3 and summary["template"] == "tulu" and summary["objective"] == "it"
    assert summary["mean"] == pytest.approx(np.mean([r["loss"] for r in rows]))
    assert "it loss over 3 example(s)" in capsys.readouterr().out


def test_cli_loss_bad_input(tmp_path, tiny_dir, capsys):
    rc = main(["loss", "--model", str(tiny_dir), "--data", str(tmp_path / "missing.jsonl")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "missing.jsonl" in err[0] and "not found" in err[0]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(RECORDS[0].to_dict()) + "\n{not json\n")
    rc = main(["loss", "--model", str(tiny_dir), "--data", str(bad), "--out", str(tmp_path / "l.jsonl")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and f"{bad}:2:" in err[0]
    assert not (tmp_path / "l.jsonl").exists()
