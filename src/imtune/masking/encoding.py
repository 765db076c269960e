"""Tokenise rendered conversations once, with offsets, and give every token a segment and a loss weight.

Boundary rule (documented contract): a token takes the highest-priority segment among the characters it covers,
priority eos > assistant > user > system > template. So a token that merges markup with content (e.g. "\\nThe" after
"<|assistant|>") counts as content, and is trained under `it` — it is a token the model must produce. Tokens with no
characters (special tokens the tokenizer adds, like BOS) are template. `weights[i]` is the weight of predicting token
i from tokens < i, so `weights[0]` is always 0.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from imtune import ranges
from imtune.config import DEFAULT_MAX_LENGTH, DEFAULT_OBJECTIVE, DEFAULT_TEMPLATE, DEFAULT_TRUNCATION_SIDE
from imtune.errors import ImtuneError, InputError
from imtune.masking.objectives import (  # noqa: F401  (CLASS_*: the encoder's classes, defined with objectives)
    CLASS_EARLIER_REPLY,
    CLASS_PROMPT,
    CLASS_REPLY,
    CLASS_TEMPLATE,
    N_CLASSES,
    Objective,
    Tokens,
    parse_objective,
    weights,
)
from imtune.masking.segments import TokenBatch, batch_token_segments, char_segments, token_segments  # noqa: F401
from imtune.masking.templates import (
    ASSISTANT,
    EOS,
    SEGMENTS,
    SYSTEM,
    TEMPLATE,
    USER,
    Rendered,
    render,
    resolve_template,
)
from imtune.records.conversation import Conversation


class Encoded:
    """One tokenised example: `input_ids`, `weights` (same length) and per-token `segments`."""

    __slots__ = ("input_ids", "weights", "segment_codes", "turns", "id", "n_tokens_full", "truncated",
                 "message_weights")

    def __init__(self, input_ids, weights, segment_codes, turns, id="", n_tokens_full=None, truncated=False,
                 message_weights=None):
        self.message_weights: np.ndarray | None = message_weights  # per token, the data's message weight; None: 1
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
    `allow_special_tokens_in_content` is set. The objective-independent part is `encode_raw` (the encode cache
    stores its output); the objective only enters through `class_weights`.
    """
    obj = parse_objective(objective)
    settings = EncodeSettings.of(tokenizer, template, max_length, truncation_side, allow_special_tokens_in_content)
    records = list(records)
    report = EncodeReport(n_input=len(records))
    encoded: list[Encoded] = []
    for b0 in range(0, len(records), max(1, batch_size)):
        batch = records[b0:b0 + max(1, batch_size)]
        raw = encode_raw(batch, tokenizer, settings, first_index=b0)
        w = weights(obj, raw.tokens())
        any_w = _any_weight(w, raw.bounds[:-1], raw.bounds[1:])
        had_w = had_weight(obj, raw.full_counts, raw.truncated)
        ids, wl = raw.ids.tolist(), w.tolist()
        for k, conv in enumerate(batch):
            a, b = int(raw.bounds[k]), int(raw.bounds[k + 1])
            report.n_truncated += bool(raw.truncated[k])
            if raw.special[k]:
                report.special_in_content.append(conv.id)
            if not keep_empty and not any_w[k]:
                report.dropped_no_weight.append(conv.id)
                if had_w[k]:
                    report.truncated_to_nothing.append(conv.id)
                continue
            mw = raw.token_message_weights
            encoded.append(Encoded(ids[a:b], wl[a:b], raw.codes[a:b], raw.turns[a:b], conv.id,
                                   int(raw.n_full[k]), bool(raw.truncated[k]), None if mw is None else mw[a:b]))
    report.trailing_user = [c.id for c in records if c.messages and c.messages[-1].role == "user"]
    report.n_kept = len(encoded)
    return encoded, report


# ---- the objective-independent encoder ---------------------------------------------------------------------------
# Weight classes (objectives.CLASS_*): markup, prompt, last-turn reply, earlier reply. A token's class is fixed by
# the encode; a built-in objective is a weight per class, so one encode serves every objective.


def class_weights(obj: str | Objective) -> np.ndarray | None:
    """float32 weight of each class under `obj` (markup, prompt, last-turn reply, earlier reply); None for an
    objective whose weights depend on more than the class."""
    return parse_objective(obj).class_weights()


def weigh(classes: np.ndarray, bounds: np.ndarray, cw: np.ndarray) -> np.ndarray:
    """Weights of flat tokens whose examples are [bounds[i], bounds[i+1]); nothing predicts an example's first."""
    w = cw[classes]
    starts = bounds[:-1][np.diff(bounds) > 0]
    w[starts] = 0.0
    return w


def had_weight(obj: Objective, full_counts: np.ndarray, truncated: np.ndarray) -> np.ndarray:
    """Per example: was it truncated, and did it have a weighted token before? (Told from the class counts where the
    objective is a weight per class, message weights aside; otherwise every truncated example is taken to have.)"""
    truncated = np.asarray(truncated, dtype=bool)
    cw = obj.class_weights()
    if cw is None:
        return truncated
    return truncated & (full_counts[:, cw > 0] > 0).any(axis=1)


