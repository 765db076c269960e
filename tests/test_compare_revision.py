"""`imtune compare --revision` and `--trust-remote-code`: the revision reaches every load of the starting model (the
advisor's tokenizer, the training runs, the starting-model evaluation, the model info), through the same config
fields `imtune train` uses. The Hub cache is laid out offline; `main` holds only pickle weights, so any load that
ignored --revision fails loudly."""

from __future__ import annotations

import json

from tests.tiny import make_tiny_model, pickle_only_copy, put_in_hub_cache, run_in_hf_home

REPO = "tiny-org/revs"
V2 = "0" * 39 + "2"


def _hub(tmp_path, tiny_dir):
    home = tmp_path / "hf"
    v2 = tmp_path / "v2"
    make_tiny_model(v2, hidden_size=48)  # a different model: its parameter count names it
    snap = put_in_hub_cache(home, REPO, v2, commit=V2)
    refs = home / "hub" / f"models--{REPO.replace('/', '--')}" / "refs"
    pickled = pickle_only_copy(tiny_dir, tmp_path / "pickled")
    put_in_hub_cache(home, REPO, pickled)  # refs/main -> the pickled commit
    (refs / "v2").write_text(V2)
    return home, snap


def test_compare_uses_the_revision_everywhere(tmp_path, tiny_dir):
    home, snap = _hub(tmp_path, tiny_dir)
    rows = [{"messages": [{"role": "user", "content": f"what is {i}+{i}?"},
                          {"role": "assistant", "content": f"The answer is {2 * i}."}]} for i in range(16)]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "cmp"
    args = ["-m", "imtune.cli.main", "compare", "--data", str(data), "--model", REPO, "--objectives", "it,im",
            "--n-val", "4", "--eval", "loss", "--out", str(out), "--max-steps", "1", "--micro-batch-size", "4",
            "--max-length", "128", "--template", "chatml", "--no-progress"]
    r = run_in_hf_home(args + ["--revision", "v2"], home, "hf_unused0123456789")
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((out / "results.json").read_text())
    assert res["model"]["path"] == str(snap) and res["model"]["hidden_size"] == 48
    assert res["train_config"]["revision"] == "v2"
    assert res["base"]["heldout_loss"] is not None  # the starting model (at v2) was evaluated
    base = json.loads((out / "base" / "eval" / "loss_heldout.json").read_text())
    assert base["params"]["revision"] == "v2"
    # Without --revision every load reads main, whose pickle weights are refused in one line.
    r = run_in_hf_home(args[:-1] + ["--out", str(tmp_path / "cmp-main")], home, "hf_unused0123456789")
    assert r.returncode == 2 and "only pickle weights" in r.stderr, r.stderr[-2000:]


def test_compare_has_trust_remote_code_through_the_train_config_field():
    import argparse

    from imtune.cli import compare

    parser = argparse.ArgumentParser()
    compare.add_parser(parser.add_subparsers())
    args = parser.parse_args(["compare", "--data", "d.jsonl", "--out", "o", "--trust-remote-code",
                              "--revision", "abc"])
    cfg = compare.config_from_args(args)
    assert cfg.train_overrides["trust_remote_code"] is True and cfg.train_overrides["revision"] == "abc"
    args = parser.parse_args(["compare", "--data", "d.jsonl", "--out", "o"])
    assert not compare.config_from_args(args).train_overrides.get("trust_remote_code", False)
