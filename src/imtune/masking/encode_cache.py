"""The encode cache: every example encoded once into memory-mapped Arrow files, for any objective.

The encoder (`encoding.encode_raw`, the same one `encode_with_report` runs) runs as a batched `datasets.map` over a
table of conversations (columns id, row, messages, optionally source), `num_proc` processes. What it stores does not
depend on the objective: token ids, segment codes, message indices and weight classes per token (after truncation),
and per example the full length, whether it was truncated, and token counts per weight class before and after
truncation. An objective is a weight per class (`encoding.class_weights`), so a run's drop rule, weight sums and
weighted-token counts come from those count columns without reading a token, and weights are made for the rows of a
micro-batch only (`EncodeCache.take`).

Location: `<root>/<key>/`, root = `encode_cache_dir`, else $IMTUNE_ENCODE_CACHE, else $HF_HOME/imtune/encoded. The
key hashes the data fingerprint, the tokenizer (its whole serialised model, special tokens, chat template), the
encode settings and `ENCODER_VERSION`. A build writes into a temporary directory next to it and renames it into
place after its marker file, so a killed or failed build leaves nothing a later run trusts.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import uuid
from pathlib import Path

import numpy as np

from imtune.errors import ImtuneError, InputError
from imtune.io_utils import children_die_with_us, remove_dead_builds
from imtune.masking.encoding import (
    N_CLASSES,
    Encoded,
    EncodeReport,
    EncodeSettings,
    RawBatch,
    encode_raw,
    had_weight,
    token_message_weights,
)
from imtune.masking.objectives import Objective, Tokens, parse_objective, weights
from imtune.masking.templates import SEGMENTS
from imtune.records.conversation import Conversation
from imtune.records.sources import quiet_datasets

ENCODER_VERSION = "1"  # bump when encode_raw's output for the same inputs changes
CACHE_ENV = "IMTUNE_ENCODE_CACHE"
MARKER = "imtune_encoded.json"
TOKEN_COLUMNS = ("input_ids", "segment_codes", "turns", "classes")
TMP_PATTERN = r"\.tmp-[0-9a-f]{32}-(\d+)-[0-9a-f]{8}"  # a build's directory: .tmp-<key>-<pid>-<random>
COUNTS = {"window": N_CLASSES, "full": N_CLASSES, "segment": len(SEGMENTS)}  # per-example count columns


def _features():
    from datasets import Features, List, Value

    cols = {"id": Value("string"), "input_ids": List(Value("int32")), "segment_codes": List(Value("int8")),
            "turns": List(Value("int32")), "classes": List(Value("int8")), "n_full": Value("int32"),
            "truncated": Value("bool"), "special": Value("bool"), "trailing_user": Value("bool"),
            "n_turns": Value("int32"), "error": Value("string"), "message_weights": List(Value("float32"))}
    for name, k in COUNTS.items():
        cols.update({f"{name}_{j}": Value("int32") for j in range(k)})
    return Features(cols)


def cache_root(override: str | os.PathLike | None = None) -> Path:
    if override:
        return Path(override)
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    from huggingface_hub import constants

    return Path(constants.HF_HOME) / "imtune" / "encoded"


def tables_dir(override: str | os.PathLike | None = None) -> Path | None:
    """Where conversation tables go: beside an overridden encode cache (tests, a scratch disk), else None (the
    records stage's default, in the HF datasets cache)."""
    return cache_root(override) / "conversations" if override or os.environ.get(CACHE_ENV) else None


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of what tokenisation depends on: the serialised fast tokenizer, special tokens and chat template."""
    h = hashlib.blake2b(digest_size=16)
    h.update(tokenizer.backend_tokenizer.to_str().encode())
    extra = {"class": type(tokenizer).__name__, "special": tokenizer.special_tokens_map,
             "special_ids": sorted(getattr(tokenizer, "all_special_ids", []) or []),
             "added": {int(i): [str(t), bool(getattr(t, "special", False))]
                       for i, t in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items()},
             "chat_template": getattr(tokenizer, "chat_template", None),
             "bos": getattr(tokenizer, "add_bos_token", None), "eos": getattr(tokenizer, "add_eos_token", None)}
    h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return h.hexdigest()


def cache_key(data_fingerprint: str, tokenizer, settings: EncodeSettings, message_weights: bool = False) -> str:
    """Data with per-message weights gets its own key (the weights are in the data's fingerprint too); data without
    any keeps the key it had before message weights existed."""
    parts = {"data": data_fingerprint, "tokenizer": tokenizer_fingerprint(tokenizer), "template": settings.template,
             "max_length": settings.max_length, "truncation_side": settings.truncation_side,
             "allow_special": settings.allow_special_tokens_in_content, "version": ENCODER_VERSION}
    if message_weights:
        parts["message_weights"] = 1
    return hashlib.blake2b(json.dumps(parts, sort_keys=True).encode(), digest_size=16).hexdigest()


def records_table(records, name: str):
    """(datasets.Dataset, fingerprint) of in-memory `Conversation`s, in the columns a conversation table has."""
    from datasets import Dataset

    from imtune.records.sources import features

    h = hashlib.blake2b(digest_size=16)
    rows = []
    for i, c in enumerate(records):
        r = {"id": str(c.id), "row": i, "source": c.source, "messages": [m.to_dict() for m in c.messages]}
        h.update(json.dumps(r, ensure_ascii=False).encode())  # a message's weight enters only where it has one
        rows.append(r)
    if not rows:
        return None, h.hexdigest()
    feats = features()
    feats["source"] = feats["id"]
    return Dataset.from_list(rows, features=feats), h.hexdigest()


def has_message_weights(dataset) -> bool:
    """Does any message of a conversation table carry a `weight`?"""
    import pyarrow.compute as pc

    inner = getattr(dataset.features.get("messages"), "feature", None)
    if not isinstance(inner, dict) or "weight" not in inner:
        return False
    w = pc.struct_field(pc.list_flatten(dataset.data.table.column("messages")), "weight")
    return bool(pc.any(pc.is_valid(w)).as_py())


def _conversations(batch: dict, name: str, row_kind: str) -> list[Conversation]:
    """A table's rows as `Conversation`s whose `source` names them as the loader does ("file:line", "x: record r")."""
    sources = batch.get("source") or [""] * len(batch["id"])
    where = "{}:{}" if row_kind == "line" else "{}: record {}"
    return [Conversation.from_messages(m, id=i or "", source=s or where.format(name, r))
            for m, i, s, r in zip(batch["messages"], batch["id"], sources, batch["row"], strict=True)]


def _encode_batch(batch: dict, indices: list[int], tokenizer, settings: EncodeSettings, name: str, row_kind: str):
    import pyarrow as pa

    convs = _conversations(batch, name, row_kind)
    raw = encode_raw(convs, tokenizer, settings, first_index=indices[0] if indices else 0, collect_errors=True)
    err = [""] * len(convs)
    for k, e in raw.errors:
        err[k] = json.dumps([e.path, e.reason, e.line, e.record])
    off = pa.array(raw.bounds.astype(np.int32))
    cols = {"id": pa.array([c.id for c in convs], pa.string())}
    for col, arr, t in (("input_ids", raw.ids, np.int32), ("segment_codes", raw.codes, np.int8),
                        ("turns", raw.turns, np.int32), ("classes", raw.classes, np.int8)):
        cols[col] = pa.ListArray.from_arrays(off, pa.array(arr.astype(t)))
    cols.update(n_full=pa.array(raw.n_full.astype(np.int32)), truncated=pa.array(raw.truncated),
                special=pa.array(raw.special),
                trailing_user=pa.array([bool(c.messages) and c.messages[-1].role == "user" for c in convs]),
                n_turns=pa.array(np.asarray([c.n_turns for c in convs], dtype=np.int32)), error=pa.array(err),
                message_weights=pa.array([m.tolist() for m in raw.message_weights], pa.list_(pa.float32())))
    for cname, counts in (("window", raw.window_counts), ("full", raw.full_counts), ("segment", raw.segment_counts)):
        for j in range(counts.shape[1]):
            cols[f"{cname}_{j}"] = pa.array(counts[:, j].astype(np.int32))
    return pa.table(cols)


def default_num_proc(n_rows: int, batch_size: int) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, math.ceil(n_rows / max(1, batch_size))))