@dataclass(frozen=True)
class EncodeSettings:
    """Everything besides the data and the objective that the encoder's output depends on."""

    template: str
    max_length: int | None
    truncation_side: str
    allow_special_tokens_in_content: bool

    @classmethod
    def of(cls, tokenizer, template=DEFAULT_TEMPLATE, max_length=DEFAULT_MAX_LENGTH,
           truncation_side=DEFAULT_TRUNCATION_SIDE, allow_special_tokens_in_content=False) -> EncodeSettings:
        if truncation_side not in ("right", "left"):
            raise ImtuneError("truncation_side must be 'right' or 'left'")
        if max_length is not None and (not isinstance(max_length, numbers.Integral)  # a numpy int is fine
                                       or not ranges.LENGTH.contains(int(max_length))):
            raise ImtuneError(f"max_length must be {ranges.LENGTH.describe()}, got {max_length!r}")
        _require_fast(tokenizer)
        return cls(resolve_template(template, tokenizer), max_length, truncation_side,
                   bool(allow_special_tokens_in_content))


@dataclass
class RawBatch:
    """`encode_raw` output: flat truncated tokens (example i owns [bounds[i], bounds[i+1])) and per-example facts."""

    ids: np.ndarray  # int64
    codes: np.ndarray  # int8 segment codes
    turns: np.ndarray  # int32 message index (-1 for markup)
    classes: np.ndarray  # int8 weight class
    bounds: np.ndarray
    n_full: np.ndarray  # tokens before truncation
    truncated: np.ndarray  # bool
    full_counts: np.ndarray  # (n, N_CLASSES) tokens of each class before truncation, first token excluded
    window_counts: np.ndarray  # the same after truncation
    segment_counts: np.ndarray  # (n, len(SEGMENTS)) tokens of each segment before truncation, all positions
    special: np.ndarray  # bool: special-token text in content (allowed by the settings)
    errors: list  # (example index, InputError) when collect_errors; the rows are then empty
    message_weights: list = field(default_factory=list)  # per example: float32 weight per message, [] if none given
    token_message_weights: np.ndarray | None = None  # float32 per token (markup 1), None when no message has one

    def tokens(self) -> Tokens:
        return Tokens(self.codes, self.turns, self.classes, self.bounds, self.token_message_weights)


def encode_raw(convs: Sequence[Conversation], tokenizer, settings: EncodeSettings, first_index: int = 0,
               collect_errors: bool = False) -> RawBatch:
    """Render, tokenise (one batched call per add-special-tokens mode) and truncate `convs`; no objective involved.

    A bad record raises its `InputError`, or with `collect_errors` is returned in `errors` (a worker process of the
    encode cache hands errors back as data rather than raising them through a process pool).
    """
    n = len(convs)
    errors: list = []
    rendered: list[Rendered | None] = []
    for k, c in enumerate(convs):
        try:
            rendered.append(_render_checked(c, tokenizer, settings.template))
        except InputError as e:
            if not collect_errors:
                raise
            errors.append((k, e))
            rendered.append(None)
    ok = [k for k in range(n) if rendered[k] is not None]
    tb = tokenize_mixed(tokenizer, [rendered[k].text for k in ok], [rendered[k].add_special_tokens for k in ok])
    codes, turns = batch_token_segments([rendered[k] for k in ok], tb)
    special = np.zeros(n, dtype=bool)
    for j, pos in _special_in_content(tb, codes, _special_ids(tokenizer)):
        k = ok[j]
        if settings.allow_special_tokens_in_content:
            special[k] = True
            continue
        e = _special_token_error(convs[k], first_index + k, tokenizer.convert_ids_to_tokens(int(tb.ids[pos])),
                                 int(turns[pos]))
        if not collect_errors:
            raise e
        errors.append((k, e))
    n_ok = np.zeros(n, dtype=np.int64)
    n_ok[ok] = np.diff(tb.bounds)
    bounds = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(n_ok, out=bounds[1:])
    last = np.asarray([max((i for i, m in enumerate(c.messages) if m.role == "assistant"), default=-1)
                       for c in convs], dtype=np.int32)
    classes = _classes(codes, turns, np.repeat(last, n_ok))
    raw = _truncate(tb.ids, codes, turns, classes, bounds, settings)
    raw.special = special
    raw.errors = sorted(errors, key=lambda t: t[0])
    raw.message_weights = [message_weights(c) for c in convs]
    raw.token_message_weights = token_message_weights(raw.message_weights, raw.codes, raw.turns, raw.bounds)
    return raw


def message_weights(conv: Conversation) -> np.ndarray:
    """The `weight` of each message as float32 (absent: 1), or an empty array when no message carries one."""
    if all(m.weight is None for m in conv.messages):
        return np.zeros(0, np.float32)
    return np.asarray([1.0 if m.weight is None else m.weight for m in conv.messages], dtype=np.float32)


