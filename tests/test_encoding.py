"""Properties of the per-token weights: exact spans, objective nesting, end points, multi-turn, truncation."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imtune.records.conversation import Conversation, Message
from imtune.masking.encoding import encode, encode_with_report
from imtune.masking.objectives import parse_objective
from imtune.masking.templates import render

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


def weighted(e):
    return {i for i, w in enumerate(e.weights) if w > 0}


@SETTINGS
@given(conv=conversations(), template=st.sampled_from(TEMPLATES))
def test_objectives_nest_and_endpoints(tiny_tok, conv, template):
    enc = {o: encode([conv], tiny_tok, o, template, max_length=None, keep_empty=True)[0]
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
    e = encode([conv], tiny_tok, "im-all", template, max_length=None, keep_empty=True)[0]
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
    e = encode([conv], tiny_tok, "it", template, max_length=None, keep_empty=True)[0]
    assistant_turns = [i for i, m in enumerate(conv.messages) if m.role == "assistant"]
    trained_turns = {int(e.turns[k]) for k in weighted(e)}
    assert trained_turns == set(assistant_turns)
    assert all(e.segments[k] in ("assistant", "eos") for k in weighted(e))
    last = encode([conv], tiny_tok, "it@last", template, max_length=None, keep_empty=True)[0]
    assert {int(last.turns[k]) for k in weighted(last)} == {assistant_turns[-1]}
    # every assistant turn's end-of-turn token is trained under `it`
    eos_turns = {int(e.turns[k]) for k in range(len(e)) if e.segments[k] == "eos"}
    assert eos_turns == set(assistant_turns)


@SETTINGS
@given(convs=st.lists(conversations(), min_size=1, max_size=5), max_length=st.integers(2, 40),
       side=st.sampled_from(["right", "left"]))
def test_truncation_accounting(tiny_tok, convs, max_length, side):
    full = encode(convs, tiny_tok, "it", "chatml", max_length=None, keep_empty=True)
    enc, rep = encode_with_report(convs, tiny_tok, "it", "chatml", max_length=max_length, truncation_side=side)
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
