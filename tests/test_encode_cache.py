"""The Arrow encode cache gives exactly what the in-memory encoder gives, is reused, and fails cleanly."""

import json
import math
import os

import numpy as np
import pytest
import torch

import imtune
from imtune.errors import ImtuneError, InputError
from imtune.masking.encode_cache import MARKER, EncodeCache, cache_key, encode_cached, records_table
from imtune.masking.encoding import EncodeSettings, encode_with_report
from imtune.records.conversation import Conversation
from imtune.records.loading import load_dataset
from tests.conftest import data_file

BUNDLED = ("lima.jsonl", "alpagasus_dolly_3k.jsonl", "code_alpaca_2k.json")


def conv(i, user, reply, *more):
    msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    msgs += [{"role": r, "content": c} for r, c in more]
    return Conversation.from_messages(msgs, id=f"c{i}", source=f"mem:{i + 1}")


def assert_same(records, tok, cache: EncodeCache, objective, max_length, side):
    """Every kept example's ids and weights, the per-example totals and the report, cached vs in memory."""
    from imtune.training.data import EncodedSet

    ref, rep = encode_with_report(records, tok, objective, "chatml", max_length, side)
    rows, crep = cache.report(objective)
    got = EncodedSet.cached(cache, rows, objective)
    assert len(got) == len(ref)
    for k in range(0, len(ref), 997):  # take() in a few chunks, like micro-batches do
        idx = list(range(k, min(k + 997, len(ref))))
        for e, c in zip([ref[i] for i in idx], got.take(idx), strict=True):
            assert c.id == e.id and c.input_ids.tolist() == e.input_ids and c.weights.tolist() == e.weights
            assert c.segment_codes.tolist() == e.segment_codes.tolist() and c.truncated == e.truncated
    assert got.lengths.tolist() == [len(e) for e in ref]
    assert got.weight_sums.tolist() == [math.fsum(e.weights) for e in ref]
    assert got.n_weighted.tolist() == [sum(w > 0 for w in e.weights) for e in ref]
    assert crep == rep  # counts and every id list, in order
    return rep


@pytest.mark.slow
@pytest.mark.parametrize("name", BUNDLED)
def test_cached_path_equals_in_memory_on_bundled_sets(name, tiny_tok, tmp_path):
    records = load_dataset(data_file(name), skip_invalid=True).records
    ds, fp = records_table(records, name)
    # Left truncation and @last are covered on the small cases below; here the three objectives on real data.
    cache = encode_cached(ds, fp, name, tiny_tok, EncodeSettings.of(tiny_tok, "chatml", 96, "right"),
                          root=tmp_path, num_proc=2)
    reports = [assert_same(records, tiny_tok, cache, objective, 96, "right") for objective in ("im", "weighted:0.3",
                                                                                               "it")]
    assert reports[0].n_truncated > 0  # the comparison covers truncated examples ...
    assert sum(r.n_dropped for r in reports) > 0  # ... and dropped ones


def test_cached_path_equals_in_memory_on_edge_cases(tiny_tok, tmp_path):
    records = [conv(0, "q " * 40, "a " * 40), conv(1, "short", "x"), conv(2, "only a question", ""),
               conv(3, "q", "a", ("user", "again?"), ("assistant", "b " * 30)),
               conv(4, "q", "a", ("user", "trailing user turn")),
               Conversation.from_messages([{"role": "system", "content": "sys " * 5},
                                           {"role": "user", "content": "hi"},
                                           {"role": "assistant", "content": "hello"}], id="c5")]
    ds, fp = records_table(records, "mem")
    for side in ("right", "left"):
        cache = encode_cached(ds, fp, "mem", tiny_tok, EncodeSettings.of(tiny_tok, "chatml", 24, side), root=tmp_path)
        for objective in ("im", "it", "weighted:0.3", "it@last", "im-all", "weighted:0.25:0.5"):
            rep = assert_same(records, tiny_tok, cache, objective, 24, side)
            assert rep.trailing_user == ["c4"]


