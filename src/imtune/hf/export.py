"""`imtune export`: the tokenised, weighted set (`imtune.hf.encode_dataset`) written to a directory for other tools.

    DIR/train.parquet        input_ids, attention_mask, labels, loss_weights   (any Parquet reader)
    DIR/dataset/             the same, `datasets.save_to_disk`                 (load_from_disk -> TRL / HF Trainer)
    DIR/labels_only.parquet  input_ids, attention_mask, labels                 (Axolotl: exactly these columns)
    DIR/labels_only/         the same, `save_to_disk`                          (LLaMA-Factory `tokenized_path`)
    DIR/README.md            how to train on it with each tool; DIR/imtune_export.json what was exported

The directory is built under a temporary name beside DIR and renamed into place, so it is never half-written. An
existing DIR is replaced only when it is an earlier export (its `imtune_export.json` lists everything in it) and
`overwrite` is given; any other non-empty directory is refused.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from pathlib import Path

from imtune.errors import ImtuneError
from imtune.records.sources import quiet_datasets

MARKER = "imtune_export.json"
FILES = ("train.parquet", "dataset", "labels_only.parquet", "labels_only", "README.md", MARKER)
TMP_PATTERN = r"\..+\.export-(\d+)-[0-9a-f]{8}"  # a build's directory: .<name>.export-<pid>-<random>
FRACTIONAL_NOTE = ("objective {objective} gives fractional token weights: the labels-only files (Axolotl, "
                   "LLaMA-Factory, any trainer's own loss) train every labelled token with weight 1, which is not "
                   "this objective; for the exact objective train on dataset/ with imtune.hf.WeightedSFTTrainer or "
                   "WeightedTrainer (docs/INTEGRATIONS.md)")


def check_out(out: str | os.PathLike, overwrite: bool, inputs=()) -> Path:
    """Refuse, before any work, an output directory that would be written over (see the module doc)."""
    from imtune.io_utils import prepare_output

    out = prepare_output(out, inputs, kind="dir")
    if not out.is_dir() or not any(out.iterdir()):
        return out
    marker = out / MARKER
    if not marker.is_file():
        raise ImtuneError(f"--out {out} is a non-empty directory not written by imtune export; choose a new path")
    if not overwrite:
        raise ImtuneError(f"--out {out} holds an earlier export; pass --overwrite to replace it")
    foreign = sorted(p.name for p in out.iterdir() if p.name not in FILES)
    if foreign:
        raise ImtuneError(f"--out {out} holds {foreign[0]!r}, which imtune export did not write; move it away or "
                          "choose a new path")
    return out


def export_dataset(data, tokenizer, out: str | os.PathLike, objective: str, *, overwrite: bool = False,
                   model: str | None = None, **encode_kwargs):
    """Write the export of `data` under `objective` to `out`; returns (out, `EncodedInfo`)."""
    from imtune.hf.data import encode_dataset_with_report
    from imtune.io_utils import remove_dead_builds

    out = check_out(out, overwrite, [data if isinstance(data, (str, os.PathLike)) else None, model])
    ds, info = encode_dataset_with_report(data, tokenizer, objective, **encode_kwargs)
    parent = out.absolute().parent
    made = [p for p in (parent, *parent.parents) if not p.exists()]  # created here, removed again on failure
    parent.mkdir(parents=True, exist_ok=True)
    remove_dead_builds(parent, TMP_PATTERN)
    tmp = parent / f".{out.name}.export-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        with quiet_datasets():
            _write(tmp, ds, _manifest(data, model, objective, info, encode_kwargs), out.resolve())
        _swap(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for p in made:  # deepest first
            with contextlib.suppress(OSError):
                p.rmdir()
        raise
    return out, info


def _write(d: Path, ds, manifest: dict, where: Path) -> None:
    from imtune.hf.data import COLUMNS

    ds.to_parquet(str(d / "train.parquet"))
    ds.save_to_disk(str(d / "dataset"))
    labels = ds.select_columns([c for c in COLUMNS if c != "loss_weights"])
    labels.to_parquet(str(d / "labels_only.parquet"))
    labels.save_to_disk(str(d / "labels_only"))
    # a path that is not UTF-8 (surrogates from the OS) is written as \udcXX: a JSON reader gets the same string back
    (d / "README.md").write_text(readme(manifest, where), encoding="utf-8", errors="backslashreplace")
    (d / MARKER).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8",
                            errors="backslashreplace")


def _swap(tmp: Path, out: Path) -> None:
    """Put `tmp` at `out`; an earlier export (checked by `check_out`) or an empty directory there is removed."""
    old = None
    if out.is_dir():
        old = out.absolute().parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _manifest(data, model, objective: str, info, encode_kwargs: dict) -> dict:
    import imtune

    return {"written_by": "imtune export", "imtune_version": getattr(imtune, "__version__", None),
            "data": str(data) if isinstance(data, (str, os.PathLike)) else "in-memory dataset", "model": model,
            "objective": objective, **{k: v for k, v in encode_kwargs.items() if v is not None},
            "examples": info.n_examples, "tokens": info.n_tokens, "weighted_tokens": info.n_weighted,
            "weight_sum": info.weight_sum, "fractional_weights": info.fractional,
            "dropped_no_weight": len(info.report.dropped_no_weight), "truncated": info.report.n_truncated,
            "skipped_invalid": len(info.skipped), "files": list(FILES)}


def readme(m: dict, where: Path | str = "DIR") -> str:
    """DIR/README.md: what the export holds and how each tool trains on it."""
    exact = ("These are exact for this objective: every weight is 0 or 1, so `labels` alone carry it."
             if not m["fractional_weights"] else "**Warning:** " + FRACTIONAL_NOTE.format(objective=m["objective"]) + ".")
    return _README.format(**{"template": None, "max_length": None, **m}, exact=exact, out=where)


_README = """# imtune export: {data} under objective `{objective}`

{examples} examples, {tokens} tokens, {weighted_tokens} with non-zero weight (sum {weight_sum:.6g}).
Tokenised by imtune for `{model}` (template `{template}`, max length {max_length}).
`loss_weights[i]` is the weight of predicting token i; `labels[i]` is `input_ids[i]` where that weight is > 0, else
-100; the loss shifts both by one, as transformers' causal-LM loss does.

## TRL / HF Trainer, exact weights (`dataset/`)

```python
from datasets import load_from_disk
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig
from imtune.hf import WeightedSFTTrainer          # or WeightedTrainer with transformers.TrainingArguments

tokenizer = AutoTokenizer.from_pretrained(MODEL)  # MODEL: {model}, the model this export was tokenised for
model = AutoModelForCausalLM.from_pretrained(MODEL)
trainer = WeightedSFTTrainer(model=model, args=SFTConfig(output_dir="out"),
                             train_dataset=load_from_disk("{out}/dataset"), processing_class=tokenizer)
trainer.train()
```

## Labels only (`labels_only.parquet`, `labels_only/`)

{exact}

Axolotl (pre-tokenised data: no `type:`, exactly these three columns):

```yaml
datasets:
  - path: {out}/labels_only.parquet
    ds_type: parquet
    type:
```

LLaMA-Factory (a tokenised dataset saved with `save_to_disk`; its other data arguments are then ignored):

```yaml
tokenized_path: {out}/labels_only
```

(The Axolotl and LLaMA-Factory snippets follow those projects' documentation; imtune's tests do not run them.)
"""
