"""The training recipe: one readable flow from a `TrainConfig` to a saved model.

    set up    config -> data (load, split, encode with the objective's weights; `training.data`)
              -> model (+LoRA, +reference for KL), optimizer, schedule (`training.components`)
    plan      which examples form each micro-batch and optimizer step (`training.data.Plan`)
    step      normaliser from the plan -> forward/backward per micro-batch -> clip -> optimizer step
    evaluate  output-only loss on the held-out set at each epoch end
    checkpoint  at epoch ends and every `save_steps` (`training.checkpointing`)
    save      final model, tokenizer, model card and metrics (`training.outputs`)

`Recipe` holds the run's state; `_train` calls its steps in that order.

Loss normalisation. A step's loss is sum(w_t * CE_t) over every micro-batch of the step, on every process, divided
by the step's total weight (`loss_normalization: weight`) or by its number of tokens with non-zero weight
(`tokens`). The data plan (`plan_batches(seed, epoch)`) is known to every process, so each process computes that
normaliser before the first backward pass from the plan itself: no communication, and exactly the same number
everywhere. Each micro-batch then backpropagates `loss_sum * world_size / normaliser`; DDP averages gradients over
processes, which undoes the `world_size`. The result depends on which examples are in the step, not on how they are
split into micro-batches or processes.

Sharding. A global step is `accumulation x world_size` consecutive micro-batches of the plan; process r takes
micro-batches r, r + world_size, ... of each step. A process left without one (a short last step) runs a zero-weight
pass so that DDP's gradient all-reduce still happens on every process; under FSDP and DeepSpeed every process runs as
many passes as the busiest one (`distributed.share_of_step`). FSDP (`accelerate launch --config_file fsdp.yaml`, also
on CPU) and DeepSpeed ZeRO-2/3 (`deepspeed_zero2.yaml`, `deepspeed_zero3.yaml`) average gradients like DDP, so the
same normaliser holds (tests/test_fsdp.py, tests/test_deepspeed.py). DeepSpeed is configured with gradient
accumulation 1, so its backward never divides the loss by an accumulation count; `accelerator.sync_gradients` marks
the last pass, on which DeepSpeed reduces, clips at `max_grad_norm` and steps imtune's AdamW inside the backward.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from imtune.config import TrainConfig
from imtune.errors import ImtuneError
from imtune.masking.templates import CHAT_TEMPLATES
from imtune.training import checkpointing, distributed, fast_defaults
from imtune.training.components import build_model, build_optimizer, lr_lambda
from imtune.training.data import Plan, encode_sets, load_sets, make_batch
from imtune.training.health import StallWatch, trainable_finite
from imtune.training.outputs import (
    CONFIG_FILE,
    FINAL_METRICS_FILE,
    MetricsLog,
    RunDir,
    config_yaml,
    note,
    save_final,
    saved_config,
)

__all__ = ["CHAT_TEMPLATES", "TrainResult", "lr_lambda", "train"]
# Settings a resumed run must share with the checkpoint, or the data order / parameters would not line up.
MUST_MATCH = ("model", "revision", "data", "data_split", "data_config", "data_revision", "data_format", "objective",
              "template", "max_length", "truncation_side", "seed", "micro_batch_size", "group_by_length", "packing",
              "val_data", "val_fraction", "lora", "lora_r", "lora_target_modules")



@dataclass
class TrainResult:
    output_dir: Path
    metrics: dict  # final: train_loss, eval_loss, steps, tokens, runtime_s, ...
    history: list[dict] = field(default_factory=list)  # one row per logged train step
    eval_history: list[dict] = field(default_factory=list)
    config: TrainConfig | None = None


def train(config: TrainConfig | dict | str | os.PathLike) -> TrainResult:
    """Train per `config` (a TrainConfig, a dict of its fields, or a YAML path); see the module doc."""
    from transformers.utils import logging as hf_logging

    # transformers' per-shard load/save bars would interleave with the training bar; imtune prints its own notes.
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return _train(config)
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def _train(config) -> TrainResult:
    recipe = Recipe(TrainConfig.coerce(config).validate())
    recipe.set_up()
    try:
        recipe.start()
        recipe.train_loop()
        return recipe.save()
    except BaseException:
        recipe.clean_up_failed()
        raise


class Recipe:
    """One training run. Steps, in the order `_train` calls them: set_up, start, train_loop (plan, step,
    evaluate, checkpoint), save."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.t_start = time.time()
        self.global_step = self.start_epoch = self.start_in_epoch = 0
        self.tokens_seen = 0
        self.last_row: dict = {}
        self.eval_rows: list[dict] = []
        self.stall = StallWatch()
        self.last_good: Path | None = None  # the newest checkpoint whose weights were verified finite

    # ---- set up: everything that can fail on bad input happens before the output directory is touched --------------
    def set_up(self) -> None:
        cfg = self.cfg
        self.run_dir = RunDir(cfg.out)
        self.run_dir.check(cfg)
        self.out = self.run_dir.out
        # cpu=True on a machine without an accelerator lets a multi-process launch (`accelerate launch --multi_gpu`,
        # torchrun) run as MULTI_CPU over gloo instead of as independent single processes; FSDP configs as FSDP.
        acc = self.accelerator = distributed.make_accelerator(not _has_accelerator(), cfg.micro_batch_size,
                                                              cfg.max_grad_norm)
        self.world, self.rank, self.is_main = acc.num_processes, acc.process_index, acc.is_main_process
        self.run_dir.active = self.is_main
        # sharded: parameters are per-process shards (FSDP, ZeRO-3); layout: how checkpoints are written. Under
        # DeepSpeed every process runs as many passes as the busiest (ZeRO reduces inside each backward).
        self.sharded, self.layout = distributed.params_sharded(acc), distributed.layout(acc)
        self.lockstep = self.layout != "plain"
        self.accumulation = cfg.accumulation_steps(self.world)
        self.ckpt = checkpointing.find_checkpoint(self.out, cfg.resume) if cfg.resume else None
        self.resumed = checkpointing.read_state(self.ckpt) if self.ckpt else None
        if self.resumed:
            _check_resume_compatible(cfg, self.resumed, self.accumulation * self.world * cfg.micro_batch_size)
        self._set_up_data()
        self._set_up_model()

    def _set_up_data(self) -> None:
        from imtune.models import load_tokenizer

        cfg = self.cfg
        load_notes: list[str] = []  # skipped records: printed and kept in the summary with the encoder's notes
        records, val_records, self.data_fingerprint = load_sets(cfg, load_notes.append,
                                                                self.accelerator.main_process_first)
        _check_same_data(cfg, self.resumed, self.data_fingerprint)  # before encoding: nothing printed yet
        self.tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code, revision=cfg.revision)
        self.pad_id = self.tokenizer.pad_token_id
        self.train_data, self.val_data, self.data_summary, self.data_notes = encode_sets(
            cfg, self.tokenizer, records, val_records, main_first=self.accelerator.main_process_first,
            report=note if self.is_main else None)
        self.data_notes = load_notes + self.data_notes

    def _set_up_model(self) -> None:
        from accelerate.utils import set_seed

        from imtune.training.loss import neftune_hook

        cfg = self.cfg
        set_seed(cfg.seed)
        model, self.ref_model = build_model(cfg, self.accelerator)
        # precision auto -> bf16/fp32, padding-free auto, packing checked on this model (fast_defaults.py)
        cfg, self.fast = fast_defaults.resolve(cfg, model, self.accelerator.device, movable=not self.sharded)
        self.cfg, self.packed = cfg, self.fast.packing or self.fast.padding_free  # packed = flattened rows
        self.plan = Plan(cfg, self.train_data, self.accumulation, self.world)
        self.total_steps = self.plan.total_steps()
        optimizer = build_optimizer(cfg, model)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, self.total_steps))
        self.neftune = neftune_hook(model, cfg.neftune_alpha) if cfg.neftune_alpha > 0 else None
        # The scheduler stays unprepared: accelerate would step it once per process.
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        if self.layout == "deepspeed":  # saved and restored by accelerate's save_state / load_state
            self.accelerator.register_for_checkpointing(self.scheduler)
        self.autocast = functools.partial(self.fast.autocast, self.accelerator.device.type)

    # ---- start: restore the checkpoint, or open a fresh output directory ----------------------------------------------
    def start(self) -> None:
        cfg, keep_rows = self.cfg, None
        if self.ckpt:
            st = checkpointing.load_checkpoint(self.ckpt, self.model, self.optimizer, self.scheduler,
                                               self.accelerator, layout=self.layout)
            self.global_step, self.start_epoch, self.start_in_epoch = st.global_step, st.epoch, st.step_in_epoch
            keep_rows = st.metrics_rows
            self._verify(f"checkpoint {self.ckpt} holds non-finite weights")
            self.last_good = self.ckpt
            if self.is_main:
                note(f"resuming from {self.ckpt} (step {self.global_step}, epoch {self.start_epoch + 1}, "
                     f"step {self.start_in_epoch} of it)")
        if self.is_main:
            from imtune.io_utils import atomic_write_text

            self.run_dir.open(overwrite=cfg.overwrite and not cfg.resume)
            atomic_write_text(self.run_dir.claim(CONFIG_FILE), config_yaml(saved_config(cfg)))
        self.accelerator.wait_for_everyone()
        self.log = MetricsLog(self.run_dir, keep_rows, purge_step=self.global_step + 1 if self.ckpt else None,
                              resumed_from=self.ckpt.parent.parent if self.ckpt else None, cfg=self.cfg)
        self.eval_rows = [r for r in self.log.rows if "eval_loss" in r]
        self.tokens_seen = sum(r.get("tokens", 0) for r in self.log.rows if "loss" in r)
        if self.is_main:
            self._announce_plan()

    def _announce_plan(self) -> None:
        from imtune.training.batching import padding_fraction

        cfg, data = self.cfg, self.train_data
        pad = 0.0 if self.packed else padding_fraction(
            [mb for step in self.plan.steps(self.start_epoch) for mb in step], data.lengths)
        note(f"{len(data)} training examples"
             + (f", {len(self.val_data)} held out" if self.val_data else "")
             + f"; {self.total_steps} steps of {cfg.micro_batch_size} x {self.accumulation} accumulation x "
               f"{self.world} process(es); objective {cfg.objective}; padding {pad:.1%}; {self.fast.summary()}")
        for line in self.data_notes:
            note(line)

    # ---- the loop: plan -> step -> evaluate -> checkpoint ------------------------------------------------------------
    def train_loop(self) -> None:
        cfg = self.cfg
        progress = _progress_bar(self.total_steps, self.global_step, enabled=self.is_main and cfg.progress)
        self.model.train()
        ended_epoch = False
        try:
            epoch = self.start_epoch
            while self.global_step < self.total_steps:
                steps = self.plan.steps(epoch)
                first = self.start_in_epoch if epoch == self.start_epoch else 0
                for s in range(first, min(len(steps), first + self.total_steps - self.global_step)):
                    row = self.step(steps[s], round(epoch + (s + 1) / len(steps), 4))
                    progress.update(1)
                    progress.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:,.0f}",
                                         refresh=False)
                    ended_epoch = s == len(steps) - 1
                    if ended_epoch and self.val_data is not None:
                        self.evaluate(epoch + 1)
                    due = ended_epoch or (cfg.save_steps and self.global_step % cfg.save_steps == 0)
                    if due and cfg.checkpoints:
                        self.checkpoint(*((epoch + 1, 0) if ended_epoch else (epoch, s + 1)))
                epoch += 1
            if self.val_data is not None and not ended_epoch and self.global_step > 0:
                self.evaluate(self.last_row.get("epoch", epoch))
        finally:
            progress.close()
            self.log.close()
            if self.neftune is not None:
                self.neftune.remove()

    def step(self, step_mbs: list[list[int]], epoch: float) -> dict:
        """One optimizer step over the plan's micro-batches `step_mbs` (this process takes its share)."""
        t0 = time.perf_counter()
        norm = self.plan.normaliser(step_mbs)
        loss_total, ce_total, kl_total = self._forward_backward(step_mbs, norm)
        loss = loss_total / norm
        grad_norm = self.accelerator.clip_grad_norm_(
            [p for p in self.model.parameters() if p.requires_grad],
            self.cfg.max_grad_norm if self.cfg.max_grad_norm > 0 else float("inf"))
        grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
        if not math.isfinite(loss) or not math.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            what = f"loss is {loss}" if not math.isfinite(loss) else f"gradient norm is {grad_norm}"
            # DeepSpeed steps inside the last backward pass: the update is applied, and never saved.
            when = "after DeepSpeed applied it" if self.layout == "deepspeed" else "before applying it"
            raise self._stopped(self.global_step + 1, f"{what}; training stopped {when}")
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1
        self._verify("the update made trained weights non-finite (inf/NaN)")
        warning = self.stall.observe(self.global_step, loss, grad_norm)
        if warning and self.is_main:
            note(f"warning: {warning}")
        row = self._step_row(step_mbs, epoch, loss, lr, grad_norm, time.perf_counter() - t0)
        if self.cfg.kl_coef > 0:
            row["ce_loss"], row["kl"] = ce_total / norm, kl_total / norm
        self.last_row = row
        if self.global_step % self.cfg.logging_steps == 0 or self.global_step == self.total_steps:
            self.log.write(row)
        return row

    def _forward_backward(self, step_mbs: list[list[int]], norm: float) -> tuple[float, float, float]:
        """Accumulate this process' gradients for the step; returns (loss, CE, KL) sums over all processes."""
        from imtune.training.loss import weighted_loss_sum

        cfg, acc, world = self.cfg, self.accelerator, self.world
        passes = distributed.share_of_step(step_mbs, self.rank, world, lockstep=self.lockstep)
        scale = world / norm
        stats = torch.zeros(3, dtype=torch.float64)  # loss_sum, ce_sum, kl_sum over this process
        for i, (mb, real) in enumerate(passes):  # real = 0.0: a stand-in pass that contributes nothing
            batch = make_batch(cfg, self.train_data.take(mb), self.pad_id, acc.device, self.packed)
            last = i == len(passes) - 1
            # accelerate's own accumulation switch: gradients are reduced (DeepSpeed: and the optimizer steps) on the
            # last pass only.
            acc.sync_gradients = last
            with contextlib.nullcontext() if last else acc.no_sync(self.model):
                with self.autocast():
                    o = weighted_loss_sum(self.model, batch, chunk_size=cfg.loss_chunk_size, kl_coef=cfg.kl_coef,
                                          kl_type=cfg.kl_type, ref_model=self.ref_model,
                                          ref_adapter_disabled=cfg.lora and cfg.kl_coef > 0, kernels=cfg.kernels)
                acc.backward(o.loss_sum * (scale * real))
            stats += torch.tensor([float(o.loss_sum.detach()) * real, o.ce_sum * real, o.kl_sum * real],
                                  dtype=torch.float64)
        if world > 1:
            stats = acc.reduce(stats.to(acc.device), "sum").cpu()
        return tuple(stats.tolist())

    def _step_row(self, step_mbs, epoch: float, loss: float, lr: float, grad_norm: float, dt: float) -> dict:
        data = self.train_data
        idx = [j for mb in step_mbs for j in mb]
        n_tok = int(data.lengths[idx].sum())
        self.tokens_seen += n_tok
        padded = n_tok if self.packed else sum(len(mb) * int(data.lengths[mb].max()) for mb in step_mbs)
        return {"step": self.global_step, "epoch": epoch, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                "tokens_per_s": n_tok / dt, "tokens": n_tok, "weighted_tokens": int(data.n_weighted[idx].sum()),
                "weight_sum": float(data.weight_sums[idx].sum()),
                "padding_fraction": 1.0 - n_tok / padded if padded else 0.0, "step_time_s": dt}

    def evaluate(self, epoch: float) -> dict:
        """Output-only loss on the held-out set: sum(w * CE) / sum(w) over all of it, sharded over processes."""
        from imtune.training.batching import plan_batches
        from imtune.training.logprobs import score_weighted

        cfg, acc, val, model = self.cfg, self.accelerator, self.val_data, self.model
        batches = plan_batches(val.lengths.tolist(), cfg.micro_batch_size, seed=0, epoch=0, group_by_length=True,
                               shuffle=False)
        sums = torch.zeros(2, dtype=torch.float64, device=acc.device)
        was_training = model.training
        model.eval()
        with torch.no_grad():
            for r in range(math.ceil(len(batches) / self.world)):
                k = r * self.world + self.rank
                # Every process runs the same number of forwards (collectives in DDP/FSDP); extra ones count zero.
                mb = batches[k] if k < len(batches) else batches[0]
                batch = make_batch(cfg, val.take(mb), self.pad_id, acc.device, packed=False)
                with self.autocast():
                    o = score_weighted(model, batch, chunk_size=cfg.loss_chunk_size)
                if k < len(batches):
                    sums += torch.tensor([o.ce_sum, o.weight_sum], dtype=torch.float64, device=sums.device)
        model.train(was_training)
        ce, w = (acc.reduce(sums, "sum") if self.world > 1 else sums).tolist()
        row = {"step": self.global_step, "epoch": epoch, "eval_loss": ce / w if w else float("nan"),
               "eval_weighted_tokens": w}
        self.eval_rows.append(row)
        self.log.write(row)
        return row

    def checkpoint(self, epoch: int, step_in_epoch: int) -> Path:
        """Save everything needed to continue at (epoch, step_in_epoch) of the plan; only finite weights."""
        self._verify("trained weights are non-finite (inf/NaN)")
        state = checkpointing.TrainerState(self.global_step, epoch, step_in_epoch, len(self.log.rows), self.world,
                                           saved_config(self.cfg), self.data_fingerprint)
        self.run_dir.claim(checkpointing.checkpoint_path(self.out, self.global_step).relative_to(self.out)
                           .as_posix(), "trees")
        path = checkpointing.save_checkpoint(self.out, state, self.model, self.optimizer, self.scheduler,
                                             self.accelerator, layout=self.layout,
                                             save_total_limit=self.cfg.save_total_limit)
        self.run_dir.forget_missing()  # checkpoints pruned by save_total_limit
        self.last_good = path
        return path

    def _verify(self, what: str) -> None:
        if not trainable_finite(self.model, self.accelerator, self.sharded):
            raise self._stopped(self.global_step, what)

    def _stopped(self, step: int, what: str) -> ImtuneError:
        return ImtuneError(f"step {step}: {what}; nothing from this step was saved (last good checkpoint: "
                           f"{self.last_good or 'none'}); try a lower --lr or --precision fp32")

    def clean_up_failed(self) -> None:
        """A failed run removes what it wrote, except a verified checkpoint (and what --resume needs with it)."""
        if getattr(self, "log", None) is not None:
            self.log.finish(failed=True)
        kept = self.run_dir.clean_up_failed()
        if self.is_main:
            note(f"the run failed; kept {kept} for --resume" if kept
                 else f"the run failed; removed what it wrote to {self.out}")

    # ---- save: final model, tokenizer, card and metrics --------------------------------------------------------------
    def save(self) -> TrainResult:
        from imtune.training.model_card import render_model_card

        cfg, out = self.cfg, self.out
        history = [r for r in self.log.rows if "loss" in r]
        final = {"train_loss": history[-1]["loss"] if history else None, "steps": self.global_step,
                 "epochs": round(history[-1]["epoch"], 4) if history else 0, "tokens": self.tokens_seen,
                 "runtime_s": round(time.time() - self.t_start, 2)}
        if self.eval_rows:
            final["eval_loss"] = self.eval_rows[-1]["eval_loss"]
        self._verify("trained weights are non-finite (inf/NaN)")
        card = render_model_card(saved_config(cfg), base_model=cfg.model, data_summary=self.data_summary,
                                 final_metrics=final, adapter=cfg.lora and not cfg.merge,
                                 data_notes=self.data_notes, warnings=self.stall.warnings)
        save_final(cfg, self.run_dir, self.model, self.tokenizer, self.accelerator, card, self.sharded,
                   CHAT_TEMPLATES.get(cfg.template))
        self.accelerator.wait_for_everyone()
        final["data"] = self.data_summary
        if self.data_notes:
            final["data_notes"] = self.data_notes
        if self.stall.warnings:
            final["warnings"] = self.stall.warnings
        if self.is_main:
            from imtune.io_utils import atomic_write_json

            atomic_write_json(self.run_dir.claim(FINAL_METRICS_FILE), final)
            self.log.finish(final)
            loss = "n/a" if final["train_loss"] is None else f"{final['train_loss']:.4f}"
            note(f"done: {self.global_step} steps, train loss {loss}"
                 + (f", eval loss {final['eval_loss']:.4f}" if "eval_loss" in final else "") + f"; saved to {out}"
                 + (f"; {len(self.stall.warnings)} warning(s), see {FINAL_METRICS_FILE}" if self.stall.warnings
                    else ""))
        return TrainResult(out, final, history, self.eval_rows, cfg)


