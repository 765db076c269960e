"""Tokenise rendered conversations once, with offsets, and give every token a segment and a loss weight.

Boundary rule (documented contract): a token takes the highest-priority segment among the characters it covers,
priority eos > assistant > user > system > template. So a token that merges markup with content (e.g. "\\nThe" after
"<|assistant|>") counts as content, and is trained under `it` — it is a token the model must produce. Tokens with no
characters (special tokens the tokenizer adds, like BOS) are template. `weights[i]` is the weight of predicting token
i from tokens < i, so `weights[0]` is always 0.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from imtune.config import DEFAULT_MAX_LENGTH, DEFAULT_OBJECTIVE, DEFAULT_TEMPLATE, DEFAULT_TRUNCATION_SIDE
from imtune.errors import ImtuneError, InputError
from imtune.masking.objectives import Objective, parse_objective
from imtune.masking.templates import (
    ASSISTANT,
    EOS,
    SEGMENTS,
    SYSTEM,
    USER,
    Rendered,
    render,
    resolve_template,
)
from imtune.records.conversation import Conversation


class Encoded:
    """One tokenised example: `input_ids`, `weights` (same length) and per-token `segments`."""

    __slots__ = ("input_ids", "weights", "segment_codes", "turns", "id", "n_tokens_full", "truncated")

    def __init__(self, input_ids, weights, segment_codes, turns, id="", n_tokens_full=None, truncated=False):
        self.input_ids: list[int] = input_ids
        self.weights: list[float] = weights
        self.segment_codes: np.ndarray = segment_codes
        self.turns: np.ndarray = turns
        self.id = id
        self.n_tokens_full = len(input_ids) if n_tokens_full is None else n_tokens_full
        self.truncated = truncated

    @property
    def segments(self) -> list[str]:
        return [SEGMENTS[c] for c in self.segment_codes.tolist()]

    def __len__(self) -> int:
        return len(self.input_ids)

    def __repr__(self) -> str:
        return f"Encoded(id={self.id!r}, tokens={len(self)}, weighted={sum(w > 0 for w in self.weights)})"


@dataclass
class EncodeReport:
    n_input: int = 0
    n_kept: int = 0
    n_truncated: int = 0
    dropped_no_weight: list[str] = field(default_factory=list)  # ids left with no weighted token
    truncated_to_nothing: list[str] = field(default_factory=list)  # of those, ids that had one before truncation
    trailing_user: list[str] = field(default_factory=list)  # ids of conversations that end on a user turn
    special_in_content: list[str] = field(default_factory=list)  # ids with special-token text in content (allowed)

    @property
    def n_dropped(self) -> int:
        return len(self.dropped_no_weight)


@dataclass(frozen=True, slots=True)
class TokenBatch:
    """Several texts' tokens in flat arrays: text i owns ids[bounds[i]:bounds[i+1]] and the same rows of offsets."""

    ids: np.ndarray
    offsets: np.ndarray  # (n_tokens, 2) character offsets into each token's own text
    bounds: np.ndarray

    def __len__(self) -> int:
        return len(self.bounds) - 1


def encode(records: Iterable[Conversation], tokenizer, objective: str | Objective = DEFAULT_OBJECTIVE,
           template: str | None = DEFAULT_TEMPLATE, max_length: int = DEFAULT_MAX_LENGTH,
           truncation_side: str = DEFAULT_TRUNCATION_SIDE, batch_size: int = 512,
           keep_empty: bool = False, allow_special_tokens_in_content: bool = False) -> list[Encoded]:
    """Render, tokenise once with offsets, weight. Examples with no weighted token left are dropped."""
    return encode_with_report(records, tokenizer, objective, template, max_length, truncation_side, batch_size,
                              keep_empty, allow_special_tokens_in_content)[0]


