"""imtune's per-token weights as a tokenised `datasets.Dataset`, and the collator that pads it.

Columns (one row per example, all lists of the same length):
  * `input_ids`      the tokens, rendered and tokenised once by imtune's one encoder (`masking.encoding`);
  * `attention_mask` all ones (padding is added by the collator);
  * `labels`         `input_ids[i]` where `loss_weights[i] > 0`, else -100 (what any HF-style trainer understands);
  * `loss_weights`   imtune's weight of *predicting* token i from the tokens before it (float32).

`loss_weights` are aligned with `input_ids`, exactly as `labels` are: position 0 is never predicted (weight 0,
label -100), and the loss shifts both by one (logits at t-1 score token t), as transformers' causal-LM loss and
imtune's own loss (`training.logprobs.weighted_positions`) do. With 0/1 weights (`it`, `im`, ...) `labels` alone
carry the whole objective; fractional weights (`weighted:λ`) need the loss hook of `imtune.hf.trainer`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from imtune.config import DEFAULT_DATA_SPLIT, DEFAULT_MAX_LENGTH, DEFAULT_OBJECTIVE, DEFAULT_TEMPLATE
from imtune.errors import ImtuneError, InputError
from imtune.records.conversation import Conversation

IGNORE_INDEX = -100
COLUMNS = ("input_ids", "attention_mask", "labels", "loss_weights")
CHUNK = 2048  # records encoded per call: bounds the Python lists alive at once


@dataclass
class EncodedInfo:
    """What `encode_dataset_with_report` did: counts, and the encoder's notes (dropped, truncated...)."""

    n_records: int
    n_examples: int
    n_tokens: int
    n_weighted: int
    weight_sum: float
    fractional: bool  # some weight is neither 0 nor 1: `labels` alone cannot express the objective
    skipped: list  # InputErrors of records skipped with skip_invalid
    report: object  # masking.encoding.EncodeReport


def encode_dataset(data, tokenizer, objective: str = DEFAULT_OBJECTIVE, **kwargs):
    """A tokenised `datasets.Dataset` (columns `COLUMNS`) of `data` under `objective`; see the module doc.

    `data`: a data file, Hub dataset id or dataset directory (any `--data`, read by imtune's one loader), a
    `datasets.Dataset`, or a list of records (dicts in any schema imtune reads, or `Conversation`s).
    `tokenizer`: a fast tokenizer, or a model name / path to load one from. Keywords as `encode_dataset_with_report`.
    Examples left with no weighted token are dropped, as `imtune train` drops them.
    """
    return encode_dataset_with_report(data, tokenizer, objective, **kwargs)[0]


def encode_dataset_with_report(data, tokenizer, objective: str = DEFAULT_OBJECTIVE, *,
                               template: str | None = DEFAULT_TEMPLATE, max_length: int | None = DEFAULT_MAX_LENGTH,
                               truncation_side: str = "right", format: str | None = None,
                               skip_invalid: bool = False, allow_special_tokens_in_content: bool = False,
                               split: str = DEFAULT_DATA_SPLIT, config: str | None = None,
                               revision: str | None = None):
    """(`datasets.Dataset`, `EncodedInfo`). `split`/`config`/`revision` apply to a Hub id or dataset directory."""
    import pyarrow as pa
    from datasets import Dataset

    from imtune.masking.encoding import EncodeReport, encode_with_report
    from imtune.masking.objectives import parse_objective

    obj = parse_objective(objective)
    tok = _tokenizer(tokenizer)
    records, skipped = _records(data, format, skip_invalid, dict(split=split, config=config, revision=revision))
    tables, total = [], EncodeReport()
    for c0 in range(0, len(records), CHUNK):
        enc, rep = encode_with_report(records[c0:c0 + CHUNK], tok, obj, template=template, max_length=max_length,
                                      truncation_side=truncation_side,
                                      allow_special_tokens_in_content=allow_special_tokens_in_content)
        _merge(total, rep)
        if enc:
            tables.append(_table(enc))
    if not tables:
        raise ImtuneError(f"{_name(data)}: no example has a token with non-zero weight under objective {objective}")
    table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
    w = table.column("loss_weights").combine_chunks().flatten().to_numpy()
    info = EncodedInfo(len(records), table.num_rows, len(w), int((w > 0).sum()), float(np.sum(w, dtype=np.float64)),
                       bool(((w != 0) & (w != 1)).any()), skipped, total)
    return Dataset(table), info


def _features():
    from datasets import Features, List, Value

    return Features({"input_ids": List(Value("int32")), "attention_mask": List(Value("int8")),
                     "labels": List(Value("int32")), "loss_weights": List(Value("float32"))})


def _table(examples) -> object:
    """An Arrow table of `COLUMNS` built from flat numpy arrays (no per-token Python objects)."""
    import pyarrow as pa

    lens = np.fromiter((len(e.input_ids) for e in examples), dtype=np.int64, count=len(examples))
    offsets = np.zeros(len(lens) + 1, dtype=np.int32)
    np.cumsum(lens, out=offsets[1:])
    ids = np.concatenate([np.asarray(e.input_ids, dtype=np.int32) for e in examples])
    w = np.concatenate([np.asarray(e.weights, dtype=np.float32) for e in examples])
    w[offsets[:-1]] = 0.0  # nothing predicts an example's first token (the encoder already says so)
    labels = np.where(w > 0, ids, IGNORE_INDEX).astype(np.int32)
    off = pa.array(offsets)
    cols = {"input_ids": ids, "attention_mask": np.ones(len(ids), dtype=np.int8), "labels": labels,
            "loss_weights": w}
    schema = _features().arrow_schema
    return pa.table({k: pa.ListArray.from_arrays(off, pa.array(v)) for k, v in cols.items()}, schema=schema)


