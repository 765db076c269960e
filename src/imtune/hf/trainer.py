"""imtune's weighted loss inside `transformers.Trainer` (and, through `imtune.hf.sft`, TRL's `SFTTrainer`).

The loss of an optimizer step is imtune's: Σ w·CE over every token of every micro-batch of the step, on every
process, divided by the step's total weight Σ w (`loss_normalization: weight` of `imtune train`). How:

  1. `get_batch_samples` (the Trainer's hook that pre-fetches the micro-batches of one optimizer step) sums
     `loss_weights[:, 1:]` over those micro-batches, and all-reduces the sum over processes: W, the step's weight.
     It hands W to the Trainer as `num_items_in_batch`, which the Trainer passes to every `compute_loss` of the step.
  2. `compute_loss` runs imtune's own loss engine (`training.loss.weighted_loss_sum`: one forward, the LM head and
     cross-entropy only at weighted positions, never a [tokens x vocab] logits tensor) and returns
     Σ_microbatch w·CE x world_size / W. `loss_is_scaled_for_ga = True` tells the Trainer not to divide by the
     accumulation steps again; DDP/FSDP average gradients over processes, which undoes the world_size. The step's
     gradient is then exactly that of Σ w·CE / W over the whole step, as in `imtune train`.
  3. The logged `loss` is the Trainer's sum of the micro-batch losses (averaged over processes): Σ w·CE / W.

Only the last optimizer step of an epoch can differ from `imtune train` under several processes: accelerate pads a
short last batch with examples from the start of the epoch, where imtune runs zero-weight passes instead.
Evaluation (`prediction_step`) reports each batch's own Σ w·CE / Σ w, which the Trainer averages over batches.
"""

from __future__ import annotations

import contextlib
import math
import os

import torch

EXTRA_COLUMNS = ("attention_mask", "position_ids", "loss_weights")


def _weights(inputs: dict) -> torch.Tensor:
    if "loss_weights" not in inputs:
        raise ValueError("the batch has no 'loss_weights': build the dataset with imtune.hf.encode_dataset and batch "
                         "it with imtune.hf.WeightedCollator (keep the column: the trainer's signature columns "
                         "include it)")
    return inputs["loss_weights"]


def _engine_batch(inputs: dict) -> dict:
    """The batch imtune's loss engine reads: input_ids, attention_mask or position_ids, and weights."""
    batch = {"input_ids": inputs["input_ids"], "weights": _weights(inputs)}
    for k in ("attention_mask", "position_ids"):
        if inputs.get(k) is not None:
            batch[k] = inputs[k]
    return batch


def step_weight(batches: list[dict]) -> float:
    """Σ w over the positions that are predicted (t >= 1) of `batches`: this process' share of W."""
    return math.fsum(float(_weights(b)[:, 1:].to("cpu", torch.float64).sum()) for b in batches)


