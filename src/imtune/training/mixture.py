"""Training data from several sources, each with its own sample size and objective (a YAML `data:` list).

Each source is loaded, split and encoded exactly as a single `--data` is (`training.data`: its own conversation
table and encode cache), sampled to its `n` or `fraction` (deterministically by --seed), and weighted under its own
`objective` (default: the run's). The sources' encoded sets are then concatenated into one `EncodedSet`, so the
plan groups lengths across all of them and the step normaliser (the total weight of a step's micro-batches) is
exact whatever source each example came from. Held-out data (val_fraction, per source) is scored under `it` as
always. The fingerprint that a resumed run checks covers every source's data and its n / fraction / objective.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from imtune.config import DEFAULT_DATA_SPLIT, TrainConfig
from imtune.errors import ImtuneError


@dataclass
class Part:
    """One source's training (and held-out) records, as `training.data.load_sets` gives them, with its config."""

    cfg: TrainConfig  # the run's config with data / objective / split... of this source
    train: object  # a list of Conversations, or a ConversationTable
    val: object


def is_mixture(cfg: TrainConfig) -> bool:
    return isinstance(cfg.data, list)


def source_config(cfg: TrainConfig, src: dict) -> TrainConfig:
    return cfg.replace(data=src["path"], data_split=src.get("split") or DEFAULT_DATA_SPLIT,
                       data_config=src.get("config"), data_revision=src.get("revision"),
                       objective=src.get("objective") or cfg.objective, val_fraction=0.0, val_data=None)


def load_parts(cfg: TrainConfig, note: Callable[[str], None], main_first=contextlib.nullcontext):
    """([Part per source], None, fingerprint of all of them): each source loaded as a single --data is, then
    held out (val_fraction) and sampled (n / fraction)."""
    from imtune.records.split import holdout_split, n_heldout
    from imtune.training.data import load_sets

    parts, prints = [], []
    for k, src in enumerate(cfg.data):
        sub = source_config(cfg, src)
        train, _, fp = load_sets(sub, note, main_first)
        rows = list(range(len(train.dataset) if hasattr(train, "dataset") else len(train)))
        n_val = n_heldout(len(rows), cfg.val_fraction) if cfg.val_fraction else 0
        n = src.get("n") or (max(1, round(src["fraction"] * (len(rows) - n_val))) if "fraction" in src else None)
        if n is not None and n > len(rows) - n_val:
            raise ImtuneError(f"data[{k}] {src['path']}: n {n} is more than its {len(rows) - n_val} training records")
        rest, held = holdout_split(rows, n_val, cfg.seed, n_train=n, source=f"data[{k}] {src['path']}")
        tag = f"n {n} val_fraction {cfg.val_fraction!r} seed {cfg.seed}"
        parts.append(Part(sub, _rows(train, rest, f"train, {tag}"), _rows(train, held, f"held out, {tag}")))
        prints.append([fp, src.get("n"), src.get("fraction"), sub.objective, cfg.val_fraction])
    fingerprint = hashlib.blake2b(json.dumps(prints).encode(), digest_size=16).hexdigest()
    val = None
    if cfg.val_data:  # read as a plain --val-data is (its default split)
        val = load_sets(cfg.replace(data=cfg.val_data, data_split=DEFAULT_DATA_SPLIT, data_config=None,
                                    data_revision=None, val_fraction=0.0, val_data=None), note, main_first)[0]
    return parts, val, fingerprint


def _rows(train, rows: list[int], tag: str):
    from imtune.training.data import _subset

    if hasattr(train, "dataset"):
        return _subset(train, rows, tag) if rows else None
    return [train[i] for i in rows]


def encode_parts(cfg: TrainConfig, tokenizer, parts: list[Part], main_first, report, val_data=None) -> tuple:
    """(training set, held-out set or None, data summary, notes): every source encoded under its own objective
    and concatenated (see the module doc); `val_data`: the records of --val-data, if given."""
    from imtune.training.data import _encode_one, encode_notes

    train, val, notes, summary = [], [], [], {"sources": []}
    totals = dict.fromkeys(("truncated", "dropped_no_weight", "dropped_by_truncation", "ending_on_user_turn",
                            "special_token_text_in_content"), 0)
    for k, p in enumerate(parts):
        name = f"data[{k}] {p.cfg.data}"
        enc, rep, where = _encode_one(p.cfg, tokenizer, p.train, p.cfg.objective, name, main_first, report)
        if not len(enc):  # as a single --data with nothing to train is refused: the source was asked for
            raise ImtuneError(f"{name}: no example has a token with non-zero weight under objective {p.cfg.objective}")
        train.append(enc)
        for key, v in (("truncated", rep.n_truncated), ("dropped_no_weight", rep.n_dropped),
                       ("dropped_by_truncation", len(rep.truncated_to_nothing)),
                       ("ending_on_user_turn", len(rep.trailing_user)),
                       ("special_token_text_in_content", len(rep.special_in_content))):
            totals[key] += v
        notes += [f"{name}: {line}" for line in encode_notes(p.cfg, rep)]
        summary["sources"].append({"path": p.cfg.data, "objective": p.cfg.objective, "examples": len(enc),
                                   "weighted_tokens": int(enc.n_weighted.sum()),
                                   **({"encode_cache": where} if where else {})})
        if p.val is not None and len(p.val.dataset if hasattr(p.val, "dataset") else p.val):
            v, _, _ = _encode_one(p.cfg, tokenizer, p.val, "it", f"{name} (held out)", main_first, report)
            val.append(v)
    if val_data is not None:
        val.append(_encode_one(cfg, tokenizer, val_data, "it", cfg.val_data, main_first, report)[0])
    notes.insert(0, "sources: " + "; ".join(f"data[{k}] {s['path']}: {s['examples']} example(s) under {s['objective']}"
                                             for k, s in enumerate(summary["sources"])))
    data = concat(train)
    if not len(data):
        raise ImtuneError(f"{', '.join(cfg.data_paths())}: no example has a token with non-zero weight")
    held = concat(val) if val and sum(len(v) for v in val) else None
    summary.update({"train_examples": len(data), **totals, **({"val_examples": len(held)} if held else {}),
                    "train_tokens": int(data.lengths.sum()), "weighted_tokens": int(data.n_weighted.sum())})
    return data, held, summary, notes


def concat(sets: list):
    """One `EncodedSet` over several: positions run through the sets in order; `take` asks each set for its own."""
    from imtune.training.data import EncodedSet

    offsets = np.zeros(len(sets) + 1, dtype=np.int64)
    np.cumsum([len(s) for s in sets], out=offsets[1:])

    def take(idx):
        idx = np.asarray(idx, dtype=np.int64)
        which = np.searchsorted(offsets, idx, side="right") - 1
        out = [None] * len(idx)
        for s in np.unique(which).tolist():
            pos = np.flatnonzero(which == s)
            for p, e in zip(pos.tolist(), sets[s].take((idx[pos] - offsets[s]).tolist()), strict=True):
                out[p] = e
        return out

    return EncodedSet(np.concatenate([s.lengths for s in sets]), np.concatenate([s.weight_sums for s in sets]),
                      np.concatenate([s.n_weighted for s in sets]), take)
