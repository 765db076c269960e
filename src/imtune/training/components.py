"""The recipe's components: the model to train (+LoRA, +frozen reference for KL), AdamW and the LR schedule."""

from __future__ import annotations

import math

import torch

from imtune.config import TrainConfig


def build_model(cfg: TrainConfig, accelerator):
    """The model to train, plus the KL reference model (or None): the starting weights, frozen, loaded a second
    time (so it never sees NEFTune's hook), sharded like the model under FSDP. With LoRA the reference is the
    model with its adapter disabled. Both are loaded shard-first (`training.sharded_load`)."""
    from imtune.training.distributed import is_fsdp
    from imtune.training.sharded_load import load_causal_lm

    sharded = is_fsdp(accelerator)
    model = load_causal_lm(cfg, accelerator, sharded=sharded)
    ref = None
    if cfg.kl_coef > 0 and not cfg.lora:
        ref = load_causal_lm(cfg, accelerator, sharded=sharded, trainable=False)
        if not sharded:
            ref = ref.to(accelerator.device)
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