def encode_cached(dataset, fingerprint: str, name: str, tokenizer, settings: EncodeSettings, *,
                  root: str | os.PathLike | None = None, num_proc: int | None = None,
                  batch_size: int = 1000, row_kind: str = "record") -> EncodeCache:
    """Open the cache of (data, tokenizer, settings), building it first if absent. See the module doc."""
    weighted = has_message_weights(dataset)
    key = cache_key(fingerprint, tokenizer, settings, weighted)
    final = cache_root(root) / key
    if (final / MARKER).is_file():
        return EncodeCache.open(final, hit=True)
    if final.exists():
        raise ImtuneError(f"{final}: an encode cache directory without its marker {MARKER} (not written by this "
                          "imtune, or damaged); remove it")
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_builds(final.parent, TMP_PATTERN)
    tmp = final.parent / f".tmp-{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        with quiet_datasets():
            _build(dataset, tmp, key, fingerprint, {"tokenizer": tokenizer, "settings": settings, "name": name,
                                                    "row_kind": row_kind}, num_proc, batch_size, weighted)
        try:
            os.replace(tmp, final)
        except OSError:  # another process finished the same cache first: use theirs
            if not (final / MARKER).is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return EncodeCache.open(final, hit=False)


def _build(dataset, tmp: Path, key, fingerprint, kwargs: dict, num_proc, batch_size, weighted: bool) -> None:
    n_proc = num_proc or default_num_proc(len(dataset), batch_size)
    with children_die_with_us():  # a killed imtune leaves no worker behind
        out = dataset.map(_encode_batch, batched=True, batch_size=batch_size, with_indices=True,
                          num_proc=n_proc if n_proc > 1 else None, remove_columns=dataset.column_names,
                          features=_features(), fn_kwargs=kwargs,
                          cache_file_name=str(tmp / "encoded.arrow"), new_fingerprint=key,
                          load_from_cache_file=False, desc=f"encoding {kwargs['name']}")
    _raise_first_error(out)
    shards = [Path(f["filename"]).name for f in out.cache_files]
    meta = {"version": ENCODER_VERSION, "key": key, "name": kwargs["name"], "data_fingerprint": fingerprint,
            "rows": len(out), "shards": shards, "settings": kwargs["settings"].__dict__, "message_weights": weighted}
    del out
    (tmp / MARKER).write_text(json.dumps(meta, indent=1))  # last: a directory without it is not a cache


