"""TRL's `SFTTrainer` with imtune's weighted loss (see `imtune.hf.trainer` for the loss and its normalisation).

TRL prepares (tokenises, truncates, packs) a dataset unless `dataset_kwargs={"skip_prepare_dataset": True}`; its
truncation would cut `input_ids` and `labels` but not `loss_weights`, so this trainer always skips it: the dataset
comes from `imtune.hf.encode_dataset`, already tokenised and truncated by imtune. What TRL's own `compute_loss`
adds (the `entropy` and `mean_token_accuracy` metrics, `loss_type="dft"`, the MoE auxiliary loss) is replaced by
imtune's loss. TRL's `packing` / `padding_free` flags need TRL's collator; use
`WeightedCollator(pad_token_id, padding_free=True)` instead.
"""

from __future__ import annotations

from imtune.hf.trainer import WeightedLossMixin, _bound, _default_collator


def _sft_args(args, model):
    from transformers import TrainingArguments
    from trl import SFTConfig

    if args is None:
        name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "model")
        args = SFTConfig(f"{str(name).rstrip('/').split('/')[-1]}-SFT")
    elif isinstance(args, TrainingArguments) and not isinstance(args, SFTConfig):
        d = args.to_dict()
        d["hub_token"] = args.hub_token  # to_dict hides it
        args = SFTConfig(**d)
    if args.packing or args.padding_free:
        raise ValueError("WeightedSFTTrainer: set packing=False and padding_free=False; for padding-free batches pass "
                         "data_collator=imtune.hf.WeightedCollator(tokenizer.pad_token_id, padding_free=True)")
    # The dataset is imtune's, already tokenised and truncated (see the module doc).
    args.dataset_kwargs = {**(args.dataset_kwargs or {}), "skip_prepare_dataset": True}
    return args


def _sft_trainer_class():
    from trl import SFTTrainer

    class WeightedSFTTrainer(WeightedLossMixin, SFTTrainer):
        """`trl.SFTTrainer` with imtune's weighted loss and normalisation (module doc of imtune.hf.sft). Takes a
        dataset from `imtune.hf.encode_dataset`; the data collator defaults to `WeightedCollator`."""

        def __init__(self, *args, **kwargs):
            kwargs = _bound(SFTTrainer.__init__, self, args, kwargs)
            kwargs["args"] = _sft_args(kwargs.get("args"), kwargs["model"])
            _default_collator(kwargs, kwargs["args"])
            super().__init__(**kwargs)

    return WeightedSFTTrainer
