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

from .conversation import Conversation
from .errors import ImtuneError, InputError
from .objectives import Objective, parse_objective
from .templates import ASSISTANT, EOS, SEGMENTS, Rendered, render, resolve_template


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

    @property
    def n_dropped(self) -> int:
        return len(self.dropped_no_weight)


def encode(records: Iterable[Conversation], tokenizer, objective: str | Objective = "im", template: str | None = "tulu",
           max_length: int = 2048, truncation_side: str = "right", batch_size: int = 512,
           keep_empty: bool = False) -> list[Encoded]:
    """Render, tokenise once with offsets, weight. Examples with no weighted token left are dropped."""
    return encode_with_report(records, tokenizer, objective, template, max_length, truncation_side, batch_size,
                              keep_empty)[0]


def encode_with_report(records: Iterable[Conversation], tokenizer, objective="im", template="tulu", max_length=2048,
                       truncation_side="right", batch_size=512, keep_empty=False):
    obj = parse_objective(objective)
    tpl = resolve_template(template, tokenizer)
    if truncation_side not in ("right", "left"):
        raise ImtuneError("truncation_side must be 'right' or 'left'")
    if max_length is not None and max_length < 2:
        raise ImtuneError("max_length must be at least 2")
    seg_w = np.asarray(obj.segment_weights(), dtype=np.float32)
    backend = _backend(tokenizer)
    report = EncodeReport()
    out: list[Encoded] = []
    records = list(records)
    report.n_input = len(records)
    for b0 in range(0, len(records), batch_size):
        batch = records[b0:b0 + batch_size]
        rendered = [_render_checked(c, tokenizer, tpl) for c in batch]
        for add_special in (False, True):
            idx = [i for i, r in enumerate(rendered) if r.add_special_tokens == add_special]
            if not idx:
                continue
            encs = backend.encode_batch([rendered[i].text for i in idx], add_special_tokens=add_special)
            for i, enc in zip(idx, encs, strict=True):
                e = _weigh(batch[i], rendered[i], enc.ids, enc.offsets, seg_w, obj, max_length, truncation_side)
                e.id = batch[i].id
                if e.truncated:
                    report.n_truncated += 1
                if not keep_empty and not any(e.weights):
                    report.dropped_no_weight.append(e.id)
                    continue
                out.append((b0 + i, e))
    out.sort(key=lambda t: t[0])
    encoded = [e for _, e in out]
    report.n_kept = len(encoded)
    return encoded, report


def _render_checked(conv: Conversation, tokenizer, tpl: str) -> Rendered:
    try:
        return render(conv, tokenizer, tpl)
    except ValueError as e:
        raise InputError(conv.source or "data", str(e), record=None if conv.source else conv.id) from None


def _backend(tokenizer):
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is None or not hasattr(backend, "encode_batch"):
        raise ImtuneError("a fast (Rust) tokenizer is needed for offset mapping; this one is a slow Python tokenizer")
    return backend


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


def _weigh(conv, rendered, ids, offsets, seg_w, obj: Objective, max_length, truncation_side) -> Encoded:
    codes, turns = token_segments(rendered, offsets)
    weights = seg_w[codes]
    if obj.last_turn_only:
        last = max(i for i, m in enumerate(conv.messages) if m.role == "assistant")
        earlier = ((codes == ASSISTANT) | (codes == EOS)) & (turns != last)
        weights = np.where(earlier, obj.prompt_weight, weights).astype(np.float32)
    n_full = len(ids)
    truncated = max_length is not None and n_full > max_length
    if truncated:
        sl = slice(0, max_length) if truncation_side == "right" else slice(n_full - max_length, n_full)
        ids, codes, turns, weights = ids[sl], codes[sl], turns[sl], weights[sl]
    weights = weights.copy() if truncated else weights
    if len(weights):
        weights[0] = 0.0  # nothing predicts the first token
    return Encoded(list(ids), weights.tolist(), codes, turns, n_tokens_full=n_full, truncated=truncated)
