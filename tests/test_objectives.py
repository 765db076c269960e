"""Objectives are plug-ins: a toy objective registered here encodes (in memory and from the cache, identically) and
trains without touching any other file; the built-ins keep their weights; `@last` wraps any objective."""

import json

import numpy as np
import pytest

import imtune
from imtune.errors import ImtuneError
from imtune.masking.encode_cache import encode_cached, records_table
from imtune.masking.encoding import EncodeSettings, encode_with_report
from imtune.masking.objectives import (
    LastTurnOnly,
    Objective,
    SegmentObjective,
    Tokens,
    objective_names,
    parse_objective,
    register_objective,
)
from imtune.masking.templates import ASSISTANT, EOS
from imtune.records.conversation import Conversation
from tests.test_encode_cache import assert_same


@register_objective("first-reply")
class FirstReply(Objective):
    """The example of docs/ARCHITECTURE.md: train on the first assistant message (and its end of turn) only."""

    def token_weights(self, t: Tokens) -> np.ndarray:
        ex = t.example
        first = np.full(len(t.bounds) - 1, np.iinfo(np.int32).max, dtype=np.int64)
        np.minimum.at(first, ex[t.is_reply], t.messages[t.is_reply])
        return (t.is_reply & (t.messages == first[ex])).astype(np.float32)


def _conv(i, turns=2):
    msgs = []
    for k in range(turns):
        msgs += [{"role": "user", "content": f"question {i}.{k} " * (1 + (i + k) % 3)},
                 {"role": "assistant", "content": f"answer {i}.{k} " * (1 + k)}]
    return Conversation.from_messages(msgs, id=f"c{i}", source=f"mem:{i + 1}")


def test_registry_parses_builtins_plugins_and_last():
    assert {"it", "im", "im-all", "weighted", "first-reply"} <= set(objective_names())
    assert parse_objective("first-reply").spec == "first-reply"
    assert isinstance(parse_objective("weighted:0.1:2"), SegmentObjective)
    assert parse_objective("weighted:0.1:2").spec == "weighted:0.1:2"
    last = parse_objective("first-reply@last")
    assert isinstance(last, LastTurnOnly) and last.spec == "first-reply@last" and last.class_weights() is None
    assert parse_objective("im@last").class_weights().tolist() == [0.0, 1.0, 1.0, 1.0]
    assert parse_objective("it@last").class_weights().tolist() == [0.0, 0.0, 1.0, 0.0]
    assert parse_objective(last, last_turn_only=False).spec == "first-reply"
    for bad in ("nope", "it:3", "weighted", "weighted:x"):
        with pytest.raises(ImtuneError):
            parse_objective(bad)


def test_plugin_weights_in_memory(tiny_tok):
    records = [_conv(i, turns=1 + i % 3) for i in range(6)]
    got = encode_with_report(records, tiny_tok, "first-reply", "chatml", None)[0]
    it = encode_with_report(records, tiny_tok, "it", "chatml", None)[0]
    for g, ref, conv in zip(got, it, records, strict=True):
        seg, msg, w = g.segment_codes, g.turns, np.asarray(g.weights)
        reply = (seg == ASSISTANT) | (seg == EOS)
        assert w[0] == 0 and set(w.tolist()) <= {0.0, 1.0}
        assert (w[1:] == (reply & (msg == 1))[1:]).all()  # message 1 is the first assistant message
        if conv.n_turns == 1:
            assert g.weights == ref.weights


@pytest.mark.parametrize("objective", ["first-reply", "first-reply@last"])
def test_plugin_cached_equals_in_memory(tiny_tok, tmp_path, objective):
    records = [_conv(i, turns=1 + i % 3) for i in range(9)]
    ds, fp = records_table(records, "mem")
    cache = encode_cached(ds, fp, "mem", tiny_tok, EncodeSettings.of(tiny_tok, "chatml", 40), root=tmp_path)
    rep = assert_same(records, tiny_tok, cache, objective, 40, "right")
    assert rep.n_truncated > 0


def test_plugin_trains(tiny_dir, tmp_path):
    rows = [{"messages": [m.to_dict() for m in _conv(i).messages]} for i in range(8)]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = imtune.train(dict(model=str(tiny_dir), data=str(data), out=str(tmp_path / "o"), template="chatml",
                          max_length=256, micro_batch_size=2, global_batch_size=4, max_steps=2, progress=False,
                          precision="fp32", objective="first-reply", encode_cache_dir=str(tmp_path / "cache")))
    assert len(r.history) == 2 and all(np.isfinite(h["loss"]) for h in r.history)
    it = imtune.train(dict(model=str(tiny_dir), data=str(data), out=str(tmp_path / "it"), template="chatml",
                           max_length=256, micro_batch_size=2, global_batch_size=4, max_steps=1, progress=False,
                           precision="fp32", objective="it", encode_cache_dir=str(tmp_path / "cache")))
    assert r.history[0]["weight_sum"] < it.history[0]["weight_sum"]  # only the first of two replies


def test_bad_plugin_weights_are_refused(tiny_tok):
    @register_objective("negative-test")
    class Negative(Objective):
        def token_weights(self, t):
            return -np.ones(len(t.classes), np.float32)

    with pytest.raises(ImtuneError, match="finite and >= 0"):
        encode_with_report([_conv(0)], tiny_tok, "negative-test", "chatml", None)