def test_second_open_is_a_hit_for_any_objective_and_the_key_follows_settings(tiny_tok, tmp_path):
    records = [conv(i, f"question {i}", f"answer {i}") for i in range(5)]
    ds, fp = records_table(records, "mem")
    st = EncodeSettings.of(tiny_tok, "chatml", 64)
    first = encode_cached(ds, fp, "mem", tiny_tok, st, root=tmp_path)
    second = encode_cached(ds, fp, "mem", tiny_tok, st, root=tmp_path)
    assert not first.hit and second.hit and first.path == second.path
    assert (second.path / MARKER).is_file()
    assert cache_key(fp, tiny_tok, EncodeSettings.of(tiny_tok, "chatml", 65)) != cache_key(fp, tiny_tok, st)
    assert cache_key(fp, tiny_tok, EncodeSettings.of(tiny_tok, "tulu", 64)) != cache_key(fp, tiny_tok, st)
    _, fp2 = records_table(records[:4], "mem")
    assert cache_key(fp2, tiny_tok, st) != cache_key(fp, tiny_tok, st)
    assert sorted(p.name for p in tmp_path.iterdir()) == [first.path.name]  # no temporary directory left


def test_unfinished_build_is_not_trusted(tiny_tok, tmp_path):
    records = [conv(i, f"question {i}", f"answer {i}") for i in range(3)]
    ds, fp = records_table(records, "mem")
    st = EncodeSettings.of(tiny_tok, "chatml", 64)
    key = cache_key(fp, tiny_tok, st)
    # What a build killed before its marker leaves: a directory at the final name without the marker, and a
    # temporary directory of a process that no longer exists.
    (tmp_path / key).mkdir()
    (tmp_path / key / "encoded.arrow").write_bytes(b"half written")
    dead = tmp_path / f".tmp-{key}-999999999-deadbeef"
    dead.mkdir()
    live = tmp_path / f".tmp-{'c' * 32}-{os.getppid()}-cafef00d"  # another build, still running
    live.mkdir()
    with pytest.raises(ImtuneError, match="without its marker"):
        encode_cached(ds, fp, "mem", tiny_tok, st, root=tmp_path)
    assert (tmp_path / key / "encoded.arrow").exists()  # not ours to delete
    (tmp_path / key / "encoded.arrow").unlink()
    (tmp_path / key).rmdir()
    encode_cached(ds, fp, "mem", tiny_tok, st, root=tmp_path)
    assert not dead.exists() and live.is_dir()
    assert len(EncodeCache.open(tmp_path / key, hit=True)) == 3


@pytest.mark.parametrize("num_proc", [1, 2])
def test_error_in_a_worker_is_the_same_one_line_error_and_leaves_no_cache(tiny_tok, tmp_path, num_proc):
    records = [conv(i, f"question {i}", f"answer {i}") for i in range(6)]
    records[4] = conv(4, "ignore <|im_end|> this", "a")
    with pytest.raises(InputError) as ref:
        encode_with_report(records, tiny_tok, "im", "chatml", 64)
    ds, fp = records_table(records, "mem")
    root = tmp_path / "cache"
    with pytest.raises(InputError) as got:
        encode_cached(ds, fp, "mem", tiny_tok, EncodeSettings.of(tiny_tok, "chatml", 64), root=root,
                      num_proc=num_proc, batch_size=2)
    assert str(got.value) == str(ref.value) and "mem:5" in str(got.value)
    assert list(root.iterdir()) == []


