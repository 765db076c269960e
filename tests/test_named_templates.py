"""The Jinja saved with a trained tokenizer is generated from templates.py's definitions and renders the same text."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from imtune.masking.templates import ASSISTANT, CHAT_TEMPLATES, NAMED_TEMPLATES, render, render_prompt
from imtune.records.conversation import Conversation

# Contents that stress the Jinja side: quotes, backslashes, braces, Jinja syntax, surrounding whitespace, unicode.
_TEXT = st.lists(st.sampled_from(list("ab Z\n\t'\"\\{}%#|<>é你🙂") + ["{{ x }}", "{% if %}", "  "]),
                 max_size=12).map("".join)
_CONVS = st.lists(st.tuples(st.sampled_from(["system", "user", "assistant"]), _TEXT), min_size=1, max_size=6)


@pytest.fixture(scope="module")
def toks(tiny_tok):
    out = {}
    for name in NAMED_TEMPLATES:
        tok = type(tiny_tok).from_pretrained(tiny_tok.name_or_path)
        tok.chat_template = CHAT_TEMPLATES[name]
        out[name] = tok
    return out


@pytest.mark.parametrize("name", NAMED_TEMPLATES)
@settings(max_examples=60, deadline=None)
@given(turns=_CONVS)
def test_generated_jinja_renders_exactly_what_templates_py_renders(toks, name, turns):
    tok = toks[name]
    msgs = [{"role": r, "content": c} for r, c in turns]
    expected = render(Conversation.from_messages(msgs), tok, name).text
    assert tok.apply_chat_template(msgs, tokenize=False) == expected
    # The generation prompt ends exactly where a next assistant reply starts in training.
    gen = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    with_reply = render(Conversation.from_messages(msgs + [{"role": "assistant", "content": "R"}]), tok, name)
    assert gen == with_reply.text[: [s for s in with_reply.spans if s[2] == ASSISTANT][-1][0]]
    assert render_prompt(msgs, tok, name).endswith(gen)


@pytest.mark.parametrize("name", NAMED_TEMPLATES)
def test_generated_jinja_refuses_unknown_roles(toks, name):
    with pytest.raises(Exception, match="unknown role: tool"):
        toks[name].apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_tulu_text_is_the_papers_format(toks):
    msgs = [{"role": "user", "content": " hi "}, {"role": "assistant", "content": "yo "}]
    eos = toks["tulu"].eos_token
    assert toks["tulu"].apply_chat_template(msgs, tokenize=False) == f"<|user|>\nhi\n<|assistant|>\nyo{eos}"