class WeightedLossMixin:
    """Put before `transformers.Trainer` (or a subclass of it) in the bases; see the module doc.

    `imtune_chunk_size`: positions whose LM head + CE run at once (the loss engine's `chunk_size`).
    """

    loss_is_scaled_for_ga = True
    imtune_chunk_size = 1024

    def __init__(self, *args, **kwargs):
        out = getattr(kwargs.get("args"), "output_dir", None)
        fresh = out is not None and not os.path.lexists(out)
        super().__init__(*args, **kwargs)
        try:
            self._check_supported()
        except ValueError:
            if fresh:  # Trainer.__init__ made it just now: a refused trainer leaves no (empty) output_dir behind
                with contextlib.suppress(OSError):
                    os.rmdir(out)
            raise

    def _check_supported(self) -> None:
        """Refuse settings whose loss or batching imtune's loss would silently replace."""
        name = type(self).__name__
        if getattr(self.args, "label_smoothing_factor", 0):
            raise ValueError(f"{name}: label_smoothing_factor is not applied by imtune's loss; set it to 0")
        if getattr(self, "compute_loss_func", None) is not None:
            raise ValueError(f"{name}: compute_loss_func would be ignored: imtune's loss is the trainer's loss")
        if getattr(self.args, "loss_type", "nll") not in ("nll", None):
            raise ValueError(f"{name}: loss_type {self.args.loss_type!r} is not imtune's loss; use loss_type='nll'")
        if self.args.n_gpu > 1:
            raise ValueError(f"{name} does not support nn.DataParallel (several GPUs in one process): "
                             "launch with accelerate launch or torchrun, one process per GPU")
        sizes = [getattr(self, f"get_{k}_size", lambda: 1)() for k in ("tp", "cp", "sp")]
        if any(s > 1 for s in sizes):
            raise ValueError(f"{name}: tensor/context/sequence parallelism is not supported "
                             "(data parallelism, DDP or FSDP, is)")

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """The step's micro-batches and W, the step's total weight over all processes (as `num_items_in_batch`)."""
        batches = []
        for _ in range(num_batches):
            try:
                batches.append(next(epoch_iterator))
            except StopIteration:
                break
        w = torch.tensor(step_weight(batches), dtype=torch.float64, device=device)
        if self.accelerator.num_processes > 1:
            w = self.accelerator.reduce(w, "sum")
        return batches, w

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        from imtune.training.loss import weighted_loss_sum

        batch = _engine_batch(inputs)
        if return_outputs or not model.training:
            return self._eval_loss(model, batch, return_outputs)
        o = weighted_loss_sum(model, batch, chunk_size=self.imtune_chunk_size)
        if num_items_in_batch is None:  # called outside the Trainer's step loop: this batch alone
            return o.loss_sum / max(o.weight_sum, 1e-30)
        norm = float(num_items_in_batch)
        # A step with no weighted token contributes nothing (0, not 0/0).
        scale = self.accelerator.num_processes / norm if norm > 0 else 0.0
        return o.loss_sum * scale

    def _eval_loss(self, model, batch: dict, return_outputs: bool):
        """Σ w·CE / Σ w of this batch; with `return_outputs`, from the model's full logits (the caller wants them)."""
        from imtune.training.loss import reference_weighted_ce, weighted_loss_sum

        w_sum = batch["weights"][:, 1:].double().sum().clamp_min(1e-30)
        if not return_outputs:
            o = weighted_loss_sum(model, batch, chunk_size=self.imtune_chunk_size)
            return (o.loss_sum.double() / w_sum).float()
        outputs = model(**{k: v for k, v in batch.items() if k != "weights"}, use_cache=False)
        loss = (reference_weighted_ce(outputs.logits, batch["input_ids"], batch["weights"]).double() / w_sum).float()
        return loss, outputs

    def _set_signature_columns_if_needed(self):
        # With remove_unused_columns (the default) the Trainer keeps only the columns the model's forward names;
        # loss_weights is the one the loss needs.
        super()._set_signature_columns_if_needed()
        self._signature_columns = list(dict.fromkeys([*self._signature_columns, "input_ids", "labels",
                                                      *EXTRA_COLUMNS]))


def _default_collator(kwargs: dict, args) -> None:
    """Batch with `WeightedCollator` unless the caller gave a collator."""
    from imtune.hf.data import WeightedCollator

    if kwargs.get("data_collator") is None:
        tok = kwargs.get("processing_class")
        pad = getattr(tok, "pad_token_id", None)
        if pad is None:
            raise ValueError("pass processing_class=tokenizer (with a pad token) or data_collator=WeightedCollator(...)")
        kwargs["data_collator"] = WeightedCollator(pad, getattr(args, "pad_to_multiple_of", None) or None)


def _bound(init, self, args: tuple, kwargs: dict) -> dict:
    """`init`'s arguments as keywords, however the caller passed them."""
    import inspect

    bound = inspect.signature(init).bind(self, *args, **kwargs)
    out = dict(bound.arguments)
    out.pop("self", None)
    out.update(out.pop("kwargs", {}))
    return out


def _trainer_class():
    from transformers import Trainer

    class WeightedTrainer(WeightedLossMixin, Trainer):
        """`transformers.Trainer` with imtune's weighted loss and normalisation (module doc of imtune.hf.trainer).
        The data collator defaults to `WeightedCollator` for the `processing_class`'s pad token."""

        def __init__(self, *args, **kwargs):
            kwargs = _bound(Trainer.__init__, self, args, kwargs)
            _default_collator(kwargs, kwargs.get("args"))
            super().__init__(**kwargs)

    return WeightedTrainer