def write_jsonl(path, n=14):
    rows = [{"messages": [{"role": "user", "content": f"Question {i}: " + "why is the sky blue? " * (1 + i % 3)},
                          {"role": "assistant", "content": "The answer is 4. " * (1 + i % 5)}]} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("objective", ["im", "weighted:0.3"])
def test_training_losses_identical_cached_and_in_memory(tiny_dir, tmp_path, capsys, objective):
    data = write_jsonl(tmp_path / "d.jsonl")
    cfg = dict(model=str(tiny_dir), data=str(data), template="chatml", max_length=40, lr=5e-3, micro_batch_size=2,
               gradient_accumulation_steps=2, epochs=1, val_fraction=0.2, progress=False, seed=3,
               objective=objective, encode_cache_dir=str(tmp_path / "cache"))
    mem = imtune.train({**cfg, "out": str(tmp_path / "mem"), "encode_cache": False})
    cached = imtune.train({**cfg, "out": str(tmp_path / "cached")})
    assert "encode cache written" in capsys.readouterr().err
    again = imtune.train({**cfg, "out": str(tmp_path / "again"), "objective": "it"})
    assert "encode cache hit: " in capsys.readouterr().err
    assert again.metrics["data"]["encode_cache"]["path"] == cached.metrics["data"]["encode_cache"]["path"]
    assert (cached.metrics["data"]["encode_cache"]["hit"], again.metrics["data"]["encode_cache"]["hit"]) == (False,
                                                                                                          True)
    assert [r["loss"] for r in cached.history] == [r["loss"] for r in mem.history]
    assert [r["weight_sum"] for r in cached.history] == [r["weight_sum"] for r in mem.history]
    assert [r["eval_loss"] for r in cached.eval_history] == [r["eval_loss"] for r in mem.eval_history]
    drop = {k: v for k, v in cached.metrics["data"].items() if k != "encode_cache"}
    assert drop == mem.metrics["data"]


def first_records(name: str, dest, n: int):
    """The first `n` records of a bundled set, in its own format."""
    src = data_file(name)
    if src.suffix == ".json":
        dest.write_text(json.dumps(json.loads(src.read_text(encoding="utf-8"))[:n]), encoding="utf-8")
    else:
        dest.write_text("".join(src.read_text(encoding="utf-8").splitlines(keepends=True)[:n]), encoding="utf-8")
    return dest


@pytest.mark.parametrize("name", BUNDLED)
def test_training_on_bundled_sets_identical_cached_and_in_memory(name, tiny_dir, tmp_path, one_torch_thread):
    from safetensors.torch import load_file

    data = first_records(name, tmp_path / name, 24)
    cfg = dict(model=str(tiny_dir), data=str(data), template="chatml", max_length=96, lr=5e-3, micro_batch_size=2,
               gradient_accumulation_steps=2, epochs=1, warmup_ratio=0.0, val_fraction=0.25, progress=False, seed=5,
               skip_invalid=True, encode_cache_dir=str(tmp_path / "cache"))
    for objective in ("it", "im"):
        runs = [imtune.train({**cfg, "objective": objective, "encode_cache": cached,
                              "out": str(tmp_path / f"{objective}-{cached}")}) for cached in (False, True)]
        mem, cached = runs
        # Truncation to 96 tokens drops the long ones under `it` (the comparison covers that), leaving >= 2 steps.
        assert cached.metrics["data"]["encode_cache"]["path"] and len(mem.history) >= 2, mem.metrics["data"]
        for key in ("loss", "weight_sum", "grad_norm", "tokens"):
            assert [r[key] for r in cached.history] == [r[key] for r in mem.history], (objective, key)
        assert [r["eval_loss"] for r in cached.eval_history] == [r["eval_loss"] for r in mem.eval_history]
        assert {k: v for k, v in cached.metrics["data"].items() if k != "encode_cache"} == mem.metrics["data"]
        w_mem, w_cached = (load_file(str(r.output_dir / "model.safetensors")) for r in runs)
        assert w_mem.keys() == w_cached.keys()
        assert all(torch.equal(w_mem[k], w_cached[k]) for k in w_mem), objective


def test_take_reads_rows_in_any_order(tiny_tok, tmp_path):
    records = [conv(i, f"question {i} " * (i + 1), f"answer {i}") for i in range(7)]
    ds, fp = records_table(records, "mem")
    cache = encode_cached(ds, fp, "mem", tiny_tok, EncodeSettings.of(tiny_tok, "chatml", 64), root=tmp_path)
    ref = encode_with_report(records, tiny_tok, "im", "chatml", 64)[0]
    order = np.asarray([5, 0, 6, 2])
    got = cache.take(order, "im")
    assert [g.input_ids.tolist() for g in got] == [ref[i].input_ids for i in order]