def encode_with_report(records: Iterable[Conversation], tokenizer, objective=DEFAULT_OBJECTIVE,
                       template=DEFAULT_TEMPLATE, max_length=DEFAULT_MAX_LENGTH,
                       truncation_side=DEFAULT_TRUNCATION_SIDE, batch_size=512, keep_empty=False,
                       allow_special_tokens_in_content=False) -> tuple[list[Encoded], EncodeReport]:
    """`encode`, plus what happened to the data: truncated, dropped, trailing user turns, special tokens in content.

    Special-token text typed inside a message (e.g. "<|im_end|>") is tokenised by the tokenizer as the special token;
    that silently changes what the model learns, so it stops with an `InputError` naming the record unless
    `allow_special_tokens_in_content` is set.
    """
    obj = parse_objective(objective)
    tpl = resolve_template(template, tokenizer)
    if truncation_side not in ("right", "left"):
        raise ImtuneError("truncation_side must be 'right' or 'left'")
    if max_length is not None and max_length < 2:
        raise ImtuneError("max_length must be at least 2")
    _require_fast(tokenizer)
    seg_w = np.asarray(obj.segment_weights(), dtype=np.float32)
    special = _special_ids(tokenizer)
    records = list(records)
    report = EncodeReport(n_input=len(records))
    out: list[tuple[int, Encoded]] = []
    for b0 in range(0, len(records), max(1, batch_size)):
        batch = records[b0:b0 + max(1, batch_size)]
        rendered = [_render_checked(c, tokenizer, tpl) for c in batch]
        for add_special in (False, True):
            idx = [i for i, r in enumerate(rendered) if r.add_special_tokens == add_special]
            if not idx:
                continue
            convs = [batch[i] for i in idx]
            tb = tokenize_batch(tokenizer, [rendered[i].text for i in idx], add_special)
            codes, turns = batch_token_segments([rendered[i] for i in idx], tb)
            for k, pos in _special_in_content(tb, codes, special):
                if not allow_special_tokens_in_content:
                    raise _special_token_error(convs[k], b0 + idx[k], tokenizer.convert_ids_to_tokens(int(tb.ids[pos])),
                                               int(turns[pos]))
                report.special_in_content.append(convs[k].id)
            for k, e, any_weight, had_weight in _weigh_batch(convs, tb, codes, turns, seg_w, obj, max_length,
                                                             truncation_side):
                report.n_truncated += e.truncated
                if not keep_empty and not any_weight:
                    report.dropped_no_weight.append(e.id)
                    if had_weight:
                        report.truncated_to_nothing.append(e.id)
                    continue
                out.append((b0 + idx[k], e))
    report.trailing_user = [c.id for c in records if c.messages and c.messages[-1].role == "user"]
    out.sort(key=lambda t: t[0])
    encoded = [e for _, e in out]
    report.n_kept = len(encoded)
    return encoded, report


def tokenize_batch(tokenizer, texts: list[str], add_special_tokens: bool) -> TokenBatch:
    """The model's own fast (Rust) tokenizer on all `texts` in one batched call, with character offsets."""
    enc = tokenizer(texts, add_special_tokens=add_special_tokens, return_offsets_mapping=True,
                    return_attention_mask=False, return_token_type_ids=False, truncation=False, verbose=False)
    ids_l, off_l = enc["input_ids"], enc["offset_mapping"]
    bounds = np.zeros(len(ids_l) + 1, dtype=np.int64)
    np.cumsum([len(x) for x in ids_l], out=bounds[1:])
    n = int(bounds[-1])
    ids = np.fromiter((t for x in ids_l for t in x), dtype=np.int64, count=n)
    off = np.fromiter((v for x in off_l for o in x for v in o), dtype=np.int64, count=2 * n).reshape(-1, 2)
    return TokenBatch(ids, off, bounds)


def _require_fast(tokenizer) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise ImtuneError("a fast (Rust) tokenizer is needed for offset mapping; this one is a slow Python tokenizer")


def _special_ids(tokenizer) -> np.ndarray:
    """Ids of special tokens. Non-special added tokens (e.g. "<think>") are meant to be typed in text: not these."""
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for i, t in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(t, "special", False):
            ids.add(int(i))
    return np.asarray(sorted(ids), dtype=np.int64)


def _special_in_content(tb: TokenBatch, codes: np.ndarray, special: np.ndarray) -> list[tuple[int, int]]:
    """(text index, first such token) for each text of `tb` with a special token whose characters are content."""
    content = (codes == SYSTEM) | (codes == USER) | (codes == ASSISTANT)
    hit = np.flatnonzero(content & np.isin(tb.ids, special) & (tb.offsets[:, 1] > tb.offsets[:, 0]))
    texts = np.searchsorted(tb.bounds, hit, side="right") - 1
    first = np.unique(texts, return_index=True)[1]
    return list(zip(texts[first].tolist(), hit[first].tolist(), strict=True))


def _special_token_error(conv: Conversation, index: int, token: str, message: int) -> InputError:
    who = f" (id {conv.id!r})" if conv.id else ""
    reason = (f"record{who}: {conv.messages[message].role} message {message + 1} contains the text of the special "
              f"token {token!r}, which the tokenizer would turn into the special token itself; remove it, or allow "
              "it explicitly (allow_special_tokens_in_content / --allow-special-tokens-in-content)")
    return InputError(conv.source or "data", reason, record=None if conv.source else index)


