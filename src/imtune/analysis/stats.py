"""Dataset statistics that matter for choosing IT vs IM: instruction vs output token lengths and their ratio."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from imtune.config import DEFAULT_MAX_LENGTH, DEFAULT_TEMPLATE
from imtune.masking.encoding import N_CLASSES, EncodeSettings, class_weights, encode_raw
from imtune.masking.templates import ASSISTANT, SEGMENTS, SYSTEM, TEMPLATE, USER
from imtune.records.conversation import Conversation


def _dist(x: np.ndarray) -> dict:
    if x.size == 0:
        return {"mean": 0.0, "median": 0.0, "p95": 0.0, "max": 0, "total": 0}
    return {"mean": round(float(x.mean()), 2), "median": float(np.median(x)), "p95": float(np.percentile(x, 95)),
            "max": int(x.max()), "total": int(x.sum())}


def dataset_stats(records: Sequence[Conversation], tokenizer, template: str | None = DEFAULT_TEMPLATE,
                  max_length: int | None = DEFAULT_MAX_LENGTH, cache: bool = False, cache_dir: str | None = None,
                  num_proc: int | None = None) -> dict:
    """Token-level statistics of one tokenisation of every example (template included, no truncation).

    Computed from per-example segment counts, not tokens: with `cache` those of the encode cache (built once, the
    same cache `imtune train` uses with this template and max length), else encoded in memory by the same encoder.
    """
    col = _columns(records, tokenizer, template, max_length, cache, cache_dir, num_proc)
    seg = col["segment"].astype(np.int64)
    instr, out, markup = seg[:, SYSTEM] + seg[:, USER], seg[:, ASSISTANT], seg[:, TEMPLATE]
    total = col["n_full"].astype(np.int64)
    turns = col["n_turns"].astype(np.int64)
    n = len(total)
    with np.errstate(divide="ignore", invalid="ignore"):
        per_ex_ratio = np.where(out > 0, instr / np.maximum(out, 1), np.nan)
    stats = {
        "examples": n,
        "turns": {"total": int(turns.sum()), "mean": round(float(turns.mean()), 3) if n else 0.0,
                  "multi_turn_examples": int((turns > 1).sum())},
        "instruction_tokens": _dist(instr),
        "output_tokens": _dist(out),
        "template_tokens": _dist(markup),
        "total_tokens": _dist(total),
        # The paper's key factor: average instruction length over average output length.
        "instruction_output_ratio": round(float(instr.mean() / max(out.mean(), 1e-9)), 4) if n else 0.0,
        "median_example_ratio": round(float(np.nanmedian(per_ex_ratio)), 4) if n else 0.0,
        "template": template,
    }
    if max_length is not None:
        stats["truncation"] = _truncation(col, max_length)
    if col.get("message_weights") is not None:
        stats["message_weights"] = col["message_weights"]
    if col.get("cache"):
        stats["encode_cache"] = col["cache"]
    return stats


def _columns(records, tokenizer, template, max_length, cache: bool, cache_dir, num_proc) -> dict:
    """Per-example arrays: segment counts and length before truncation, turns, weight-class counts after it."""
    settings = EncodeSettings.of(tokenizer, template, max_length)
    if cache:
        from imtune.masking.encode_cache import encode_cached, records_table

        if hasattr(records, "dataset"):  # a records.sources.ConversationTable
            ds, fp, name = records.dataset, records.fingerprint, records.name
        else:
            (ds, fp), name = records_table(records, "data"), "data"
        if ds is not None:
            c = encode_cached(ds, fp, name, tokenizer, settings, root=cache_dir, num_proc=num_proc)
            return {"segment": c.counts["segment"], "window": c.counts["window"], "n_full": c.col["n_full"],
                    "n_turns": c.col["n_turns"], "cache": str(c.path), "message_weights": _cache_weights(c)}
    records = list(records)
    parts = [encode_raw(records[b:b + 512], tokenizer, settings, first_index=b) for b in range(0, len(records), 512)]
    per_message = [m for p in parts for m in p.message_weights]
    zero = sum(int((p.token_message_weights == 0).sum()) for p in parts if p.token_message_weights is not None)
    return {"segment": _stack([p.segment_counts for p in parts], len(SEGMENTS)),
            "window": _stack([p.window_counts for p in parts], N_CLASSES),
            "n_full": np.concatenate([p.n_full for p in parts]) if parts else np.zeros(0, np.int64),
            "n_turns": np.asarray([r.n_turns for r in records], dtype=np.int64),
            "message_weights": _weight_summary(per_message, zero)}


def _cache_weights(cache) -> dict | None:
    if not cache.weighted:
        return None
    per_message = [np.asarray(m, np.float32) for m in cache.table.column("message_weights").to_pylist()]
    zero = 0
    for a in range(0, len(cache), 4096):
        t = cache.tokens(np.arange(a, min(a + 4096, len(cache))))
        zero += int((t.message_weights == 0).sum()) if t.message_weights is not None else 0
    return _weight_summary(per_message, zero)


def _weight_summary(per_example: list, zero_tokens: int) -> dict | None:
    """What the data's per-message `weight`s do: examples and messages weighted (weight != 1), messages at 0, and
    the tokens (within max_length) that weight 0 takes out of training. None when no message has a weight."""
    given = [m for m in per_example if len(m)]
    if not given:
        return None
    flat = np.concatenate(given)
    return {"examples_with_weights": len(given), "messages_weighted": int((flat != 1).sum()),
            "messages_weight_zero": int((flat == 0).sum()), "tokens_weight_zero": zero_tokens}


def _stack(arrays, width: int) -> np.ndarray:
    return np.concatenate(arrays) if arrays else np.zeros((0, width), np.int64)


def _truncation(col: dict, max_length: int) -> dict:
    """How many examples `max_length` cuts, and how many of those it drops (no weighted token left)."""
    cut = col["n_full"] > max_length
    dropped = {obj: int((cut & ~(col["window"][:, class_weights(obj) > 0] > 0).any(axis=1)).sum())
               for obj in ("it", "im")}
    return {"max_length": max_length, "truncated": int(cut.sum()), "dropped_it": dropped["it"],
            "dropped_im": dropped["im"]}
