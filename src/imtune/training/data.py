"""The recipe's data: records loaded and split, encoded with the objective's weights, and the step plan.

The plan (`Plan`) says which examples form each micro-batch and each optimizer step. It is a pure function of the
config and the encoded lengths, known to every process without communication, so the step normaliser (the step's
total weight) is computed from it before the first backward pass, and a resumed run continues the same order.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from imtune.config import TrainConfig
from imtune.errors import ImtuneError


@dataclass
class EncodedSet:
    """Encoded examples plus per-example totals the step normaliser is built from.

    The examples live either in an in-memory list or in the encode cache (memory-mapped Arrow, read row by row:
    `take` reads only the rows it is asked for); the arrays here are all the plan needs.
    """

    lengths: np.ndarray
    weight_sums: np.ndarray  # float64
    n_weighted: np.ndarray
    _take: Callable[[list[int]], list]

    def __len__(self) -> int:
        return len(self.lengths)

    def take(self, idx) -> list:
        """The examples at positions `idx` (objects with `input_ids` and `weights`)."""
        return self._take(list(idx))

    @classmethod
    def of(cls, examples) -> EncodedSet:
        return cls(np.array([len(e) for e in examples], dtype=np.int64),
                   np.array([math.fsum(e.weights) for e in examples], dtype=np.float64),
                   np.array([sum(1 for w in e.weights if w > 0) for e in examples], dtype=np.int64),
                   lambda idx: [examples[i] for i in idx])

    @classmethod
    def cached(cls, cache, rows: np.ndarray, objective) -> EncodedSet:
        """The encode cache's `rows` (those kept under `objective`) with that objective's weights."""
        sums, n_weighted = cache.totals(rows, objective)
        return cls(cache.col["length"][rows].astype(np.int64), sums, n_weighted.astype(np.int64),
                   lambda idx: cache.take(rows[np.asarray(idx, dtype=np.int64)], objective))


def load_records(cfg: TrainConfig, note: Callable[[str], None]) -> tuple[list, list, str | None]:
    """Training and held-out records (not yet tokenised), and the fingerprint of --data."""
    from imtune.records.loading import describe_skipped, load_dataset

    def load(path, **source):
        # A Hub id or dataset directory as --data takes --data-split/-config/-revision; --val-data its defaults.
        res = load_dataset(path, format=cfg.data_format, skip_invalid=cfg.skip_invalid, **source)
        if res.skipped:
            note(describe_skipped(res.skipped, path))
        return res

    res = load(cfg.data, split=cfg.data_split, config=cfg.data_config, revision=cfg.data_revision)
    records = res.records
    val_records = load(cfg.val_data).records if cfg.val_data else []
    if cfg.val_fraction:
        from imtune.records.split import holdout_split, n_heldout

        records, val_records = holdout_split(records, n_heldout(len(records), cfg.val_fraction), cfg.seed,
                                             source=f"{cfg.data} (val_fraction {cfg.val_fraction:g})")
    return records, val_records, res.fingerprint


def load_sets(cfg: TrainConfig, note: Callable[[str], None], main_first=contextlib.nullcontext) -> tuple:
    """(training data, held-out data, fingerprint of --data): with `encode_cache`, conversation tables
    (memory-mapped Arrow, never a list of all records, `records.sources`); else the in-memory records of
    `load_records`. Both split the same records and give the same fingerprint (a resumed run checks it).
    `main_first`: a context under which the main process builds a table before the other processes open it.
    A YAML list of sources gives a list of `mixture.Part`s instead (`training.mixture`)."""
    from imtune.training import mixture

    if mixture.is_mixture(cfg):
        return mixture.load_parts(cfg, note, main_first)
    if not cfg.encode_cache:
        return load_records(cfg, note)
    from imtune.masking.encode_cache import tables_dir as tables_dir_of
    from imtune.records.loading import describe_skipped
    from imtune.records.sources import DataSpec, conversation_table

    tables_dir = tables_dir_of(cfg.encode_cache_dir)

    def table(spec, shown):
        with main_first():
            t = conversation_table(spec, skip_invalid=cfg.skip_invalid, num_proc=cfg.num_proc, cache_dir=tables_dir)
        if t.errors:
            note(describe_skipped(t.skipped_errors(), shown))
        return t

    train = table(DataSpec.of(cfg), cfg.data)
    fingerprint = train.fingerprint  # of all of --data, before the split below
    val = table(DataSpec(str(cfg.val_data), format=cfg.data_format), cfg.val_data) if cfg.val_data else None
    if cfg.val_fraction:
        from imtune.records.split import holdout_split, n_heldout

        n = len(train.dataset)
        rest, held = holdout_split(range(n), n_heldout(n, cfg.val_fraction), cfg.seed,
                                   source=f"{cfg.data} (val_fraction {cfg.val_fraction:g})")
        tag = f"val_fraction {cfg.val_fraction!r} seed {cfg.seed}"
        train, val = _subset(train, rest, f"train, {tag}"), _subset(train, held, f"held out, {tag}")
    return train, val, fingerprint


def _subset(table, rows: list[int], tag: str):
    import dataclasses
    import hashlib

    fp = hashlib.blake2b(f"{table.fingerprint} {tag}".encode(), digest_size=16).hexdigest()
    return dataclasses.replace(table, dataset=table.dataset.select(rows), fingerprint=fp)


def encode_sets(cfg: TrainConfig, tokenizer, records, val_records, main_first=contextlib.nullcontext,
                report=None) -> tuple[EncodedSet, EncodedSet | None, dict, list[str]]:
    """(training set, held-out set or None, data summary (counts), notes on what the encoder changed or dropped).

    With `encode_cache` (the default) each set is encoded once into the Arrow encode cache and read from there;
    `main_first` is a context under which the main process builds the cache before the others open it.
    """
    from imtune.training import mixture

    if mixture.is_mixture(cfg):
        return mixture.encode_parts(cfg, tokenizer, records, main_first, report, val_records)
    train, rep, where = _encode_one(cfg, tokenizer, records, cfg.objective, cfg.data, main_first, report)
    if not len(train):
        raise ImtuneError(f"{cfg.data}: no example has a token with non-zero weight under objective {cfg.objective}")
    summary = {"train_examples": len(train), "truncated": rep.n_truncated, "dropped_no_weight": rep.n_dropped,
               "dropped_by_truncation": len(rep.truncated_to_nothing), "ending_on_user_turn": len(rep.trailing_user),
               "special_token_text_in_content": len(rep.special_in_content)}
    val = None
    if val_records:
        # Held-out loss is always output-only, so runs with different training objectives are comparable.
        val_set, _, _ = _encode_one(cfg, tokenizer, val_records, "it", cfg.val_data or f"{cfg.data} (held out)",
                                    main_first, report)
        if len(val_set):
            val = val_set
            summary["val_examples"] = len(val_set)
    summary["train_tokens"] = int(train.lengths.sum())
    summary["weighted_tokens"] = int(train.n_weighted.sum())
    if where:
        summary["encode_cache"] = where
    return train, val, summary, encode_notes(cfg, rep)


def _encode_one(cfg: TrainConfig, tokenizer, records, objective, name, main_first, report):
    """(EncodedSet, EncodeReport, cache path or None) of one set of records (a list, or a conversation table)."""
    enc_args = dict(template=cfg.template, max_length=cfg.max_length, truncation_side=cfg.truncation_side,
                    allow_special_tokens_in_content=cfg.allow_special_tokens_in_content)
    if not cfg.encode_cache:
        from imtune.masking.encoding import encode_with_report

        examples, rep = encode_with_report(records, tokenizer, objective, **enc_args)
        return EncodedSet.of(examples), rep, None
    from imtune.masking.encode_cache import encode_cached, records_table
    from imtune.masking.encoding import EncodeReport, EncodeSettings

    settings = EncodeSettings.of(tokenizer, **enc_args)
    if hasattr(records, "dataset"):  # a records.sources.ConversationTable
        ds, fingerprint, name = records.dataset, records.fingerprint, records.name
    else:
        ds, fingerprint = records_table(records, str(name))
    if ds is None:
        return EncodedSet.of([]), EncodeReport(), None
    with main_first():
        cache = encode_cached(ds, fingerprint, str(name), tokenizer, settings, root=cfg.encode_cache_dir,
                              num_proc=cfg.num_proc, row_kind=getattr(records, "row_kind", "record"))
    if report is not None:
        report(f"encode cache {'hit' if cache.hit else 'written'}: {cache.path}"
               + ("" if cache.hit else f" ({len(cache)} examples encoded)"))
    rows, rep = cache.report(objective)
    return EncodedSet.cached(cache, rows, objective), rep, {"path": str(cache.path), "hit": cache.hit}


def encode_notes(cfg: TrainConfig, rep) -> list[str]:
    """One line per thing the encoder did to the training data that a user should know, naming the examples."""
    cut = set(rep.truncated_to_nothing)
    no_weight = [i for i in rep.dropped_no_weight if i not in cut]
    notes = []
    if rep.trailing_user:
        notes.append(f"{_ids(rep.trailing_user)} end(s) on a user turn with no reply; that turn is weighted as an "
                     f"instruction under objective {cfg.objective}")
    if rep.n_truncated:
        notes.append(f"{rep.n_truncated} example(s) truncated to max_length {cfg.max_length} "
                     f"({cfg.truncation_side} side)")
    if cut:
        notes.append(f"{_ids(rep.truncated_to_nothing)} dropped: truncation to {cfg.max_length} tokens cut every "
                     "weighted token (raise --max-length, or --truncation-side left)")
    if no_weight:
        notes.append(f"{_ids(no_weight)} dropped: no token with non-zero weight under objective {cfg.objective}")
    if rep.special_in_content:
        notes.append(f"{_ids(rep.special_in_content)} contain(s) special-token text in content, encoded as special "
                     "tokens (allow_special_tokens_in_content)")
    return notes


def _ids(ids: list[str], shown: int = 5) -> str:
    more = f" (+{len(ids) - shown} more)" if len(ids) > shown else ""
    return f"{len(ids)} example(s) ({', '.join(map(str, ids[:shown]))}{more})"


class Plan:
    """Which examples form each micro-batch and each optimizer step, per epoch; identical on every process."""

    def __init__(self, cfg: TrainConfig, data: EncodedSet, accumulation: int, world_size: int):
        self.cfg, self.data = cfg, data
        self.per_step = accumulation * world_size
        self._cache: dict[int, list[list[list[int]]]] = {}

    def micro_batches(self, epoch: int) -> list[list[int]]:
        from imtune.training.batching import pack_plan, plan_batches

        lengths = self.data.lengths.tolist()
        if self.cfg.packing:
            rows = pack_plan(lengths, self.cfg.max_length, seed=self.cfg.seed, epoch=epoch)
            # A packed micro-batch is micro_batch_size packed rows, flattened into one sequence.
            mbs = self.cfg.micro_batch_size
            return [[i for row in rows[k:k + mbs] for i in row] for k in range(0, len(rows), mbs)]
        return plan_batches(lengths, self.cfg.micro_batch_size, seed=self.cfg.seed, epoch=epoch,
                            group_by_length=self.cfg.group_by_length, shuffle=True)

    def steps(self, epoch: int) -> list[list[list[int]]]:
        if epoch not in self._cache:
            mbs = self.micro_batches(epoch)
            self._cache = {epoch: [mbs[i:i + self.per_step] for i in range(0, len(mbs), self.per_step)]}
        return self._cache[epoch]

    def total_steps(self) -> int:
        if self.cfg.max_steps:
            return self.cfg.max_steps
        if self.cfg.packing:  # how many rows the examples pack into depends on each epoch's order
            return sum(len(self.steps(e)) for e in range(self.cfg.epochs))
        # plan_batches makes ceil(n / micro_batch_size) micro-batches in every epoch (its mega-batches hold a whole
        # number of them): counted here without planning every epoch of a large set.
        n_mb = -(-len(self.data) // self.cfg.micro_batch_size)
        return self.cfg.epochs * -(-n_mb // self.per_step)

    def normaliser(self, step: list[list[int]]) -> float:
        idx = [i for mb in step for i in mb]
        src = self.data.weight_sums if self.cfg.loss_normalization == "weight" else self.data.n_weighted
        return float(math.fsum(src[idx].tolist()))


def make_batch(cfg: TrainConfig, examples, pad_token_id: int, device, packed: bool) -> dict:
    from imtune.training.batching import collate, pack

    if packed:
        b = pack(examples, cfg.max_length * cfg.micro_batch_size)
        b.pop("seq_lens", None)
    else:
        b = collate(examples, pad_token_id)
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()}