def _render_checked(conv: Conversation, tokenizer, tpl: str) -> Rendered:
    try:
        return render(conv, tokenizer, tpl)
    except ValueError as e:
        raise InputError(conv.source or "data", str(e), record=None if conv.source else conv.id) from None


def char_segments(rendered: Rendered) -> tuple[np.ndarray, np.ndarray]:
    """Per-character segment code and message index (-1 for markup)."""
    n = len(rendered.text)
    codes = np.zeros(n + 1, dtype=np.int8)
    turns = np.full(n + 1, -1, dtype=np.int32)
    for s, e, c, m in rendered.spans:
        codes[s:e] = c
        turns[s:e] = m
    return codes, turns


def token_segments(rendered: Rendered, offsets: Sequence[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """Apply the boundary rule: each token takes the max segment code over its characters (see module doc)."""
    codes, turns = char_segments(rendered)
    off = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    n_tok = off.shape[0]
    if n_tok == 0:
        return np.zeros(0, np.int8), np.zeros(0, np.int32)
    starts, ends = off[:, 0], off[:, 1]
    empty = ends <= starts
    # reduceat over [s, e) pairs: result[2k] = max(a[s_k:e_k]); clamp empty spans to a harmless index.
    s = np.where(empty, 0, starts)
    e = np.where(empty, 1, ends)
    idx = np.empty(2 * n_tok, dtype=np.int64)
    idx[0::2], idx[1::2] = s, e
    # reduceat needs indices < len: arrays carry one padding element (codes[n] == 0, turns[n] == -1).
    tok_codes = np.maximum.reduceat(codes, idx)[0::2]
    tok_turns = np.maximum.reduceat(turns, idx)[0::2]
    tok_codes[empty] = 0
    tok_turns[empty] = -1
    return tok_codes.astype(np.int8), tok_turns.astype(np.int32)


def batch_token_segments(rendered: Sequence[Rendered], tb: TokenBatch) -> tuple[np.ndarray, np.ndarray]:
    """`token_segments` for a whole batch at once: (segment code, message index) of every token of `tb`.

    Same boundary rule (a token takes the max code and max message index over the characters it covers), computed
    from the spans' side: spans are disjoint and sorted, and so are the tokens, so each span covers a contiguous run
    of tokens (found by two binary searches per span) that is painted with a difference array; the few tokens that
    meet several spans get the max explicitly.
    """
    n_tok = len(tb.ids)
    codes = np.zeros(n_tok, dtype=np.int8)
    turns = np.full(n_tok, -1, dtype=np.int32)
    ss, se, sc, sm = [], [], [], []
    base = 0
    bases = []
    for r in rendered:
        bases.append(base)
        spans = r.spans if _sorted_disjoint(r.spans) else _normalise_spans(r)
        for s, e, c, m in spans:
            if e > s:
                ss.append(base + s)
                se.append(base + e)
                sc.append(c)
                sm.append(m)
        base += len(r.text) + 1  # a gap between texts, so no token of one text meets a span of the next
    if not n_tok or not ss:
        return codes, turns
    shift = np.repeat(np.asarray(bases, dtype=np.int64), np.diff(tb.bounds))
    tok_s = tb.offsets[:, 0] + shift
    tok_e = tb.offsets[:, 1] + shift
    empty = tok_e <= tok_s
    # Binary search needs sorted offsets. Tokens with no characters (a BOS/EOS the post-processor adds, at (0, 0))
    # break the order: give them their predecessor's values (they end up template anyway). Any other disorder (an
    # unusual tokenizer) is handled text by text with the plain per-character rule.
    s_m, e_m = np.maximum.accumulate(tok_s), np.maximum.accumulate(tok_e)
    if (s_m[~empty] != tok_s[~empty]).any() or (e_m[~empty] != tok_e[~empty]).any():
        return _segments_per_text(rendered, tb)
    tok_s, tok_e = s_m, e_m
    SC, SM = np.asarray(sc, dtype=np.int64), np.asarray(sm, dtype=np.int64)
    t0 = np.searchsorted(tok_e, np.asarray(ss, dtype=np.int64), side="right")  # first token ending after the start
    t1 = np.searchsorted(tok_s, np.asarray(se, dtype=np.int64), side="left")  # one past the last starting before the end
    live = t1 > t0
    t0, t1, SC, SM = t0[live], t1[live], SC[live], SM[live]
    cover = np.zeros(n_tok + 1, dtype=np.int32)
    np.add.at(cover, t0, 1)
    np.add.at(cover, t1, -1)
    dc = np.zeros(n_tok + 1, dtype=np.int64)
    np.add.at(dc, t0, SC)
    np.add.at(dc, t1, -SC)
    dm = np.zeros(n_tok + 1, dtype=np.int64)
    np.add.at(dm, t0, SM + 1)
    np.add.at(dm, t1, -(SM + 1))
    cover = np.cumsum(cover[:-1])
    codes[:] = np.cumsum(dc[:-1])
    turns[:] = np.cumsum(dm[:-1]) - 1
    multi = np.flatnonzero(cover > 1)
    if len(multi):  # a token over several spans (rare): max over exactly those spans
        j0 = np.searchsorted(t1, multi, side="right")  # first span whose run ends after k
        j1 = np.searchsorted(t0, multi, side="right")  # one past the last span whose run starts at or before k
        for k, a, b in zip(multi.tolist(), j0.tolist(), j1.tolist(), strict=True):
            codes[k] = SC[a:b].max()
            turns[k] = SM[a:b].max()
    if empty.any():
        codes[empty] = 0
        turns[empty] = -1
    return codes, turns


def _segments_per_text(rendered: Sequence[Rendered], tb: TokenBatch) -> tuple[np.ndarray, np.ndarray]:
    parts = [token_segments(r, tb.offsets[tb.bounds[i]:tb.bounds[i + 1]]) for i, r in enumerate(rendered)]
    if not parts:
        return np.zeros(0, np.int8), np.zeros(0, np.int32)
    return (np.concatenate([c for c, _ in parts]).astype(np.int8),
            np.concatenate([t for _, t in parts]).astype(np.int32))


def _sorted_disjoint(spans) -> bool:
    prev = 0
    for s, e, _, _ in spans:
        if s < prev:
            return False
        prev = max(prev, e)
    return True


def _normalise_spans(rendered: Rendered):
    """Disjoint sorted spans equivalent to `char_segments` (later spans overwrite earlier ones)."""
    codes, turns = char_segments(rendered)
    out, n = [], len(rendered.text)
    k = 0
    while k < n:
        j = k
        while j < n and codes[j] == codes[k] and turns[j] == turns[k]:
            j += 1
        if codes[k] != 0 or turns[k] != -1:
            out.append((k, j, int(codes[k]), int(turns[k])))
        k = j
    return out


def _weigh_batch(convs, tb: TokenBatch, codes, turns, seg_w, obj: Objective, max_length, truncation_side):
    """Weights, truncation and `Encoded` objects for a batch, vectorised over all its tokens."""
    n = len(convs)
    bounds = tb.bounds
    n_full = np.diff(bounds)
    weights = seg_w[codes]
    if obj.last_turn_only:
        last = np.asarray([max((i for i, m in enumerate(c.messages) if m.role == "assistant"), default=-1)
                           for c in convs], dtype=np.int32)
        earlier = ((codes == ASSISTANT) | (codes == EOS)) & (turns != np.repeat(last, n_full))
        weights[earlier] = np.float32(obj.prompt_weight)
    start, end = bounds[:-1].copy(), bounds[1:].copy()
    had_w = _any_weight(weights, np.minimum(start + 1, end), end)  # before truncation (the first token is never predicted)
    if max_length is not None:
        cut = n_full > max_length
        if truncation_side == "right":
            end = np.where(cut, start + max_length, end)
        else:
            start = np.where(cut, end - max_length, start)
    else:
        cut = np.zeros(n, dtype=bool)
    nonempty = end > start
    weights[start[nonempty]] = 0.0  # nothing predicts the first token
    any_w = _any_weight(weights, start, end)
    ids, wl = tb.ids.tolist(), weights.tolist()
    for k, (a, b, nf, tr, aw, hw) in enumerate(zip(start.tolist(), end.tolist(), n_full.tolist(), cut.tolist(),
                                                   any_w.tolist(), had_w.tolist(), strict=True)):
        yield k, Encoded(ids[a:b], wl[a:b], codes[a:b], turns[a:b], convs[k].id, nf, tr), aw, hw


def _any_weight(weights: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """For each [start, end) range of `weights`: does it hold a positive weight?"""
    has_w = np.zeros(len(weights) + 1, dtype=np.int64)
    np.cumsum(weights > 0, out=has_w[1:])
    return (has_w[end] - has_w[start]) > 0
