"""Properties of the per-token weights: exact spans, objective nesting, end points, multi-turn, truncation; `encode`
equals tokenising each rendered text on its own with the HF tokenizer; special-token text in content is refused."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imtune.errors import InputError
from imtune.masking.encoding import encode, encode_with_report, token_segments, tokenize_batch
from imtune.masking.objectives import parse_objective
from imtune.masking.templates import render
from imtune.records.conversation import Conversation, Message

from .conftest import data_file

TEMPLATES = ["tulu", "chatml", "alpaca", "tokenizer"]
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

content = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\u27e6\u27e7"), min_size=1, max_size=40
).filter(lambda s: s.strip())
special_ish = st.sampled_from(["<|im_end|>", "<|endoftext|>", "<|user|>", "\r\n", "  ", "🙂", "你好", "e\u0301"])
rich_content = st.lists(st.one_of(content, special_ish), min_size=1, max_size=4).map("".join).filter(
    lambda s: s.strip())


@st.composite
def conversations(draw, max_turns=3):
    msgs = []
    if draw(st.booleans()):
        msgs.append(Message("system", draw(rich_content)))
    for _ in range(draw(st.integers(1, max_turns))):
        msgs.append(Message("user", draw(rich_content)))
        msgs.append(Message("assistant", draw(rich_content)))
    return Conversation(tuple(msgs), id="h")


def allowing(fn):
    """`encode`/`encode_with_report` with special-token text in content allowed (the data below types some)."""
    return lambda *a, **k: fn(*a, allow_special_tokens_in_content=True, **k)


enc_any, enc_report_any = allowing(encode), allowing(encode_with_report)


def weighted(e):
    return {i for i, w in enumerate(e.weights) if w > 0}


@SETTINGS
@given(conv=conversations(), template=st.sampled_from(TEMPLATES))
def test_objectives_nest_and_endpoints(tiny_tok, conv, template):
    enc = {o: enc_any([conv], tiny_tok, o, template, max_length=None, keep_empty=True)[0]
           for o in ("it", "im", "im-all", "weighted:0", "weighted:1", "weighted:0.3")}
    ids = enc["it"].input_ids
    assert all(e.input_ids == ids and len(e.weights) == len(ids) for e in enc.values())
    assert all(e.weights[0] == 0 for e in enc.values())
    assert weighted(enc["it"]) <= weighted(enc["im"]) <= weighted(enc["im-all"])
    assert enc["weighted:0"].weights == enc["it"].weights
    assert enc["weighted:1"].weights == enc["im"].weights
    w = np.array(enc["weighted:0.3"].weights)
    segs = np.array(enc["im"].segments)
    prompt = np.isin(segs, ["user", "system"])
    assert np.allclose(w[1:][prompt[1:]], 0.3)
    assert set(w[1:][np.isin(segs[1:], ["assistant", "eos"])]) <= {1.0}
    assert not w[segs == "template"].any()


def token_bytes(tok, ids):
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    inv = {v: k for k, v in bytes_to_unicode().items()}
    special = {t.content for t in tok.added_tokens_decoder.values()}
    out = []
    for t in tok.convert_ids_to_tokens(ids):
        out.append(t.encode() if t in special else bytes(inv[c] for c in t))
    return out


def _message_text(conv, i, template):
    c = conv.messages[i].content
    return c.strip() if template in ("tulu", "alpaca") else c


@SETTINGS
@given(conv=conversations(), template=st.sampled_from(TEMPLATES))
def test_segment_tokens_decode_to_segment_text(tiny_tok, conv, template):
    """Tokens labelled with message i decode to that message's text plus at most the boundary tokens' extra."""
    e = enc_any([conv], tiny_tok, "im-all", template, max_length=None, keep_empty=True)[0]
    for i, m in enumerate(conv.messages):
        idx = [k for k in range(len(e)) if e.turns[k] == i and e.segments[k] == m.role]
        assert idx == list(range(idx[0], idx[-1] + 1)), "a message's tokens are contiguous"
        # Byte level: a token may hold part of a multi-byte character.
        text = _message_text(conv, i, template).encode()
        pieces = token_bytes(tiny_tok, [e.input_ids[k] for k in idx])
        decoded = b"".join(pieces)
        assert text in decoded
        assert len(decoded) - len(text) <= len(pieces[0]) + len(pieces[-1])
        # Between the two boundary tokens there is nothing but this message's text.
        if len(idx) > 2:
            assert b"".join(pieces[1:-1]) in text


@SETTINGS
@given(conv=conversations(max_turns=4), template=st.sampled_from(TEMPLATES))
def test_multi_turn_every_assistant_turn_trained_and_last_turn_only(tiny_tok, conv, template):
    e = enc_any([conv], tiny_tok, "it", template, max_length=None, keep_empty=True)[0]
    assistant_turns = [i for i, m in enumerate(conv.messages) if m.role == "assistant"]
    trained_turns = {int(e.turns[k]) for k in weighted(e)}
    assert trained_turns == set(assistant_turns)
    assert all(e.segments[k] in ("assistant", "eos") for k in weighted(e))
    last = enc_any([conv], tiny_tok, "it@last", template, max_length=None, keep_empty=True)[0]
    assert {int(last.turns[k]) for k in weighted(last)} == {assistant_turns[-1]}
    # every assistant turn's end-of-turn token is trained under `it`
    eos_turns = {int(e.turns[k]) for k in range(len(e)) if e.segments[k] == "eos"}
    assert eos_turns == set(assistant_turns)


@SETTINGS
@given(convs=st.lists(conversations(), min_size=1, max_size=5), max_length=st.integers(2, 40),
       side=st.sampled_from(["right", "left"]))
def test_truncation_accounting(tiny_tok, convs, max_length, side):
    full = enc_any(convs, tiny_tok, "it", "chatml", max_length=None, keep_empty=True)
    enc, rep = enc_report_any(convs, tiny_tok, "it", "chatml", max_length=max_length, truncation_side=side)
    assert rep.n_input == len(convs)
    assert rep.n_truncated == sum(len(f) > max_length for f in full)
    assert rep.n_kept + rep.n_dropped == len(convs)
    kept = {e.id for e in enc}
    for f in full:
        n = len(f)
        cut = f.input_ids[:max_length] if side == "right" else f.input_ids[max(0, n - max_length):]
        w = (f.weights[:max_length] if side == "right" else f.weights[max(0, n - max_length):])[1:]
        if any(w):
            assert any(e.input_ids == cut and e.n_tokens_full == n for e in enc)
    assert all(len(e) <= max_length and any(e.weights) for e in enc)
    assert len(kept) <= len(convs)


def test_tulu_matches_open_instruct_text(tiny_tok):
    conv = Conversation((Message("system", " S "), Message("user", "U\n"), Message("assistant", " A"),
                         Message("user", "U2"), Message("assistant", "A2 ")))
    eos = tiny_tok.eos_token
    expected = f"<|system|>\nS\n<|user|>\nU\n<|assistant|>\nA{eos}\n<|user|>\nU2\n<|assistant|>\nA2{eos}"
    assert render(conv, tiny_tok, "tulu").text == expected


def test_im_excludes_template_markers(tiny_tok):
    conv = Conversation((Message("user", "hello there"), Message("assistant", "general kenobi")))
    e = encode([conv], tiny_tok, "im", "tulu")[0]
    trained = tiny_tok.decode([t for t, w in zip(e.input_ids, e.weights, strict=True) if w > 0])
    assert "<|user|>" not in trained and "<|assistant|>" not in trained
    assert "hello there" in trained and "general kenobi" in trained and tiny_tok.eos_token in trained


def test_objective_parsing():
    assert parse_objective("weighted:0.1").prompt_weight == 0.1
    o = parse_objective("weighted:0.2:0.5@last")
    assert (o.prompt_weight, o.response_weight, o.last_turn_only) == (0.2, 0.5, True)
    from imtune.errors import ImtuneError

    for bad in ("foo", "weighted:x", "weighted:-1", "weighted:0:0"):
        with pytest.raises(ImtuneError):
            parse_objective(bad)


# --- real SmolLM2 tokenizer on real data -------------------------------------------------------------

@pytest.mark.real_model
@pytest.mark.parametrize("name", ["lima.jsonl", "alpagasus_dolly_3k.jsonl"])
@pytest.mark.parametrize("template", ["tulu", "tokenizer"])
def test_real_tokenizer_on_real_data(smol_tok, name, template):
    from imtune.records.loading import load_records

    recs = load_records(data_file(name))[:200]
    it = encode(recs, smol_tok, "it", template, max_length=None, keep_empty=True)
    im = encode(recs, smol_tok, "im", template, max_length=None, keep_empty=True)
    for conv, a, b in zip(recs, it, im, strict=True):
        assert a.input_ids == b.input_ids
        assert weighted(a) < weighted(b)
        # every assistant message's text is recovered from its trained tokens
        trained = smol_tok.decode([t for t, w in zip(a.input_ids, a.weights, strict=True) if w > 0])
        for m in conv.messages:
            if m.role == "assistant":
                assert m.content.strip() in trained
        # the one-pass tokenisation equals tokenising the rendered text plainly
        r = render(conv, smol_tok, "tulu" if template == "tulu" else "tokenizer")
        assert smol_tok(r.text, add_special_tokens=r.add_special_tokens)["input_ids"] == a.input_ids
    # the default SmolLM2 system prompt injected by its chat template is markup, never user content
    if template == "tokenizer":
        segs = it[0].segments
        assert segs[3] == "template"


# --- encode() equals tokenising each rendered text on its own ----------------------------------------------------

PIECES = [
    "<|im_end|>", "<|im_start|>", "<|endoftext|>", "<|user|>", "<|assistant|>\n", "<|im_end", "im_end|>",
    " ", "  ", "\n", "\n\n", "\r\n", "\t", " \n ", "\u00a0", "\u3000", "\x85", "\u2028", "\u200b", "\ufeff",
    "🙂", "👨\u200d👩\u200d👧", "🇫🇷", "你好", "مرحبا", "e\u0301", "\u0308", "ß", "ﬁ", "İ", "123", "٣٤", "½",
    "'s", "don't", "def f(x):\n    return x", "http://a.b/c?d=e", "—", "\x00", "\x7f", "\U0010fffd",
]
piece_text = st.lists(
    st.one_of(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12), st.sampled_from(PIECES)),
    max_size=12,
).map("".join).filter(lambda s: s.strip())


@st.composite
def piece_conversations(draw):
    msgs = [Message("system", draw(piece_text))] if draw(st.booleans()) else []
    for _ in range(draw(st.integers(1, 3))):
        msgs += [Message("user", draw(piece_text)), Message("assistant", draw(piece_text))]
    return Conversation(tuple(msgs), id="h")


def reference_encode(records, tokenizer, objective, template, max_length, truncation_side):
    """Per example: render, tokenise alone with HF, `token_segments`, weight, truncate (the plain algorithm)."""
    obj = parse_objective(objective)
    seg_w = np.asarray(obj.segment_weights(), dtype=np.float32)
    out = []
    for conv in records:
        r = render(conv, tokenizer, template)
        e = tokenizer(r.text, add_special_tokens=r.add_special_tokens, return_offsets_mapping=True)
        codes, turns = token_segments(r, e["offset_mapping"])
        weights = seg_w[codes]
        if obj.last_turn_only:
            last = max(i for i, m in enumerate(conv.messages) if m.role == "assistant")
            earlier = ((codes == 3) | (codes == 4)) & (turns != last)
            weights = np.where(earlier, obj.prompt_weight, weights).astype(np.float32)
        ids = e["input_ids"]
        n = len(ids)
        if max_length is not None and n > max_length:
            sl = slice(0, max_length) if truncation_side == "right" else slice(n - max_length, n)
            ids, codes, turns, weights = ids[sl], codes[sl], turns[sl], weights[sl].copy()
        if len(weights):
            weights[0] = 0.0
        out.append((list(ids), weights.tolist(), codes.tolist(), turns.tolist(), n))
    return out


def check_encode(records, tokenizer, objective, template, max_length, side):
    got, rep = enc_report_any(records, tokenizer, objective, template, max_length, side, batch_size=7,
                              keep_empty=True)
    want = reference_encode(records, tokenizer, objective, template, max_length, side)
    assert len(got) == len(want) == rep.n_input
    for e, (ids, w, c, t, n) in zip(got, want, strict=True):
        assert e.input_ids == ids
        assert e.weights == w
        assert e.segment_codes.tolist() == c and e.turns.tolist() == t
        assert e.n_tokens_full == n and e.truncated == (max_length is not None and n > max_length)


@pytest.mark.real_model
def test_encode_on_lima_equals_reference(smol_tok):
    from imtune.records.loading import load_records

    recs = load_records(data_file("lima.jsonl"), skip_invalid=True)[:150]
    for objective, template, max_length, side in (("im", "tulu", 2048, "right"), ("it@last", "chatml", 300, "left"),
                                                  ("weighted:0.3:0.5", "tokenizer", None, "right"),
                                                  ("im-all", "alpaca", 64, "right")):
        check_encode(recs, smol_tok, objective, template, max_length, side)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(convs=st.lists(piece_conversations(), min_size=1, max_size=4),
       objective=st.sampled_from(["it", "im", "im-all", "it@last", "weighted:0.25"]),
       template=st.sampled_from(["tulu", "chatml", "alpaca", "tokenizer"]), max_length=st.sampled_from([None, 2, 17, 64]),
       side=st.sampled_from(["right", "left"]))
def test_encode_equals_reference_random(tiny_tok, convs, objective, template, max_length, side):
    check_encode(convs, tiny_tok, objective, template, max_length, side)


def test_tokenize_batch_layout(tiny_tok):
    texts = ["ab c", "", "é🙂 x<|im_end|>"]
    tb = tokenize_batch(tiny_tok, texts, True)
    assert len(tb) == 3
    for i, t in enumerate(texts):
        e = tiny_tok(t, return_offsets_mapping=True)
        a, b = tb.bounds[i], tb.bounds[i + 1]
        assert tb.ids[a:b].tolist() == e["input_ids"]
        assert [tuple(o) for o in tb.offsets[a:b].tolist()] == [tuple(o) for o in e["offset_mapping"]]


def test_slow_tokenizer_refused(tiny_tok):
    from imtune.errors import ImtuneError

    class Slow:
        is_fast = False
        chat_template = None

    with pytest.raises(ImtuneError, match="fast"):
        encode([Conversation((Message("user", "a"), Message("assistant", "b")))], Slow(), "im", "tulu")


# --- special-token text typed in content (issue 8 §6) -------------------------------------------------------------

def _chat(user, assistant, id="r"):
    return Conversation((Message("user", user), Message("assistant", assistant)), id=id)


@pytest.mark.parametrize("where", ["user", "assistant"])
@pytest.mark.parametrize("template", ["tulu", "chatml", "tokenizer"])
def test_special_token_in_content_stops_naming_the_record(tiny_tok, where, template):
    typed = "stop here <|im_end|> and go on"
    convs = [_chat("fine", "fine too", id="ok"),
             _chat(typed, "fine", id="bad") if where == "user" else _chat("fine", typed, id="bad")]
    with pytest.raises(InputError) as err:
        encode(convs, tiny_tok, "im", template)
    msg = str(err.value)
    assert "record 1" in msg and "'bad'" in msg and "<|im_end|>" in msg and where in msg
    assert err.value.exit_code == 2


def test_special_token_in_content_source_named(tiny_tok):
    conv = Conversation((Message("user", "hi"), Message("assistant", "x<|endoftext|>")), id="7",
                        source="data.jsonl:8")
    with pytest.raises(InputError, match=r"^data\.jsonl:8: .*'<\|endoftext\|>'"):
        encode([conv], tiny_tok, "it", "tulu")


def test_special_token_in_content_allowed_explicitly(tiny_tok):
    conv = _chat("a <|im_end|> b", "ok", id="x")
    enc, rep = encode_with_report([conv], tiny_tok, "im", "tulu", allow_special_tokens_in_content=True)
    end_id = tiny_tok.convert_tokens_to_ids("<|im_end|>")
    k = enc[0].input_ids.index(end_id)
    assert enc[0].segments[k] == "user"  # it is the special token, in the user's segment
    assert rep.special_in_content == ["x"]


def test_template_markup_and_lookalikes_are_not_special_in_content(tiny_tok):
    # The template's own <|im_end|> (chatml) is markup; a partial marker is plain text.
    convs = [_chat("<|im_end", "im_end|> <|user|>")]
    for template in ("chatml", "tulu", "tokenizer"):
        enc, rep = encode_with_report(convs, tiny_tok, "im", template)
        assert len(enc) == 1 and rep.special_in_content == []


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(conv=piece_conversations(), template=st.sampled_from(["tulu", "chatml", "alpaca", "tokenizer"]))
def test_special_text_in_content_iff_refused(tiny_tok, conv, template):
    typed = any(s in m.content for m in conv.messages for s in ("<|im_end|>", "<|im_start|>", "<|endoftext|>"))
    try:
        encode([conv], tiny_tok, "im", template, keep_empty=True)
        refused = False
    except InputError:
        refused = True
    assert refused == typed


# --- what encode counts for the run summary (issue 8 §6) -----------------------------------------------------------

def test_trailing_user_turn_counted(tiny_tok):
    convs = [_chat("q", "a", id="a"),
             Conversation((Message("user", "q"), Message("assistant", "a"), Message("user", "more?")), id="b"),
             Conversation((Message("user", "only a question"),), id="c")]
    enc, rep = encode_with_report(convs, tiny_tok, "im", "tulu")
    assert rep.trailing_user == ["b", "c"]
    assert {e.id for e in enc} == {"a", "b", "c"}  # im trains them: that is why they are reported
    enc_it, rep_it = encode_with_report(convs, tiny_tok, "it", "tulu")
    assert rep_it.trailing_user == ["b", "c"] and rep_it.dropped_no_weight == ["c"]
    assert rep_it.truncated_to_nothing == []  # c never had an output token: not truncation's doing


def test_dropped_by_truncation_counted(tiny_tok):
    long_prompt = "word " * 200
    convs = [_chat(long_prompt, "the answer", id="long"), _chat("q", "a", id="short")]
    enc, rep = encode_with_report(convs, tiny_tok, "it", "tulu", max_length=32)
    assert [e.id for e in enc] == ["short"]
    assert rep.dropped_no_weight == ["long"] and rep.truncated_to_nothing == ["long"]
    assert rep.n_truncated == 1 and rep.n_kept == 1


def test_cli_train_stops_on_special_token_in_content(tiny_dir, tmp_path, capsys):
    import json

    from imtune.cli.main import main

    data = tmp_path / "d.jsonl"
    rows = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
            {"messages": [{"role": "user", "content": "ignore <|im_end|> this"},
                          {"role": "assistant", "content": "a"}]}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    rc = main(["train", "--data", str(data), "--model", str(tiny_dir), "--out", str(out), "--max-steps", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert f"{data}:2" in err[0] and "<|im_end|>" in err[0] and "Traceback" not in err[0]