def _check_resume_compatible(cfg: TrainConfig, st: checkpointing.TrainerState, global_batch: int) -> None:
    saved = st.config
    diffs = [k for k in MUST_MATCH if k in saved and saved[k] != getattr(cfg, k)]
    saved_cfg = TrainConfig.from_dict(saved)
    saved_global = saved_cfg.micro_batch_size * saved_cfg.accumulation_steps(st.world_size) * st.world_size
    if saved_global != global_batch:
        diffs.append(f"global batch ({saved_global} -> {global_batch})")
    if diffs:
        raise ImtuneError(f"--resume: the checkpoint was saved with different {', '.join(diffs)}; "
                          f"resume with the same settings or start a new run")


def _check_same_data(cfg: TrainConfig, st: checkpointing.TrainerState | None, fingerprint: str | None) -> None:
    # A checkpoint without a fingerprint was saved by an imtune that did not record one: nothing to compare.
    if st is not None and st.data_fingerprint not in (None, fingerprint):
        raise ImtuneError(f"--resume: {', '.join(cfg.data_paths())} changed since the checkpoint was saved (a file "
                          "edited, a Hub dataset's revision moved); resume with the same data or start a new run")


def _has_accelerator() -> bool:
    acc = getattr(torch, "accelerator", None)
    return bool(acc.is_available()) if acc is not None else torch.cuda.is_available()


def _progress_bar(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True,
                desc="train", file=sys.stderr)
