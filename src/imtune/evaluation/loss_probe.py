"""Per-example loss under an objective's weights: the paper's Figure 3 probe of overfitting.

IM's claim is that it overfits less than IT: its loss on the *output* tokens is higher on training data and lower on
held-out data. `per_example_loss` measures exactly that quantity for any model and objective: for each example, the
weighted mean token cross-entropy over the tokens the objective weights (for `it`, the assistant output and its EOS).

Template: unless given, the template is the one the model was trained with when `model` is (or came from) an
`imtune train` output directory, i.e. one holding `imtune_config.yaml` (the directory itself or its parent, for
`checkpoint-N` subdirectories); otherwise `tulu`, the paper's template. Measuring a model under a template it was
not trained with would mostly measure the template mismatch.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from imtune.config import DEFAULT_MAX_LENGTH, DEFAULT_TEMPLATE
from imtune.errors import ImtuneError
from imtune.records.conversation import Conversation
from imtune.statistics import bootstrap_mean_ci

CONFIG_NAME = "imtune_config.yaml"


# ---------------------------------------------------------------------------------------------------- templates


def training_config(model_ref) -> dict | None:
    """The `imtune_config.yaml` of a training output directory (or of the parent of a checkpoint dir), else None."""
    if model_ref is None:
        return None
    path = Path(os.fspath(model_ref)).expanduser()
    if not path.is_dir():
        return None
    for d in (path, path.parent):
        cfg = d / CONFIG_NAME
        if cfg.is_file():
            from imtune.inputs import read_yaml

            data = read_yaml(cfg)
            if not isinstance(data, dict):
                raise ImtuneError(f"{cfg}: expected a mapping of settings")
            return data
    return None


def default_template(model_ref, template: str | None = None) -> str:
    """`template` if given, else the template `model_ref` was trained with (see module doc), else `tulu`."""
    if template:
        return template
    cfg = training_config(model_ref)
    if cfg and cfg.get("template"):
        return str(cfg["template"])
    return DEFAULT_TEMPLATE


def model_ref_of(model) -> str | None:
    """Where a loaded HF model came from (its `name_or_path`), to look for its training config."""
    ref = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    return str(ref) if ref else None


# ---------------------------------------------------------------------------------------------------- loss


@dataclass
class LossReport:
    rows: list[dict]
    excluded: list[str] = field(default_factory=list)  # ids with no weighted token (after truncation)
    n_truncated: int = 0
    template: str = DEFAULT_TEMPLATE
    objective: str = "it"


def per_example_loss(model, tokenizer, records, *, objective="it", template: str | None = None,
                     max_length: int | None = DEFAULT_MAX_LENGTH, batch_size: int = 8, truncation_side: str = "right",
                     progress: bool = True) -> list[dict]:
    """`[{"id", "tokens", "loss"}]` in input order; examples with no weighted token are left out.

    `loss` is sum_t w_t * CE_t / sum_t w_t over the objective's weights (nats per token); `tokens` counts the tokens
    with w_t > 0. `template=None` picks the model's training template (see module doc). Use
    `per_example_loss_with_report` to also learn which examples were left out.
    """
    return per_example_loss_with_report(model, tokenizer, records, objective=objective, template=template,
                                        max_length=max_length, batch_size=batch_size,
                                        truncation_side=truncation_side, progress=progress).rows


def per_example_loss_with_report(model, tokenizer, records, *, objective="it", template: str | None = None,
                                 max_length: int | None = DEFAULT_MAX_LENGTH, batch_size: int = 8, truncation_side: str = "right",
                                 progress: bool = True) -> LossReport:

    from imtune.masking.encoding import encode_with_report
    from imtune.masking.objectives import parse_objective

    if batch_size < 1:
        raise ImtuneError("batch_size must be at least 1")
    obj = parse_objective(objective)
    tpl = default_template(model_ref_of(model), template)
    convs = [_as_conversation(r, i) for i, r in enumerate(records)]
    encoded, enc_report = encode_with_report(convs, tokenizer, obj, tpl, max_length, truncation_side)
    report = LossReport(rows=[], excluded=list(enc_report.dropped_no_weight), n_truncated=enc_report.n_truncated,
                        template=tpl, objective=obj.spec)
    if not encoded:
        return report

    losses, counts = _score(model, tokenizer, encoded, batch_size, progress)
    report.rows = [{"id": e.id, "tokens": int(counts[i]), "loss": float(losses[i])} for i, e in enumerate(encoded)]
    return report


def _score(model, tokenizer, encoded, batch_size: int, progress: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per-example Σ w·CE / Σ w and weighted-token count, through the engine the training loss uses."""
    import torch
    from tqdm.auto import tqdm

    from imtune.training.batching import collate
    from imtune.training.logprobs import score_weighted

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    # Longest first: least padding per batch, and an out-of-memory error shows on the first batch, not the last.
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    losses = np.zeros(len(encoded), dtype=np.float64)
    counts = np.zeros(len(encoded), dtype=np.int64)
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(encoded), desc="loss", unit="ex", disable=not progress, leave=False, file=sys.stderr)
    try:
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                batch = {k: v.to(device) for k, v in collate([encoded[i] for i in idx], pad_id).items()}
                ce, w, n = score_weighted(model, batch).per_row(len(idx))
                losses[idx] = (ce / w).numpy()
                counts[idx] = n.numpy()
                bar.update(len(idx))
    finally:
        bar.close()
        if was_training:
            model.train()
    return losses, counts


def _as_conversation(r, i: int) -> Conversation:
    if isinstance(r, Conversation):
        return r
    if isinstance(r, dict) and isinstance(r.get("messages"), list):
        return Conversation.from_messages(r["messages"], id=str(r.get("id", i)))
    raise ImtuneError(f"record {i}: expected a Conversation or a dict with 'messages', got {type(r).__name__}")


# ---------------------------------------------------------------------------------------------------- summary


def summarise(rows: Iterable[dict | float]) -> dict:
    """`{"n", "mean", "median", "std", "ci95": [lo, hi]}` of per-example losses (rows or plain numbers).

    `std` is the sample standard deviation (ddof=1; 0 for one example); `ci95` a bootstrap CI of the mean.
    """
    vals = np.asarray([r["loss"] if isinstance(r, dict) else r for r in rows], dtype=np.float64)
    if vals.size == 0:
        return {"n": 0, "mean": None, "median": None, "std": None, "ci95": [None, None]}
    return {"n": int(vals.size), "mean": float(vals.mean()), "median": float(np.median(vals)),
            "std": float(vals.std(ddof=1)) if vals.size > 1 else 0.0, "ci95": bootstrap_mean_ci(vals)}


def summary_path(out: str | os.PathLike) -> Path:
    """`losses.jsonl` -> `losses.summary.json` (any other name gets `.summary.json` appended)."""
    out = Path(out)
    if out.suffix.lower() in (".jsonl", ".json", ".ndjson"):
        return out.with_suffix(".summary.json")
    return out.with_name(out.name + ".summary.json")
