"""imtune's exact per-token weights in the trainers practitioners already use: HF Trainer, TRL, Axolotl,
LLaMA-Factory (docs/INTEGRATIONS.md).

    from imtune.hf import encode_dataset, WeightedSFTTrainer      # or WeightedTrainer for transformers.Trainer
    train = encode_dataset("data.jsonl", tokenizer, "weighted:0.3", template="tokenizer", max_length=1024)
    WeightedSFTTrainer(model=model, args=SFTConfig(...), train_dataset=train, processing_class=tokenizer).train()

  * `encode_dataset` (data.py): any `--data` (or a `datasets.Dataset`, or records) -> a tokenised Dataset with
    `input_ids`, `attention_mask`, `labels` and `loss_weights`, through imtune's one encoder;
  * `WeightedCollator` (data.py): pads those columns (weight 0, label -100), or packs them padding-free;
  * `WeightedLossMixin`, `WeightedTrainer` (trainer.py), `WeightedSFTTrainer` (sft.py): imtune's loss engine and
    its normalisation (Σ w·CE / Σ w over the whole optimizer step, all processes) in place of the trainer's loss;
  * `export_dataset` (export.py): the tokenised set written to a directory for other tools (`imtune export`).

transformers and trl are imported only when a trainer class is first used.
"""

from __future__ import annotations

from imtune.hf.data import COLUMNS, IGNORE_INDEX, WeightedCollator, encode_dataset, encode_dataset_with_report

__all__ = ["COLUMNS", "IGNORE_INDEX", "WeightedCollator", "WeightedLossMixin", "WeightedSFTTrainer", "WeightedTrainer",
           "encode_dataset", "encode_dataset_with_report", "export_dataset"]

_CACHE: dict = {}


def __getattr__(name: str):
    if name == "WeightedLossMixin":
        from imtune.hf.trainer import WeightedLossMixin

        return WeightedLossMixin
    if name == "export_dataset":
        from imtune.hf.export import export_dataset

        return export_dataset
    if name in ("WeightedTrainer", "WeightedSFTTrainer"):
        if name not in _CACHE:
            if name == "WeightedTrainer":
                from imtune.hf.trainer import _trainer_class as make
            else:
                from imtune.hf.sft import _sft_trainer_class as make
            _CACHE[name] = make()
        return _CACHE[name]
    raise AttributeError(f"module 'imtune.hf' has no attribute {name!r}")
