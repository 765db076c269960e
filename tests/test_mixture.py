"""A YAML `data:` list of sources, each with its own sample size and objective: one plan across all, exact
normalisation, bit-identical resume."""

import json

import pytest
import torch
from safetensors.torch import load_file

import imtune
from imtune.config import TrainConfig
from imtune.errors import ImtuneError


def _write(path, n, long_q, offset=0):
    rows = [{"id": f"{path.stem}{i}",
             "messages": [{"role": "user", "content": f"Q{i + offset}: " + "why is the sky blue? " * (1 + (i * long_q) % 4)},
                          {"role": "assistant", "content": "The answer is 4. " * (1 + i % 3)}]} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def _cfg(tiny_dir, tmp_path, data, out, **kw):
    return {**dict(model=str(tiny_dir), data=data, out=str(tmp_path / out), template="chatml", max_length=64,
                   lr=5e-3, micro_batch_size=2, gradient_accumulation_steps=2, epochs=1, warmup_ratio=0.0,
                   progress=False, seed=3, precision="fp32", encode_cache_dir=str(tmp_path / "cache")), **kw}


def _weights(r):
    return load_file(str(r.output_dir / "model.safetensors"))


def test_sources_are_checked():
    ok = TrainConfig.from_dict({"data": ["a.jsonl", {"path": "b.jsonl", "n": "3", "objective": "im"}]})
    assert ok.sources() == [{"path": "a.jsonl"}, {"path": "b.jsonl", "n": 3, "objective": "im"}]
    assert ok.data_paths() == ["a.jsonl", "b.jsonl"]
    assert TrainConfig.from_dict({"data": "a.jsonl"}).sources()[0]["path"] == "a.jsonl"
    for bad in ([], [{"n": 3}], [{"path": "a", "size": 3}], [{"path": "a", "n": 0}], [{"path": "a", "fraction": 2}],
                [{"path": "a", "n": 2, "fraction": 0.5}], [3]):
        with pytest.raises(ImtuneError, match=r"data\[0\]"):
            TrainConfig.from_dict({"data": bad})
    with pytest.raises(ImtuneError, match="unknown objective"):
        TrainConfig.from_dict({"data": [{"path": "a", "objective": "nope"}], "out": "o"}).validate()


def test_sources_with_the_runs_objective_train_as_their_concatenation(tiny_dir, tmp_path):
    """Same objective everywhere, no sampling: the mixture is the concatenated file, step for step, bit for bit."""
    a, b = _write(tmp_path / "a.jsonl", 5, 1), _write(tmp_path / "b.jsonl", 7, 3, offset=50)
    (tmp_path / "ab.jsonl").write_text("".join(json.dumps(r) + "\n" for r in a + b))
    mix = imtune.train(_cfg(tiny_dir, tmp_path, [str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")], "mix",
                            objective="weighted:0.3"))
    one = imtune.train(_cfg(tiny_dir, tmp_path, str(tmp_path / "ab.jsonl"), "one", objective="weighted:0.3"))
    assert [h["loss"] for h in mix.history] == [h["loss"] for h in one.history]
    mem = imtune.train(_cfg(tiny_dir, tmp_path, [str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")], "mem",
                            objective="weighted:0.3", encode_cache=False))
    assert [h["loss"] for h in mem.history] == [h["loss"] for h in one.history]
    assert [h["weight_sum"] for h in mix.history] == [h["weight_sum"] for h in one.history]
    wm, wo = _weights(mix), _weights(one)
    assert all(torch.equal(wm[k], wo[k]) for k in wo)
    assert [s["examples"] for s in mix.metrics["data"]["sources"]] == [5, 7]


def test_each_source_has_its_objective_and_sample(tiny_dir, tmp_path):
    _write(tmp_path / "a.jsonl", 8, 1)
    _write(tmp_path / "b.jsonl", 6, 3, offset=50)
    data = [{"path": str(tmp_path / "a.jsonl"), "objective": "im", "n": 4},
            {"path": str(tmp_path / "b.jsonl"), "fraction": 0.5}]
    r = imtune.train(_cfg(tiny_dir, tmp_path, data, "mix", objective="it", max_steps=1))
    src = r.metrics["data"]["sources"]
    assert [(s["objective"], s["examples"]) for s in src] == [("im", 4), ("it", 3)]
    # the weighted tokens of each source are those of that source alone under its objective
    alone = [imtune.train(_cfg(tiny_dir, tmp_path, [d], f"alone{k}", objective="it", max_steps=1))
             for k, d in enumerate(data)]
    assert [s["weighted_tokens"] for s in src] == [x.metrics["data"]["weighted_tokens"] for x in alone]
    assert r.metrics["data"]["weighted_tokens"] == sum(s["weighted_tokens"] for s in src)
    assert "val_examples" not in r.metrics["data"]
    held = imtune.train(_cfg(tiny_dir, tmp_path, data, "held", max_steps=1, val_data=str(tmp_path / "b.jsonl")))
    assert held.metrics["data"]["val_examples"] == 6 and held.eval_history
    # a source samples the same alone or in a mixture; a saved config reloads with its sources
    saved = TrainConfig.from_yaml(r.output_dir / "imtune_config.yaml")
    assert saved.sources() == data


def test_resume_of_a_mixture_is_bit_identical(tiny_dir, tmp_path):
    _write(tmp_path / "a.jsonl", 8, 1)
    _write(tmp_path / "b.jsonl", 8, 3, offset=50)
    data = [{"path": str(tmp_path / "a.jsonl"), "objective": "im", "n": 6},
            {"path": str(tmp_path / "b.jsonl"), "objective": "weighted:0.2"}]
    cfg = _cfg(tiny_dir, tmp_path, data, "ref", epochs=2, save_steps=2, save_total_limit=0, val_fraction=0.2)
    ref = imtune.train(cfg)
    assert ref.metrics["steps"] >= 4 and ref.metrics["data"]["val_examples"] > 0
    ckpt = ref.output_dir / "checkpoints" / "checkpoint-000002"
    res = imtune.train({**cfg, "out": str(tmp_path / "resumed"), "resume": str(ckpt)})
    tail = [(h["step"], h["loss"], h["weight_sum"]) for h in res.history if h["step"] > 2]
    assert tail and tail == [(h["step"], h["loss"], h["weight_sum"]) for h in ref.history if h["step"] > 2]
    wr, wo = _weights(res), _weights(ref)
    assert all(torch.equal(wr[k], wo[k]) for k in wo)
    with pytest.raises(ImtuneError, match="different data|changed since"):
        imtune.train({**cfg, "out": str(tmp_path / "again"), "resume": str(ckpt),
                      "data": [data[0], {**data[1], "n": 5}]})
