"""Per-message `weight` from the data (OpenAI's fine-tuning format): parsed in every form that has messages,
validated (one line, exit 2), carried through Arrow tables and the encode cache, shown by inspect, counted by stats,
and multiplied exactly into every objective's weights."""

import json
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import imtune
from imtune.errors import InputError
from imtune.masking.encode_cache import cache_key, encode_cached, records_table
from imtune.masking.encoding import EncodeSettings, encode_with_report
from imtune.masking.objectives import parse_objective
from imtune.masking.templates import TEMPLATE
from imtune.records.conversation import Conversation, Message
from imtune.records.loading import load_dataset
from tests.test_encode_cache import assert_same


def _rows(n=6, weights=lambda i, k: None):
    rows = []
    for i in range(n):
        msgs = []
        for k in range(1 + i % 2):
            msgs += [{"role": "user", "content": f"question {i}.{k} " * (1 + i % 3)},
                     {"role": "assistant", "content": f"answer {i}.{k} " * (1 + k)}]
        for k, m in enumerate(msgs):
            w = weights(i, k)
            if w is not None:
                m["weight"] = w
        rows.append({"id": f"r{i}", "messages": msgs})
    return rows


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_messages_and_sharegpt_forms_carry_weights(tmp_path):
    rows = _rows(2, lambda i, k: 0 if k == 1 else (0.5 if k == 3 else None))
    recs = load_dataset(_jsonl(tmp_path / "m.jsonl", rows)).records
    assert [m.weight for m in recs[0].messages] == [None, 0.0]
    assert [m.weight for m in recs[1].messages] == [None, 0.0, None, 0.5]
    share = [{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a", "weight": 1}]}]
    assert load_dataset(_jsonl(tmp_path / "s.jsonl", share)).records[0].messages[1].weight == 1.0


@pytest.mark.parametrize("bad, reason", [(-1, "got -1.0"), ("NaN", "got nan"), ("Infinity", "got inf"),
                                         (True, "got bool True"), ('"1"', "got str '1'"), ([1], "got list")])
def test_bad_weights_are_one_line_naming_file_line_and_message(tmp_path, bad, reason):
    good = json.dumps(_rows(1)[0])
    msgs = '[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": %s}]'
    text = bad if isinstance(bad, str) else json.dumps(bad)
    path = tmp_path / "d.jsonl"
    path.write_text(good + "\n" + '{"messages": ' + msgs % text + "}\n")
    with pytest.raises(InputError) as e:
        load_dataset(path)
    assert str(e.value).startswith(f"{path}:2: message 1: weight must be") and reason in str(e.value)
    res = load_dataset(path, skip_invalid=True)
    assert len(res.records) == 1 and len(res.skipped) == 1


def test_cli_bad_weight_exits_2_with_one_line(tmp_path, tiny_dir, capsys):
    from imtune.cli.main import main

    rows = _rows(3, lambda i, k: -0.5 if (i, k) == (2, 1) else None)
    data = _jsonl(tmp_path / "d.jsonl", rows)
    rc = main(["stats", "--data", str(data), "--model", str(tiny_dir), "--json"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and f"{data}:3: message 1: weight must be a finite number >= 0" in err[0]
    rc = main(["stats", "--data", str(data), "--model", str(tiny_dir), "--json", "--skip-invalid"])
    out = capsys.readouterr()
    assert rc == 0 and json.loads(out.out)["examples"] == 2 and "skipped 1 invalid record(s)" in out.err


# ---- the weights: objective x message, exactly --------------------------------------------------------------------

weights_st = st.one_of(st.none(), st.sampled_from([0.0, 1.0, 0.5, 2.0]),
                       st.floats(0, 10, allow_nan=False, allow_infinity=False))
objectives_st = st.sampled_from(["it", "im", "im-all", "weighted:0.1", "weighted:0.3:2", "it@last", "im@last"])


@st.composite
def weighted_conversations(draw):
    msgs = [Message("system", "be brief", draw(weights_st))] if draw(st.booleans()) else []
    for k in range(draw(st.integers(1, 3))):
        msgs += [Message("user", f"question {k} " * draw(st.integers(1, 4)), draw(weights_st)),
                 Message("assistant", f"answer {k} " * draw(st.integers(1, 4)), draw(weights_st))]
    return Conversation(tuple(msgs), id="h")


def _strip(conv, to=None):
    return Conversation(tuple(Message(m.role, m.content, to) for m in conv.messages), id=conv.id)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(convs=st.lists(weighted_conversations(), min_size=1, max_size=4), objective=objectives_st,
       max_length=st.sampled_from([None, 24]))
def test_weight_is_objective_weight_times_message_weight(tiny_tok, convs, objective, max_length):
    with_w = encode_with_report(convs, tiny_tok, objective, "chatml", max_length, keep_empty=True)[0]
    plain = encode_with_report([_strip(c) for c in convs], tiny_tok, objective, "chatml", max_length,
                               keep_empty=True)[0]
    ones = encode_with_report([_strip(c, 1.0) for c in convs], tiny_tok, objective, "chatml", max_length,
                              keep_empty=True)[0]
    for e, p, o, conv in zip(with_w, plain, ones, convs, strict=True):
        assert e.input_ids == p.input_ids and o.weights == p.weights  # weight 1 everywhere == no weights
        mw = [1.0 if m.weight is None else m.weight for m in conv.messages]
        for i, (w, pw, seg, msg) in enumerate(zip(e.weights, p.weights, e.segment_codes, e.turns, strict=True)):
            scale = 1.0 if seg == TEMPLATE or msg < 0 else mw[msg]
            assert w == (0.0 if i == 0 else float(np.float32(pw) * np.float32(scale))), (i, seg, msg)


@pytest.mark.parametrize("objective", ["it", "weighted:0.3", "im@last"])
def test_cached_equals_in_memory_with_weights_and_keys(tiny_tok, tmp_path, objective):
    recs = [Conversation.from_messages(r["messages"], id=r["id"], source=f"mem:{k + 1}")
            for k, r in enumerate(_rows(9, lambda i, k: [0.0, 0.25, 3.0, None][(i + k) % 4]))]
    settings_ = EncodeSettings.of(tiny_tok, "chatml", 40)
    ds, fp = records_table(recs, "mem")
    cache = encode_cached(ds, fp, "mem", tiny_tok, settings_, root=tmp_path)
    assert cache.weighted and cache.path.name == cache_key(fp, tiny_tok, settings_, True)
    assert_same(recs, tiny_tok, cache, objective, 40, "right")
    plain = [_strip(c) for c in recs]
    ds0, fp0 = records_table(plain, "mem")
    c0 = encode_cached(ds0, fp0, "mem", tiny_tok, settings_, root=tmp_path)
    assert not c0.weighted and c0.path.name == cache_key(fp0, tiny_tok, settings_)  # the key weights-free data had
    assert fp0 != fp


def test_arrow_tables_carry_weights(tmp_path):
    from datasets import Dataset

    from imtune.records.sources import DataSpec, conversation_table

    rows = _rows(4, lambda i, k: 0.0 if k == 1 and i % 2 else None)
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "dir"))
    t = conversation_table(DataSpec(str(tmp_path / "dir")), cache_dir=tmp_path / "c")
    got = [[m.weight for m in c.messages] for c in t.conversations()]
    assert got[0] == [None, None] and got[1][:2] == [None, 0.0]
    f = conversation_table(DataSpec(str(_jsonl(tmp_path / "d.jsonl", rows))), cache_dir=tmp_path / "c")
    assert [[m.weight for m in c.messages] for c in f.conversations()] == got


def test_inspect_shows_and_stats_counts_weights(tmp_path, tiny_dir, capsys):
    from imtune.cli.main import main

    data = _jsonl(tmp_path / "d.jsonl", _rows(4, lambda i, k: 0 if (i, k) == (0, 1) else (0.5 if k == 3 else None)))
    assert main(["inspect", "--data", str(data), "--model", str(tiny_dir), "--template", "chatml", "--format",
                 "json"]) == 0
    ex = json.loads(capsys.readouterr().out)[0]
    assert ex["totals"]["message_weights"] == {"1": 0.0}
    assert all(r["weight"] == 0 for r in ex["tokens"] if r.get("message") == 1)
    assert main(["stats", "--data", str(data), "--model", str(tiny_dir), "--template", "chatml", "--json"]) == 0
    mw = json.loads(capsys.readouterr().out)["message_weights"]
    assert mw["examples_with_weights"] == 3 and mw["messages_weighted"] == 3 and mw["messages_weight_zero"] == 1
    assert mw["tokens_weight_zero"] > 0


def test_training_with_weights(tiny_dir, tmp_path):
    """Weight 1 on every message trains exactly as no weights; weight 0 on every reply of an example drops it."""
    base = dict(model=str(tiny_dir), template="chatml", max_length=96, micro_batch_size=2, global_batch_size=4,
                max_steps=2, progress=False, precision="fp32", seed=3, objective="it",
                encode_cache_dir=str(tmp_path / "cache"))
    runs = {}
    for name, fn in (("none", lambda i, k: None), ("ones", lambda i, k: 1),
                     ("zero", lambda i, k: 0 if i == 0 and k % 2 else None)):
        data = _jsonl(tmp_path / f"{name}.jsonl", _rows(8, fn))
        runs[name] = imtune.train({**base, "data": str(data), "out": str(tmp_path / name)})
    assert [h["loss"] for h in runs["ones"].history] == [h["loss"] for h in runs["none"].history]
    assert runs["zero"].metrics["data"]["dropped_no_weight"] == 1
    assert runs["zero"].metrics["data"]["dropped_by_truncation"] == 0  # its weights were 0, nothing was cut
    assert all(math.isfinite(h["loss"]) for h in runs["zero"].history)


def test_objective_weight_unchanged_for_markup():
    obj = parse_objective("im-all")
    assert obj.class_weights().tolist() == [1.0, 1.0, 1.0, 1.0]