def token_message_weights(per_example: list, codes: np.ndarray, turns: np.ndarray,
                          bounds: np.ndarray) -> np.ndarray | None:
    """Each token's message weight: content and end-of-turn tokens take their message's, markup 1. None when no
    example has message weights (the common case costs nothing)."""
    if not any(len(m) for m in per_example):
        return None
    table = [m if len(m) else np.zeros(0, np.float32) for m in per_example]
    offsets = np.zeros(len(table) + 1, dtype=np.int64)
    np.cumsum([len(m) for m in table], out=offsets[1:])
    flat = np.concatenate([*table, np.ones(1, np.float32)])  # the last entry: weight 1
    example = np.repeat(np.arange(len(table), dtype=np.int64), np.diff(bounds))
    weighted = (turns >= 0) & (codes != TEMPLATE) & (np.diff(offsets)[example] > 0)
    idx = np.where(weighted, offsets[example] + np.maximum(turns, 0), len(flat) - 1)
    return flat[idx]


def tokenize_mixed(tokenizer, texts: list[str], add_special: list[bool]) -> TokenBatch:
    """`tokenize_batch` for texts that differ in whether the tokenizer adds its special tokens, in input order."""
    if not texts:
        return TokenBatch(np.zeros(0, np.int64), np.zeros((0, 2), np.int64), np.zeros(1, np.int64))
    modes = sorted(set(add_special))
    if len(modes) <= 1:
        return tokenize_batch(tokenizer, texts, bool(modes[0]) if modes else False)
    parts = {m: tokenize_batch(tokenizer, [t for t, a in zip(texts, add_special, strict=True) if a == m], m)
             for m in modes}
    seen = dict.fromkeys(modes, 0)
    ids, offs, lens = [], [], []
    for a in add_special:
        tb, i = parts[a], seen[a]
        seen[a] += 1
        ids.append(tb.ids[tb.bounds[i]:tb.bounds[i + 1]])
        offs.append(tb.offsets[tb.bounds[i]:tb.bounds[i + 1]])
        lens.append(len(ids[-1]))
    bounds = np.zeros(len(texts) + 1, dtype=np.int64)
    np.cumsum(lens, out=bounds[1:])
    return TokenBatch(np.concatenate(ids), np.concatenate(offs).reshape(-1, 2), bounds)


def _classes(codes: np.ndarray, turns: np.ndarray, last: np.ndarray) -> np.ndarray:
    reply = (codes == ASSISTANT) | (codes == EOS)
    cls = np.where(codes == TEMPLATE, CLASS_TEMPLATE, CLASS_PROMPT).astype(np.int8)
    cls[reply] = np.where(turns[reply] == last[reply], CLASS_REPLY, CLASS_EARLIER_REPLY)
    return cls


def _counts(values: np.ndarray, bounds: np.ndarray, n_values: int, skip_first: bool) -> np.ndarray:
    """(n_examples, n_values): how many tokens of each example have each value."""
    n = len(bounds) - 1
    example = np.repeat(np.arange(n, dtype=np.int64), np.diff(bounds))
    keep = np.ones(len(values), dtype=bool)
    if skip_first:
        keep[bounds[:-1][np.diff(bounds) > 0]] = False
    flat = example[keep] * n_values + values[keep].astype(np.int64)
    return np.bincount(flat, minlength=n * n_values).reshape(n, n_values).astype(np.int32)


def _truncate(ids, codes, turns, classes, bounds, settings: EncodeSettings) -> RawBatch:
    n_full = np.diff(bounds)
    start, end = bounds[:-1].copy(), bounds[1:].copy()
    cut = np.zeros(len(n_full), dtype=bool)
    if settings.max_length is not None:
        cut = n_full > settings.max_length
        if settings.truncation_side == "right":
            end = np.where(cut, start + settings.max_length, end)
        else:
            start = np.where(cut, end - settings.max_length, start)
    lens = end - start
    new_bounds = np.zeros(len(lens) + 1, dtype=np.int64)
    np.cumsum(lens, out=new_bounds[1:])
    take = np.repeat(start - new_bounds[:-1], lens) + np.arange(int(new_bounds[-1]), dtype=np.int64)
    t_cls = classes[take]
    return RawBatch(ids[take], codes[take], turns[take], t_cls, new_bounds, n_full, cut,
                    _counts(classes, bounds, N_CLASSES, True), _counts(t_cls, new_bounds, N_CLASSES, True),
                    _counts(codes, bounds, len(SEGMENTS), False), np.zeros(len(lens), dtype=bool), [])


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


def _any_weight(weights: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """For each [start, end) range of `weights`: does it hold a positive weight?"""
    has_w = np.zeros(len(weights) + 1, dtype=np.int64)
    np.cumsum(weights > 0, out=has_w[1:])
    return (has_w[end] - has_w[start]) > 0
