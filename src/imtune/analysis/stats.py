"""Dataset statistics that matter for choosing IT vs IM: instruction vs output token lengths and their ratio."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from imtune.config import DEFAULT_MAX_LENGTH, DEFAULT_TEMPLATE
from imtune.masking.encoding import encode
from imtune.masking.templates import ASSISTANT, SYSTEM, TEMPLATE, USER
from imtune.records.conversation import Conversation


def _dist(x: np.ndarray) -> dict:
    if x.size == 0:
        return {"mean": 0.0, "median": 0.0, "p95": 0.0, "max": 0, "total": 0}
    return {"mean": round(float(x.mean()), 2), "median": float(np.median(x)), "p95": float(np.percentile(x, 95)),
            "max": int(x.max()), "total": int(x.sum())}


def dataset_stats(records: Sequence[Conversation], tokenizer, template: str | None = DEFAULT_TEMPLATE,
                  max_length: int | None = DEFAULT_MAX_LENGTH) -> dict:
    """Token-level statistics of one tokenisation of every example (template included, no truncation)."""
    enc = encode(records, tokenizer, objective="im-all", template=template, max_length=None, keep_empty=True)
    instr, out, total, markup = (np.zeros(len(enc), np.int64) for _ in range(4))
    for i, e in enumerate(enc):
        c = e.segment_codes
        instr[i] = int(np.count_nonzero((c == USER) | (c == SYSTEM)))
        out[i] = int(np.count_nonzero(c == ASSISTANT))
        markup[i] = int(np.count_nonzero(c == TEMPLATE))
        total[i] = len(e)
    turns = np.asarray([r.n_turns for r in records], dtype=np.int64)
    with np.errstate(divide="ignore", invalid="ignore"):
        per_ex_ratio = np.where(out > 0, instr / np.maximum(out, 1), np.nan)
    stats = {
        "examples": len(records),
        "turns": {"total": int(turns.sum()), "mean": round(float(turns.mean()), 3),
                  "multi_turn_examples": int((turns > 1).sum())},
        "instruction_tokens": _dist(instr),
        "output_tokens": _dist(out),
        "template_tokens": _dist(markup),
        "total_tokens": _dist(total),
        # The paper's key factor: average instruction length over average output length.
        "instruction_output_ratio": round(float(instr.mean() / max(out.mean(), 1e-9)), 4) if len(enc) else 0.0,
        "median_example_ratio": round(float(np.nanmedian(per_ex_ratio)), 4) if len(enc) else 0.0,
        "template": template,
    }
    if max_length is not None:
        stats["truncation"] = truncation_effect(records, tokenizer, template, max_length, total)
    return stats


def truncation_effect(records, tokenizer, template, max_length: int, totals: np.ndarray | None = None) -> dict:
    """How many examples `max_length` would cut, and how many would be dropped (no weighted token left)."""
    if totals is None:
        totals = np.asarray([len(e) for e in encode(records, tokenizer, "im-all", template, None, keep_empty=True)])
    cut = int((totals > max_length).sum())
    dropped = {}
    for obj in ("it", "im"):
        if cut == 0:
            dropped[obj] = 0
            continue
        long_recs = [r for r, n in zip(records, totals, strict=True) if n > max_length]
        kept = encode(long_recs, tokenizer, obj, template, max_length)
        dropped[obj] = len(long_recs) - len(kept)
    return {"max_length": max_length, "truncated": cut, "dropped_it": dropped["it"], "dropped_im": dropped["im"]}
