"""The recipe's data: records loaded and split, encoded with the objective's weights, and the step plan.

The plan (`Plan`) says which examples form each micro-batch and each optimizer step. It is a pure function of the
config and the encoded lengths, known to every process without communication, so the step normaliser (the step's
total weight) is computed from it before the first backward pass, and a resumed run continues the same order.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from imtune.config import TrainConfig
from imtune.errors import ImtuneError


@dataclass
class EncodedSet:
    """Encoded examples plus per-example totals the step normaliser is built from."""

    examples: list
    lengths: np.ndarray
    weight_sums: np.ndarray  # float64
    n_weighted: np.ndarray

    @classmethod
    def of(cls, examples) -> EncodedSet:
        return cls(examples, np.array([len(e) for e in examples], dtype=np.int64),
                   np.array([math.fsum(e.weights) for e in examples], dtype=np.float64),
                   np.array([sum(1 for w in e.weights if w > 0) for e in examples], dtype=np.int64))


def load_records(cfg: TrainConfig, note: Callable[[str], None]) -> tuple[list, list]:
    """Training and held-out records (not yet tokenised)."""
    from imtune.records.loading import load_dataset

    def load(path):
        res = load_dataset(path, format=cfg.data_format, skip_invalid=cfg.skip_invalid)
        if res.skipped:
            note(f"skipped {len(res.skipped)} invalid record(s) in {path}: {res.skipped[0].format()}"
                 + (" ..." if len(res.skipped) > 1 else ""))
        return res.records

    records = load(cfg.data)
    val_records = load(cfg.val_data) if cfg.val_data else []
    if cfg.val_fraction:
        from imtune.records.split import holdout_split, n_heldout

        records, val_records = holdout_split(records, n_heldout(len(records), cfg.val_fraction), cfg.seed,
                                             source=f"{cfg.data} (val_fraction {cfg.val_fraction:g})")
    return records, val_records


def encode_sets(cfg: TrainConfig, tokenizer, records, val_records) -> tuple[EncodedSet, EncodedSet | None, dict,
                                                                            list[str]]:
    """(training set, held-out set or None, data summary (counts), notes on what the encoder changed or dropped)."""
    from imtune.masking.encoding import encode_with_report

    enc_args = dict(template=cfg.template, max_length=cfg.max_length, truncation_side=cfg.truncation_side,
                    allow_special_tokens_in_content=cfg.allow_special_tokens_in_content)
    train, rep = encode_with_report(records, tokenizer, cfg.objective, **enc_args)
    if not train:
        raise ImtuneError(f"{cfg.data}: no example has a token with non-zero weight under objective {cfg.objective}")
    summary = {"train_examples": len(train), "truncated": rep.n_truncated, "dropped_no_weight": rep.n_dropped,
               "dropped_by_truncation": len(rep.truncated_to_nothing), "ending_on_user_turn": len(rep.trailing_user),
               "special_token_text_in_content": len(rep.special_in_content)}
    val = None
    if val_records:
        # Held-out loss is always output-only, so runs with different training objectives are comparable.
        val_enc, _ = encode_with_report(val_records, tokenizer, "it", **enc_args)
        if val_enc:
            val = EncodedSet.of(val_enc)
            summary["val_examples"] = len(val_enc)
    train_set = EncodedSet.of(train)
    summary["train_tokens"] = int(train_set.lengths.sum())
    summary["weighted_tokens"] = int(train_set.n_weighted.sum())
    return train_set, val, summary, encode_notes(cfg, rep)


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
        return sum(len(self.steps(e)) for e in range(self.cfg.epochs))

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