def _merge(total, rep) -> None:
    total.n_input += rep.n_input
    total.n_kept += rep.n_kept
    total.n_truncated += rep.n_truncated
    for name in ("dropped_no_weight", "truncated_to_nothing", "trailing_user", "special_in_content"):
        getattr(total, name).extend(getattr(rep, name))


def _tokenizer(tokenizer):
    if isinstance(tokenizer, (str, os.PathLike)):
        from imtune.models import load_tokenizer

        return load_tokenizer(str(tokenizer))
    return tokenizer


def _name(data) -> str:
    if isinstance(data, (str, os.PathLike)):
        return str(data)
    return getattr(getattr(data, "info", None), "dataset_name", None) or "dataset"


def _records(data, format: str | None, skip_invalid: bool, source: dict) -> tuple[list[Conversation], list]:
    """Conversations of `data` (validated as the loader validates a file) and the records skipped."""
    if isinstance(data, (str, os.PathLike)):
        from imtune.records.loading import load_dataset

        res = load_dataset(data, format=format, skip_invalid=skip_invalid,
                           **{k: v for k, v in source.items() if v is not None})
        return res.records, res.skipped
    if isinstance(data, dict):  # a DatasetDict (a dict of splits)
        raise ImtuneError(f"a dict of {sorted(map(str, data))[:5]} is not a dataset: pass one split of a DatasetDict, "
                          "e.g. data['train'], or a list of records")
    if not isinstance(data, Iterable) or isinstance(data, (bytes, bytearray)):
        raise TypeError(f"data must be a path, a datasets.Dataset or a list of records, got {type(data).__name__}")
    return _validated(data, _name(data), format, skip_invalid)


def _validated(rows: Iterable, name: str, format: str | None, skip_invalid: bool) -> tuple[list, list]:
    from imtune.records.parsing import SCHEMAS, detect_schema, normalise

    if format is not None and format not in SCHEMAS:
        raise ImtuneError(f"unknown format {format!r}; choose one of {', '.join(SCHEMAS)}")
    out, skipped = [], []
    for i, row in enumerate(rows):
        try:
            if isinstance(row, Conversation):
                conv = row
            elif isinstance(row, dict):
                conv = normalise(row, format or detect_schema(row), id_default=str(i))
            else:
                raise ValueError(f"expected a record (a dict), got {type(row).__name__}")
        except ValueError as e:
            err = InputError(name, str(e), record=i)
            if not skip_invalid:
                raise err from None
            skipped.append(err)
            continue
        out.append(dataclasses.replace(conv, source=conv.source or f"{name}: record {i}"))
    if not out:
        raise InputError(name, "no valid records" + (f" ({len(skipped)} skipped)" if skipped else ""))
    return out, skipped


# ---------------------------------------------------------------------------------------------------- collator


class _Row:
    """An example as the batching functions read it (`input_ids`, `weights`)."""

    __slots__ = ("input_ids", "weights", "id")

    def __init__(self, feature: dict, i: int):
        self.id = i
        self.input_ids = np.asarray(_plain(feature["input_ids"]), dtype=np.int64)
        if "loss_weights" in feature:
            self.weights = np.asarray(_plain(feature["loss_weights"]), dtype=np.float32)
        elif "labels" in feature:  # a labels-only dataset: weight 1 wherever a label is kept
            self.weights = (np.asarray(_plain(feature["labels"])) != IGNORE_INDEX).astype(np.float32)
        else:
            raise ValueError("a feature needs 'loss_weights' (imtune.hf.encode_dataset) or 'labels'")


def _plain(x):
    return x.tolist() if hasattr(x, "tolist") else x


@dataclass
class WeightedCollator:
    """Pads features of `encode_dataset` into `input_ids`, `attention_mask`, `labels`, `loss_weights` tensors.

    Right padding with `pad_token_id`, label -100 and weight 0 (imtune's `training.batching.collate`). With
    `padding_free=True` the examples are concatenated into one row with `position_ids` restarting at 0 for each
    (imtune's `training.batching.pack`; transformers keeps the examples apart from the position ids) and no
    attention mask. Labels are derived from the weights, so the two always agree.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None
    padding_free: bool = False

    def __call__(self, features: Sequence[dict]) -> dict:
        from imtune.training.batching import collate, pack

        rows = [_Row(f, i) for i, f in enumerate(features)]
        if self.padding_free:
            b = pack(rows, sum(len(r.input_ids) for r in rows))
            b.pop("seq_lens")
        else:
            b = collate(rows, self.pad_token_id, self.pad_to_multiple_of)
        weights = b.pop("weights")
        b["labels"] = b["input_ids"].masked_fill(weights <= 0, IGNORE_INDEX)
        b["loss_weights"] = weights
        return b
