"""Per-token segment codes from character spans: the boundary rule of `masking.encoding`, vectorised."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from imtune.masking.templates import Rendered


@dataclass(frozen=True, slots=True)
class TokenBatch:
    """Several texts' tokens in flat arrays: text i owns ids[bounds[i]:bounds[i+1]] and the same rows of offsets."""

    ids: np.ndarray
    offsets: np.ndarray  # (n_tokens, 2) character offsets into each token's own text
    bounds: np.ndarray

    def __len__(self) -> int:
        return len(self.bounds) - 1


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
