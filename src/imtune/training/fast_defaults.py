"""The fast settings `imtune train` picks by itself, resolved once per run and named in the run summary.

Each one is chosen only where it leaves the result unchanged up to bf16 rounding:

* `precision: auto` -> bf16 autocast (fp32 master weights, fp32 optimizer state, fp32 logits in the loss) where the
  device computes bf16 natively: a CUDA GPU that supports it, or a CPU with AVX512-BF16 / AMX-BF16 (x86) or BF16
  (Arm) instructions. Elsewhere bf16 matmuls are emulated and slower than fp32, so auto means fp32 there.
* `padding_free: auto` -> each planned micro-batch is run as one row without padding, examples kept apart by
  restarting `position_ids`. The examples of every step stay the same, so the loss does too (checked on the
  model before use, `batching.supports_packing`). Only with a variable-length attention kernel (flash-attention):
  with sdpa or eager attention the block-diagonal mask is a dense [T, T] over the whole row, so a row of k
  examples costs k times the attention of running them side by side, which is more than the padding that length
  grouping leaves (about 1% on LIMA; see bench/RESULTS.md).
  "Flash" covers transformers' `flash_attention_2/3/4` and the Hub-kernel variants (`kernels-community/flash-attn*`).
  transformers' sdpa path has no variable-length mode (it hands torch a dense mask even where torch has
  `nn.attention.varlen`), so sdpa keeps auto off.
* `kernels: auto` -> Liger-Kernel's fused lm_head + cross-entropy and RMSNorm/SwiGLU/RoPE on a CUDA device where
  `liger-kernel` is installed (`training.kernels`: exact per-token weights, same loss up to bf16 rounding).
* `group_by_length` (on by default in config.py) batches similar lengths; bin-packing (`packing: true`) stays
  opt-in because it changes which examples share an optimizer step.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from pathlib import Path

import torch

# Attention kernels that take per-example boundaries (cu_seqlens from position_ids) instead of a dense mask.
VARLEN_ATTENTION = ("flash_attention_2", "flash_attention_3", "flash_attention_4")


def is_varlen_attention(attn: str) -> bool:
    """flash_attention_2/3/4 or a Hub flash kernel (`kernels-community/flash-attn2`, ...), as transformers names them."""
    return attn in VARLEN_ATTENTION or "flash" in attn
# CPU feature flags under which oneDNN runs bf16 matmuls natively (names as in /proc/cpuinfo).
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16", "bf16")


@dataclass(frozen=True)
class FastSettings:
    precision: str  # "fp32" | "bf16": what the run uses
    padding_free: bool  # micro-batches run as one unpadded row
    packing: bool  # bin-packed rows (opt-in)
    group_by_length: bool
    reasons: tuple[str, ...] = ()  # why, for each automatic choice
    kernels: str = "none"  # "liger" | "none": the fused-kernel backend of the loss

    def summary(self) -> str:
        """One line for the run summary, e.g. `precision bf16 (auto: ...), length grouping on, padding-free off
        (auto: ...)`."""
        layout = "packing on" if self.packing else \
            f"length grouping {'on' if self.group_by_length else 'off'}, padding-free {'on' if self.padding_free else 'off'}"
        text = f"precision {self.precision}, {layout}, kernels {self.kernels}"
        return text + (f" ({'; '.join(self.reasons)})" if self.reasons else "")

    def autocast(self, device_type: str):
        """A fresh autocast context for one forward (a factory: contexts are single-use)."""
        if self.precision == "bf16":
            return torch.autocast(device_type, dtype=torch.bfloat16)
        return contextlib.nullcontext()


@functools.lru_cache(maxsize=1)
def cpu_bf16_feature() -> str | None:
    """The CPU feature that makes bf16 native here (e.g. 'avx512_bf16'), or None."""
    caps = getattr(getattr(torch._C, "_cpu", None), "_get_cpu_capability", None)
    if caps is not None:
        try:
            found = caps()
        except (RuntimeError, TypeError):
            found = {}
        for flag in CPU_BF16_FLAGS[:2]:
            if found.get(flag):
                return flag
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:  # not Linux: no cheap way to tell, and fp32 is always correct
        return None
    return bf16_flag_in_cpuinfo(text)


def bf16_flag_in_cpuinfo(text: str) -> str | None:
    """The first native-bf16 flag in /proc/cpuinfo text ('flags' lines on x86, 'Features' on Arm), or None."""
    flags = {f for line in text.splitlines() if line.split(":")[0].strip() in ("flags", "Features")
             for f in line.split(":", 1)[-1].split()}
    return next((f for f in CPU_BF16_FLAGS if f in flags), None)


def native_bf16(device: torch.device | str) -> tuple[bool, str]:
    """Whether `device` computes bf16 natively, with the reason in words."""
    device = torch.device(device)
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
        return ok, f"GPU {'supports' if ok else 'lacks'} bf16"
    if device.type == "cpu":
        feature = cpu_bf16_feature()
        return (True, f"CPU has native bf16 ({feature})") if feature else (False, "CPU lacks native bf16")
    return False, f"bf16 on {device.type} not known to be native"


def resolve_precision(requested: str, device: torch.device | str) -> tuple[str, str | None]:
    """`auto` -> `bf16` or `fp32` for `device`; an explicit choice is kept. Returns (precision, reason or None)."""
    if requested != "auto":
        return requested, None
    ok, why = native_bf16(device)
    return ("bf16" if ok else "fp32"), f"auto: {why}"


def attention_of(model) -> str:
    from imtune.training.loss import causal_lm_of

    cfg = getattr(causal_lm_of(model), "config", None)
    return str(getattr(cfg, "_attn_implementation", None) or "eager")


def resolve(cfg, model, device: torch.device | str, movable: bool = True):
    """(cfg with precision, kernels, packing and padding_free resolved, FastSettings) for this model on this device.

    `cfg.packing` / `cfg.padding_free` True are honoured only where `supports_packing` confirms the model keeps
    packed examples apart; `padding_free` None (auto) turns on only with a variable-length attention kernel. The
    check runs on `device` (flash kernels exist only there), after any Liger patches, on the model as it will
    train: the model is moved there first when `movable` (the prepare step would move it anyway); a model about to
    be sharded is checked where it is. `kernels: liger` where Liger cannot run raises `ImtuneError`.
    """
    from imtune.training.batching import supports_packing
    from imtune.training.kernels import patch_model, resolve_kernels

    device = torch.device(device)
    precision, why = resolve_precision(cfg.precision, device)
    reasons = [f"precision {why}"] if why else []
    kernels, why = resolve_kernels(cfg.kernels, device)
    reasons += [why] if why else []
    if kernels == "liger":
        reasons.append(patch_model(model))
    fast = FastSettings(precision, False, False, cfg.group_by_length)
    wants_flat = cfg.packing or cfg.padding_free is True
    attn = attention_of(model)
    auto_flat = cfg.padding_free is None and not cfg.packing and is_varlen_attention(attn)
    flat_ok = False
    if wants_flat or auto_flat:
        if movable and device.type != "cpu":
            model.to(device)
        with fast.autocast(device.type):  # flash kernels only run in half precision
            flat_ok = supports_packing(model)
        if not flat_ok:
            what = "packing" if cfg.packing else "padding-free"
            reasons.append(f"{what} off: {type(model).__name__} with {attn} attention does not keep packed "
                           f"examples apart")
    if cfg.padding_free is None and not cfg.packing:
        reasons.append(f"padding-free auto: {'on' if auto_flat and flat_ok else 'off'} with {attn} attention"
                       + ("" if is_varlen_attention(attn) else " (no variable-length kernel: a packed row would "
                          "pay a dense block mask)"))
    packing = cfg.packing and flat_ok
    padding_free = not packing and flat_ok and (cfg.padding_free is True or auto_flat)
    fast = FastSettings(precision, padding_free, packing, cfg.group_by_length, tuple(reasons), kernels)
    return cfg.replace(precision=precision, kernels=kernels, packing=packing, padding_free=padding_free), fast
