"""The recipe's components: the model to train (+LoRA, +frozen reference for KL), AdamW and the LR schedule."""

from __future__ import annotations

import copy
import math

import torch

from imtune.config import TrainConfig
from imtune.errors import ImtuneError


def build_model(cfg: TrainConfig, accelerator):
    """The model to train, plus the KL reference model (or None). Frozen reference = the starting weights."""
    from imtune.models import load_model

    model = load_model(cfg.model, dtype="float32", trust_remote_code=cfg.trust_remote_code,
                       revision=cfg.revision)
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