def _raise_first_error(out) -> None:
    import pyarrow.compute as pc

    errors = out.data.table.column("error")
    bad = pc.indices_nonzero(pc.not_equal(errors, ""))
    if len(bad):
        path, reason, line, record = json.loads(errors[bad[0].as_py()].as_py())
        raise InputError(path, reason, line=line, record=record)


class EncodeCache:
    """An opened cache: memory-mapped Arrow rows plus its per-example columns as numpy arrays."""

    def __init__(self, path: Path, dataset, hit: bool, meta: dict):
        self.path, self.dataset, self.hit, self.meta = path, dataset, hit, meta
        self.max_length = meta["settings"]["max_length"]
        self.table = dataset.data.table
        cols = ["n_full", "truncated", "special", "trailing_user", "n_turns"]
        self.col = {c: self.table.column(c).to_numpy() for c in cols}
        self.col["length"] = np.minimum(self.col["n_full"], self.max_length or np.iinfo(np.int32).max)
        self.counts = {name: np.stack([self.table.column(f"{name}_{j}").to_numpy() for j in range(k)], axis=1)
                       for name, k in COUNTS.items()}

    @classmethod
    def open(cls, path: Path, hit: bool) -> EncodeCache:
        from datasets import Dataset, concatenate_datasets

        meta = json.loads((path / MARKER).read_text())
        if meta.get("version") != ENCODER_VERSION:
            raise ImtuneError(f"{path}: encode cache of encoder version {meta.get('version')}, not "
                              f"{ENCODER_VERSION}; remove it")
        parts = [Dataset.from_file(str(path / s)) for s in meta["shards"]]
        return cls(path, parts[0] if len(parts) == 1 else concatenate_datasets(parts), hit, meta)

    def __len__(self) -> int:
        return len(self.col["n_full"])

    def ids(self, rows) -> list[str]:
        return self.table.column("id").take(np.asarray(rows, dtype=np.int64)).to_pylist()

    def report(self, objective, keep_empty: bool = False) -> tuple[np.ndarray, EncodeReport]:
        """(rows kept under `objective`, in order; the `EncodeReport` that `encode_with_report` gives)."""
        obj = parse_objective(objective)
        cw = None if self.weighted else obj.class_weights()
        if cw is not None:
            any_w = (self.counts["window"][:, cw > 0] > 0).any(axis=1)
        else:
            any_w = self._scan(obj)[1] > 0
        had_w = had_weight(obj, self.counts["full"], self.col["truncated"])
        kept = np.arange(len(self)) if keep_empty else np.flatnonzero(any_w)
        dropped = np.zeros(0, np.int64) if keep_empty else np.flatnonzero(~any_w)
        rep = EncodeReport(n_input=len(self), n_kept=len(kept), n_truncated=int(self.col["truncated"].sum()),
                           dropped_no_weight=self.ids(dropped),
                           truncated_to_nothing=self.ids(dropped[had_w[dropped]]),
                           trailing_user=self.ids(np.flatnonzero(self.col["trailing_user"])),
                           special_in_content=self.ids(np.flatnonzero(self.col["special"])))
        return kept, rep

    @property
    def weighted(self) -> bool:
        """Does the data carry per-message weights? (Then weights are counted from the tokens, not the classes.)"""
        return bool(self.meta.get("message_weights"))

    def totals(self, rows: np.ndarray, objective) -> tuple[np.ndarray, np.ndarray]:
        """(weight sum as float64, number of tokens with weight > 0) of each of `rows` under `objective`."""
        obj = parse_objective(objective)
        cw = None if self.weighted else obj.class_weights()
        if cw is None:
            sums, n_weighted = self._scan(obj)
            return sums[rows], n_weighted[rows]
        cw = cw.astype(np.float64)
        win = self.counts["window"][rows].astype(np.int64)
        n_weighted = win[:, cw > 0].sum(axis=1)
        # Each count x weight is exact in float64; summing them groups equal weights first so that with at most two
        # distinct non-zero weights a single rounding gives what math.fsum of the per-token weights gives.
        values = sorted({float(v) for v in cw if v > 0})
        parts = [win[:, cw == v].sum(axis=1) * v for v in values]
        if len(parts) <= 2:
            sums = np.sum(parts, axis=0) if parts else np.zeros(len(rows))
        else:
            sums = np.asarray([math.fsum(x) for x in zip(*(p.tolist() for p in parts), strict=True)])
        return np.asarray(sums, dtype=np.float64), n_weighted

    def _scan(self, obj: Objective, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
        """(math.fsum of the weights, weighted tokens) of every row, from the tokens: for objectives that are not a
        weight per class, and for data with message weights. Once per objective per opened cache."""
        memo = self.__dict__.setdefault("_scans", {})
        if obj.spec not in memo:
            sums, counts = np.zeros(len(self)), np.zeros(len(self), dtype=np.int64)
            for a in range(0, len(self), chunk):
                t = self.tokens(np.arange(a, min(a + chunk, len(self))))
                w = weights(obj, t)
                for k in range(len(t.bounds) - 1):
                    part = w[t.bounds[k]:t.bounds[k + 1]]
                    sums[a + k], counts[a + k] = math.fsum(part.tolist()), int((part > 0).sum())
            memo[obj.spec] = (sums, counts)
        return memo[obj.spec]

    def tokens(self, rows) -> Tokens:
        """The objective-independent token columns of `rows` (what an objective sees)."""
        return self._tokens(rows)[0]

    def _tokens(self, rows) -> tuple[Tokens, object]:
        """The objective-independent token columns of `rows`, and the taken Arrow rows."""
        import pyarrow.compute as pc

        sub = self.table.take(np.asarray(rows, dtype=np.int64))
        lens = pc.list_value_length(sub.column("classes")).to_numpy(zero_copy_only=False).astype(np.int64)
        bounds = np.zeros(len(lens) + 1, dtype=np.int64)
        np.cumsum(lens, out=bounds[1:])
        flat = {c: sub.column(c).combine_chunks().flatten().to_numpy() for c in TOKEN_COLUMNS}
        mw = None
        if self.weighted:
            per_example = [np.asarray(m, dtype=np.float32) for m in sub.column("message_weights").to_pylist()]
            mw = token_message_weights(per_example, flat["segment_codes"], flat["turns"], bounds)
        t = Tokens(flat["segment_codes"], flat["turns"], flat["classes"], bounds, mw)
        return t, (sub, flat["input_ids"].astype(np.int64))

    def take(self, rows, objective) -> list[Encoded]:
        """The examples at `rows` with their weights under `objective`; reads only those rows."""
        t, (sub, ids) = self._tokens(rows)
        w = weights(parse_objective(objective), t)
        out = []
        for k, (i, nf, tr) in enumerate(zip(sub.column("id").to_pylist(), sub.column("n_full").to_pylist(),
                                            sub.column("truncated").to_pylist(), strict=True)):
            a, b = t.bounds[k], t.bounds[k + 1]
            mw = None if t.message_weights is None else t.message_weights[a:b]
            out.append(Encoded(ids[a:b], w[a:b], t.segments[a:b], t.messages[a:b], i, nf, tr, mw))
        return out


__all__ = ["EncodeCache", "RawBatch", "cache_key", "cache_root", "tables_dir", "encode_cached", "records_table",
           "tokenizer_fingerprint"]
