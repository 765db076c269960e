"""The training recipe: one readable flow from a `TrainConfig` to a saved model.

    config -> data (load, split, encode with the objective's weights) -> model (+LoRA, +reference for KL)
           -> for each optimizer step: normaliser from the plan -> forward/backward per micro-batch -> clip -> step
           -> metrics, checkpoints, evaluation -> final model, tokenizer, model card

Loss normalisation. A step's loss is sum(w_t * CE_t) over every micro-batch of the step, on every process, divided
by the step's total weight (`loss_normalization: weight`) or by its number of tokens with non-zero weight
(`tokens`). The data plan (`plan_batches(seed, epoch)`) is known to every process, so each process computes that
normaliser before the first backward pass from the plan itself: no communication, and exactly the same number
everywhere. Each micro-batch then backpropagates `loss_sum * world_size / normaliser`; DDP averages gradients over
processes, which undoes the `world_size`. The result depends on which examples are in the step, not on how they are
split into micro-batches or processes.

Sharding. A global step is `accumulation x world_size` consecutive micro-batches of the plan; process r takes
micro-batches r, r + world_size, ... of each step. A process left without one (a short last step) runs a zero-weight
pass so that DDP's gradient all-reduce still happens on every process.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from imtune.training import checkpointing
from imtune.config import TrainConfig
from imtune.errors import ImtuneError

CONFIG_FILE = "imtune_config.yaml"
METRICS_FILE = "metrics.jsonl"
TB_DIR = "tensorboard"
# Settings a resumed run must share with the checkpoint, or the data order / parameters would not line up.
MUST_MATCH = ("model", "data", "data_format", "objective", "template", "max_length", "truncation_side", "seed",
              "micro_batch_size", "group_by_length", "packing", "val_data", "val_fraction", "lora", "lora_r",
              "lora_target_modules")

# Jinja equivalents of imtune's named templates, stored with the saved tokenizer so that apply_chat_template
# renders prompts exactly as in training.
CHAT_TEMPLATES = {
    "tulu": (
        "{% for message in messages %}"
        "{{ '<|' + message['role'] + '|>\n' + (message['content'] | trim) }}"
        "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
        "{% if not loop.last %}{{ '\n' }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '\n<|assistant|>\n' }}{% endif %}"
    ),
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    "alpaca": (
        "{% if messages[0]['role'] == 'system' %}{{ (messages[0]['content'] | trim) + '\n\n' }}"
        "{% else %}{{ 'Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n' }}{% endif %}"
        "{% for message in messages %}"
        "{% if message['role'] == 'user' %}{{ '### Instruction:\n' + (message['content'] | trim) + '\n\n' }}"
        "{% elif message['role'] == 'assistant' %}"
        "{{ '### Response:\n' + (message['content'] | trim) + eos_token + '\n\n' }}"
        "{% elif not loop.first %}{{ (message['content'] | trim) + '\n\n' }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"
    ),
}


@dataclass
class TrainResult:
    output_dir: Path
    metrics: dict  # final: train_loss, eval_loss, steps, tokens, runtime_s, ...
    history: list[dict] = field(default_factory=list)  # one row per logged train step
    eval_history: list[dict] = field(default_factory=list)
    config: TrainConfig | None = None


@dataclass
class Split:
    """Encoded examples plus per-example totals the step normaliser is built from."""

    examples: list
    lengths: np.ndarray
    weight_sums: np.ndarray  # float64
    n_weighted: np.ndarray


def _split(examples) -> Split:
    return Split(examples, np.array([len(e) for e in examples], dtype=np.int64),
                 np.array([math.fsum(e.weights) for e in examples], dtype=np.float64),
                 np.array([sum(1 for w in e.weights if w > 0) for e in examples], dtype=np.int64))


# ---------------------------------------------------------------------------------------------------------- data


def load_split(cfg: TrainConfig) -> tuple[list, list]:
    """Training and held-out records (not yet tokenised)."""
    from imtune.records.loading import load_dataset

    def load(path):
        res = load_dataset(path, format=cfg.data_format, skip_invalid=cfg.skip_invalid)
        if res.skipped:
            _note(f"skipped {len(res.skipped)} invalid record(s) in {path}: {res.skipped[0].format()}"
                  + (" ..." if len(res.skipped) > 1 else ""))
        return res.records

    records = load(cfg.data)
    val_records = load(cfg.val_data) if cfg.val_data else []
    if cfg.val_fraction:
        from imtune.records.split import holdout_split, n_heldout

        records, val_records = holdout_split(records, n_heldout(len(records), cfg.val_fraction), cfg.seed,
                                             source=f"{cfg.data} (val_fraction {cfg.val_fraction:g})")
    return records, val_records


def encode_split(cfg: TrainConfig, tokenizer, records, val_records) -> tuple[Split, Split | None, dict]:
    from imtune.masking.encoding import encode_with_report

    enc_args = dict(template=cfg.template, max_length=cfg.max_length, truncation_side=cfg.truncation_side)
    train, rep = encode_with_report(records, tokenizer, cfg.objective, **enc_args)
    if not train:
        raise ImtuneError(f"{cfg.data}: no example has a token with non-zero weight under objective {cfg.objective}")
    summary = {"train_examples": len(train), "truncated": rep.n_truncated, "dropped_no_weight": rep.n_dropped}
    val = None
    if val_records:
        # Held-out loss is always output-only, so runs with different training objectives are comparable.
        val_enc, _ = encode_with_report(val_records, tokenizer, "it", **enc_args)
        if val_enc:
            val = _split(val_enc)
            summary["val_examples"] = len(val_enc)
    split = _split(train)
    summary["train_tokens"] = int(split.lengths.sum())
    summary["weighted_tokens"] = int(split.n_weighted.sum())
    return split, val, summary


class Plan:
    """Which examples form each micro-batch and each optimizer step, per epoch; identical on every process."""

    def __init__(self, cfg: TrainConfig, data: Split, accumulation: int, world_size: int):
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


# ---------------------------------------------------------------------------------------------------------- model


def build_model(cfg: TrainConfig, accelerator):
    """The model to train, plus the KL reference model (or None). Frozen reference = the starting weights."""
    from imtune.models import load_model

    model = load_model(cfg.model, dtype="float32", trust_remote_code=cfg.trust_remote_code)
    if cfg.attn_implementation:
        try:
            model.set_attn_implementation(cfg.attn_implementation)
        except (ValueError, ImportError) as e:
            raise ImtuneError(f"attn_implementation {cfg.attn_implementation!r}: {e}") from None
    ref = None
    if cfg.kl_coef > 0 and not cfg.lora:
        # Copied before any hook is attached, so the reference never sees NEFTune noise.
        ref = copy.deepcopy(model).eval().requires_grad_(False).to(accelerator.device)
    if cfg.lora:
        from peft import LoraConfig, get_peft_model

        targets = cfg.lora_target_modules.strip()
        targets = targets if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()]
        lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=targets, task_type="CAUSAL_LM")
        try:
            model = get_peft_model(model, lcfg)
        except ValueError as e:
            raise ImtuneError(f"lora_target_modules {cfg.lora_target_modules!r}: {e}") from None
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(model, "config"):
        model.config.use_cache = False
    return model, ref


def build_optimizer(cfg: TrainConfig, model) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            # Matrices decay; biases and norm gains do not (the usual AdamW convention).
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # The fused kernel (CPU and CUDA) is what HF Trainer uses by default on recent torch; same maths, one pass.
    fused = all(p.device.type in ("cpu", "cuda") for p in decay + no_decay)
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                             eps=cfg.adam_epsilon, fused=fused or None)


def lr_lambda(cfg: TrainConfig, total_steps: int):
    warmup = math.ceil(cfg.warmup_ratio * total_steps)

    def f(step: int) -> float:
        if step < warmup:
            return step / warmup
        if cfg.lr_scheduler == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        if cfg.lr_scheduler == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return max(0.0, 1.0 - progress)

    return f


# ---------------------------------------------------------------------------------------------------------- output


def _note(msg: str) -> None:
    print(f"imtune train: {msg}", file=sys.stderr, flush=True)


def check_output_dir(cfg: TrainConfig) -> Path:
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ImtuneError(f"out: {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not cfg.resume:
        if not cfg.overwrite:
            raise ImtuneError(f"out: {out} is not empty; pass --overwrite to replace it or --resume to continue")
        if not ((out / CONFIG_FILE).exists() or (out / checkpointing.CHECKPOINTS).exists()):
            raise ImtuneError(f"out: refusing to --overwrite {out}: it does not look like an imtune output "
                              f"directory (no {CONFIG_FILE})")
    return out


def _clear_dir(out: Path) -> None:
    for p in out.iterdir():
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def saved_config(cfg: TrainConfig) -> dict:
    # resume/overwrite describe one invocation, not the run: re-using the file should start a run, not resume one.
    return cfg.replace(resume=None, overwrite=False).to_dict()


def save_final(cfg: TrainConfig, out: Path, model, tokenizer, accelerator, card: str, sharded: bool) -> None:
    """Write model, tokenizer and card to a temp dir, then rename the files into `out` (config.json and README
    last, so a directory that looks loadable is complete)."""
    state_dict = accelerator.get_state_dict(model) if sharded else None
    if not accelerator.is_main_process:
        return
    from imtune.io_utils import atomic_write_text

    unwrapped = accelerator.unwrap_model(model)
    tmp = out / f".tmp-final-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        if cfg.lora and cfg.merge:
            unwrapped = unwrapped.merge_and_unload()
            state_dict = None
        if hasattr(unwrapped, "config"):
            unwrapped.config.use_cache = True
        unwrapped.save_pretrained(str(tmp), state_dict=state_dict, safe_serialization=True)
        tok = copy.copy(tokenizer)  # load_tokenizer memoises: never mutate the shared instance
        if cfg.template in CHAT_TEMPLATES:
            tok.chat_template = CHAT_TEMPLATES[cfg.template]
        tok.save_pretrained(str(tmp))
        names = sorted(p.name for p in tmp.iterdir())
        last = [n for n in ("adapter_config.json", "config.json") if n in names]
        for n in [n for n in names if n not in last] + last:
            dst = out / n
            if dst.is_dir():
                shutil.rmtree(dst)
            os.replace(tmp / n, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    atomic_write_text(out / "README.md", card)


class MetricsLog:
    """metrics.jsonl + TensorBoard, main process only."""

    def __init__(self, out: Path, active: bool, keep_rows: int | None, purge_step: int | None):
        self.active, self.rows = active, []
        self.path = out / METRICS_FILE
        self.f = self.tb = None
        if not active:
            return
        if keep_rows is not None and self.path.exists():
            # Rows written after the checkpoint belong to the part of the run that is being redone.
            lines = self.path.read_text(encoding="utf-8").splitlines(keepends=True)[:keep_rows]
            self.path.write_text("".join(lines), encoding="utf-8")
            self.rows = [json.loads(x) for x in lines]
        self.f = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / TB_DIR), purge_step=purge_step)
        except ImportError:  # tensorboard is a dependency, but a broken install should not stop training
            self.tb = None

    def write(self, row: dict) -> None:
        self.rows.append(row)
        if not self.active:
            return
        self.f.write(json.dumps(row) + "\n")
        self.f.flush()
        if self.tb is not None:
            tag = "eval" if "eval_loss" in row else "train"
            for k, v in row.items():
                if k not in ("step", "epoch") and isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(f"{tag}/{k}", v, row["step"])

    def close(self) -> None:
        if self.f:
            self.f.close()
        if self.tb is not None:
            self.tb.close()


# ---------------------------------------------------------------------------------------------------------- loop


def evaluate(model, val: Split, cfg: TrainConfig, accelerator, pad_id: int, autocast) -> dict:
    """Output-only loss on the held-out split: sum(w * CE) / sum(w) over all of it, sharded over processes."""
    from imtune.training.batching import plan_batches
    from imtune.training.loss import weighted_loss_sum

    batches = plan_batches(val.lengths.tolist(), cfg.micro_batch_size, seed=0, epoch=0, group_by_length=True,
                           shuffle=False)
    world, rank = accelerator.num_processes, accelerator.process_index
    n_rounds = math.ceil(len(batches) / world)
    sums = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for r in range(n_rounds):
            k = r * world + rank
            # Every process runs the same number of forwards (collectives in DDP/FSDP); extra ones count zero.
            mb = batches[k] if k < len(batches) else batches[0]
            batch = make_batch(cfg, [val.examples[i] for i in mb], pad_id, accelerator.device, packed=False)
            with autocast():
                o = weighted_loss_sum(model, batch, chunk_size=cfg.loss_chunk_size)
            if k < len(batches):
                sums += torch.tensor([o.ce_sum, o.weight_sum], dtype=torch.float64, device=sums.device)
    model.train(was_training)
    sums = accelerator.reduce(sums, "sum") if world > 1 else sums
    ce, w = sums.tolist()
    return {"eval_loss": ce / w if w else float("nan"), "eval_weighted_tokens": w}


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
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, set_seed

    from imtune.training.loss import neftune_hook, weighted_loss_sum
    from imtune.training.model_card import render_model_card
    from imtune.models import load_tokenizer

    t_start = time.time()
    cfg = TrainConfig.coerce(config).validate()

    # ---- everything that can fail on bad input happens before the output directory is touched
    out = check_output_dir(cfg)
    # cpu=True on a machine without an accelerator lets a multi-process launch (`accelerate launch --multi_gpu`,
    # torchrun) run as MULTI_CPU over gloo instead of as independent single processes.
    accelerator = Accelerator(cpu=not _has_accelerator())
    world, rank, is_main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
    sharded = accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP)
    accumulation = cfg.accumulation_steps(world)
    ckpt = checkpointing.find_checkpoint(out, cfg.resume) if cfg.resume else None
    ckpt_state = checkpointing.read_state(ckpt) if ckpt else None
    if ckpt_state:
        _check_resume_compatible(cfg, ckpt_state, accumulation * world * cfg.micro_batch_size)
    records, val_records = load_split(cfg)
    tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    train_data, val_data, data_summary = encode_split(cfg, tokenizer, records, val_records)
    set_seed(cfg.seed)
    model, ref_model = build_model(cfg, accelerator)
    packed = False
    if cfg.packing:
        from imtune.training.batching import supports_packing

        packed = supports_packing(model)
        if not packed:
            _note(f"packing is off: {type(model).__name__} does not honour position_ids across packed examples")
            cfg = cfg.replace(packing=False)
    plan = Plan(cfg, train_data, accumulation, world)
    total_steps = plan.total_steps()
    optimizer = build_optimizer(cfg, model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))
    neftune = neftune_hook(model, cfg.neftune_alpha) if cfg.neftune_alpha > 0 else None
    # The scheduler stays unprepared: accelerate would step it once per process.
    model, optimizer = accelerator.prepare(model, optimizer)
    device_type = accelerator.device.type
    autocast = (lambda: torch.autocast(device_type, dtype=torch.bfloat16)) if cfg.precision == "bf16" \
        else contextlib.nullcontext
    pad_id = tokenizer.pad_token_id

    # ---- restore or start the output directory
    global_step, start_epoch, start_in_epoch, keep_rows = 0, 0, 0, None
    if ckpt:
        st = checkpointing.load_checkpoint(ckpt, model, optimizer, scheduler, accelerator, sharded=sharded)
        global_step, start_epoch, start_in_epoch, keep_rows = st.global_step, st.epoch, st.step_in_epoch, \
            st.metrics_rows
        if is_main:
            _note(f"resuming from {ckpt} (step {global_step}, epoch {start_epoch + 1}, "
                  f"step {start_in_epoch} of it)")
    if is_main:
        if cfg.overwrite and not cfg.resume and out.is_dir():
            _clear_dir(out)
        out.mkdir(parents=True, exist_ok=True)
        from imtune.io_utils import atomic_write_text

        atomic_write_text(out / CONFIG_FILE, _yaml(saved_config(cfg)))
    accelerator.wait_for_everyone()
    log = MetricsLog(out, is_main, keep_rows, purge_step=global_step + 1 if ckpt else None)

    if is_main:
        from imtune.training.batching import padding_fraction

        pad = padding_fraction(plan.micro_batches(start_epoch), train_data.lengths.tolist()) if not packed else 0.0
        _note(f"{len(train_data.examples)} training examples"
              + (f", {len(val_data.examples)} held out" if val_data else "")
              + f"; {total_steps} steps of {cfg.micro_batch_size} x {accumulation} accumulation x {world} "
                f"process(es); objective {cfg.objective}; padding {pad:.1%}")

    progress = _progress_bar(total_steps, global_step, enabled=is_main and cfg.progress)
    model.train()
    last_row: dict = {}
    eval_rows: list[dict] = [r for r in log.rows if "eval_loss" in r]
    tokens_seen = sum(r.get("tokens", 0) for r in log.rows if "loss" in r)
    stopped_at_epoch_end = False
    try:
        epoch = start_epoch
        while global_step < total_steps:
            steps = plan.steps(epoch)
            first = start_in_epoch if epoch == start_epoch else 0
            for s in range(first, len(steps)):
                if global_step >= total_steps:
                    break
                t0 = time.perf_counter()
                step_mbs = steps[s]
                norm = plan.normaliser(step_mbs)
                mine = step_mbs[rank::world]
                scale = world / norm
                stats = torch.zeros(3, dtype=torch.float64)  # loss_sum, ce_sum, kl_sum over this process
                for i, mb in enumerate(mine or step_mbs[:1]):
                    batch = make_batch(cfg, [train_data.examples[j] for j in mb], pad_id, accelerator.device,
                                       packed)
                    last = i == max(len(mine), 1) - 1
                    sync = contextlib.nullcontext() if last else accelerator.no_sync(model)
                    if sharded:
                        accelerator.gradient_state._set_sync_gradients(last)
                    with sync:
                        with autocast():
                            o = weighted_loss_sum(model, batch, chunk_size=cfg.loss_chunk_size,
                                                  kl_coef=cfg.kl_coef, kl_type=cfg.kl_type, ref_model=ref_model,
                                                  ref_adapter_disabled=cfg.lora and cfg.kl_coef > 0)
                        real = 1.0 if mine else 0.0  # a stand-in pass contributes nothing
                        accelerator.backward(o.loss_sum * (scale * real))
                    stats += torch.tensor([float(o.loss_sum.detach()) * real, o.ce_sum * real, o.kl_sum * real],
                                          dtype=torch.float64)
                if world > 1:
                    stats = accelerator.reduce(stats.to(accelerator.device), "sum").cpu()
                loss_total, ce_total, kl_total = stats.tolist()
                loss = loss_total / norm
                grad_norm = accelerator.clip_grad_norm_(
                    [p for p in model.parameters() if p.requires_grad],
                    cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
                grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
                if not math.isfinite(loss) or (not math.isfinite(grad_norm) and not sharded):
                    optimizer.zero_grad(set_to_none=True)
                    what = f"loss is {loss}" if not math.isfinite(loss) else f"gradient norm is {grad_norm}"
                    good = checkpointing.list_checkpoints(out)
                    raise ImtuneError(f"step {global_step + 1}: {what}; training stopped before applying it "
                                      f"(last good checkpoint: {good[-1] if good else 'none'}); try a lower --lr "
                                      f"or --precision fp32")
                lr = scheduler.get_last_lr()[0]
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                global_step += 1
                dt = time.perf_counter() - t0

                idx = [j for mb in step_mbs for j in mb]
                n_tok = int(train_data.lengths[idx].sum())
                tokens_seen += n_tok
                padded = sum(len(mb) * int(train_data.lengths[mb].max()) for mb in step_mbs) if not packed else n_tok
                row = {"step": global_step, "epoch": round(epoch + (s + 1) / len(steps), 4), "loss": loss,
                       "lr": lr, "grad_norm": grad_norm, "tokens_per_s": n_tok / dt, "tokens": n_tok,
                       "weighted_tokens": int(train_data.n_weighted[idx].sum()),
                       "weight_sum": float(train_data.weight_sums[idx].sum()),
                       "padding_fraction": 1.0 - n_tok / padded if padded else 0.0, "step_time_s": dt}
                if cfg.kl_coef > 0:
                    row["ce_loss"], row["kl"] = ce_total / norm, kl_total / norm
                last_row = row
                if global_step % cfg.logging_steps == 0 or global_step == total_steps:
                    log.write(row)
                progress.update(1)
                progress.set_postfix(loss=f"{loss:.4f}", tok_s=f"{n_tok / dt:,.0f}", refresh=False)

                epoch_end = s == len(steps) - 1
                stopped_at_epoch_end = epoch_end
                if epoch_end and val_data is not None:
                    ev = {"step": global_step, "epoch": epoch + 1,
                          **evaluate(model, val_data, cfg, accelerator, pad_id, autocast)}
                    eval_rows.append(ev)
                    log.write(ev)
                if epoch_end or (cfg.save_steps and global_step % cfg.save_steps == 0):
                    pos = (epoch + 1, 0) if epoch_end else (epoch, s + 1)
                    state = checkpointing.TrainerState(global_step, pos[0], pos[1], len(log.rows), world,
                                                       saved_config(cfg))
                    checkpointing.save_checkpoint(out, state, model, optimizer, scheduler, accelerator,
                                                  sharded=sharded, save_total_limit=cfg.save_total_limit)
            epoch += 1
        if val_data is not None and not stopped_at_epoch_end and global_step > 0:
            ev = {"step": global_step, "epoch": round(last_row.get("epoch", epoch), 4),
                  **evaluate(model, val_data, cfg, accelerator, pad_id, autocast)}
            eval_rows.append(ev)
            log.write(ev)
    finally:
        progress.close()
        log.close()
        if neftune is not None:
            neftune.remove()

    # ---- final outputs
    history = [r for r in log.rows if "loss" in r]
    final = {"train_loss": history[-1]["loss"] if history else None, "steps": global_step,
             "epochs": round(history[-1]["epoch"], 4) if history else 0, "tokens": tokens_seen,
             "runtime_s": round(time.time() - t_start, 2)}
    if eval_rows:
        final["eval_loss"] = eval_rows[-1]["eval_loss"]
    card = render_model_card(saved_config(cfg), base_model=cfg.model, data_summary=data_summary,
                             final_metrics=final, adapter=cfg.lora and not cfg.merge)
    save_final(cfg, out, model, tokenizer, accelerator, card, sharded)
    accelerator.wait_for_everyone()
    if is_main:
        from imtune.io_utils import atomic_write_json

        atomic_write_json(out / "final_metrics.json", final)
        _note(f"done: {global_step} steps, train loss {final['train_loss']:.4f}"
              + (f", eval loss {final['eval_loss']:.4f}" if "eval_loss" in final else "") + f"; saved to {out}")
    return TrainResult(out, final, history, eval_rows, cfg)


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


def _has_accelerator() -> bool:
    acc = getattr(torch, "accelerator", None)
    return bool(acc.is_available()) if acc is not None else torch.cuda.is_available()


def _yaml(d: dict) -> str:
    import yaml

    return "# Resolved imtune training config: `imtune train THIS_FILE --out NEW_DIR` repeats the run.\n" + \
        yaml.safe_dump(d, sort_keys=False, allow_unicode=True)


def _progress_bar(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True,
                desc="train", file=sys.stderr)
